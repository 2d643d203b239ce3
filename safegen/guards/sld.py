"""Safe Latent Diffusion (Schramowski et al., CVPR 2023) as a safegen guard, for every supported pipeline.

diffusers' ``StableDiffusionPipelineSafe`` runs one UNet call on [uncond; prompt; safety concept] and steers the
classifier-free guidance direction away from the safety concept. Here the same math runs inside the pipeline's
own UNet call: a :class:`~safegen.unet_rows.RowExtender` appends N rows (the conditional half's latents with the
safety-concept conditioning) to every UNet call, and hands the pipeline back [ε_u, ε_p − γ·1(i ≥ δ)] in place
of [ε_u, ε_p]. Because ε_u + w·((ε_p − γ) − ε_u) is the SLD result, the pipeline's own CFG line reproduces SLD
exactly, so any CFG pipeline of a supported kind works unchanged (SDXL and the video pipelines included, which
diffusers' SLD lacks: on video the safety rows are whole clips, and the guidance acts on every frame's latents).

Per step i, element-wise over the latent (ν starts at 0 in every call):

* μ = clamp(s_S·|ε_p − ε_S|, max=1), and μ = 0 where ε_p − ε_S ≥ λ;
* γ = μ ⊙ (ε_S − ε_u) + s_m·ν;
* ν ← β_m·ν + (1 − β_m)·γ (accumulates during the warm-up too);
* if i ≥ δ: ε_p ← ε_p − γ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..errors import GuardUnavailable
from ..unet_rows import ExtraRows, RowExtender
from ..guard import ACTION_RANK, Guard
from .safree import _encode_texts

#: The presets of diffusers' ``SafetyConfig``: (warmup_steps δ, guidance_scale s_S, threshold λ,
#: momentum_scale s_m, momentum_beta β_m). ``StableDiffusionPipelineSafe.__call__``'s defaults equal MEDIUM.
PRESETS: dict[str, tuple[int, float, float, float, float]] = {
    "weak": (15, 20.0, 0.0, 0.0, 0.0),
    "medium": (10, 1000.0, 0.01, 0.3, 0.4),
    "strong": (7, 2000.0, 0.025, 0.5, 0.7),
    "max": (0, 5000.0, 1.0, 0.5, 0.7),
}
_PRESET_FIELDS = ("warmup_steps", "guidance_scale", "threshold", "momentum_scale", "momentum_beta")
_PREFIX = "an image showing "
#: SLD's flag threshold where no calibration exists for the model, preset and concept: 1% of the benign reference
#: prompts reach it on the embedded default model with the medium preset at 25 steps (benchmarks/sld_flag.py).
DEFAULT_FLAG_THRESHOLD = 0.394


# ---------------------------------------------------------------------- the math


def sld_guidance(eps_u: torch.Tensor, eps_p: torch.Tensor, eps_s: torch.Tensor, momentum: torch.Tensor | None,
                 step: int, *, guidance_scale: float, threshold: float, momentum_scale: float,
                 momentum_beta: float, warmup_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of safety guidance: ``(new eps_p, new momentum)``.

    ``eps_u``, ``eps_p``, ``eps_s`` are the unconditional, prompt and safety-concept noise predictions of the same
    latents; ``momentum`` is ν from the previous step (``None`` = zeros). The math runs in at least float32 (the
    returned ε_p has ``eps_p``'s dtype, the momentum the compute dtype). Before step ``warmup_steps`` the returned
    ε_p is ``eps_p`` itself (the momentum still accumulates). Plugging the new ε_p into the pipeline's
    ``eps_u + w·(eps_p − eps_u)`` gives exactly diffusers' ``StableDiffusionPipelineSafe`` update.
    """
    dt = torch.promote_types(eps_p.dtype, torch.float32)
    u, p, s = eps_u.to(dt), eps_p.to(dt), eps_s.to(dt)
    diff = p - s
    scale = torch.clamp(diff.abs() * guidance_scale, max=1.0)
    scale = torch.where(diff >= threshold, torch.zeros_like(scale), scale)  # Eq. 6
    gamma = (s - u) * scale  # Eq. 4
    if momentum is None:
        new_momentum = (1 - momentum_beta) * gamma
    else:
        gamma = gamma + momentum_scale * momentum.to(dt)  # Eq. 7
        new_momentum = momentum_beta * momentum.to(dt) + (1 - momentum_beta) * gamma  # Eq. 8
    if step >= warmup_steps:  # Eq. 3
        return (p - gamma).to(eps_p.dtype), new_momentum
    return eps_p, new_momentum


