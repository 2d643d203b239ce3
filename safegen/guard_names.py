"""The guards' names: one canonical name per guard (reports, policy threshold keys, the CLI, the demo), the
spellings accepted for it on input, and the named presets. Strings only: a leaf module (it imports nothing of
safegen), so the policy loader can validate names without importing the guards; :mod:`safegen.guards` maps the
same names to the guard classes (a test keeps the two in step).

Example:
    >>> from safegen.guard_names import canonical_guard, guard_of_preset, normalize_preset
    >>> canonical_guard("LatentGuard"), canonical_guard("latent_guard"), canonical_guard("nope")
    ('latent-guard', 'latent-guard', None)
    >>> normalize_preset("SLD_Strong"), guard_of_preset("sld-strong")
    ('sld-strong', 'sld')
"""

from __future__ import annotations

import re

#: THE guard registry: canonical name -> (module of :mod:`safegen.guards`, class), in stage order. Adding a guard is
#: one file in ``safegen/guards/`` plus one line here; everything else (policy keys, the CLI, the demo, reports)
#: reads this table. Strings only: the classes load on first use.
GUARDS: dict[str, tuple[str, str]] = {
    "latent-guard": ("latent_guard", "LatentGuard"),
    "safree": ("safree", "Safree"),
    "sld": ("sld", "SLD"),
    "lvd": ("lvd", "LVD"),
    "safetydpo": ("safetydpo", "SafetyDPO"),
    "output": ("output", "OutputGuard"),
}

#: Named settings: preset -> (guard, settings or the name of a classmethod of the guard that makes them). A guard's
#: own name is also a preset (of its default settings).
PRESETS: dict[str, tuple[str, object]] = {
    "safree-lra": ("safree", {"reattention": True}),
    "safree-official": ("safree", {"official": True}),
    "sld-weak": ("sld", "weak"),
    "sld-medium": ("sld", "medium"),
    "sld-strong": ("sld", "strong"),
    "sld-max": ("sld", "max"),
    # the default policy's output check: the model's trained classifier where it has one (the embedded model's
    # ships), else NudeNet where installed; never the world oracle, which evaluations judge with
    "output-check": ("output", {"oracle": "auto", "action": "placeholder"}),
    # post-hoc output checks with the default model's world oracle (the judge itself: for studying the output
    # guard's actions, not as protection) and with NudeNet or the classifier explicitly
    "output-check-world": ("output", {"action": "placeholder"}),
    "output-blur": ("output", {"action": "blur"}),
    "output-regenerate": ("output", {"action": "regenerate"}),
    "output-check-nudenet": ("output", {"oracle": "nudenet", "action": "placeholder"}),
    "output-check-classifier": ("output", {"oracle": "classifier", "action": "placeholder"}),
}

#: The canonical name of every guard, in stage order.
GUARD_NAMES = tuple(GUARDS)

#: Other spellings accepted on input (after lower-casing and ``_`` → ``-``, dashes dropped): the class names.
_ALIASES = {cls.lower(): name for name, (_, cls) in GUARDS.items()}

#: Every preset name accepted by ``protect(guards=[...])``, a policy's ``guards:`` list and the CLI's
#: ``--guards``, mapped to the guard it makes, each guard followed by its presets.
PRESET_GUARDS: dict[str, str] = {}
for _name in GUARDS:
    PRESET_GUARDS[_name] = _name
    PRESET_GUARDS.update({p: g for p, (g, _) in PRESETS.items() if g == _name})
del _name


def normalize_preset(name: str) -> str:
    """A name as written by a user (any case, ``_`` or ``-``, a class name) in the canonical spelling."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", str(name).strip())  # LatentGuard -> Latent-Guard
    key = text.lower().replace("_", "-")
    return _ALIASES.get(key.replace("-", ""), key)


def canonical_guard(name: str) -> str | None:
    """The canonical name of the guard ``name`` spells (``"latent_guard"``, ``"LatentGuard"`` →
    ``"latent-guard"``), or ``None``."""
    key = normalize_preset(name)
    return key if key in GUARD_NAMES else None


def guard_of_preset(name: str) -> str | None:
    """The guard a preset name makes, or ``None`` when the name is not a known preset or guard."""
    key = normalize_preset(name)
    return PRESET_GUARDS.get(key) or canonical_guard(key)
