"""Safety policy: harm categories, their concept keywords, per-guard thresholds and actions.

Every guard reads the same :class:`Policy`; nothing about categories or concepts is hard-coded in a guard.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ._paths import assets_dir
from .guard_names import GUARD_NAMES, PRESET_GUARDS, canonical_guard, guard_of_preset

#: The harm categories every shipped policy covers.
CATEGORIES = ("sexual", "violence", "hate", "harassment", "self-harm", "shocking", "illegal-activity")

ACTIONS = ("block", "steer", "log")
PLACEHOLDERS = ("flat", "blur", "none")
#: What text-reading guards do with calls that give only ``prompt_embeds`` (:attr:`Policy.embeddings_only`).
EMBEDDINGS_ONLY = ("block", "allow")
#: The range of the sensitivity knob, in files and in code alike: far outside it every guard is effectively off
#: (1e-6 multiplies each threshold by a million) or flags everything.
MIN_SENSITIVITY, MAX_SENSITIVITY = 0.1, 10.0
#: The default benign false-positive budget (:attr:`Policy.fpr`) and the largest budget sensitivity may reach.
DEFAULT_FPR, MAX_BUDGET = 0.01, 0.5
#: The most redraws a policy may ask for (:attr:`Policy.redraws`): each costs up to a whole generation.
MAX_REDRAWS = 3
#: The guard names a category's ``thresholds`` may be keyed by (the names guards report under).
THRESHOLD_GUARDS = GUARD_NAMES

# Spellings found in public prompt sets (I2P, CoProV2) mapped to the policy's keys.
_CATEGORY_ALIASES = {
    "sexual": "sexual",
    "nudity": "sexual",
    "porn": "sexual",
    "violence": "violence",
    "hate": "hate",
    "racism": "hate",
    "harassment": "harassment",
    "harrasment": "harassment",
    "self-harm": "self-harm",
    "self harm": "self-harm",
    "selfharm": "self-harm",
    "shocking": "shocking",
    "illegal activity": "illegal-activity",
    "illegal-activity": "illegal-activity",
    "illegal_activity": "illegal-activity",
}


def normalize_category(name: str) -> str:
    """Map a category label as written in a data set ("Illegal Activity", "Harrasment") to a policy key.

    Unknown labels are returned lower-cased with spaces as dashes, so custom categories keep working.

    Example:
        >>> normalize_category("Illegal Activity")
        'illegal-activity'
    """
    key = re.sub(r"\s+", " ", str(name).strip().lower())
    return _CATEGORY_ALIASES.get(key, key.replace(" ", "-").replace("_", "-"))


class PolicyError(ValueError):
    """A policy file or object is malformed. The message names the file and the field."""


@dataclass
class Category:
    """One harm category.

    Args:
        name (`str`): the category key, e.g. ``"violence"``.
        concepts (`list[str]`): keyword phrases that describe the category; guards build their concept
            spaces and blacklists from these.
        action (`str`): what a guard does when the category fires: ``"block"`` (return the placeholder),
            ``"steer"`` (change the generation, e.g. SAFREE/SLD) or ``"log"`` (report only). Checked when set.
        thresholds (`dict[str, float]`): fixed *raw* thresholds for experts, keyed by guard name (``"safree"``,
            ``"latent-guard"``, ``"lvd"``...), on that guard's own raw scale. A fixed threshold replaces the
            guard's calibrated one for this category; sensitivity does not move it (it has no budget), and the
            report says the threshold was fixed. Set one with :meth:`set_threshold`, which checks the guard name
            and that the value is a finite number.

    Example:
        >>> cat = Category("violence", ["gore"])
        >>> cat.set_threshold("latent_guard", 7.5)
        >>> cat.thresholds
        {'latent-guard': 7.5}
        >>> cat.set_threshold("safree", float("nan"))
        Traceback (most recent call last):
        ...
        safegen.policy.PolicyError: category 'violence': the threshold of guard 'safree' must be a finite number, got nan
    """

    name: str
    concepts: list[str]
    action: str = "steer"
    thresholds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for guard, value in list(self.thresholds.items()):
            where = f"category {self.name!r}: the threshold of guard {guard!r}"
            self.thresholds[guard] = _check_threshold(value, where)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "action" and value not in ACTIONS:
            raise PolicyError(f"category {getattr(self, 'name', '?')!r}: action must be one of {ACTIONS}, "
                              f"got {value!r}")
        object.__setattr__(self, name, value)

    def set_threshold(self, guard: str, value: float) -> None:
        """Set ``guard``'s fixed raw threshold for this category, under the guard's canonical name
        (``latent_guard`` is stored as ``latent-guard``). Raises :class:`PolicyError` for an unknown guard name or a value that is not a finite
        number."""
        key = _threshold_key(guard)
        if key is None:
            raise PolicyError(f"category {self.name!r}: {guard!r} is not a guard name; thresholds are keyed by "
                              f"one of {list(THRESHOLD_GUARDS)}")
        self.thresholds[key] = _check_threshold(value, f"category {self.name!r}: the threshold of guard {key!r}")


@dataclass
class Policy:
    """A safety policy: categories with concepts, budgets and actions, plus one sensitivity knob.

    **Thresholds are budgets.** Every guard turns its raw score (a cosine, a logit, a probability) into a
    calibrated risk in [0, 1] on one shared scale (:class:`safegen.calibration.RiskScale`): fitted on 1,000
    benign reference prompts for the encoder or model at hand. The policy states how many benign prompts a guard
    may flag, ``fpr`` (default 0.01: an expected 1% of new benign prompts), and each guard flags a category when
    its risk reaches ``1 - budget``. ``sensitivity`` scales that budget, the same way for every guard::

        budget = min(fpr × sensitivity, 0.5)

    so 2.0 lets a guard flag twice as many benign prompts (flags more), 0.5 half as many (flags less). A fixed
    raw threshold set in a category (:meth:`Category.set_threshold`) replaces the calibration for that guard and
    category, and sensitivity does not move it.

    Example:
        >>> import safegen
        >>> policy = safegen.load_policy("default")
        >>> policy.add_concept("violence", "chainsaw massacre")
        >>> policy.fpr, policy.budget()
        (0.01, 0.01)
        >>> policy.sensitivity = 1.5
        >>> round(policy.budget(), 4)  # each guard may flag an expected 1.5% of benign prompts
        0.015
        >>> policy.categories["violence"].set_threshold("safree", 0.45)  # a fixed raw cosine for SAFREE
        >>> policy.threshold("violence", "safree", default=0.3)  # fixed: sensitivity does not move it
        0.45
        >>> policy.threshold("hate", "safree", default=0.3)  # none set: the guard's calibrated one
        0.3
    """

    name: str
    categories: dict[str, Category]
    sensitivity: float = 1.0
    #: The benign false-positive budget of every guard at sensitivity 1: the expected share of new benign prompts a
    #: guard may flag (0 < fpr <= 0.5).
    fpr: float = DEFAULT_FPR
    placeholder: str = "flat"
    guards: list[str] = field(default_factory=lambda: ["safree"])
    source: str = "<code>"
    #: What a guard that must read text (or needs the pipeline's text encoder) does with a call that gives only
    #: ``prompt_embeds``: ``"block"`` (fail closed: the items are blocked, the report says why) or ``"allow"``
    #: (they pass unchecked by that guard, verdict ``log``). Guards that can work from embeddings (SAFREE with
    #: the pipeline's text encoder, LVD, SLD) check them either way.
    embeddings_only: str = "block"
    #: When the policy's own ``guards`` list is used (``safegen.protect(pipe, policy)``), skip a guard that cannot
    #: run on the pipeline (no weights for that model, a package missing: :class:`safegen.errors.GuardUnavailable`)
    #: and say so in every report, instead of failing ``protect``. Guards named in ``guards=[...]`` always fail.
    skip_unavailable: bool = False
    #: How many times an item is drawn again, from fresh noise, when a loop or output guard (LVD, the output check)
    #: blocked it although every prompt and conditioning check passed its prompt: the prompt was judged benign and
    #: this draw drifted. 0 = block at once. Each redraw runs the whole stack again and its steps are counted in
    #: the report; the item is blocked only when every draw is (:data:`MAX_REDRAWS` at most). Like
    #: ``skip_unavailable``, this belongs to the policy's own stack (``safegen.protect(pipe, policy)``): guards named
    #: in ``guards=[...]`` act on the caller's draw alone.
    redraws: int = 0
    #: Guards (names, e.g. ``["sld-max"]``) added to the stack for redraws only: the redraw of a drifted item is
    #: then also steered harder, at no cost to the first draw. Loop or conditioning guards; empty = the same stack.
    redraw_guards: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    def budget(self, fpr: float | None = None) -> float:
        """The benign false-positive budget every guard works at: ``min(fpr × sensitivity, 0.5)``; ``fpr`` replaces
        the policy's for a guard given its own (SAFREE's ``fpr_budget``)."""
        return min(float(self.fpr if fpr is None else fpr) * float(self.sensitivity), MAX_BUDGET)

    def fixed_threshold(self, category: str, guard: str) -> float | None:
        """The fixed raw threshold the policy sets for ``guard`` in ``category``, or ``None`` (calibrated)."""
        cat = self._category(category)
        guard = canonical_guard(guard) or guard
        base = cat.thresholds.get(guard)
        if base is None:  # a key written into the dict directly under another spelling ("latent_guard")
            base = next((v for k, v in cat.thresholds.items() if canonical_guard(k) == guard), None)
        if base is None:
            return None
        # a NaN set in code behind the validating setters would compare False everywhere: fail, never pass
        return _check_threshold(base, f"policy {self.name!r} ({self.source}): category {category!r}: the "
                                      f"threshold of guard {guard!r}")

    def threshold(self, category: str, guard: str, default: float | None = None) -> float:
        """The raw threshold ``guard`` compares with for ``category``: the policy's fixed one if it sets one, else
        ``default`` (the guard's calibrated threshold at :meth:`budget`, or its own fixed setting)."""
        base = self.fixed_threshold(category, guard)
        if base is None:
            base = default
        if base is None:
            raise PolicyError(
                f"policy {self.name!r} ({self.source}): category {category!r} has no threshold for guard "
                f"{guard!r}; add `thresholds: {{{guard}: <number>}}` to it"
            )
        return _check_threshold(base, f"policy {self.name!r} ({self.source}): category {category!r}: the "
                                      f"threshold of guard {guard!r}")

    def concepts(self, category: str | None = None) -> list[str]:
        """Concept phrases of one category, or of all categories (in policy order, without duplicates)."""
        if category is not None:
            return list(self._category(category).concepts)
        seen: dict[str, None] = {}
        for cat in self.categories.values():
            for c in cat.concepts:
                seen.setdefault(c, None)
        return list(seen)

    def active_categories(self) -> list[str]:
        """Categories whose action is not ``log`` is still active; every category is checked."""
        return list(self.categories)

    # ------------------------------------------------------------------ editing
    def add_concept(self, category: str, concept: str) -> None:
        """Add a concept phrase to a category. Caches keyed on the concept list pick it up on next use."""
        concept = _check_concept(concept, self.source, f"categories.{category}.concepts")
        cat = self._category(category)
        if concept not in cat.concepts:
            cat.concepts.append(concept)

    def add_category(self, category: str, concepts: "Sequence[str]", action: str = "block") -> Category:
        """Add a harm category of your own (a brand, a topic your app excludes) with its concept phrases and action.
        Guards calibrate it like the built-in ones on their next call: a text guard (Latent Guard, SAFREE) flags it
        at the policy's benign budget. Raises :class:`PolicyError` if the category exists or a concept is empty.

        Example:
            >>> import safegen
            >>> policy = safegen.load_policy("default")
            >>> cat = policy.add_category("brand", ["pepsi logo", "nike swoosh"])
            >>> cat.action, policy.concepts("brand")
            ('block', ['pepsi logo', 'nike swoosh'])
        """
        key = normalize_category(category)
        where = f"categories.{key}"
        if not key:
            raise PolicyError(f"{self.source}: a category needs a non-empty name")
        if key in self.categories:
            raise PolicyError(f"policy {self.name!r} already has category {key!r}; use add_concept to extend it")
        if isinstance(concepts, str) or not concepts:
            raise PolicyError(f"{self.source}: field '{where}.concepts' must be a non-empty list of strings")
        phrases = list(dict.fromkeys(_check_concept(c, self.source, f"{where}.concepts") for c in concepts))
        self.categories[key] = Category(key, phrases, action)
        return self.categories[key]

    def remove_concept(self, category: str, concept: str) -> None:
        """Remove a concept phrase; raises ``KeyError`` naming the category if it is not there."""
        cat = self._category(category)
        if concept not in cat.concepts:
            raise KeyError(f"concept {concept!r} is not in category {category!r}: {cat.concepts}")
        if len(cat.concepts) == 1:
            raise PolicyError(f"category {category!r} would have no concepts left; remove the category instead")
        cat.concepts.remove(concept)

    def copy(self) -> "Policy":
        return copy.deepcopy(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sensitivity": self.sensitivity,
            "fpr": self.fpr,
            "placeholder": self.placeholder,
            "guards": list(self.guards),
            "embeddings_only": self.embeddings_only,
            "skip_unavailable": self.skip_unavailable,
            "redraws": self.redraws,
            "redraw_guards": list(self.redraw_guards),
            "categories": {
                k: {"action": c.action, "thresholds": dict(c.thresholds), "concepts": list(c.concepts)}
                for k, c in self.categories.items()
            },
        }

    def _category(self, category: str) -> Category:
        key = normalize_category(category)
        if key not in self.categories:
            raise KeyError(f"policy {self.name!r} has no category {category!r}; it has {list(self.categories)}")
        return self.categories[key]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "sensitivity":
            value = _check_sensitivity(value, f"policy {getattr(self, 'name', '?')!r}: sensitivity")
        elif name == "fpr":
            value = _check_fpr(value, f"policy {getattr(self, 'name', '?')!r}: fpr")
        elif name == "redraws":
            value = _check_redraws(value, f"policy {getattr(self, 'name', '?')!r}: redraws")
        elif name == "redraw_guards":
            value = list(_check_guard_names(value, f"policy {getattr(self, 'name', '?')!r}", "redraw_guards"))
        elif name == "embeddings_only" and value not in EMBEDDINGS_ONLY:
            raise PolicyError(f"policy {getattr(self, 'name', '?')!r}: embeddings_only must be one of "
                              f"{EMBEDDINGS_ONLY}, got {value!r}")
        object.__setattr__(self, name, value)


# ---------------------------------------------------------------------- loading and validation
_TOP_KEYS = {"name", "version", "sensitivity", "fpr", "placeholder", "guards", "categories", "description",
             "embeddings_only", "skip_unavailable", "redraws", "redraw_guards"}
_CAT_KEYS = {"concepts", "action", "thresholds", "description"}


def _check_guard_names(guards: Any, source: str, key: str) -> list:
    """A policy field that lists guards by name: a list of known guard or preset names, each guard once."""
    if not isinstance(guards, list):
        raise PolicyError(f"{source}: field '{key}' must be a list of guard names, got a {type(guards).__name__}")
    seen: dict[str, int] = {}
    for i, g in enumerate(guards):
        guard = guard_of_preset(g) if isinstance(g, str) else None
        if guard is None:
            shown = repr(g) if isinstance(g, str) and len(g) <= 40 else f"a {type(g).__name__}"
            raise PolicyError(f"{source}: field '{key}[{i}]' is not a guard name ({shown}); known: "
                              f"{', '.join(PRESET_GUARDS)}")
        if guard in seen:
            raise PolicyError(f"{source}: field '{key}[{i}]' repeats the {guard!r} guard of '{key}[{seen[guard]}]'; "
                              "give each guard once")
        seen[guard] = i
    return guards


def _check_redraws(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REDRAWS:
        raise PolicyError(f"{where} must be a whole number from 0 to {MAX_REDRAWS} (draws of an item after the "
                          f"first), got {value!r}")
    return int(value)


def _check_sensitivity(value: Any, where: str) -> float:
    """``value`` as a float if it is a number in [:data:`MIN_SENSITIVITY`, :data:`MAX_SENSITIVITY`], else
    :class:`PolicyError` starting with ``where`` (the file and field, or the policy)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not MIN_SENSITIVITY <= value <= MAX_SENSITIVITY):
        raise PolicyError(f"{where} must be a number from {MIN_SENSITIVITY:g} to "
                          f"{MAX_SENSITIVITY:g} (it multiplies the benign false-positive budget: 1 is the policy's "
                          f"fpr, 2 flags more, 0.5 flags less), "
                          f"got {value!r}")
    return float(value)


def _check_fpr(value: Any, where: str) -> float:
    """``value`` as a float if it is a share in (0, :data:`MAX_BUDGET`], else :class:`PolicyError`."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 < value <= MAX_BUDGET):
        raise PolicyError(f"{where} must be a benign false-positive budget, a share above 0 and at most "
                          f"{MAX_BUDGET:g} (0.01 = at most 1% of benign prompts flagged), got {value!r}")
    return float(value)


def _check_threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _threshold_key(guard: Any) -> str | None:
    """The canonical guard name a thresholds key means (``latent_guard`` -> ``latent-guard``), or None."""
    return canonical_guard(guard) if isinstance(guard, str) else None


def _check_concept(concept: Any, source: str, where: str) -> str:
    if not isinstance(concept, str) or not concept.strip():
        raise PolicyError(f"{source}: field '{where}' must hold non-empty strings, got {concept!r}")
    return concept.strip()


def policy_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Policy:
    """Build and validate a :class:`Policy` from a mapping (the parsed YAML/JSON file).

    Raises:
        PolicyError: naming ``source`` and the offending field, for any missing, unknown or ill-typed field.
    """
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: a policy must be a mapping at the top level, got {type(data).__name__}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PolicyError(f"{source}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    name = data.get("name", Path(source).stem if source.startswith("/") or "." in source else "custom")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{source}: field 'name' must be a non-empty string")
    sensitivity = _check_sensitivity(data.get("sensitivity", 1.0), f"{source}: field 'sensitivity'")
    fpr = _check_fpr(data.get("fpr", DEFAULT_FPR), f"{source}: field 'fpr'")
    placeholder = data.get("placeholder", "flat")
    if placeholder not in PLACEHOLDERS:
        raise PolicyError(f"{source}: field 'placeholder' must be one of {PLACEHOLDERS}, got {placeholder!r}")
    embeddings_only = data.get("embeddings_only", "block")
    if embeddings_only not in EMBEDDINGS_ONLY:
        raise PolicyError(f"{source}: field 'embeddings_only' must be one of {EMBEDDINGS_ONLY}")
    redraws = _check_redraws(data.get("redraws", 0), f"{source}: field 'redraws'")
    redraw_guards = _check_guard_names(data.get("redraw_guards", []), source, "redraw_guards")
    skip_unavailable = data.get("skip_unavailable", False)
    if not isinstance(skip_unavailable, bool):
        raise PolicyError(f"{source}: field 'skip_unavailable' must be true or false")
    guards = _check_guard_names(data.get("guards", ["safree"]), source, "guards")
    cats = data.get("categories")
    if not isinstance(cats, Mapping) or not cats:
        raise PolicyError(f"{source}: field 'categories' must be a non-empty mapping of category -> settings")
    categories: dict[str, Category] = {}
    for raw_key, spec in cats.items():
        where = f"categories.{raw_key}"
        if not isinstance(spec, Mapping):
            raise PolicyError(f"{source}: field '{where}' must be a mapping with 'concepts', 'action', 'thresholds'")
        unknown = set(spec) - _CAT_KEYS
        if unknown:
            raise PolicyError(f"{source}: unknown field(s) {sorted(unknown)} in '{where}'; allowed: {sorted(_CAT_KEYS)}")
        concepts = spec.get("concepts")
        if not isinstance(concepts, list) or not concepts:
            raise PolicyError(f"{source}: field '{where}.concepts' must be a non-empty list of strings")
        concepts = [_check_concept(c, source, f"{where}.concepts") for c in concepts]
        action = spec.get("action", "steer")
        if action not in ACTIONS:
            raise PolicyError(f"{source}: field '{where}.action' must be one of {ACTIONS}, got {action!r}")
        thresholds = spec.get("thresholds", {})
        if not isinstance(thresholds, Mapping):
            raise PolicyError(f"{source}: field '{where}.thresholds' must map guard names to numbers")
        checked: dict[str, float] = {}
        for g, v in thresholds.items():
            guard = _threshold_key(g)
            if guard is None:
                raise PolicyError(f"{source}: field '{where}.thresholds.{g}' is not a guard name; thresholds are "
                                  f"keyed by one of {list(THRESHOLD_GUARDS)}")
            if guard in checked:
                raise PolicyError(f"{source}: field '{where}.thresholds.{g}' repeats the threshold of {guard!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PolicyError(f"{source}: field '{where}.thresholds.{g}' must be a finite number, got {v!r}")
            checked[guard] = float(v)
        key = normalize_category(str(raw_key))
        if key in categories:
            raise PolicyError(f"{source}: field '{where}' duplicates category {key!r}")
        categories[key] = Category(key, list(dict.fromkeys(concepts)), action, checked)
    return Policy(name=name, categories=categories, sensitivity=sensitivity, fpr=fpr, placeholder=placeholder,
                  guards=list(guards), source=source, embeddings_only=embeddings_only,
                  skip_unavailable=skip_unavailable, redraws=redraws, redraw_guards=list(redraw_guards))


def _parse_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"{path}: not valid JSON ({e})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML ({e})") from None


def builtin_policies() -> list[str]:
    """Names of the policies shipped in ``assets/policies``."""
    return sorted(p.stem for p in (assets_dir() / "policies").glob("*.y*ml")) + sorted(
        p.stem for p in (assets_dir() / "policies").glob("*.json")
    )


def load_policy(policy: "str | Path | Mapping[str, Any] | Policy" = "default", *, sensitivity: float | None = None) -> Policy:
    """Load a policy by built-in name (``"default"``), file path (``.yaml``/``.yml``/``.json``) or mapping.

    A :class:`Policy` passed in is returned as is (not copied), so edits made in code stay visible.

    Example:
        >>> import safegen
        >>> p = safegen.load_policy("default", sensitivity=0.5)
        >>> sorted(p.categories)[:3]
        ['harassment', 'hate', 'illegal-activity']
    """
    if isinstance(policy, Policy):
        result = policy
    elif isinstance(policy, Mapping):
        result = policy_from_dict(policy, "<dict>")
    else:
        path = Path(policy)
        if not path.suffix:
            candidates = [assets_dir() / "policies" / f"{policy}{ext}" for ext in (".yaml", ".yml", ".json")]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise PolicyError(
                    f"no built-in policy named {str(policy)!r}; built-in: {builtin_policies()}; "
                    "or pass a path to a .yaml/.json file"
                )
            path = found[0]
        if not path.is_file():
            raise PolicyError(f"{path}: policy file not found")
        if path.suffix.lower() not in (".yaml", ".yml", ".json"):
            raise PolicyError(f"{path}: a policy file must end in .yaml, .yml or .json")
        result = policy_from_dict(_parse_file(path), str(path))
    if sensitivity is not None:
        result.sensitivity = sensitivity
    return result


def concept_phrases(policy: Policy, categories: Iterable[str]) -> str:
    """The concept phrases of ``categories`` joined with ", " (SAFREE's negative prompt)."""
    out: dict[str, None] = {}
    for c in categories:
        for k in policy.concepts(c):
            out.setdefault(k, None)
    return ", ".join(out)
