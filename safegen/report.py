"""Safety reports: one :class:`SafetyReport` per generated image or video, one :class:`GuardResult` per guard."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .guard_names import canonical_guard

#: Verdicts a guard can give for one item, from least to most severe.
VERDICTS = ("pass", "log", "steer", "block", "error")
_SEVERITY = {v: i for i, v in enumerate(VERDICTS)}


@dataclass
class GuardResult:
    """What one guard did to one item, and why.

    Attributes:
        guard: the guard's name (``"safree"``, ``"sld"``...).
        verdict: ``"pass"`` (did nothing), ``"log"`` (flagged, report only), ``"steer"`` (changed the
            generation), ``"block"`` (item replaced by the placeholder) or ``"error"`` (the guard failed; the
            item is blocked: guards fail closed).
        category: the policy category that fired, if any.
        concept: the concept phrase that fired, if the guard knows it.
        score: the deciding raw score, on the guard's own scale (a cosine, a logit, a probability); ``threshold``
            is the raw threshold it was compared against.
        risk: the deciding score as calibrated risk in [0, 1], the scale every guard shares
            (:class:`safegen.calibration.RiskScale`: 1 - the expected share of new benign prompts that would be
            flagged at that score); ``None`` where the guard has no calibration.
        budget: the benign false-positive budget the threshold was set at (the policy's ``fpr`` × sensitivity):
            the guard flags when ``risk >= 1 - budget``; ``None`` when the threshold was fixed, not calibrated.
        scores: per-category raw scores; ``risks``: per-category calibrated risks.
        trigger_tokens: prompt tokens the guard acted on (SAFREE).
        filtered_steps: how many denoising steps used filtered conditioning (SAFREE).
        stopped_at_step: the step at which generation was stopped (LVD).
        steps_saved: UNet steps not run because of this guard.
        seconds: this item's share of the guard's wall time in the call: the call's total divided over the items
            the guard worked on (an item an earlier stage blocked is not one of them); the call's total is in
            ``details["call_seconds"]``.
        reason: one human-readable sentence.

    A ``"pass"`` names no category and no concept: the closest ones a guard saw, if it reports them, sit in
    ``details["nearest"]`` (``{"category": ..., "concept": ...}``), so a report never suggests a benign prompt
    was flagged.
    """

    guard: str
    verdict: str = "pass"
    category: str | None = None
    concept: str | None = None
    score: float | None = None
    threshold: float | None = None
    risk: float | None = None
    budget: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    risks: dict[str, float] = field(default_factory=dict)
    trigger_tokens: list[str] = field(default_factory=list)
    filtered_steps: int | None = None
    stopped_at_step: int | None = None
    steps_saved: int = 0
    seconds: float = 0.0
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def settle(self, call_seconds: float, items: int) -> None:
        """Finish the result once the call is over: the per-item share of the guard's time (``items`` = how many
        items it worked on), and a pass's category and concept moved to ``details["nearest"]``."""
        self.seconds = call_seconds / max(items, 1)
        self.details = {**self.details, "call_seconds": call_seconds}
        if self.verdict == "pass" and (self.category is not None or self.concept is not None):
            self.details["nearest"] = {"category": self.category, "concept": self.concept}
            self.category = self.concept = None


@dataclass
class SafetyReport:
    """The safety report of one generated item (image or video).

    Example:
        >>> r = SafetyReport(index=0, prompt="a red bus")
        >>> r.verdict, r.blocked
        ('pass', False)
    """

    index: int
    prompt: str | None = None
    guards: list[GuardResult] = field(default_factory=list)
    unet_steps_run: int = 0
    unet_steps_saved: int = 0
    #: the caller's prompt where the pipeline rewrites it before conditioning on it (FLUX.2 [dev]'s caption
    #: upsampling); ``prompt`` is then the rewritten text, the one every guard judged
    original_prompt: str | None = None
    #: the earlier draws of this item, oldest first, when the policy redraws items a loop or output guard blocked
    #: although their prompt passed (:attr:`safegen.Policy.redraws`): each one's seed (``None``: drawn without a
    #: generator), verdict, reason and denoiser steps; the item is the last draw, its steps include theirs
    redraws: list[dict] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The most severe guard verdict (``"error"`` counts as blocked)."""
        if not self.guards:
            return "pass"
        return max((g.verdict for g in self.guards), key=_SEVERITY.__getitem__)

    @property
    def blocked(self) -> bool:
        return self.verdict in ("block", "error")

    @property
    def steered(self) -> bool:
        return self.verdict == "steer"

    @property
    def reason(self) -> str:
        """Why the item was blocked or changed (empty when no guard acted)."""
        acted = [g for g in self.guards if g.verdict != "pass"]
        acted.sort(key=lambda g: -_SEVERITY[g.verdict])
        why = [f"{g.guard}: {g.reason}" for g in acted if g.reason]
        if self.redraws:  # the returned item is not the caller's first draw: say which guard sent it back
            why.append(f"drawn {len(self.redraws) + 1} times (fresh noise each), the earlier draws blocked: "
                       + " | ".join(d["reason"] for d in self.redraws))
        return "; ".join(why)

    def result(self, guard: str) -> GuardResult | None:
        """The result of the named guard (any accepted spelling: ``"latent-guard"``, ``"latent_guard"``...), or
        ``None`` if it did not run on this item."""
        name = canonical_guard(guard) or guard
        for g in self.guards:
            if g.guard == name:
                return g
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(verdict=self.verdict, blocked=self.blocked, reason=self.reason)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        head = f"[{self.index}] {self.verdict.upper()}"
        if self.prompt is not None:
            head += f" {self.prompt!r}"
        if self.original_prompt is not None:
            head += f" (rewritten from {self.original_prompt!r})"
        lines = [head]
        for g in self.guards:
            bits = [f"{g.guard}: {g.verdict}"]
            if g.category:
                bits.append(f"category={g.category}")
            if g.concept:
                bits.append(f"concept={g.concept!r}")
            if g.score is not None:
                bits.append(f"score={g.score:.3f}" + (f"/{g.threshold:.3f}" if g.threshold is not None else ""))
            if g.risk is not None:
                bits.append(f"risk={g.risk:.3f}" + (f" (budget {g.budget:g})" if g.budget is not None else ""))
            if g.trigger_tokens:
                bits.append(f"triggers={g.trigger_tokens}")
            if g.filtered_steps is not None:
                bits.append(f"filtered_steps={g.filtered_steps}")
            if g.stopped_at_step is not None:
                bits.append(f"stopped_at={g.stopped_at_step}")
            if g.steps_saved:
                bits.append(f"steps_saved={g.steps_saved}")
            bits.append(f"{g.seconds * 1000:.1f} ms")
            lines.append("    " + ", ".join(bits) + (f" — {g.reason}" if g.reason else ""))
        lines.append(f"    UNet steps run {self.unet_steps_run}, saved {self.unet_steps_saved}")
        return "\n".join(lines)