# ---------------------------------------------------------------------- the safety concept


def safety_alignment(eps_u: torch.Tensor, eps_p: torch.Tensor, eps_s: torch.Tensor) -> torch.Tensor:
    """SLD's per-item flag score: the cosine between the item's classifier-free guidance direction ε_p − ε_u
    and the safety concept's ε_S − ε_u, over the item's whole latent (one value per row, in [−1, 1]). A prompt
    whose guidance pushes the image the way the unsafe concept would scores high."""
    dt = torch.promote_types(eps_p.dtype, torch.float32)
    u = eps_u.to(dt).flatten(1)
    return torch.nn.functional.cosine_similarity(eps_p.to(dt).flatten(1) - u, eps_s.to(dt).flatten(1) - u, dim=1)


def _round_robin(groups: list[list[str]]) -> list[str]:
    """Phrases taken one per category in turn (so every category survives truncation), without duplicates."""
    out: dict[str, None] = {}
    for i in range(max((len(g) for g in groups), default=0)):
        for g in groups:
            if i < len(g):
                out.setdefault(g[i], None)
    return list(out)


def policy_concept(policy, tokenizers: list) -> str:
    """``"an image showing "`` + the policy's concept phrases, one per category in turn, cut to fit every
    tokenizer's ``model_max_length`` (77 for CLIP) with its special tokens."""
    phrases = _round_robin([list(policy.concepts(c)) for c in policy.categories])
    toks = [t for t in tokenizers if t is not None]
    limits = [int(getattr(t, "model_max_length", 77) or 77) for t in toks]

    def fits(text: str) -> bool:
        return all(len(t(text, verbose=False)["input_ids"]) <= n for t, n in zip(toks, limits))

    kept: list[str] = []
    for p in phrases:  # once per distinct phrase list (the result is cached), never per step
        if not fits(_PREFIX + ", ".join(kept + [p])):
            break
        kept.append(p)
    return _PREFIX + ", ".join(kept)


def _check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"SLD({name}=...) must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f"≥ {low}"
        raise ValueError(f"SLD({name}=...) must be {rng}, got {value!r}")
    return value


# ---------------------------------------------------------------------- the guard
@dataclass
class _CallState:
    """SLD's state for one call."""

    apply: bool = True  # some category's action is steer or block (else: measure the flag, change nothing)
    active: bool = False
    why_inactive: str = ""
    concept: str | None = None
    embeds: dict | None = None
    extenders: list = field(default_factory=list)  # one RowExtender per denoiser
    n: int | None = None  # items in the denoising batch
    rows: dict | None = None  # the safety-concept conditioning, repeated for the items
    src: torch.Tensor | None = None
    calls: int = 0  # denoiser calls that ran safety rows
    guided: set = field(default_factory=set)  # steps whose ε_p was changed
    nu: torch.Tensor | None = None  # the momentum
    align_sum: torch.Tensor | None = None  # per item, the flag's running sum (on device)
    align_steps: int = 0
    reported: bool = False
    # true CFG (FLUX): the branches are separate denoiser calls, conditional first
    phase_step: int = -1  # the step whose calls are being counted
    phase: int = 0  # denoiser calls seen in that step
    pending: tuple | None = None  # (ε_p, ε_S) of the step's conditional call, until its unconditional call




