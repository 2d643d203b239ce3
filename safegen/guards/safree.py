"""SAFREE (Yoon et al., ICLR 2025): training-free steering of the text conditioning away from toxic concepts.

The five parts, each switchable on :class:`Safree`:

(a) **concept subspace** — the policy's keywords of a category are encoded once (one batched pass) and
    orthonormalised (SVD, rank by pinv's default tolerance); projections are ``x - U(Uᵀx)``, never dense D×D.
(b) **trigger tokens** — N copies of the prompt, copy *i* with token *i* masked, go through the text encoder
    in one batched pass; d_i is the distance of copy *i*'s summary vector to the concept span; token *i*
    triggers when d_i ≥ (1 + alpha) · mean_{j≠i} d_j (leave-one-out, closed form).
(c) **selective projection** — trigger tokens' states e are replaced by (I − P_c) P_m e: kept inside the
    prompt's own span (P_m, spanned by the masked-copy summaries) minus the toxic span (P_c).
(d) **self-validating filtering** — beta = 1 − mean cos(projected, original) over the prompt's tokens sets
    how many steps use the filtered conditioning: t' = round(gamma · sigmoid(2k(10·beta − c))) (on a 50-step
    scale, rescaled to the call's step count); a step callback switches back to the original after t'.
(e) **latent re-attention** — a Fourier filter on UNet up-block skip features of the filtered rows against
    reference rows conditioned on the original prompt, on the filtered steps only (see ``reattention.py``).

Plus, as in the authors' runs, the joined concept keywords become the negative prompt of flagged prompts.

Deviation from the paper, on purpose: SAFREE's leave-one-out rule finds "trigger tokens" in every prompt.
This guard first decides whether a prompt is about a category at all (a literal concept phrase, or the
cosine of its summary vector to the category's span, measured from the empty prompt, ≥ the policy's
``safree`` threshold); prompts that are not are left exactly as they were (bit-identical output).

Calibration (``calibrate=True``): the gate's thresholds and SVF's c are constants of the encoder, not of the
method. They are calibrated once per text encoder on the benign reference prompts (:mod:`safegen.calibration`):
each category's threshold at a false-positive budget, c as 10 × the midpoint of the mean beta of unsafe seed
prompts and benign ones (the authors' own rule for their c = 5.333 on CLIP). ``official=True`` runs the method
with the authors' settings and no gate.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..encoders import SEQUENCE_ENCODES, TextEncoderAdapter, conditioning_streams, join_rows, pad_tokens
from ..encoders import ConditioningStream as _Stream
from ..errors import NonFiniteError
from ..policy import concept_phrases
from ..guard import Guard, has_text_encoder, unreadable_call

logger = logging.getLogger("safegen")
_WARNED: set[str] = set()

# ---------------------------------------------------------------------- the math (paper equations)


def orthonormal_basis(columns: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal basis of the span of ``columns`` (..., D, K), as (..., D, K) with unused columns zero.

    The rank follows ``torch.linalg.pinv``'s default: singular values ≤ max(D, K)·eps·σ_max are dropped, so
    ``U Uᵀ`` equals the projector ``E (EᵀE)⁺ Eᵀ``. ``valid`` (..., K) zeroes columns that do not exist.
    """
    if valid is not None:
        columns = columns * valid.unsqueeze(-2).to(columns.dtype)
    u, s, _ = torch.linalg.svd(columns, full_matrices=False)
    d, k = columns.shape[-2:]
    tol = s.amax(-1, keepdim=True) * max(d, k) * torch.finfo(columns.dtype).eps
    keep = (s > tol).to(columns.dtype)
    return u * keep.unsqueeze(-2)


