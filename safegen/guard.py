"""The guard contract every safety method implements (part of the core: the protected call runs guards through it,
and each guard in :mod:`safegen.guards` is one subclass)."""

from __future__ import annotations

import math
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from .errors import GuardError, guarded  # noqa: F401  (re-exported: guards raise and wrap with these)

if TYPE_CHECKING:  # pragma: no cover
    from .protection import Call, Protection

#: How strongly a policy action acts: when several flagged categories disagree, the strongest one applies.
ACTION_RANK = {"log": 0, "steer": 1, "block": 2}

#: Order in which guards run inside one call, whatever order the user lists them in.
STAGES = ("prompt", "conditioning", "loop", "weights", "output")


class Guard:
    """Base class of all guards: a small config (its dataclass fields) plus the code that hooks it in.

    **Lifecycle**

    * :meth:`attach` once at :func:`safegen.protect` time: check the pipeline is supported, load weights, cache
      what does not depend on the prompt. What belongs to *this pipeline* goes in
      ``protection.set_state(self, obj)`` (typed, per guard), never on the guard object: one guard object may
      protect two pipelines.
    * per pipeline call: :meth:`prepare` before the loop (may change conditioning, register per-call module
      hooks through :mod:`safegen.hooks` with ``call.defer(handle.remove)``, or block items); :meth:`step_end`
      after each denoising step (only if ``tensor_inputs`` is not ``None``); :meth:`finish` after the loop (fills
      reports); :meth:`after_decode` on the assembled output (stage ``"output"``). Per-call state goes in
      ``call.set_state(self, obj)``.
    * :meth:`detach` at :func:`safegen.unprotect` time: restore anything :meth:`attach` changed.

    Anything a guard raises is turned into a fail-closed block of the affected items.

    **Metadata** (class attributes, read by the CLI's help, the demo and the docs): :attr:`name` (the one
    canonical name: reports, policy threshold keys), :attr:`stage`, :attr:`summary`, :attr:`weights` (what
    weight files it needs, ``None`` for none) and :attr:`pipelines` (where it works).

    **Settings** round-trip: :meth:`to_dict` gives ``{"guard": name, **fields}`` (stored in every
    ``report.json`` / ``metrics.json``) and ``Guard.from_dict`` / :func:`safegen.guards.guard_from_dict` rebuild it.
    """

    name: ClassVar[str] = "guard"
    stage: ClassVar[str] = "conditioning"
    #: One line: what the guard does.
    summary: ClassVar[str] = ""
    #: The weight files it needs (``None``: none).
    weights_needed: ClassVar[str | None] = None
    #: The pipelines it works on.
    pipelines: ClassVar[str] = "every supported pipeline"
    #: Callback tensors the guard needs in :meth:`step_end`; ``None`` means it has no step hook.
    tensor_inputs: ClassVar[tuple[str, ...] | None] = None
    #: Whether :meth:`prepare` reads ``call.conditioning()`` (computed before any guard runs).
    needs_conditioning: ClassVar[bool] = False

    def attach(self, protection: "Protection") -> None:
        pass

    def detach(self, protection: "Protection") -> None:
        pass

    def prepare(self, call: "Call") -> None:
        pass

    def step_end(self, call: "Call", step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def finish(self, call: "Call") -> None:
        pass

    def after_decode(self, call: "Call", out: Any, output_type: str) -> None:
        """Stage ``"output"``: judge (and replace) the decoded items of ``out`` in place."""

    def weight_files(self) -> list:
        """The weight files this guard reads (paths; empty for a guard without weights): an evaluation run
        fingerprints them so that a resume on other weights is refused."""
        return []

    # ------------------------------------------------------------------ settings
    def config_dict(self) -> dict[str, Any]:
        """The guard's settings (its dataclass fields)."""
        if not is_dataclass(self):
            return {}
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.init and not f.name.startswith("_")}

    def to_dict(self) -> dict[str, Any]:
        """``{"guard": name, **settings}``: JSON-ready, and :meth:`from_dict` rebuilds an equal guard.

        Example:
            >>> from safegen.guards import SLD, guard_from_dict
            >>> d = SLD.strong().to_dict()
            >>> d["guard"], d["warmup_steps"], guard_from_dict(d) == SLD.strong()
            ('sld', 7, True)
        """
        return {"guard": self.name, **self.config_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Guard":
        """The guard of these settings (``data`` from :meth:`to_dict`; its ``"guard"`` key, if any, must name
        this class's guard)."""
        data = dict(data)
        name = data.pop("guard", cls.name)
        if name != cls.name:
            raise ValueError(f"settings of guard {name!r} given to {cls.__name__} ({cls.name!r})")
        known = {f.name for f in fields(cls) if f.init} if is_dataclass(cls) else set()
        # values derived from the settings (e.g. SLD's ``preset`` name) are reported by to_dict, not set
        derived = {k for k in data if isinstance(getattr(cls, k, None), property)}
        data = {k: v for k, v in data.items() if k not in derived}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting(s) {unknown}; its settings: {sorted(known)}")
        return cls(**data)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items())
        return f"{type(self).__name__}({settings})"