@dataclass(repr=False)
class SLD(Guard):
    """Safe Latent Diffusion: classifier-free guidance steered away from a safety concept on every prompt.

    Like the original, SLD changes *every* image it generates (it has no notion of a flagged prompt): each UNet
    call runs 1.5× the rows (the safety-concept rows), and every item's report says ``"steer"`` once safety
    guidance was applied on at least one step. It needs classifier-free guidance: with ``guidance_scale ≤ 1``
    (or a guidance-distilled UNet) in the pipeline call, or with this guard's ``guidance_scale ≤ 1`` (diffusers'
    rule), it does nothing and the reports say it was inactive. On a guidance-distilled FLUX.1 pipeline the
    unconditional branch exists only with true CFG (``negative_prompt`` and ``true_cfg_scale > 1``), as a second,
    separate transformer call: the concept rows then join the conditional call and SLD's guidance reaches the
    pipeline through the unconditional call's output (ε_u' = ε_u + s·(ε_p' − ε_p)/(1 − s), so the pipeline's own
    ε_u' + s·(ε_p − ε_u') is SLD's ε_u + s·(ε_p' − ε_u)); without true CFG the call fails closed and says why.
    Wan runs its two branches as separate calls too (s is ``guidance_scale``, or ``guidance_scale_2`` on Wan 2.2's
    low-noise expert). Qwen-Image's true CFG (default ``true_cfg_scale`` 4, with a ``negative_prompt``) works as
    FLUX's; the pipeline then rescales the guided prediction to the conditional prediction's norm, as it does for
    its own CFG. Its concept is as many tokens long as its text: the row extender pads the concept's and the
    batch's LLM states to one length, with masks that hide the padding.

    Notes:
        * One UNet call per step is assumed (as in diffusers' SLD): a second-order scheduler (Heun, DPM2) calls the
          UNet twice per step and the momentum then accumulates twice per step.
        * With ``guidance_rescale > 0`` the pipeline's rescale sees the safety-guided ε_p.
        * When the momentum is not used (``momentum_scale == 0``, e.g. the weak preset) the safety rows are not
          run during the warm-up: same result, less compute.
        * Prompt conditioning must have the concept's sequence length (77 tokens with CLIP); longer custom
          ``prompt_embeds`` make the call fail closed.

    Args:
        warmup_steps (`int`, defaults to 10): δ, the first step index whose ε_p is changed (momentum builds up
            before).
        guidance_scale (`float`, defaults to 1000): s_S, scale of the safety guidance (≤ 1 disables it).
        threshold (`float`, defaults to 0.01): λ; elements where ε_p − ε_S ≥ λ get no safety guidance.
        momentum_scale (`float`, defaults to 0.3): s_m, weight of the momentum ν in γ.
        momentum_beta (`float`, defaults to 0.4): β_m in [0, 1], how much of ν is kept each step.
        concept (`str`, *optional*): the safety concept text. Defaults to ``"an image showing "`` followed by the
            policy's concept phrases (one per category in turn, cut to fit the 77-token text encoder), so the
            policy stays the one place that owns concepts.
        flag_threshold (`float`, *optional*): a fixed threshold of the flag for categories whose policy sets no
            ``sld`` threshold. The flag score is the cosine between an item's guidance direction ε_p − ε_u and the
            safety concept's ε_S − ε_u, averaged over the steps with safety rows (:func:`safety_alignment`).
            Default: calibrated at the policy's budget (fpr × sensitivity) from the flag scores of the 1,000 benign
            reference prompts on this model, preset and concept (:meth:`calibrate`; cached on disk;
            ``benchmarks/sld_flag.py --ship`` puts the embedded model's in the package); without a calibration,
            the fixed :data:`DEFAULT_FLAG_THRESHOLD` (0.394: 1% of the reference on the embedded model, medium
            preset), and the report says ``budget: None``.

    A flagged item gets its category's policy action: ``block`` returns the placeholder (after the loop: SLD
    only knows once the item is generated), ``steer`` keeps the steered image, ``log`` reports; with every
    category on ``log`` SLD measures its flag without steering.

    The defaults equal the ``medium`` preset; :meth:`weak`, :meth:`medium`, :meth:`strong` and :meth:`max` give
    diffusers' four ``SafetyConfig`` presets, and :attr:`preset` names the one a config matches (or ``"custom"``).

    Example:
        >>> import safegen
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = safegen.protect(tiny_sd_pipeline(), guards=[safegen.SLD.max()])
        >>> out = pipe("a photo of a red bus", num_inference_steps=2, output_type="np")
        >>> r = out.safety[0].result("sld")
        >>> r.verdict, r.details["preset"]
        ('steer', 'max')
        >>> safegen.SLD.strong()
        SLD.strong()
        >>> _ = safegen.unprotect(pipe)
    """

    name: ClassVar[str] = "sld"
    stage: ClassVar[str] = "loop"
    summary: ClassVar[str] = "Safe Latent Diffusion: guidance away from the policy's safety concept (needs CFG)"

    warmup_steps: int = 10
    guidance_scale: float = 1000.0
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = 0.4
    concept: str | None = None
    flag_threshold: float | None = None

    def __post_init__(self):
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"SLD(warmup_steps=...) must be an integer ≥ 0, got {self.warmup_steps!r}")
        _check_number("guidance_scale", self.guidance_scale, 0.0)
        _check_number("threshold", self.threshold)
        _check_number("momentum_scale", self.momentum_scale, 0.0)
        _check_number("momentum_beta", self.momentum_beta, 0.0, 1.0)
        if self.flag_threshold is not None:
            _check_number("flag_threshold", self.flag_threshold, -1.0, 1.0)
        if self.concept is not None and (not isinstance(self.concept, str) or not self.concept.strip()):
            raise ValueError(f"SLD(concept=...) must be a non-empty string or None, got {self.concept!r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def _preset(cls, name: str, **overrides: Any) -> "SLD":
        return cls(**{**dict(zip(_PRESET_FIELDS, PRESETS[name])), **overrides})

    @classmethod
    def weak(cls, **overrides: Any) -> "SLD":
        """δ=15, s_S=20, λ=0.0, s_m=0.0, β_m=0.0."""
        return cls._preset("weak", **overrides)

    @classmethod
    def medium(cls, **overrides: Any) -> "SLD":
        """δ=10, s_S=1000, λ=0.01, s_m=0.3, β_m=0.4 (diffusers' defaults)."""
        return cls._preset("medium", **overrides)

    @classmethod
    def strong(cls, **overrides: Any) -> "SLD":
        """δ=7, s_S=2000, λ=0.025, s_m=0.5, β_m=0.7."""
        return cls._preset("strong", **overrides)

    @classmethod
    def max(cls, **overrides: Any) -> "SLD":
        """δ=0, s_S=5000, λ=1.0, s_m=0.5, β_m=0.7."""
        return cls._preset("max", **overrides)

    @property
    def preset(self) -> str:
        """The name of the preset whose five numbers this config has, else ``"custom"``."""
        mine = tuple(getattr(self, f) for f in _PRESET_FIELDS)
        for name, values in PRESETS.items():
            if mine == values:
                return name
        return "custom"

    @property
    def enabled(self) -> bool:
        """diffusers' rule: safety guidance runs only when ``guidance_scale > 1``."""
        return self.guidance_scale > 1.0

    def config_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["preset"] = self.preset
        return d

    def __repr__(self) -> str:
        preset = self.preset
        if preset != "custom":
            extra = f"concept={self.concept!r}" if self.concept is not None else ""
            return f"SLD.{preset}({extra})"
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"SLD({args})"

    # ------------------------------------------------------------------ lifecycle

    def detach(self, protection) -> None:
        for key in [k for k in protection.cache if isinstance(k, tuple) and k and k[0] in ("sld-text", "sld-embeds")]:
            del protection.cache[key]

    def concept_text(self, call) -> str:
        """The safety concept of this call: ``concept`` if given, else built from the policy (cached)."""
        if self.concept is not None:
            return self.concept
        pipe, policy = call.pipe, call.policy
        toks = [getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)]
        phrases = tuple((c, tuple(policy.concepts(c))) for c in policy.categories)
        key = ("sld-text", phrases, tuple(id(t) for t in toks))
        cache = call.protection.cache
        if key not in cache:
            cache[key] = policy_concept(policy, toks)
        return cache[key]

    def _concept_embeds(self, call, text: str) -> dict[str, torch.Tensor]:
        """The concept's conditioning through the pipeline's own ``encode_prompt``, once per text and
        :func:`~safegen.protection.encode_setting`."""
        from ..protection import encode_setting

        key = ("sld-embeds", text, encode_setting(call))
        cache = call.protection.cache
        if key not in cache:
            cache[key] = _encode_texts(call, [text])
        return cache[key]

    def attach(self, protection) -> None:
        if protection.spec.cfg == "none":  # nothing to guide against, whatever a call asks: say so up front
            raise GuardUnavailable(f"SLD cannot run on {type(protection.pipe).__name__}: it is guidance-distilled and "
                                   "has no unconditional branch for SLD to guide against (use safree, latent-guard "
                                   "or lvd)")

    # ------------------------------------------------------------------ before the loop
    def prepare(self, call) -> None:
        st = _CallState()
        call.set_state(self, st)
        actions = {c.action for c in call.policy.categories.values()}
        # guidance only where some category asks for more than a log line; with only `log` categories SLD
        # measures (its flag) without changing the image
        st.apply = bool(actions & {"steer", "block"})
        if not call.do_cfg and call.spec.cfg == "true":  # asked for, and cannot act: an error, not a silent pass
            raise ValueError(f"SLD on {type(call.pipe).__name__} needs true classifier-free guidance: pass a "
                             "negative_prompt and true_cfg_scale > 1 (a guidance-distilled model has no "
                             "unconditional branch for SLD to guide against)")
        if not call.do_cfg:
            st.why_inactive = ("inactive: SLD needs classifier-free guidance and this call has none "
                                  "(guidance_scale ≤ 1 or a guidance-distilled UNet)")
            return
        if not self.enabled:
            st.why_inactive = (f"inactive: SLD guidance_scale={self.guidance_scale} ≤ 1 disables safety "
                                  "guidance (as in diffusers)")
            return
        text = self.concept_text(call)
        st.concept = text
        st.embeds = self._concept_embeds(call, text)
        st.active = True
        st.extenders = []
        for k, den in enumerate(call.denoisers):  # Wan 2.2: both experts, each with its own guidance scale
            ext = RowExtender(den, provide=lambda b, i, k=k: self._provide(call, st, b, i, k),
                              consume=lambda m, e, x, n: self._consume(call, st, m, e, x, n), guard=self.name)
            st.extenders.append(ext.install())
            call.defer(ext.remove)

    # ------------------------------------------------------------------ the hooks (no host syncs)

    def _concept_rows(self, st, n: int, inputs: dict[str, Any], device) -> dict[str, torch.Tensor]:
        """The safety concept's conditioning for ``n`` rows (once per call): its token states, and its pooled
        vector where the denoiser takes one (SDXL's added text embeddings, SD3's and FLUX's pooled projections)."""
        if st.rows is None:
            emb = st.embeds
            ehs = inputs.get("encoder_hidden_states")
            pe = emb["prompt_embeds"].to(device)
            mask = emb.get("prompt_embeds_mask")  # an LLM's (Qwen-Image): the row extender pads to one length
            other_length = mask is not None and ehs is not None and ehs.shape[2:] == pe.shape[2:]
            if torch.is_tensor(ehs) and ehs.shape[1:] != pe.shape[1:] and not other_length:
                raise ValueError(f"SLD: the pipeline's encoder_hidden_states have shape {tuple(ehs.shape[1:])} "
                                 f"per row but the safety concept encodes to {tuple(pe.shape[1:])}; SLD needs "
                                 "prompt conditioning of the text encoder's standard length")
            rows = {"encoder_hidden_states": pe.expand(n, *pe.shape[1:])}
            if mask is not None:
                rows["encoder_hidden_states_mask"] = mask.to(device).expand(n, *mask.shape[1:])
            added = inputs.get("added_cond_kwargs") or {}
            ppe = emb.get("pooled_prompt_embeds")
            if ppe is not None:
                ppe = ppe.to(device).expand(n, *ppe.shape[1:])
                if "text_embeds" in added:
                    rows["text_embeds"] = ppe
                if torch.is_tensor(inputs.get("pooled_projections")):
                    rows["pooled_projections"] = ppe
            st.rows = rows
        return st.rows

    @staticmethod
    def _cfg_scale(call, expert: int) -> float:
        """The scale of the pipeline's own guidance line for a call of denoiser ``expert``: FLUX's
        ``true_cfg_scale``; Wan's ``guidance_scale``, or for the low-noise expert ``guidance_scale_2`` when given."""
        from ..protection import call_default

        if call.spec.cfg == "true":
            return float(call_default(call, "true_cfg_scale"))
        second = call_default(call, "guidance_scale_2") if expert else None
        return float(second if second is not None else call_default(call, "guidance_scale"))

    def _provide_separate(self, call, st, n: int, batch: int, inputs: dict[str, Any],
                          expert: int = 0) -> ExtraRows | None:
        """Separate branches (FLUX's true CFG, Wan): each step runs the conditional call, then the unconditional
        one. The conditional call gets the safety-concept rows (ε_S next to ε_p); the unconditional call gets none,
        but its output is where the guidance goes (:meth:`_consume_separate`)."""
        if batch != n:
            return None
        step = call.step
        if st.phase_step != step:
            st.phase_step, st.phase = step, 0
        phase, st.phase = st.phase, st.phase + 1
        sample = inputs["sample"]
        if phase == 0:
            if step < self.warmup_steps and self.momentum_scale == 0:
                return None  # the momentum is never used: the warm-up steps need no safety rows
            rows = self._concept_rows(st, n, inputs, sample.device)
            st.calls += 1
            if step >= self.warmup_steps:
                st.guided.add(step)
            return ExtraRows(tensors={"sample": sample, **rows}, source_rows=torch.arange(n, device=sample.device),
                             info=("cond", n, step, expert))
        if phase == 1 and st.pending is not None:  # no extra rows: only its output is rewritten
            return ExtraRows(tensors={"sample": sample[:0]}, source_rows=torch.zeros(0, dtype=torch.long,
                                                                                        device=sample.device),
                             info=("uncond", n, step, expert))
        return None

    def _provide(self, call, st, batch: int, inputs: dict[str, Any], expert: int = 0) -> ExtraRows | None:
        n = st.n
        if n is None:
            kept = call.kept_items
            n = st.n = len(kept) if kept is not None else call.n_items
        if not call.spec.cfg_in_batch:
            return self._provide_separate(call, st, n, batch, inputs, expert)
        if batch < 2 * n:  # this UNet call has no CFG halves (e.g. a CFG cut-off callback): leave it alone
            return None
        step = call.step
        if step < self.warmup_steps and self.momentum_scale == 0:
            return None  # the momentum is never used: the warm-up steps need no safety rows
        sample = inputs["sample"]
        rows = self._concept_rows(st, n, inputs, sample.device)
        if st.src is None:
            st.src = torch.arange(n, 2 * n, device=sample.device)
        st.calls += 1
        if step >= self.warmup_steps:
            st.guided.add(step)
        return ExtraRows(tensors={"sample": sample[n:2 * n], **rows}, source_rows=st.src, info=(n, step))

    def _consume(self, call, st, main: torch.Tensor, mine: torch.Tensor, extra: ExtraRows, _n: int):
        if len(extra.info) == 4:  # the branches come in separate calls (FLUX's true CFG, Wan)
            return self._consume_separate(call, st, main, mine, extra)
        n, step = extra.info
        eps_u, eps_p = main[:n], main[n:2 * n]
        new_p = self._guide(st, eps_u, eps_p, mine, step)
        if new_p is None:
            return None
        return torch.cat([eps_u, new_p, main[2 * n:]], 0)

    def _guide(self, st, eps_u: torch.Tensor, eps_p: torch.Tensor, eps_s: torch.Tensor, step: int):
        """One step of SLD on the three predictions: the flag is accumulated, the momentum moves, and the
        safety-guided ε_p' is returned (``None`` during the warm-up or under a log-only policy: ε_p unchanged)."""
        # the flag: how far each item's own guidance direction points at the safety concept's (on device)
        align = safety_alignment(eps_u, eps_p, eps_s)
        st.align_sum = align if st.align_sum is None else st.align_sum + align
        st.align_steps += 1
        new_p, st.nu = sld_guidance(eps_u, eps_p, eps_s, st.nu, step, guidance_scale=self.guidance_scale,
                                    threshold=self.threshold, momentum_scale=self.momentum_scale,
                                    momentum_beta=self.momentum_beta, warmup_steps=self.warmup_steps)
        if step < self.warmup_steps or not st.apply:
            return None  # warm-up: only the momentum moved; log-only policy: measured only
        return new_p

    def _consume_separate(self, call, st, main: torch.Tensor, mine: torch.Tensor, extra: ExtraRows):
        """Separate branches: keep (ε_p, ε_S) from the conditional call; on the unconditional call compute SLD's ε_p'
        and return ε_u' = ε_u + s·(ε_p' − ε_p)/(1 − s), s the pipeline's own guidance scale (:meth:`_cfg_scale`),
        so its line ε_u' + s·(ε_p − ε_u') equals ε_u + s·(ε_p' − ε_u): SLD's guidance, through an unchanged
        pipeline."""
        kind, n, step, expert = extra.info
        if kind == "cond":
            st.pending = (main, mine)
            return None
        (eps_p, eps_s), st.pending = st.pending, None
        new_p = self._guide(st, main, eps_p, eps_s, step)
        if new_p is None:
            return None
        s = self._cfg_scale(call, expert)
        return main + s * (new_p - eps_p) / (1.0 - s)

    # ------------------------------------------------------------------ after the loop
    def finish(self, call) -> None:
        st = call.state(self)
        if st is None:
            return
        extenders, st.extenders = st.extenders, []
        for ext in extenders:
            ext.remove()
        st.nu = st.rows = st.pending = None
        if st.reported:
            return
        st.reported = True
        items = [it for p, blocked in enumerate(call.blocked_prompts) if not blocked for it in call.items_of(p)]
        if not items:
            return  # every prompt was blocked before the loop: nothing was generated
        preset = self.preset
        guided = len(st.guided) if st.apply else 0
        steps = call.steps_run if call.steps_run is not None else call.num_steps
        details = {**self.config_dict(), "active": st.active, "concept": st.concept,
                   "guided_steps": guided, "unet_calls_with_safety_rows": st.calls}
        if not st.active:
            verdict, reason = "pass", st.why_inactive
        elif not st.apply:
            verdict, reason = "pass", "measured only: every policy category's action is log"
        elif guided == 0:
            verdict = "pass"
            reason = (f"inactive: the {preset} preset's warm-up of {self.warmup_steps} steps was not reached in "
                      f"{steps} steps, so the output is unchanged")
        else:
            verdict = "steer"
            reason = (f"SLD ({preset} preset) guided the denoising away from the safety concept on {guided} of "
                      f"{steps} steps")
        flags, thresholds, budgets = self._flags(call, st, len(items))
        for j, item in enumerate(items):
            res = call.result(item, self.name)
            res.verdict = verdict
            res.reason = reason
            res.details = dict(details)
            if flags is None:
                continue
            score, fired, bad, risk = flags[j]
            res.score, res.risk = score, risk
            res.details["flag_thresholds"] = dict(thresholds)
            if bad:
                call.block_item(item, self.name, "SLD's flag score is not a finite number (NaN or inf): item "
                                "blocked (fail closed)", verdict="error")
                continue
            if not fired:
                continue
            cat = max(fired, key=lambda c: ACTION_RANK[call.policy.categories[c].action])
            action = call.policy.categories[cat].action
            res.category, res.threshold, res.budget = cat, thresholds[cat], budgets[cat]
            res.details["flagged_categories"] = fired
            why = (f"its guidance points at the safety concept (alignment {score:.2f} ≥ {res.threshold:.2f}, "
                   f"category {cat!r})")
            if action == "block":
                call.block_item(item, self.name, f"{why}; action: block", category=cat, score=score,
                                threshold=res.threshold, risk=risk, budget=res.budget)
            elif action == "log" and verdict != "steer":
                res.verdict, res.reason = "log", f"{why}; action: log"
            else:
                res.reason = f"{reason}; {why}"

    # ------------------------------------------------------------------ calibration
    def _calibration_key(self, pipe, concept: str) -> str:
        from ..calibration import digest, reference_digest
        from .lvd import unet_fingerprint

        fp = unet_fingerprint(pipe)
        model = {k: fp[k] for k in ("class", "config_sha", "weight_probe")}
        return digest("sld", 1, model, [getattr(self, f) for f in _PRESET_FIELDS], concept, reference_digest())

    def _scale(self, call, concept: str, categories: list):
        """The flag's risk scale on this model, preset and concept (one column repeated per category: one score
        serves every category), or ``None`` when it was never calibrated (:meth:`calibrate`)."""
        from ..calibration import RiskScale, load_cached

        key = ("sld-scale", concept, tuple(categories))
        cache = call.protection.cache
        if key not in cache:  # read and fitted once per concept and category list, not per call
            data = load_cached("sld", self._calibration_key(call.pipe, concept))
            ref = None if data is None else RiskScale.from_dict(data["scale"]).reference[:, :1]
            cache[key] = None if ref is None else RiskScale(ref.expand(-1, len(categories)), categories)
        return cache[key]

    def calibrate(self, pipe, policy: Any = "default", *, steps: int = 25, batch_size: int = 16,
                  limit: int | None = None, progress: bool = True) -> dict:
        """Measure the flag score of the benign reference prompts (:func:`safegen.calibration.reference_prompts`,
        item ``i`` seeded with ``i``, ``steps`` steps) with this config on ``pipe`` and keep it in the calibration
        cache (``$SAFEGEN_CACHE``), so that this guard's flag threshold follows the policy's budget on this model.
        ``pipe`` must be unprotected (it is protected with this guard alone for the measurement, then restored).
        Returns ``{"key": ..., "scale": RiskScale, "steps": steps, "n_reference": n}``.

        Example:
            >>> import safegen
            >>> from safegen.testing import tiny_sd_pipeline
            >>> cal = safegen.SLD.max().calibrate(tiny_sd_pipeline(), steps=2, limit=8, progress=False)
            >>> above = cal["scale"].reference.amax(0, keepdim=True) + 1  # above every benign reference score
            >>> cal["n_reference"], cal["scale"].risk(above).min().item()
            (8, 1.0)
        """
        import torch
        from tqdm.auto import tqdm

        from ..calibration import RiskScale, reference_prompts, save_cached
        from ..policy import load_policy
        from ..protection import install, is_protected, unprotect

        if is_protected(pipe):
            raise ValueError("SLD.calibrate needs an unprotected pipeline (safegen.unprotect(pipe) first)")
        pol = load_policy(policy).copy()
        for cat in pol.categories.values():
            cat.action = "log"  # measure only: every item is generated and scored, nothing steered
        prompts = reference_prompts()[:limit]
        install(pipe, pol, [self])
        try:
            concept = self.concept if self.concept is not None else policy_concept(
                pol, [getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)])
            scores = []
            for start in tqdm(range(0, len(prompts), batch_size), desc="SLD calibration: reference prompts",
                              unit="batch", disable=not progress):
                chunk = prompts[start:start + batch_size]
                gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
                out = pipe(prompt=chunk, num_inference_steps=steps, generator=gens, output_type="latent")
                scores += [r.result(self.name).score for r in out.safety]
        finally:
            unprotect(pipe)
        if any(v is None for v in scores):
            raise ValueError(f"SLD measured no flag score in {steps} steps (its warm-up of {self.warmup_steps} steps "
                             "was not passed, or the call had no classifier-free guidance)")
        scale = RiskScale(torch.tensor(scores, dtype=torch.float32).view(-1, 1), ["alignment"])
        key = self._calibration_key(pipe, concept)
        save_cached("sld", key, {"scale": scale.to_dict(), "steps": steps, "n_reference": len(scores),
                                 "preset": self.preset})
        return {"key": key, "scale": scale, "steps": steps, "n_reference": len(scores)}

    def _flags(self, call, st, n: int):
        """``(rows, thresholds, budgets)``: per item ``(alignment score, categories whose threshold it reaches,
        non-finite, calibrated risk)`` from one host copy, and the threshold and budget per category;
        ``(None, {}, {})`` when no safety rows ran (nothing was measured)."""
        if st.align_sum is None or not st.align_steps:
            return None, {}, {}
        from ..calibration import guard_thresholds

        score = (st.align_sum / st.align_steps).cpu()[:n]
        policy = call.policy
        cats = list(policy.categories)
        scale = self._scale(call, st.concept, cats) if self.flag_threshold is None else None
        values, budgets = guard_thresholds(policy, self.name, cats, scale=scale, fixed=self.flag_threshold,
                                           default=DEFAULT_FLAG_THRESHOLD)
        thresholds = dict(zip(cats, values))
        risk = scale.risk(score.view(-1, 1).expand(-1, len(cats)))[:, 0].tolist() if scale is not None else None
        bad_thr = not all(math.isfinite(t) for t in thresholds.values())
        rows = []
        for j, v in enumerate(score.tolist()):
            bad = bad_thr or not math.isfinite(v)
            fired = [] if bad else [c for c, t in thresholds.items() if v >= t]
            rows.append((round(v, 4) if math.isfinite(v) else v, fired, bad,
                         None if risk is None else round(risk[j], 4)))
        return rows, thresholds, dict(zip(cats, budgets))