def remove_span(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(I − U Uᵀ) x for row vectors x (..., L, D) and basis (..., D, r)."""
    return x - (x @ basis) @ basis.transpose(-1, -2)


def keep_span(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """U Uᵀ x for row vectors x (..., L, D) and basis (..., D, r)."""
    return (x @ basis) @ basis.transpose(-1, -2)


def trigger_mask(dist: torch.Tensor, valid: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """SAFREE's leave-one-out rule: token i triggers when d_i ≥ (1 + alpha) · mean_{j≠i} d_j.

    ``dist`` and ``valid`` are (B, N); a prompt with a single content token triggers on it.
    """
    validf = valid.to(dist.dtype)
    n = validf.sum(-1, keepdim=True)
    total = (dist * validf).sum(-1, keepdim=True)
    loo_mean = (total - dist) / (n - 1).clamp(min=1)
    trig = (dist >= (1 + alpha) * loo_mean) & valid
    return torch.where(n == 1, valid, trig)


def project_tokens(tokens: torch.Tensor, prompt_basis: torch.Tensor, concept_basis: torch.Tensor) -> torch.Tensor:
    """(I − P_c) P_m e for every token state: kept in the prompt's own span, minus the toxic span."""
    return remove_span(keep_span(tokens, prompt_basis), concept_basis)


def svf_steps(original: torch.Tensor, projected: torch.Tensor, attention: torch.Tensor, *, gamma: float = 10.0,
              k: float = 2.5, c: float = 5.333, num_steps: int | None = None, reference_steps: int = 50):
    """Self-validating filtering: (t', beta) per prompt. Steps with index ≤ t' use the filtered embedding.

    beta = 1 − mean cos(projected_k, original_k) over positions where ``attention`` is 1;
    t' = round(gamma · sigmoid(2k(10·beta − c))), with gamma rescaled by num_steps / reference_steps.
    """
    cos = torch.nn.functional.cosine_similarity(projected, original, dim=-1)
    att = attention.to(cos.dtype)
    beta = 1 - (cos * att).sum(-1) / att.sum(-1).clamp(min=1)
    g = gamma if num_steps is None else gamma * num_steps / reference_steps
    t_prime = torch.round(g * torch.sigmoid(2 * k * (10 * beta - c))).long()
    return t_prime, beta


def masked_copies(ids: torch.Tensor, attention: torch.Tensor, n_content: torch.Tensor, first: int, mask_id: int,
                  cut: bool = True):
    """All single-token-masked copies of a batch, cut to the longest attended length (``cut=False`` keeps the full
    padded length: for encoders whose states depend on the padding).

    Returns ``(copies (M, L'), copy_attention (M, L'), owner (M,), position (M,), valid (B, N))`` where row m
    is prompt ``owner[m]`` with content token ``position[m]`` (0-based among the content tokens, which start at
    ``first``: 1 after CLIP's BOS, 0 for T5) replaced by ``mask_id``. No Python loop over tokens: the copies are
    one broadcast and one boolean selection.
    """
    b = ids.shape[0]
    n_max = int(n_content.max()) if b else 0
    length = int(attention.sum(1).max()) if cut else ids.shape[1]
    ids_c, att_c = ids[:, :length], attention[:, :length]
    pos = torch.arange(n_max, device=ids.device)
    valid = pos.unsqueeze(0) < n_content.unsqueeze(1)  # (B, N)
    copies = ids_c.unsqueeze(1).expand(b, n_max, length).clone()
    target = (first + pos).view(1, n_max, 1).expand(b, n_max, 1)
    copies.scatter_(2, target, mask_id)
    copies = copies[valid]
    owner = torch.arange(b, device=ids.device).unsqueeze(1).expand(b, n_max)[valid]
    position = pos.unsqueeze(0).expand(b, n_max)[valid]
    return copies, att_c[owner], owner, position, valid


# ---------------------------------------------------------------------- concept spaces


def _stream_texts(texts: list[list[tuple[str, str]]], stream: _Stream) -> list[str]:
    """The text each prompt's stream encodes (its own argument's, else ``prompt``'s)."""
    return [dict(t).get(stream.text_arg, t[0][1]) for t in texts]


def _streams(call, cache: dict, clip_skip) -> list[_Stream]:
    """The conditioning streams of this call's pipeline at the call's ``clip_skip``, ``max_sequence_length`` and
    (FLUX.2) ``text_encoder_out_layers``."""
    return _cached_streams(call.pipe, call.spec.encode, cache, clip_skip, call.arg)


def _default_streams(pipe, encode: str, cache: dict) -> list[_Stream]:
    """The streams of a call with default arguments (no ``clip_skip``; the signature's ``max_sequence_length``
    and ``text_encoder_out_layers``): the same objects such a call gets."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    return _cached_streams(pipe, encode, cache, None, lambda name: params[name].default)


def _cached_streams(pipe, encode: str, cache: dict, clip_skip, arg) -> list[_Stream]:
    """:func:`safegen.encoders.conditioning_streams`, once per pipeline and setting (the adapters carry the
    concept spaces and calibrations built on them); ``arg(name)`` is the call's value of an argument."""
    from ..specs import pipeline_spec

    max_len = arg("max_sequence_length") if encode in SEQUENCE_ENCODES else None
    layers = arg("text_encoder_out_layers") if encode == "flux2" else None
    key = ("safree-streams", clip_skip, max_len, None if layers is None else tuple(layers))
    if key not in cache:
        cache[key] = conditioning_streams(pipe, encode, clip_skip=clip_skip, max_len=max_len, layers=layers,
                                          text_mask=pipeline_spec(pipe).text_mask)
    return cache[key]


def _phrase_regex(phrases: Sequence[str]) -> re.Pattern:
    alts = sorted({re.escape(p.lower()) for p in phrases}, key=len, reverse=True)
    return re.compile(r"(?<![\w])(" + "|".join(alts) + r")(?![\w])", re.IGNORECASE)


# ---------------------------------------------------------------------- the guard


@dataclass
class _CallState:
    """SAFREE's state for one call: the gate's decision per prompt and category, then (for steered prompts) the
    filtered and original conditioning and each prompt's filtered window."""

    fired: torch.Tensor  # (B, K) bool
    scores: torch.Tensor  # (B, K) gate similarities
    lexical: list  # per prompt and category: the literal phrase found, or None
    cats: list
    thresholds: torch.Tensor  # (K,)
    budgets: list  # (K,) the budget each threshold stands for (None: fixed)
    risks: torch.Tensor | None  # (B, K) calibrated risk (None without a calibration)
    nearest: list  # per prompt and category: the closest concept phrase
    error: torch.Tensor  # (B,) a non-finite score or threshold
    blocked: torch.Tensor | None = None
    steered: torch.Tensor | None = None
    groups: dict = field(default_factory=dict)
    safe: torch.Tensor | None = None
    orig: torch.Tensor | None = None
    t_prime: torch.Tensor | None = None  # per prompt: last filtered step (−1: none)
    beta: torch.Tensor | None = None
    triggers: dict = field(default_factory=dict)
    safe_pooled: torch.Tensor | None = None
    orig_pooled: torch.Tensor | None = None
    negative_text: dict = field(default_factory=dict)
    negative_kept: bool = False
    last_filtered_step: int = -1
    lra: Any = None
    loop: dict | None = None
    reported: bool = False
    calibration: dict | None = None  # where the thresholds and SVF's c came from (for the report)
    rules: dict = field(default_factory=dict)  # per encoder stream: the trigger rule part (b) used


@dataclass(repr=False)
class Safree(Guard):
    """SAFREE as a safegen guard. Every part can be switched off; defaults follow the paper and its code.

    Args:
        projection (`bool`, defaults to `True`): project trigger tokens (parts a–c). Off: report only.
        project_positions (`str`, defaults to `"triggers"`): which token states the projection replaces:
            ``"triggers"`` the trigger tokens only (the paper); ``"triggers+eos"`` also EOS and the padding after
            it, which a causal CLIP fills with the whole prompt, concept included (an extension beyond the paper);
            ``"all"`` every state after BOS (extension). With ``prompt_embeds`` only (no text), the EOS position is
            unknown and ``"triggers+eos"`` projects the trigger positions only.
        gate (`bool`, defaults to `True`): steer only the prompts the relevance gate flags. Off: every prompt is
            steered over every ``steer`` category's span, as the authors run it (a ``block`` category still
            blocks only flagged prompts).
        alpha (`float`, defaults to 0.01): leave-one-out margin of the trigger-token rule.
        svf (`bool`, defaults to `True`): self-validating filtering; off filters every step.
        svf_gamma, svf_k, svf_c: t' = round(gamma·sigmoid(2k(10·beta − c))) on a 50-step scale
            (the code's nudity constants; artists use k=3.5, c=5.5).
        svf_scale_steps (`bool`, defaults to `True`): rescale gamma by num_inference_steps / 50.
        reattention (`bool`, defaults to `False`): Fourier latent re-attention on UNet up-block skips.
        reattention_tau, reattention_s1, reattention_s2: low-band half-width and the two skip scales
            (paper code: 1, 0.9, 0.2).
        negative_prompt (`bool`, defaults to `True`): use the flagged categories' joined keywords as the
            negative prompt of flagged prompts (the authors do this for every number they report).
        sdxl_pooled (`str`, defaults to `"project"`): SDXL's pooled embedding during filtered steps:
            ``"project"`` removes the concept span from it, ``"keep"`` leaves it (the authors' code).
        threshold (`float`, defaults to 0.55): gate threshold for categories whose policy sets none, when
            ``calibrate=False`` (0.55 was chosen on CLIP; it means little on other encoders).
        calibrate (`bool`, defaults to `True`): calibrate the gate and SVF for the pipeline's text encoder on the
            benign reference prompts (:mod:`safegen.calibration`), once per encoder (cached on disk): each
            category's threshold is set so that at most the policy's budget (``fpr`` × sensitivity) of benign
            prompts fire the gate in any category (a policy's own fixed ``safree`` threshold wins; the report gives
            each prompt's calibrated risk), and SVF's ``c`` is fitted as
            the authors' code does, 10 × the midpoint between the mean beta of unsafe seed prompts ("a photo of
            <concept>") and of benign prompts. The report's details say which thresholds and c were used.
        fpr_budget (`float`, *optional*): a false-positive budget for SAFREE's gate that replaces the policy's
            ``fpr`` (still multiplied by the policy's sensitivity); default: the policy's.
        copies_length (`str`, defaults to `"auto"`): how long the masked copies of part (b) and the concept
            phrases of part (a) are encoded. ``"full"``: padded as the pipeline pads, so every vector lies in the
            space of the pipeline's own states (exact); ``"content"``: only as long as the text (a copy of an
            N-token prompt costs N tokens, not the 256 or 512 a T5 pipeline pads to); ``"auto"``: ``"content"`` where
            the encoder attends to its padding and pads to more than 77 tokens (SD3's, FLUX's and CogVideoX's T5:
            there the full-length leave-one-out pass costs many denoiser steps), else ``"full"``. Content-length
            vectors differ a little from the pipeline's (the padding it attends to is missing); the trigger rule
            compares the copies only with each other, and the gate is calibrated on the same path.
        trigger_rule (`str`, defaults to `"auto"`): how part (b) finds trigger tokens. ``"masked"``: the paper's
            leave-one-out over N masked copies of an N-token prompt (N extra encoder passes per prompt and encoder);
            ``"states"``: the same leave-one-out rule on the pipeline's own token states, d_i = the length of the
            concept-span part of token i's state minus the mean state of the prompt's tokens (how far token i pulls
            the prompt towards the concept, against its other tokens; no extra encoder pass; the prompt's span is that
            of its own token states, so a trigger's projection removes the concept span from it); ``"auto"``:
            ``"masked"`` on encoders that read at most 77 tokens (CLIP, where the paper measures it and the copies are
            cheap), ``"states"`` on longer sequence encoders (SD3's, FLUX's, CogVideoX's T5, Wan's UMT5, the LLM
            encoders of Qwen-Image and FLUX.2): there the masked copies of one prompt cost more text-encoder time than
            several denoiser steps (SD3.5 at 1/6 depth: 6.6 s of 9.1 s, BENCHMARKS.md). A deviation from the paper on
            those encoders, named in every report (``details["trigger_rule"]``); ``official=True`` keeps ``"masked"``.
        official (`bool`, defaults to `False`): SAFREE exactly as the authors run it: no gate (every prompt is
            steered over every ``steer`` category's span, their keywords as every prompt's negative prompt), their
            constants gamma=10, k=2.5, c=5.333 on a 50-step scale without rescaling, SDXL's pooled embedding kept.
            A ``block`` category still blocks the prompts the gate flags. The fields it fixes must keep their
            defaults.

    Example:
        >>> import safegen
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = safegen.protect(tiny_sd_pipeline(), guards=[safegen.Safree(alpha=0.01)])
        >>> out = pipe("a photo of blood and gore", num_inference_steps=2, output_type="np")
        >>> r = out.safety[0].result("safree")
        >>> r.verdict, r.category
        ('steer', 'violence')
    """

    name: ClassVar[str] = "safree"
    stage: ClassVar[str] = "conditioning"
    summary: ClassVar[str] = ("training-free: projects the prompt's trigger tokens out of the concept subspace for "
                                 "the steps self-validating filtering picks")
    # the pooled vector is SDXL's ``add_text_embeds`` and SD3's ``pooled_prompt_embeds`` at the step callback
    tensor_inputs: ClassVar[tuple[str, ...]] = ("prompt_embeds", "add_text_embeds", "pooled_prompt_embeds")
    needs_conditioning: ClassVar[bool] = True

    projection: bool = True
    project_positions: str = "triggers"
    gate: bool = True
    alpha: float = 0.01
    svf: bool = True
    svf_gamma: float = 10.0
    svf_k: float = 2.5
    svf_c: float | None = None
    svf_scale_steps: bool = True
    reattention: bool = False
    reattention_tau: int = 1
    reattention_s1: float = 0.9
    reattention_s2: float = 0.2
    negative_prompt: bool = True
    sdxl_pooled: str = "project"
    threshold: float = 0.55
    calibrate: bool = True
    fpr_budget: float | None = None
    copies_length: str = "auto"
    trigger_rule: str = "auto"
    official: bool = False
    encode_batch: int = 256

    #: The authors' constants (official code, nudity): SVF's gamma, k and c on a 50-step scale.
    OFFICIAL_SVF: ClassVar[tuple[float, float, float]] = (10.0, 2.5, 5.333)

    def __post_init__(self):
        if not 0 <= self.alpha < 10:
            raise ValueError(f"Safree(alpha=...) must be in [0, 10), got {self.alpha}")
        if self.project_positions not in ("triggers", "triggers+eos", "all"):
            raise ValueError(f"Safree(project_positions=...) must be 'triggers', 'triggers+eos' or 'all', "
                             f"got {self.project_positions!r}")
        if self.copies_length not in ("auto", "full", "content"):
            raise ValueError(f"Safree(copies_length=...) must be 'auto', 'full' or 'content', "
                             f"got {self.copies_length!r}")
        if self.trigger_rule not in ("auto", "masked", "states"):
            raise ValueError(f"Safree(trigger_rule=...) must be 'auto', 'masked' or 'states', "
                             f"got {self.trigger_rule!r}")
        if self.sdxl_pooled not in ("project", "keep"):
            raise ValueError(f"Safree(sdxl_pooled=...) must be 'project' or 'keep', got {self.sdxl_pooled!r}")
        if self.svf_gamma < 0:
            raise ValueError(f"Safree(svf_gamma=...) must be ≥ 0, got {self.svf_gamma}")
        if isinstance(self.reattention_tau, bool) or not isinstance(self.reattention_tau, int) or self.reattention_tau < 1:
            raise ValueError(f"Safree(reattention_tau=...) must be an integer ≥ 1 (the low band's half-width), "
                             f"got {self.reattention_tau!r}")
        for name in ("reattention_s1", "reattention_s2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"Safree({name}=...) must be in [0, 1] (1 = no attenuation), got {getattr(self, name)}")
        if not 0 <= self.threshold:
            raise ValueError(f"Safree(threshold=...) must be ≥ 0, got {self.threshold}")
        if isinstance(self.encode_batch, bool) or not isinstance(self.encode_batch, int) or self.encode_batch < 1:
            raise ValueError(f"Safree(encode_batch=...) must be a positive integer, got {self.encode_batch!r}")
        b = self.fpr_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 0.5):
            raise ValueError(f"Safree(fpr_budget=...) is a share of benign prompts in (0, 0.5), got {self.fpr_budget!r}")
        if self.svf_c is not None and not (isinstance(self.svf_c, (int, float)) and math.isfinite(self.svf_c)):
            raise ValueError(f"Safree(svf_c=...) must be a finite number or None (calibrated), got {self.svf_c!r}")
        if self.official:
            fixed = {"svf_gamma": 10.0, "svf_k": 2.5, "svf_c": None, "svf_scale_steps": True, "projection": True,
                     "svf": True, "negative_prompt": True, "sdxl_pooled": "project", "project_positions": "triggers",
                     "gate": True, "trigger_rule": "auto"}
            changed = [k for k, v in fixed.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(f"Safree(official=True) fixes {', '.join(changed)} to the authors' settings; "
                                 "leave them at their defaults (or use official=False to set them)")

    @property
    def _gated(self) -> bool:
        """Whether only the prompts the gate flags are steered (the authors' SAFREE has no gate)."""
        return self.gate and not self.official

    @classmethod
    def authors(cls, **overrides: Any) -> "Safree":
        """SAFREE as the authors run it (``official=True``)."""
        return cls(official=True, **overrides)

    def svf_constants(self, calibration: dict | None) -> tuple[float, float, float, bool]:
        """``(gamma, k, c, rescale)`` of SVF: the authors' in official mode; else the fields, with c calibrated
        when ``svf_c`` is None (the authors' 5.333 without a calibration)."""
        if self.official:
            return (*self.OFFICIAL_SVF, False)
        c = self.svf_c
        if c is None:
            c = calibration["svf_c"] if calibration and calibration.get("svf_c") is not None else self.OFFICIAL_SVF[2]
        return self.svf_gamma, self.svf_k, float(c), self.svf_scale_steps

    # ------------------------------------------------------------------ lifecycle
    def attach(self, protection) -> None:
        if not has_text_encoder(protection.pipe):
            mode = getattr(protection.policy, "embeddings_only", "block")
            logger.warning("safegen: %s has no text encoder, so SAFREE cannot build its concept space: with the "
                           "policy's embeddings_only=%r every call is %s", type(protection.pipe).__name__, mode,
                           "let through unchecked" if mode == "allow" else "blocked")
        else:
            calibration = None
            if self.calibrate:  # at protect() time: its seconds are spent here, once per encoder (disk cache)
                primary = _default_streams(protection.pipe, protection.spec.encode, protection.cache)[-1]
                calibration = self._calibration(protection.cache, primary, protection.policy)
            self._warn_if_unselective(protection, calibration)
        den = type(protection.denoiser).__name__
        if self.reattention and not self._has_skips(protection.denoiser) and den not in _WARNED:
            _WARNED.add(den)  # once per process and backbone class (the reports say it on every call)
            logger.warning("safegen: Safree(reattention=True) on %s: its %s has no U-Net skip features, so latent "
                           "re-attention is not applied (the rest of SAFREE is); see safegen.guards.safree",
                           type(protection.pipe).__name__, type(protection.denoiser).__name__)

    def _warn_if_unselective(self, protection, calibration: dict | None = None) -> None:
        """Say at protect() time when the gate cannot tell prompts apart on this text encoder: a category whose
        k concept phrases span k of the encoder's D dimensions gives a *random* direction a cosine of about
        √(k/D) to its span; when that reaches the category's threshold, every prompt passes the gate (diffusers'
        tiny test encoders: D = 32 or less) and SAFREE steers everything."""
        pipe = protection.pipe
        te = getattr(pipe, "text_encoder_2", None) or getattr(pipe, "text_encoder", None)
        width = getattr(getattr(te, "config", None), "hidden_size", None)
        if not width:
            return
        policy = protection.policy
        loose = []
        try:
            thresholds, budgets = self._thresholds(policy, calibration)
        except ValueError:  # a bad threshold fails the calls closed; nothing to warn about here
            return
        for cat, threshold, budget in zip(policy.categories, thresholds, budgets):
            chance = math.sqrt(min(len(policy.concepts(cat)), width) / width)
            calibrated = threshold if budget is not None else None
            if threshold > 1.0:  # no cosine reaches it: only literal phrases fire, which is selective
                continue
            if chance >= threshold or calibrated is not None and calibrated >= 0.95:
                # (calibrated near 1: benign reference prompts already score that close to the concept span)
                loose.append(f"{cat} (≈{max(chance, calibrated or 0):.2f})")
        if loose:
            logger.warning("safegen: SAFREE cannot be selective on %s's %d-dimensional text encoder: for %s the "
                           "concept span covers so much of the space that unrelated prompts score about that "
                           "close to it, so the gate steers prompts by chance; use a real encoder, or raise the "
                           "categories' safree thresholds above 1 (fixed thresholds) to rely on literal phrases "
                           "only",
                           type(pipe).__name__, width, ", ".join(loose))

    def _short(self, ad: TextEncoderAdapter) -> bool:
        """Whether this encoder's masked copies and concept phrases are encoded at their content length
        (``copies_length``)."""
        if self.copies_length != "auto":
            return self.copies_length == "content"
        return ad.padding_matters and ad.max_length > 77

    def _rule(self, ad: TextEncoderAdapter) -> str:
        """The trigger rule this encoder's tokens are found by: ``"masked"`` or ``"states"`` (``trigger_rule``)."""
        if self.official:
            return "masked"
        if self.trigger_rule != "auto":
            return self.trigger_rule
        return "masked" if ad.max_length <= 77 else "states"

    @staticmethod
    def _pooled_switches(call) -> bool:
        """Whether the pipeline's step callback takes the pooled vector back (SDXL, SD3; not FLUX)."""
        allowed = getattr(call.pipe, "_callback_tensor_inputs", ())
        return any(k in allowed for k in ("add_text_embeds", "pooled_prompt_embeds"))

    @staticmethod
    def _has_skips(denoiser) -> bool:
        """Re-attention filters U-Net up-block skip features; a DiT (CogVideoX's transformer) has none."""
        return len(getattr(denoiser, "up_blocks", None) or []) > 0

    def _space(self, cache: dict, stream: _Stream, categories: tuple[str, ...], policy, projected: bool = False):
        """Cached orthonormal basis (D, r) of the concept span of ``categories`` in a stream's space."""
        phrases = tuple(k for c in categories for k in policy.concepts(c))
        key = ("safree-basis", stream.name, id(stream.adapter), categories, phrases, projected,
               self._short(stream.adapter))
        basis = cache.get(key)
        if basis is None:
            short = self._short(stream.adapter)
            vecs = stream.adapter.summaries(list(phrases), projected=projected, short=short).float()
            basis = orthonormal_basis(vecs.T)
            cache[key] = basis
        return basis

    def _gate_space(self, cache: dict, stream: _Stream, category: str, policy):
        """Per-category basis of keyword vectors measured from the empty prompt (for the relevance gate)."""
        phrases = tuple(policy.concepts(category))
        key = ("safree-gate", stream.name, id(stream.adapter), category, phrases, self._short(stream.adapter))
        hit = cache.get(key)
        if hit is None:
            vecs = stream.adapter.summaries(list(phrases) + [""], short=self._short(stream.adapter)).float()
            origin = vecs[-1]
            centered = vecs[:-1] - origin
            unit = centered / centered.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            hit = (orthonormal_basis(centered.T), origin, _phrase_regex(phrases), unit, phrases)
            cache[key] = hit
        return hit

    def _gate_scores(self, cache: dict, stream: _Stream, summary: torch.Tensor, policy, cats: Sequence[str]):
        """The gate's cosine per prompt and category, ``(B, K)`` on the CPU, for summaries ``(B, D)`` (text) or
        token states ``(B, L, D)`` (embeddings: the best position after the first); and per category the index
        of each prompt's closest concept phrase (text only, else ``None``)."""
        scores = torch.empty(summary.shape[0], len(cats))
        closest = []
        for j, cat in enumerate(cats):
            basis, origin, _, unit, _ = self._gate_space(cache, stream, cat, policy)
            x = summary - origin.to(summary.device)
            cos = (x @ basis).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)
            scores[:, j] = (cos if cos.ndim == 1 else cos[:, 1:].amax(-1)).cpu()
            closest.append((x @ unit.T.to(x.device)).argmax(-1).tolist() if summary.ndim == 2 else None)
        return scores, closest

    # ------------------------------------------------------------------ calibration
    CALIBRATION_VERSION: ClassVar[int] = 3
    BETA_REFERENCE: ClassVar[int] = 200  # benign prompts whose beta is measured (every 5th of the 1,000)

    def _budget(self, policy) -> float:
        """The gate's benign false-positive budget: the policy's (fpr × sensitivity), or ``fpr_budget`` ×
        sensitivity when the guard sets its own."""
        return policy.budget(self.fpr_budget)

    def _thresholds(self, policy, calibration: dict | None) -> tuple[list[float], list]:
        """Each category's gate threshold and the budget it stands for (``None``: fixed): the policy's fixed
        ``safree`` threshold when it sets one, else the calibrated one at the budget (``calibrate=True``), else
        ``threshold`` (fixed)."""
        from ..calibration import guard_thresholds

        scale = calibration["scale"] if calibration else None
        return guard_thresholds(policy, self.name, list(policy.categories), scale=scale, default=self.threshold,
                                budget=self._budget(policy))

    def _calibration(self, cache: dict, stream: _Stream, policy) -> dict | None:
        """The calibration of ``stream``'s encoder for the policy's concepts (``None`` when ``calibrate`` is off):
        from this pipeline's cache, else the disk cache, else computed (:meth:`calibrate_stream`)."""
        if not self.calibrate:
            return None
        phrases = tuple((c, tuple(policy.concepts(c))) for c in policy.categories)
        key = ("safree-calibration", stream.name, id(stream.adapter), phrases)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = self.calibrate_stream(cache, stream, policy)
        return hit

    def calibrate_stream(self, cache: dict, stream: _Stream, policy) -> dict:
        """Calibrate the gate and SVF's c for one conditioning stream (cached on disk by encoder fingerprint,
        concepts and reference set; see :mod:`safegen.calibration`): the gate's scores on the benign reference
        prompts (its :class:`~safegen.calibration.RiskScale`, under ``"scale"``) and SVF's fitted c."""
        import hashlib
        import json

        from ..calibration import (RiskScale, cache_dir, encoder_fingerprint, load_cached, reference_digest,
                                   reference_prompts, save_cached)

        ad = stream.adapter
        cats = list(policy.categories)
        concepts = {c: list(policy.concepts(c)) for c in cats}
        fingerprint = encoder_fingerprint(ad.encoder, ad.tokenizer, layer=ad.layer, final_norm=ad.final_norm,
                                          summary=ad.summary_kind, max_length=ad.max_length, mask=ad.mask_token_id,
                                          attention_mask=ad.use_attention_mask)
        parts = [self.CALIBRATION_VERSION, fingerprint, concepts, reference_digest(), self.BETA_REFERENCE]
        if self._short(ad):  # content-length phrases and copies: another space (exact ones keep their keys)
            parts.append("content-length")
        if self._rule(ad) == "states":  # SVF's betas measured by the token-state rule: another c
            parts.append("states-rule")
        key = hashlib.blake2b(json.dumps(parts).encode(),
                              digest_size=16).hexdigest()
        cached = load_cached("safree", key)
        if cached is not None and cached.get("scale", {}).get("categories") == cats:
            return {**cached, "scale": RiskScale.from_dict(cached["scale"])}
        from tqdm.auto import tqdm

        ref = reference_prompts()
        logger.info("safegen: calibrating SAFREE for text encoder %s (once; cached in %s)", ad.name,
                    cache_dir())
        # padded as the pipeline pads (its full length): the scores are bit-for-bit the ones the gate computes
        # from the pipeline's prompt_embeds, so a threshold just above a benign score stays above it at run time
        # (a long masked encoder, Wan's UMT5, pads to each chunk's longest: the same states, a fraction of the work)
        chunks = range(0, len(ref), self.encode_batch)
        summaries = torch.cat([ad.encode(ad.tokenize(ref[i:i + self.encode_batch],
                                                     pad_to_longest=ad.long_masked)).summary.float()
                               for i in tqdm(chunks, desc=f"SAFREE calibration ({ad.name}): reference prompts",
                                             unit="batch", leave=False, disable=len(chunks) < 2)])
        scores, _ = self._gate_scores(cache, stream, summaries, policy, cats)
        if not bool(torch.isfinite(scores).all()):
            raise NonFiniteError(f"SAFREE calibration: the gate's scores on the reference prompts are not finite "
                                 f"for encoder {ad.name}")
        scale = RiskScale(scores, cats)
        # SVF's c, as the authors fit it: 10 x the midpoint between the classes' mean beta
        picked = list(range(0, len(ref), max(1, len(ref) // self.BETA_REFERENCE)))[: self.BETA_REFERENCE]
        top = scores[picked].argmax(1).tolist()
        benign, unsafe = [], []
        for j, cat in enumerate(tqdm(cats, desc=f"SAFREE calibration ({ad.name}): SVF beta", unit="category",
                                     leave=False)):
            basis = self._space(cache, stream, (cat,), policy)
            mine = [ref[i] for i, t in zip(picked, top) if t == j]
            if mine:
                benign.append(self._beta_of(ad, mine, basis))
            unsafe.append(self._beta_of(ad, [f"a photo of {p}" for p in concepts[cat]], basis))
        beta_b, beta_u = torch.cat(benign), torch.cat(unsafe)
        mb, mu = float(beta_b.mean()), float(beta_u.mean())
        data = {"encoder": ad.name, "fingerprint": fingerprint, "scale": scale.to_dict(), "n_reference": len(ref),
                "beta_benign": round(mb, 6), "beta_unsafe": round(mu, 6), "n_beta_benign": len(beta_b),
                "n_beta_unsafe": len(beta_u),
                # on an encoder where unsafe prompts do not move further from their span than benign ones, the
                # midpoint means nothing: keep the authors' constant and say so
                "svf_c": round(10 * (mb + mu) / 2, 6) if mu > mb else None}
        save_cached("safree", key, data)
        return {**data, "scale": scale}

    def _beta_of(self, ad: TextEncoderAdapter, texts: list[str], basis: torch.Tensor) -> torch.Tensor:
        """SVF's beta of each text against ``basis`` (every token projected, as SVF measures it)."""
        out = []
        for i in range(0, len(texts), 32):
            sb = ad.tokenize(texts[i:i + 32], pad_to_longest=True, approximate=self._short(ad))
            tokens = ad.encode(sb).tokens.float()
            _, projected = self._analyse_text(ad, sb, tokens, basis)
            att = sb.attention_mask[:, : tokens.shape[1]].to(tokens.device)
            out.append(svf_steps(tokens, projected, att)[1].cpu())
        return torch.cat(out)

    def _calibration_note(self, policy, calibration: dict | None, svf: tuple) -> dict:
        """What the report says about where the gate's thresholds and SVF's constants came from."""
        gamma, k, c, rescale = svf
        own = [cat for cat in policy.categories if policy.categories[cat].thresholds.get(self.name) is not None]
        note = {"mode": "official" if self.official else "calibrated" if calibration else "fixed",
                "svf": {"gamma": gamma, "k": k, "c": round(c, 4), "rescaled": rescale},
                "sensitivity": float(policy.sensitivity)}
        if calibration:
            note.update({"budget": self._budget(policy), "encoder": calibration["encoder"],
                         "svf_c_fitted": calibration["svf_c"] is not None})
        if own:
            note["policy_thresholds"] = own
        return note

    def calibration(self, pipe, policy=None) -> dict:
        """The calibration this guard uses on ``pipe`` (its primary text encoder) for ``policy`` (default: the
        default policy): the risk scale of the gate (``"scale"``), the budget it works at, the per-category gate
        thresholds at that budget, the fire rate they give on the benign reference, SVF's fitted c and the two
        mean betas it is the midpoint of.

        Example:
            >>> from safegen.guards import Safree
            >>> from safegen.testing import tiny_sd_pipeline
            >>> cal = Safree(fpr_budget=0.05).calibration(tiny_sd_pipeline())
            >>> cal["budget"], cal["reference_fire_rate"] <= 0.05, sorted(cal["thresholds"])[:2]
            (0.05, True, ['harassment', 'hate'])
        """
        from ..calibration import fire_rate
        from ..policy import load_policy
        from ..specs import pipeline_spec

        policy = load_policy("default") if policy is None else policy
        stream = _default_streams(pipe, pipeline_spec(pipe).encode, {})[-1]
        data = self.calibrate_stream({}, stream, policy)
        budget = self._budget(policy)
        thresholds = data["scale"].thresholds(budget)
        return {**data, "budget": budget, "thresholds": dict(zip(data["scale"].categories, thresholds.tolist())),
                "reference_fire_rate": fire_rate(data["scale"].reference, thresholds)}

    # ------------------------------------------------------------------ before the loop
    def prepare(self, call) -> None:
        policy = call.policy
        clip_skip = call.args.get("clip_skip")
        cache = call.protection.cache  # per pipeline: one guard object may protect several
        if not has_text_encoder(call.pipe):
            unreadable_call(call, self.name, "SAFREE builds its concept space with the pipeline's text encoder, and "
                                         "this pipeline has none")
            return
        streams = _streams(call, cache, clip_skip)
        primary = streams[-1]
        cond = call.conditioning()
        pe = cond["prompt_embeds"]
        B = pe.shape[0]
        cats = list(policy.categories)
        texts = call.condition_texts()  # every text that conditions the model, per prompt (None: embeddings)
        text_mode = texts is not None

        # ---- gate: which prompts are about which categories, in every stream whose text differs from the
        # primary's (SDXL's prompt_2), from the pipeline's own token states: no extra encoder pass
        gate_streams = [primary]
        if text_mode:
            primary_texts = _stream_texts(texts, primary)
            gate_streams += [st for st in streams[:-1] if _stream_texts(texts, st) != primary_texts]
        scores = torch.full((B, len(cats)), float("-inf"))
        nearest: list[list[str | None]] = [[None] * len(cats) for _ in range(B)]
        for stream in gate_streams:
            if text_mode and stream.tokens is None:  # pooled only (FLUX's CLIP): its summary is the pooled vector
                summary = cond["pooled_prompt_embeds"][:, stream.pooled].float()
            elif text_mode:
                batch = stream.adapter.tokenize(_stream_texts(texts, stream))
                summary = stream.adapter.summarize(stream.block(pe, batch), batch.attention_mask).float()
            else:
                summary = stream.block(pe).float()  # (B, L, D): every position is a candidate
            found, closest = self._gate_scores(cache, stream, summary, policy, cats)
            for j, cat in enumerate(cats):
                better = (found[:, j] > scores[:, j]) | torch.isnan(found[:, j])
                scores[:, j] = torch.where(better, found[:, j], scores[:, j])
                if text_mode:  # the single concept closest to each prompt, for the report
                    phrases = self._gate_space(cache, stream, cat, policy)[4]
                    for b, k in enumerate(closest[j]):
                        if better[b]:
                            nearest[b][j] = phrases[k]
        # ---- the literal route: a concept phrase written in any text that conditions the model
        lexical: list[list[str | None]] = [[None] * len(cats) for _ in range(B)]
        if text_mode:
            for j, cat in enumerate(cats):
                regex = self._gate_space(cache, primary, cat, policy)[2]
                for b, item in enumerate(texts):
                    for _, text in item:
                        m = regex.search(text)
                        if m:
                            lexical[b][j] = m.group(0)
                            break
        calibration = self._calibration(cache, primary, policy)
        thresholds, budgets = self._thresholds(policy, calibration)
        thresholds = torch.tensor(thresholds)
        risks = calibration["scale"].risk(scores) if calibration else None
        svf = self.svf_constants(calibration)
        lex = torch.tensor([[h is not None for h in row] for row in lexical], dtype=torch.bool).view(B, len(cats))
        # a NaN score or threshold cannot be decided on (score >= NaN is False): those prompts fail closed,
        # unless a literal phrase already decides them
        bad = (~torch.isfinite(scores) | ~torch.isfinite(thresholds)).any(1) & ~lex.any(1)
        fired = (scores >= thresholds) | lex
        state = _CallState(fired=fired, scores=scores, lexical=lexical, cats=cats, thresholds=thresholds,
                           budgets=budgets, risks=risks,
                           nearest=nearest, error=bad, calibration=self._calibration_note(policy, calibration, svf))
        call.set_state(self, state)
        actions = [policy.categories[c].action for c in cats]
        blocked_before = torch.tensor(call.blocked_prompts)  # an earlier stage's block: nothing left to steer
        block = (torch.tensor([[a == "block" for a in actions]]) & fired).any(1) & ~blocked_before & ~bad
        # ungated (official SAFREE, or gate=False): every prompt is steered over every steer category's span
        steer_fired = fired if self._gated else torch.ones_like(fired)
        steer = torch.tensor([[a == "steer" for a in actions]]) & steer_fired & ~(block | bad | blocked_before).view(B, 1)
        for b in torch.nonzero(bad).flatten().tolist():
            call.block_prompt(b, self.name, "a similarity score or threshold is not a finite number (NaN or inf): "
                                            "prompt blocked (fail closed)", verdict="error")
        for b in torch.nonzero(block).flatten().tolist():
            j = self._reported_category(state, b, among=[k for k, a in enumerate(actions) if a == "block"])
            call.block_prompt(b, self.name, f"category {cats[j]!r} ({self._why(state, b, j)}; action: block)",
                              category=cats[j], concept=lexical[b][j] or nearest[b][j],
                              score=float(scores[b, j]), threshold=float(thresholds[j]),
                              **self._risk_fields(state, b, j),
                              steps_saved=call.num_steps)
        state.blocked = block | bad
        steered = steer.any(1)
        state.steered = steered
        if not bool(steered.any()) or not self.projection and not self.negative_prompt:
            return
        rows = torch.nonzero(steered).flatten().tolist()
        groups = {}
        for b in rows:
            groups.setdefault(tuple(c for j, c in enumerate(cats) if steer[b, j]), []).append(b)
        state.groups = groups

        # ---- parts (a)-(d) per stream, batched over the steered prompts
        T = call.num_steps
        safe_pe = pe.clone()
        triggers: dict[int, list[str]] = {b: [] for b in rows}
        t_prime = torch.full((B,), -1, dtype=torch.long)
        beta_all = torch.zeros(B)
        safe_pooled = cond.get("pooled_prompt_embeds")
        if safe_pooled is not None:
            safe_pooled = safe_pooled.clone()
        if self.projection:
            # prompt_embeds only: no text to mask, every encoder's triggers come from its positions' share of the
            # concept span (_project_embeds), reported as "embeddings"
            state.rules = {st.name: self._rule(st.adapter) if text_mode else "embeddings" for st in streams
                           if st.tokens is not None}
            for stream in (st for st in streams if st.tokens is not None):  # each encoder's token states
                for group, members in groups.items():
                    idx = torch.tensor(members)
                    basis = self._space(cache, stream, group, policy).to(pe.device)
                    sb = (stream.adapter.tokenize([_stream_texts(texts, stream)[b] for b in members])
                          if text_mode else None)
                    tokens = stream.block(pe[idx], sb).float()
                    if text_mode:
                        new_tokens, trig, tp, beta = self._project_text(stream, sb, tokens, basis, T, svf)
                        if stream is primary or stream in gate_streams:  # each distinct text's triggers
                            for r, b in enumerate(members):
                                pos = torch.nonzero(trig[r]).flatten()
                                ids = sb.ids[r, sb.first + pos]
                                new = [t for t in stream.adapter.token_strings(ids.tolist()) if t not in triggers[b]]
                                triggers[b] = new + triggers[b] if stream is primary else triggers[b] + new
                    else:
                        new_tokens, trig, tp, beta = self._project_embeds(tokens, basis, T, stream.adapter.first,
                                                                          svf)
                        if stream is primary:
                            for r, b in enumerate(members):
                                triggers[b] = [f"#{int(p)}" for p in torch.nonzero(trig[r]).flatten()]
                    stream.put(safe_pe, idx, new_tokens.to(pe.dtype), sb)
                    if stream is primary:  # host-side bookkeeping (one small copy per call)
                        t_prime[idx] = tp.cpu()
                        beta_all[idx] = beta.float().cpu()
            if safe_pooled is not None and self.sdxl_pooled == "project" and not self.official:
                for stream in (st for st in streams if st.pooled is not None):  # each encoder's pooled part
                    for group, members in groups.items():
                        idx = torch.tensor(members)
                        pb = self._space(cache, stream, group, policy, projected=stream.pooled_projected).to(pe.device)
                        part = safe_pooled[idx][:, stream.pooled].float().unsqueeze(1)
                        safe_pooled[idx, stream.pooled] = remove_span(part, pb).squeeze(1).to(safe_pooled.dtype)
            if not self.svf:
                t_prime = torch.where(t_prime >= 0, torch.full_like(t_prime, T), t_prime)
        if not bool(torch.isfinite(safe_pe).all()) or safe_pooled is not None and not bool(
                torch.isfinite(safe_pooled).all()):
            raise NonFiniteError("SAFREE's projected conditioning is not finite (NaN or inf)")
        any_trigger = {b: bool(triggers[b]) for b in rows}
        # prompts whose tokens were not changed use the original conditioning on every step
        changed = torch.tensor([b in any_trigger and any_trigger[b] for b in range(B)])
        t_prime = torch.where(changed, t_prime, torch.full_like(t_prime, -1))
        state.safe, state.orig, state.t_prime, state.beta, state.triggers = safe_pe, pe, t_prime, beta_all, triggers
        state.safe_pooled, state.orig_pooled = safe_pooled, cond.get("pooled_prompt_embeds")
        override = {"prompt_embeds": torch.where(changed.view(B, 1, 1).to(pe.device), safe_pe, pe)}
        if safe_pooled is not None:
            override["pooled_prompt_embeds"] = torch.where(changed.view(B, 1).to(pe.device), safe_pooled,
                                                           cond["pooled_prompt_embeds"])

        # ---- the concept keywords as negative prompt of steered prompts (authors' setting)
        # (never over the caller's own negative_prompt_embeds: there is no text to add the keywords to)
        given_embeds = call.args.get("negative_prompt_embeds") is not None
        state.negative_kept = given_embeds
        if self.negative_prompt and call.do_cfg and cond.get("negative_prompt_embeds") is not None \
                and not given_embeds:
            neg_text, neg_text_2 = [], []
            user_2 = _as_texts(call.args.get("negative_prompt_2"), B)
            for b in rows:
                order = sorted((j for j in range(len(cats)) if steer[b, j]), key=lambda j: -float(scores[b, j]))
                kw = self._keyword_prompt(cache, primary.adapter, policy, [cats[j] for j in order])
                user = call.negative_prompts[b] if call.negative_prompts else ""
                neg_text.append(f"{user}, {kw}" if user else kw)
                # SDXL's second encoder reads negative_prompt_2 when the caller gave one
                neg_text_2.append(f"{user_2[b]}, {kw}" if user_2 and user_2[b] else neg_text[-1])
            enc = self._negative_embeds(call, cache, neg_text, neg_text_2 if user_2 else None)
            idx = torch.tensor(rows)
            npe = cond["negative_prompt_embeds"]
            new_rows = enc["prompt_embeds"].to(npe.dtype)
            if cond.get("negative_prompt_embeds_mask") is not None:  # an LLM's rows are as long as their text
                mask, n = cond["negative_prompt_embeds_mask"], npe.shape[0]
                npe, new_rows = join_rows([npe, new_rows]).split([n, len(rows)])
                mask, new_mask = join_rows([mask, enc["prompt_embeds_mask"].to(mask.dtype)]).split([n, len(rows)])
                mask = mask.clone()
                mask[idx] = new_mask
                override["negative_prompt_embeds_mask"] = mask
            npe = npe.clone()
            npe[idx] = new_rows
            override["negative_prompt_embeds"] = npe
            if "negative_pooled_prompt_embeds" in cond and cond["negative_pooled_prompt_embeds"] is not None:
                nppe = cond["negative_pooled_prompt_embeds"].clone()
                nppe[idx] = enc["pooled_prompt_embeds"].to(nppe.dtype)
                override["negative_pooled_prompt_embeds"] = nppe
            state.negative_text = dict(zip(rows, neg_text))
        call.override_conditioning(**override)
        state.last_filtered_step = int(t_prime.max()) if len(t_prime) else -1  # the one host sync
        if self.reattention and state.last_filtered_step >= 0 and self._has_skips(call.denoiser):
            from .reattention import LatentReattention

            lra = LatentReattention(call.pipe.unet, tau=self.reattention_tau, s1=self.reattention_s1,
                                    s2=self.reattention_s2)
            lra.begin(call, t_prime=state.t_prime, orig=state.orig, orig_pooled=state.orig_pooled,
                      last_filtered_step=state.last_filtered_step)
            call.defer(lra.end)
            state.lra = lra

    @staticmethod
    def _negative_embeds(call, cache: dict, texts: list[str], texts_2: list[str] | None) -> dict:
        """The keyword negative prompts' conditioning, one row per text, through the pipeline's own
        ``encode_prompt``; each distinct text is encoded once per protection and
        :func:`~safegen.protection.encode_setting` (as SLD's concept): steered prompts of the same categories
        share one negative prompt, and on a T5 pipeline its encoding is most of SAFREE's per-call work."""
        from ..protection import encode_setting

        setting = encode_setting(call)
        seconds = texts_2 if texts_2 is not None else [None] * len(texts)
        keys = [("safree-negative", t, t2, setting) for t, t2 in zip(texts, seconds)]
        todo = [k for k in dict.fromkeys(keys) if k not in cache]  # distinct texts not encoded yet, in order
        if todo:
            enc = _encode_texts(call, [k[1] for k in todo], [k[2] for k in todo] if texts_2 is not None else None)
            for r, k in enumerate(todo):
                cache[k] = {name: (v[r:r + 1] if v is not None else None) for name, v in enc.items()}
        rows = [cache[k] for k in keys]
        return {k: (join_rows([row[k] for row in rows]) if rows[0].get(k) is not None else None)
                for k in rows[0]}

    @staticmethod
    def _risk_fields(state: "_CallState", b: int, j: int) -> dict:
        """The report's calibrated fields for prompt ``b`` and category ``j``: risk, budget and risk per category
        (a literal phrase fires whatever its risk)."""
        if state.risks is None:
            return {"budget": state.budgets[j]}
        row = state.risks[b]
        return {"risk": round(float(row[j]), 4), "budget": state.budgets[j],
                "risks": {c: round(float(v), 4) for c, v in zip(state.cats, row)}}

    @staticmethod
    def _reported_category(state: "_CallState", b: int, among: Sequence[int] | None = None) -> int:
        """The category reported for prompt ``b`` (restricted to the indices ``among``): a literal phrase is the
        strongest evidence, then the highest similarity among the fired categories, else the closest one."""
        scores, fired = state.scores[b], state.fired[b].clone()
        allowed = torch.ones_like(fired)
        if among is not None:
            allowed = torch.zeros_like(fired)
            allowed[list(among)] = True
        lexical = torch.tensor([h is not None for h in state.lexical[b]]) & allowed
        pool = lexical if bool(lexical.any()) else fired & allowed
        if not bool(pool.any()):
            pool = allowed
        return int(torch.where(pool, scores.nan_to_num(-1.0), torch.full_like(scores, -2.0)).argmax())

    def _why(self, state: "_CallState", b: int, j: int) -> str:
        lex = state.lexical[b][j]
        if lex:
            return f"literal {lex!r}"
        if not bool(state.fired[b, j]):  # only an ungated SAFREE steers a prompt the gate did not flag
            who = "official SAFREE" if self.official else "SAFREE with gate=False"
            return f"{who} steers every prompt; similarity {float(state.scores[b, j]):.2f}"
        return f"similarity {float(state.scores[b, j]):.2f} ≥ {float(state.thresholds[j]):.2f}"

    def _keyword_prompt(self, cache: dict, adapter: TextEncoderAdapter, policy, categories: list[str]) -> str:
        """Joined concept phrases of ``categories`` (most relevant first), cut to fit the encoder's length."""
        text = concept_phrases(policy, categories)
        key = ("safree-negative", id(adapter), text)
        hit = cache.get(key)
        if hit is None:
            phrases = text.split(", ")
            lengths = [len(adapter.tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in phrases]
            budget, used, kept = adapter.max_length - 2, 0, []
            for p, n in zip(phrases, lengths):  # once per distinct phrase list (cached), not per call
                if used + n > budget:
                    break
                kept.append(p)
                used += n
            hit = cache[key] = ", ".join(kept)
        return hit

    def _analyse_text(self, ad: TextEncoderAdapter, sb, tokens: torch.Tensor, basis: torch.Tensor):
        """Parts (b)-(c) for prompts given as text: ``(trigger mask (b, N), every token projected (b, L, D))``."""
        if self._rule(ad) == "states":
            return self._analyse_states(sb, tokens, basis)
        copies, att, owner, position, valid = masked_copies(sb.ids, sb.attention_mask, sb.n_content, sb.first,
                                                            ad.mask_token_id,
                                                            cut=not ad.padding_matters or self._short(ad))
        vecs = []
        for start in range(0, copies.shape[0], self.encode_batch):  # chunks of sequences, not tokens
            vecs.append(ad.encode(copies[start:start + self.encode_batch], att[start:start + self.encode_batch]).summary)
        vecs = torch.cat(vecs).float() if vecs else torch.zeros(0, tokens.shape[-1])
        b, n_max = valid.shape
        masked = torch.zeros(b, n_max, vecs.shape[-1], device=vecs.device)
        masked[valid] = vecs
        dist = remove_span(masked, basis.to(masked.device)).norm(dim=-1)  # (b, N)
        trig = trigger_mask(dist, valid, self.alpha)
        prompt_basis = orthonormal_basis(masked.transpose(1, 2), valid)  # (b, D, N)
        projected = project_tokens(tokens, prompt_basis.to(tokens.device), basis.to(tokens.device))
        return trig, projected

    def _analyse_states(self, sb, tokens: torch.Tensor, basis: torch.Tensor):
        """:meth:`_analyse_text` by the token-state rule (``trigger_rule="states"``): d_i is the length of the
        concept-span part of content token i's state minus the prompt's mean content state (states share a large
        common part, which would make every token look alike), triggers by the same leave-one-out rule; the
        prompt's span is that of its content tokens' states."""
        b, first = tokens.shape[0], sb.first
        n_max = int(sb.n_content.max()) if b else 0
        content = tokens[:, first:first + n_max]
        valid = (torch.arange(n_max).view(1, -1) < sb.n_content.view(-1, 1)).to(tokens.device)
        basis = basis.to(tokens.device)
        w = valid.unsqueeze(-1).to(content.dtype)
        mean = (content * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)
        dist = ((content - mean) @ basis).norm(dim=-1)  # (b, N)
        trig = trigger_mask(dist, valid, self.alpha)
        prompt_basis = orthonormal_basis(content.transpose(1, 2), valid)
        return trig, project_tokens(tokens, prompt_basis, basis)

    def _project_text(self, stream: _Stream, sb, tokens: torch.Tensor, basis: torch.Tensor, T: int, svf: tuple):
        """Parts (b)-(d) for prompts given as text. tokens: (b, L, D) states as the pipeline computed them;
        ``svf``: :meth:`svf_constants`."""
        trig, projected = self._analyse_text(stream.adapter, sb, tokens, basis)
        b, n_max = trig.shape
        L = tokens.shape[1]
        pos_full = torch.zeros(b, L, dtype=torch.bool, device=tokens.device)
        pos_full[:, sb.first:sb.first + n_max] = trig.to(tokens.device)
        if self.project_positions != "triggers":  # the named extensions beyond the paper
            at = torch.arange(L, device=tokens.device).view(1, L)
            start = sb.first + (sb.n_content.to(tokens.device).view(b, 1) if self.project_positions == "triggers+eos"
                                else 0)
            pos_full |= at >= start
        new_tokens = torch.where(pos_full.unsqueeze(-1), projected, tokens)
        att_full = sb.attention_mask[:, :L].to(tokens.device)
        if att_full.shape[1] < L:  # an LLM's conditioning is as long as the call's longest prompt, not these
            att_full = pad_tokens(att_full, L)
        gamma, k, c, rescale = svf
        tp, beta = svf_steps(tokens, projected, att_full, gamma=gamma, k=k, c=c, num_steps=T if rescale else None)
        return new_tokens, trig, tp, beta

    def _project_embeds(self, tokens: torch.Tensor, basis: torch.Tensor, T: int, first: int, svf: tuple):
        """Parts (b)-(d) when only ``prompt_embeds`` were given (no text to mask): positions whose state lies
        close to the concept span trigger; the prompt's span is that of its own token states."""
        b, L, _ = tokens.shape
        rel = (tokens @ basis).norm(dim=-1) / tokens.norm(dim=-1).clamp(min=1e-12)  # (b, L)
        valid = torch.ones(b, L, dtype=torch.bool)
        valid[:, :first] = False  # a BOS state (CLIP) is the same for every prompt; T5 has none
        trig = trigger_mask(rel, valid, self.alpha)
        prompt_basis = orthonormal_basis(tokens.transpose(1, 2), valid)
        projected = project_tokens(tokens, prompt_basis, basis)
        where = valid if self.project_positions == "all" else trig
        new_tokens = torch.where(where.unsqueeze(-1), projected, tokens)
        gamma, k, c, rescale = svf
        tp, beta = svf_steps(tokens, projected, torch.ones(b, L), gamma=gamma, k=k, c=c,
                             num_steps=T if rescale else None)
        return new_tokens, trig, tp, beta

    # ------------------------------------------------------------------ the loop
    def _loop_tables(self, call, state) -> dict:
        """Per-item tensors for the step switch, built once per call on the embeddings' device (so the
        per-step work is two ``torch.where`` and no host-to-device copy)."""
        keep = torch.tensor(call.kept_prompts)
        nipp = call.num_images_per_prompt
        dev = state.safe.device
        rows = keep.to(dev)

        def items(t):
            return t.index_select(0, rows).repeat_interleave(nipp, 0)

        tables = {"t_prime": state.t_prime.index_select(0, keep).repeat_interleave(nipp).to(dev),
                  "safe": items(state.safe), "orig": items(state.orig)}
        if state.safe_pooled is not None:
            tables["safe_pooled"], tables["orig_pooled"] = items(state.safe_pooled), items(state.orig_pooled)
        return tables

    def step_end(self, call, step, timestep, tensors):
        state = call.state(self)
        if state is None or state.safe is None or step >= state.last_filtered_step + 1:
            return None  # past every prompt's window: nothing to switch any more
        tab = state.loop
        if tab is None:
            tab = state.loop = self._loop_tables(call, state)
        use_safe = (step + 1) <= tab["t_prime"]  # (n_items,), on device: the next step's conditioning
        out = {}
        pe = tensors.get("prompt_embeds")
        if pe is not None:
            cond = torch.where(use_safe.view(-1, 1, 1), tab["safe"], tab["orig"]).to(pe.dtype)
            # AnimateDiff repeats every row once per frame (repeat_interleave) before the loop
            per_row = pe.shape[0] // (cond.shape[0] * (2 if call.do_cfg and call.spec.cfg_in_batch else 1))
            if per_row > 1:
                cond = cond.repeat_interleave(per_row, 0)
            n = cond.shape[0]
            out["prompt_embeds"] = torch.cat([pe[:-n], cond]) if pe.shape[0] > n else cond
        for key in ("add_text_embeds", "pooled_prompt_embeds"):
            te = tensors.get(key)
            if te is not None and "safe_pooled" in tab:
                pooled = torch.where(use_safe.view(-1, 1), tab["safe_pooled"], tab["orig_pooled"]).to(te.dtype)
                n = pooled.shape[0]
                out[key] = torch.cat([te[:-n], pooled]) if te.shape[0] > n else pooled
        return out

    # ------------------------------------------------------------------ after the loop
    def finish(self, call) -> None:
        state = call.state(self)
        if state is None:
            return
        lra, state.lra = state.lra, None
        if lra is not None:
            lra.end()
        if state.reported:
            return
        state.reported = True
        cats, scores, fired = state.cats, state.scores, state.fired
        thresholds = state.thresholds
        for b in range(call.batch_size):
            if call.blocked_prompts[b]:  # blocked here (its report is written) or by an earlier stage
                continue
            j = self._reported_category(state, b)
            cat = cats[j]
            lex = state.lexical[b][j]
            for item in call.items_of(b):
                res = call.result(item, self.name)
                res.scores = {c: round(float(scores[b, i]), 4) for i, c in enumerate(cats)}
                res.score = float(scores[b, j])
                res.threshold = float(thresholds[j])
                for k, v in self._risk_fields(state, b, j).items():
                    setattr(res, k, v)
                res.details = {"calibration": state.calibration}
                if not bool(fired[b].any()) and not bool(state.steered[b]):
                    res.verdict = "pass"
                    continue
                res.category = cat
                res.concept = lex or state.nearest[b][j]
                if not bool(state.steered[b]):
                    res.verdict = "log"
                    res.reason = f"prompt matches category {cat!r} (action: log)"
                    continue
                res.verdict = "steer"
                trig = state.triggers.get(b, [])
                res.trigger_tokens = list(trig)
                tp = int(state.t_prime[b]) if state.t_prime is not None else -1
                res.filtered_steps = min(tp + 1, call.num_steps) if tp >= 0 else 0
                lra = self.reattention and self._has_skips(call.denoiser)
                res.details = {**res.details,
                               "beta": round(float(state.beta[b]), 4) if state.beta is not None else None,
                               "lexical_match": lex, "negative_prompt": state.negative_text.get(b),
                               "mode": "text" if call.prompts is not None else "embeddings",
                               "trigger_rule": dict(state.rules), "reattention": lra}
                if state.safe_pooled is not None and not self._pooled_switches(call):
                    res.details["pooled_note"] = (f"{type(call.pipe).__name__}'s step callback cannot hand back the "
                                                  "pooled vector: the projected one conditions every step (the "
                                                  "token states switch back after the filtered steps)")
                if self.reattention and not lra:
                    res.details["reattention_skipped"] = (f"{type(call.denoiser).__name__} has no U-Net skip "
                                                          "features to filter")
                if state.negative_kept and self.negative_prompt:
                    res.details["negative_prompt_skipped"] = ("the call gave negative_prompt_embeds: kept as given "
                                                              "(no text to add the concept keywords to)")
                if call.prompts is None:
                    res.details["embeddings_note"] = ("embeddings only: no literal route (no text), the similarity "
                                                      "gate decided on every token position")
                why = self._why(state, b, j)
                res.reason = (f"category {cat!r} ({why}); projected tokens {trig} out of the concept span "
                              f"for {res.filtered_steps} of {call.num_steps} steps")


def _as_texts(value, n: int) -> list[str] | None:
    """A text argument as one entry per prompt (``None`` when not given)."""
    if value is None:
        return None
    return [value] * n if isinstance(value, str) else list(value)


def _encode_texts(call, texts: list[str], texts_2: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Positive-prompt conditioning of ``texts`` (and, for a second encoder, ``texts_2``) through the pipeline's
    own encode_prompt (no CFG)."""
    from ..protection import encode_with_pipeline

    enc = encode_with_pipeline(call, texts, do_cfg=False, prompt_2=texts_2)
    return {k: v for k, v in enc.items() if k in ("prompt_embeds", "pooled_prompt_embeds", "prompt_embeds_mask")}