def _plain(value: Any) -> Any:
    """A setting as JSON-ready data (tuples as lists; objects that are not data as their class name)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Guard):
        return value.to_dict()
    return getattr(value, "name", type(value).__name__)


# ---------------------------------------------------------------------- one validator for every guard's settings
def check_number(owner: str, field_name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 integer: bool = False, optional: bool = False, open_low: bool = False, open_high: bool = False):
    """A guard setting that must be a (finite) number in a range; ``ValueError`` naming ``owner(field=...)`` and
    the range otherwise. ``integer`` asks for an int, ``optional`` lets ``None`` through, ``open_low`` /
    ``open_high`` exclude the bounds.

    Example:
        >>> check_number("LVD", "window", 5, low=1, integer=True)
        5
        >>> check_number("LVD", "ratio", 1.5, low=0, high=1, open_low=True)
        Traceback (most recent call last):
        ...
        ValueError: LVD(ratio=...) must be a number in (0, 1], got 1.5
    """
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    lo = "" if low is None else f"{'(' if open_low else '['}{low:g}"
    hi = "" if high is None else f"{high:g}{')' if open_high else ']'}"
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (lo or hi) else ""
    wrong = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
    if not wrong:
        wrong = not math.isfinite(value)
        wrong = wrong or (low is not None and (value <= low if open_low else value < low))
        wrong = wrong or (high is not None and (value >= high if open_high else value > high))
    if wrong:
        raise ValueError(f"{owner}({field_name}=...) must be {kind}{where}{' or None' if optional else ''}, "
                         f"got {value!r}")
    return value


def check_choice(owner: str, field_name: str, value: Any, choices) -> Any:
    """A guard setting that must be one of ``choices``; ``ValueError`` naming them otherwise."""
    if value not in choices:
        raise ValueError(f"{owner}({field_name}=...) must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def has_text_encoder(pipe) -> bool:
    """Whether the pipeline has a text encoder with its tokenizer (a pipeline built with ``text_encoder=None``
    that is fed only ``prompt_embeds`` has none)."""
    pairs = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
    return any(getattr(pipe, te, None) is not None and getattr(pipe, tok, None) is not None for te, tok in pairs)


def unreadable_call(call, guard: str, why: str) -> None:
    """What a guard does with a call it cannot read (embeddings only, and it needs text or a text encoder): the
    policy's ``embeddings_only`` setting decides. ``"block"`` (the default: fail closed) blocks every item;
    ``"allow"`` lets them through unchecked, the report saying so (verdict ``log``)."""
    mode = getattr(call.policy, "embeddings_only", "block")
    if mode == "allow":
        for item in range(call.n_items):
            res = call.result(item, guard)
            res.verdict = "log"
            res.reason = f"not checked: {why} (policy embeddings_only: allow)"
        return
    for b in range(call.batch_size):
        if not call.blocked_prompts[b]:
            call.block_prompt(b, guard, f"cannot check this call: {why}; blocked (policy embeddings_only: block)")
