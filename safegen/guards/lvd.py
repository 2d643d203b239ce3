"""Latent Variable Defense (LVD; Pang et al., "Towards Understanding Unsafe Video Generation"): stop a generation
inside the loop as soon as its latents are turning unsafe, and skip the remaining UNet steps and the VAE decode.

The original decodes the predicted x0 through the VAE at every step and runs one VideoMAE per (category, step)
(250 classifiers per model). Here:

* **What is classified: the predicted x0, in latent space.** x_t is mostly noise early on and its statistics change
  with t; the predicted x0 (what the model currently believes the final latent is) lives in the same space at
  every step, so one classifier serves all steps, and it is already computed by the scheduler (for free). It is
  read through a per-call proxy of ``scheduler.step`` (:func:`predicted_x0`), right for epsilon-, v- and
  sample-prediction on DDPM-type schedulers, k-diffusion (VE) schedulers and flow matching. No VAE decode.
* **One classifier** (:class:`LatentClassifier`, ~0.1M parameters): a small conv net over the x0 latent,
  conditioned on the noise level of the step (FiLM), multi-label over the policy's categories. On video
  pipelines every frame of x0 is classified (whatever the latent layout: :func:`latent_frames`), the clip's
  probability is the max (or mean) over its frames, and the report names the frames that reached the threshold.
* **The decision rule, online**: over the first ``window`` steps (checked every ``check_every``), a step counts
  when some category's probability reaches ``threshold``; the item is stopped as soon as ``ceil(checks ·
  ratio)`` steps counted, and accepted (no more checks) as soon as that can no longer happen. A call with fewer
  steps than the window scales the count to the checks it can make, and its last step (whose x0 is all but the
  output) stops a flagged item on its own, so LVD protects at any step count (the report says so).
* **On a stop**: the item's UNet rows stop running (the rest of the batch goes on), its latents are not
  decoded, it returns the policy's placeholder, and its report gives the step, the category, the scores and the
  UNet steps saved (:meth:`safegen.protection.Call.stop_item`).

Training (:func:`record_trajectories`, :func:`train_classifier`, ``safegen train-lvd``): run the pipeline over
labelled prompts, record x0 along each trajectory, label each trajectory with an oracle on its final image (the
default model's exact oracle here; NudeNet or human labels for real models), then train the classifier on
(x0 at step i, noise level at step i) → the trajectory's label.

Weights are safetensors only, with the config, the category names and a fingerprint of the UNet they were
trained for in the metadata; a classifier trained for another model is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GuardUnavailable, NonFiniteError
from ..hooks import patch
from ..outputs import latent_unpacker
from ..unet_rows import _expand_rows
from ..calibration import guard_thresholds
from ..guard import Guard

__all__ = ["LVDConfig", "LatentClassifier", "LVDWeightsError", "LVD", "predicted_x0", "unet_fingerprint", "latent_frames",
           "record_trajectories", "train_classifier", "Trajectories", "default_weights_path", "balanced_accuracy"]

_FORMAT = "safegen.lvd"
_FORMAT_VERSION = 1
_TRAIN_HINT = "train one with `safegen train-lvd --model MODEL --out FILE` (see safegen.guards.lvd)"

#: k-diffusion style schedulers: the sample lives in "variance exploding" form x = x0 + σ·ε (scaled for the
#: UNet by ``scale_model_input``), σ = ``sigmas[step_index]``.
_VE_SCHEDULERS = frozenset({
    "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
})


class LVDWeightsError(ValueError):
    """An LVD classifier file that is missing, corrupt, or made for another model."""


class LVDModelMismatch(LVDWeightsError, GuardUnavailable):
    """The classifier was trained on another model's latents: LVD cannot run on this pipeline without its own
    (a policy with ``skip_unavailable`` skips it there)."""


def _rule_of(trace: torch.Tensor, need: int) -> torch.Tensor:
    """Rule scores (..., K) of check traces (..., checks, K): per category the ``need``-th highest probability (-1
    where fewer than ``need`` checks were made)."""
    return trace.topk(min(need, trace.shape[-2]), dim=-2).values.select(-2, -1)


# ---------------------------------------------------------------------- predicted x0
def _step_index(scheduler, timestep) -> int:
    idx = getattr(scheduler, "step_index", None)
    if idx is None:  # before the scheduler's first step it has not located itself yet
        if hasattr(scheduler, "index_for_timestep"):
            t = timestep.to(scheduler.timesteps.device) if torch.is_tensor(timestep) else timestep
            return int(scheduler.index_for_timestep(t))
        return 0
    return int(idx)


def _x0(kind: str, out: torch.Tensor, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    if kind == "epsilon":
        return (x - sigma * out) / alpha
    if kind == "v_prediction":
        return alpha * x - sigma * out
    if kind == "sample":
        return out
    if kind == "flow_prediction":
        return x - sigma * out
    raise ValueError(f"LVD cannot compute x0 for prediction_type {kind!r}; supported: epsilon, v_prediction, "
                     "sample, flow_prediction")


def predicted_x0(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor
                 ) -> tuple[torch.Tensor, float]:
    """The predicted clean latent x̂0 at this step and the step's noise level in [0, 1] (σ/√(α²+σ²)).

    Called with the arguments of ``scheduler.step`` *before* it runs. Formulas (α, σ the signal and noise
    coefficients of x_t = α·x0 + σ·ε):

    * DDPM-type schedulers (DDIM, DDPM, PNDM, DPM-Solver, UniPC, ...): epsilon x̂0 = (x − σ·ε̂)/α, v-prediction
      x̂0 = α·x − σ·v̂, with α = √ᾱ_t, σ = √(1 − ᾱ_t) (or the scheduler's own σ → (α, σ) map when it has one,
      which also covers flow-sigma variants);
    * k-diffusion schedulers (Euler, LMS, Heun, ...; x = x0 + σ·ε): epsilon x̂0 = x − σ·ε̂, v-prediction
      x̂0 = x/(σ² + 1) − σ/√(σ² + 1)·v̂;
    * flow matching (x = (1 − σ)·x0 + σ·ε, the model predicts v = ε − x0): x̂0 = x − σ·v̂.

    Example:
        >>> import torch
        >>> from diffusers import DDIMScheduler
        >>> s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        >>> s.set_timesteps(10)
        >>> x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        >>> x0, noise = predicted_x0(s, eps, s.timesteps[0], x)
        >>> ref = s.step(eps, s.timesteps[0], x).pred_original_sample
        >>> bool(torch.allclose(x0, ref, atol=1e-5)), 0.9 < noise <= 1.0
        (True, True)
    """
    name = type(scheduler).__name__
    cfg = scheduler.config
    if "FlowMatch" in name:
        sigma = scheduler.sigmas[_step_index(scheduler, timestep)].to(sample.device, sample.dtype)
        return sample - sigma * model_output, float(sigma)
    kind = getattr(cfg, "prediction_type", "epsilon")
    if name in _VE_SCHEDULERS:
        sigma = scheduler.sigmas[_step_index(scheduler, timestep)].to(sample.device, torch.float32)
        s = float(sigma)
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
        elif kind == "sample":
            x0 = model_output
        else:
            raise ValueError(f"LVD cannot compute x0 for {name} with prediction_type {kind!r}")
        return x0.to(sample.dtype), s / math.sqrt(s * s + 1)
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and getattr(scheduler, "sigmas", None) is not None:
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[_step_index(scheduler, timestep)])
        a, s = float(alpha), float(sigma)
        if getattr(cfg, "use_flow_sigmas", False) and kind == "flow_prediction":
            return sample - s * model_output, s
        return _x0(kind, model_output, sample, a, s), s / math.sqrt(a * a + s * s)
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise TypeError(f"LVD does not know how to read the predicted x0 from {name}: it has neither "
                        "alphas_cumprod nor sigmas")
    t = int(timestep)
    abar = float(acp[t])
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    return _x0(kind, model_output, sample, a, s), s


class _X0Tap:
    """For one call: ``scheduler.step`` is proxied (an instance attribute, removed afterwards) so every step's
    x̂0 and noise level are kept in ``last`` (and, when ``history`` is a list, appended to it). ``unpack`` turns
    packed latents into images (:func:`safegen.outputs.latent_unpacker`; FLUX), so x̂0 is always (B, C, H, W)
    for images."""

    def __init__(self, scheduler, history: list | None = None, unpack=None):
        self.scheduler, self.history, self.last = scheduler, history, None
        # every diffusers scheduler names them model_output, timestep and sample, but not always in that order
        # (CogVideoXDPMScheduler.step(model_output, old_pred_original_sample, timestep, timestep_back, sample))
        signature = inspect.signature(scheduler.step)

        def make(original):
            def step(*args, **kwargs):
                got = signature.bind_partial(*args, **kwargs).arguments
                x0, noise = predicted_x0(scheduler, got["model_output"], got["timestep"], got["sample"])
                self.last = (x0 if unpack is None else unpack(x0), noise)
                if self.history is not None:
                    self.history.append((self.last[0].detach(), self.last[1]))
                return original(*args, **kwargs)
            return step

        self._patch = patch(scheduler, "step", make, "safegen.lvd.x0")

    def remove(self) -> None:
        self._patch.remove()


# ---------------------------------------------------------------------- the classifier
@dataclass
class LVDConfig:
    """Architecture of a :class:`LatentClassifier` and what it was trained for (stored with the weights).

    Args:
        latent_channels (`int`): channels of the model's latents (4 for SD 1.x/2.x/SDXL).
        categories (`list[str]`): the output labels, in order (policy categories).
        width (`int`, defaults to 32): channels of the first conv layer (the next two have twice as many).
        hidden (`int`, defaults to 64): width of the classification MLP.
        noise_features (`int`, defaults to 8): sinusoidal features of the noise level (FiLM conditioning).
        input_clip (`float`, defaults to 6.0): x̂0 is clamped to ±input_clip (early-step estimates overshoot).
        model (`dict`): fingerprint of the UNet the classifier was trained on (:func:`unet_fingerprint`).
    """

    latent_channels: int
    categories: list = field(default_factory=list)
    width: int = 32
    hidden: int = 64
    noise_features: int = 8
    input_clip: float = 6.0
    model: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("latent_channels", "width", "hidden", "noise_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LVDConfig({name}=...) must be a positive integer, got {v!r}")
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"LVDConfig(categories=...) must be distinct category names, got {self.categories!r}")
        self.categories = list(self.categories)


def _latent_channels(pipe, den) -> int:
    """Channels of the latent images x̂0 is classified as (packed layouts unpack 2×2 patches: a quarter)."""
    from ..specs import pipeline_spec

    try:
        packed = pipeline_spec(pipe).layout == "packed"
    except TypeError:  # a pipeline safegen does not protect: its latents as the denoiser reads them
        packed = False
    return int(den.config.in_channels) // 4 if packed else int(den.config.in_channels)


def unet_fingerprint(pipe) -> dict[str, Any]:
    """What identifies the latent space a classifier was trained on: the denoiser's class and config digest,
    and the channels of the latent images the classifier reads (for packed latents, FLUX's 2×2 patches as
    tokens, a quarter of the denoiser's input channels)."""
    den = getattr(pipe, "unet", None)
    if den is None:  # not ``or``: a torch.compile'd module (OptimizedModule) raises TypeError in bool()
        den = getattr(pipe, "transformer", None)
    if den is None:
        raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer; LVD needs a denoiser")
    den = getattr(den, "_orig_mod", den)  # torch.compile(unet) wraps it: the fingerprint is the model's own
    cfg = {k: v for k, v in dict(den.config).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
    probe = next(iter(den.parameters())).detach().flatten()[:4096].double()  # tells two trainings apart
    return {"class": type(den).__name__, "config_sha": digest, "in_channels": _latent_channels(pipe, den),
            "weight_probe": round(float(probe.sum()), 5), "weight_probe_abs": round(float(probe.abs().sum()), 5)}


def _same_model(want: Mapping[str, Any], have: Mapping[str, Any]) -> bool:
    if (want.get("class"), want.get("config_sha")) != (have["class"], have["config_sha"]):
        return False
    if want.get("weight_probe") is None:
        return True
    # the same weights in another dtype (fp16 on a GPU) move the probe by far less than 1% of its magnitude
    return abs(float(want["weight_probe"]) - have["weight_probe"]) <= 0.01 * have["weight_probe_abs"] + 1e-6


class LatentClassifier(nn.Module):
    """A small conv net on x̂0 latents, FiLM-conditioned on the step's noise level, multi-label over categories.

    ``forward(x0, noise)``: ``x0`` (N, C, H, W) — or (N, C, F, H, W) video latents, classified per frame and
    averaged — and ``noise`` (N,) or a float in [0, 1]; returns logits (N, K).

    Example:
        >>> import torch
        >>> clf = LatentClassifier(LVDConfig(latent_channels=4, categories=["sexual", "violence"]))
        >>> clf(torch.randn(3, 4, 16, 16), 0.5).shape, clf(torch.randn(2, 4, 5, 8, 8), torch.rand(2)).shape
        (torch.Size([3, 2]), torch.Size([2, 2]))
    """

    def __init__(self, config: LVDConfig):
        super().__init__()
        self.config = config
        c, w, h = config.latent_channels, config.width, config.hidden
        self.stem = nn.Conv2d(c, w, 3, padding=1)
        self.down1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.norms = nn.ModuleList([nn.GroupNorm(8 if w % 8 == 0 else 1, w),
                                    nn.GroupNorm(8 if w % 4 == 0 else 1, 2 * w),
                                    nn.GroupNorm(8 if w % 4 == 0 else 1, 2 * w)])
        self.film = nn.Linear(2 * config.noise_features, 4 * w)
        self.head = nn.Sequential(nn.Linear(4 * w, h), nn.SiLU(), nn.Linear(h, len(config.categories)))
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(config.noise_features, dtype=torch.float32),
                             persistent=False)
        self.metadata: dict[str, Any] = {}

    @classmethod
    def scripted(cls, pipe, flag, categories=("violence",), calls: list | None = None) -> "LatentClassifier":
        """A classifier for ``pipe`` whose verdicts are scripted, for testing how a pipeline stops items without
        training one: ``flag(x0)`` gives one bool per latent row it classifies (per frame row for video); those
        rows score certain (logit +10) for the last of ``categories``, the others certain-safe (−10). ``calls``,
        when given, collects how many rows each check classified.

        Example:
            >>> import torch, safegen
            >>> from safegen.testing import tiny_sd_pipeline
            >>> pipe = tiny_sd_pipeline()
            >>> every = LatentClassifier.scripted(pipe, lambda x0: torch.ones(x0.shape[0], dtype=torch.bool))
            >>> pipe = safegen.protect(pipe, guards=[LVD.from_classifier(every, window=2, ratio=0.5)])
            >>> out = pipe("a red cat", num_inference_steps=4, output_type="np")
            >>> out.safety[0].result("lvd").stopped_at_step, out.safety[0].unet_steps_run
            (0, 1)
        """
        cats = list(categories)
        fingerprint = unet_fingerprint(pipe)
        clf = cls(LVDConfig(fingerprint["in_channels"], categories=cats, model=fingerprint))

        def forward(x0, noise):
            if calls is not None:
                calls.append(x0.shape[0])
            logits = torch.full((x0.shape[0], len(cats)), -10.0)
            logits[flag(x0), len(cats) - 1] = 10.0
            return logits

        clf.forward = forward
        return clf

    @property
    def categories(self) -> list[str]:
        return self.config.categories

    def forward(self, x0: torch.Tensor, noise) -> torch.Tensor:
        frames = 1
        if x0.ndim == 5:  # (N, C, F, H, W): every frame is an image; logits are averaged over frames
            n, c, frames, hh, ww = x0.shape
            x0 = x0.permute(0, 2, 1, 3, 4).reshape(n * frames, c, hh, ww)
        x = x0.float().clamp(-self.config.input_clip, self.config.input_clip)
        noise = torch.as_tensor(noise, dtype=torch.float32, device=x.device).reshape(-1)
        noise = noise.expand(x.shape[0] // frames).repeat_interleave(frames)
        emb = noise.unsqueeze(1) * self.freqs
        scale, shift = self.film(torch.cat([emb.sin(), emb.cos()], 1)).chunk(2, 1)
        h = F.silu(self.norms[0](self.stem(x)))
        h = F.silu(self.norms[1](self.down1(h)))
        h = self.norms[2](self.down2(h))
        h = F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        logits = self.head(pooled)
        if frames > 1:
            logits = logits.reshape(-1, frames, logits.shape[-1]).mean(1)
        return logits

    # ------------------------------------------------------------------ files
    def save(self, path: "str | os.PathLike", metadata: Mapping[str, Any] | None = None) -> Path:
        """Write safetensors with the config and ``metadata`` (e.g. the calibrated threshold) in the header."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {**self.metadata, **(metadata or {})}
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path),
                  metadata={"format": _FORMAT, "format_version": str(_FORMAT_VERSION),
                            "config": json.dumps(asdict(self.config)), "metadata": json.dumps(extra, default=str)})
        return path

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "LatentClassifier":
        """Load a file written by :meth:`save` (safetensors only; never unpickles)."""
        from .._bundle import read_tagged

        path = Path(path)
        state, header = read_tagged(
            path, _FORMAT, kind="an LVD classifier", error=LVDWeightsError, hint=_TRAIN_HINT,
            missing=LVDWeightsError(f"{path}: LVD classifier weights not found; {_TRAIN_HINT}"))
        try:
            model = cls(LVDConfig(**json.loads(header["config"])))
            model.load_state_dict(state)
        except Exception as e:
            raise LVDWeightsError(f"{path}: the weights do not match their config ({type(e).__name__}: {e})") from None
        model.metadata = json.loads(header.get("metadata") or "{}")
        return model.eval()

    def check_model(self, pipe, source: str = "the classifier") -> None:
        """Refuse a classifier trained on another model's latents (the fingerprints must match)."""
        want, have = self.config.model, unet_fingerprint(pipe)
        if have["in_channels"] != self.config.latent_channels:
            raise LVDModelMismatch(f"{source} reads {self.config.latent_channels}-channel latents but this pipeline's "
                                  f"denoiser has {have['in_channels']}; {_TRAIN_HINT}")
        if want and not _same_model(want, have):
            raise LVDModelMismatch(f"{source} was trained on another model's latents ({want.get('class')} "
                                  f"config {want.get('config_sha')}, weights {want.get('weight_probe')}) than this "
                                  f"pipeline's ({have['class']} config {have['config_sha']}, weights "
                                  f"{have['weight_probe']}); {_TRAIN_HINT}")


#: The classifiers shipped in ``assets/lvd/``, one per embedded model (the image model's first).
SHIPPED_WEIGHTS = ("default-model.safetensors", "default-video-model.safetensors")


def default_weights_path(pipe=None) -> Path:
    """The shipped classifier: ``assets/lvd/default-model.safetensors`` (the embedded default model's), or, for
    ``pipe``, the shipped one trained on that pipeline's model (the embedded video model has its own,
    ``default-video-model.safetensors``); the image model's when none fits (attaching it then says why)."""
    if pipe is not None:
        for path in _shipped_paths():
            try:
                LatentClassifier.load(path).check_model(pipe, str(path))
            except Exception:  # another model's classifier (or an unreadable file: attaching reports it)
                continue
            return path
    from .._paths import assets_dir

    return assets_dir() / "lvd" / SHIPPED_WEIGHTS[0]


def _shipped_paths() -> list:
    """The files of :data:`SHIPPED_WEIGHTS` this installation has, in that order."""
    from .._paths import assets_dir

    return [p for p in (assets_dir() / "lvd" / n for n in SHIPPED_WEIGHTS) if p.is_file()]


# ---------------------------------------------------------------------- video latents
def latent_frames(x0: torch.Tensor, n: int, layout: str) -> tuple[torch.Tensor, int]:
    """The frames of ``n`` items' latents as one image batch: ``((n·F, C, H, W), F)``, item-major.

    ``x0`` is what the scheduler steps on: (n, C, H, W) images (F = 1); (n, C, F, H, W) for UNet video pipelines
    (``layout="BCFHW"``); (n, F, C, H, W) for CogVideoX (``"BFCHW"``); or (n·F, C, H, W) when the pipeline folds
    the frames into the batch around ``scheduler.step`` (ZeroScope's ``TextToVideoSDPipeline``).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 3, 8, 8)  # two clips of 3 frames, BCFHW
        >>> frames, f = latent_frames(x, 2, "BCFHW")
        >>> frames.shape, f, torch.equal(frames[4], x[1, :, 1])
        (torch.Size([6, 4, 8, 8]), 3, True)
    """
    if x0.ndim == 5:
        if layout == "BCFHW":
            x0 = x0.transpose(1, 2)
        f = x0.shape[1]
        return x0.reshape(x0.shape[0] * f, *x0.shape[2:]), f
    return x0, max(1, x0.shape[0] // max(1, n))


def _output_span(f: int, n_latent: int, ratio: int, causal: bool = False) -> list[int]:
    """[first, last] output frame decoded from latent frame ``f`` of ``n_latent`` by a causal video VAE that
    compresses time by ``ratio`` (CogVideoX: an odd count keeps the first frame single, 13 → 49 frames; Wan,
    ``causal``: the first frame is always single, 21 → 81)."""
    if causal or n_latent % 2:
        return [0, 0] if f == 0 else [1 + (f - 1) * ratio, f * ratio]
    return [f * ratio, (f + 1) * ratio - 1]


# ---------------------------------------------------------------------- per call
@dataclass
class _CallState:
    """LVD's state for one call: the x0 tap, the classifier and thresholds, and per running item its flagged
    checks, its peak probabilities and whether it is still undecided."""

    tap: Any
    clf: "LatentClassifier"
    thresholds: torch.Tensor  # (K,)
    stoppable: torch.Tensor  # (K,) the category's action is not log
    count: torch.Tensor  # (n, K) flagged checks per category
    peak: torch.Tensor  # (n, K)
    trace: torch.Tensor  # (n, total, K) the probabilities of every check so far (-1 before it is made)
    budgets: list  # (K,) the budget each threshold stands for (None: fixed)
    scale: Any  # the classifier's RiskScale (None: not calibrated)
    open: list  # (n,) still undecided
    need: int  # flagged checks that stop an item in this call
    total: int  # checks this call can make
    video: bool
    layout: str
    time_ratio: int
    causal: bool = False
    checks: int = 0
    frame_flags: torch.Tensor | None = None  # (n, F) video: checked steps that flagged each frame


# ---------------------------------------------------------------------- the guard
@dataclass(repr=False)
class LVD(Guard):
    """Latent Variable Defense as a safegen guard: classify each item's predicted x0 during the first steps and
    stop the items that are turning unsafe (no more UNet steps, no VAE decode, the policy's placeholder).

    Args:
        weights (`str`, *optional*): a classifier file written by :meth:`LatentClassifier.save` for this
            pipeline's model. Default: the classifier shipped for the embedded default model
            (``assets/lvd/default-model.safetensors``); other models need their own (``safegen train-lvd``).
        window (`int`, defaults to 5): the decision window, in steps from the start (the paper's η).
        ratio (`float`, defaults to 0.6): share of checked window steps that must look unsafe (the paper's λ).
        check_every (`int`, defaults to 1): check every k-th step of the window.
        threshold (`float`, *optional*): a fixed probability at which a category counts at a step. Default: the
            policy's fixed ``lvd`` threshold for the category if it sets one, else calibrated at the policy's budget
            (fpr × sensitivity) from the rule scores of the benign reference prompts stored with the weights by
            :meth:`calibrate` (for calls with the step count it was measured at), else the one stored at training
            (fixed: the report says ``budget: None``), else 0.5. The shipped classifier keeps its trained
            threshold: see BENCHMARKS.md ("LVD on the shared scale") for why neither calibration was shipped.
        clip_score (`str`, defaults to `"max"`): on video, how the per-frame probabilities make the clip's:
            ``"max"`` (a clip is as unsafe as its worst frame: one unsafe frame is enough) or ``"mean"``.

    The rule: an item stops once one category's probability reaches its threshold at ``ceil(checks × ratio)``
    checked steps. Its score (the report's ``score``) is that rule's statistic, the ``need``-th highest probability
    of the category over the checks, so the calibrated risk says how rare a benign prompt reaching it is.

    On video pipelines the classifier reads every frame of the predicted x0 (frames × channels latents, whatever
    the pipeline's layout: :func:`latent_frames`); the decision is per clip, and the report lists the frames
    whose probability reached the threshold (``details["frames"]``: at the stopping step, with the per-frame
    scores of the deciding category; ``details["frame_flags"]``: per frame, how many checked steps flagged it).
    Frames are latent frames; where the VAE compresses time (CogVideoX: 4 output frames per latent frame)
    ``details["output_frames"]`` maps each listed frame to the [first, last] output frames it decodes to.

    A category whose policy action is ``log`` is reported, never stopped. Errors in the classifier fail the call
    closed (every item blocked, the report says why).

    Example:
        >>> import safegen, torch
        >>> from safegen.testing import tiny_sd_pipeline
        >>> from safegen.guards.lvd import LVD, LVDConfig, LatentClassifier, unet_fingerprint
        >>> pipe = tiny_sd_pipeline()
        >>> clf = LatentClassifier(LVDConfig(4, categories=["violence"], model=unet_fingerprint(pipe)))
        >>> with torch.no_grad():
        ...     _ = clf.head[-1].bias.fill_(10.0)  # a classifier that finds every latent unsafe
        >>> _ = safegen.protect(pipe, guards=[LVD.from_classifier(clf, window=4, ratio=0.5)])
        >>> out = pipe("a red bus", num_inference_steps=6, output_type="np")
        >>> r = out.safety[0]
        >>> r.verdict, r.result("lvd").stopped_at_step, r.unet_steps_run, r.unet_steps_saved
        ('block', 1, 2, 4)
        >>> _ = safegen.unprotect(pipe)
    """

    name: ClassVar[str] = "lvd"
    stage: ClassVar[str] = "loop"
    summary: ClassVar[str] = ("classifies the predicted x0 during the first steps and stops items turning unsafe "
                                 "(no more denoiser steps, no decode)")
    weights_needed: ClassVar[str | None] = ("a latent classifier trained for the model (safegen train-lvd); the "
                                            "embedded default model's ships")
    tensor_inputs: ClassVar[tuple[str, ...]] = ("latents",)

    weights: str | None = None
    window: int = 5
    ratio: float = 0.6
    check_every: int = 1
    threshold: float | None = None
    clip_score: str = "max"

    def __post_init__(self):
        if self.clip_score not in ("max", "mean"):
            raise ValueError(f"LVD(clip_score=...) must be 'max' or 'mean', got {self.clip_score!r}")
        for name in ("window", "check_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LVD({name}=...) must be a positive integer, got {v!r}")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"LVD(ratio=...) must be in (0, 1], got {r!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1):
            raise ValueError(f"LVD(threshold=...) must be a probability in (0, 1) or None, got {t!r}")
        if self.weights is not None:
            self.weights = os.fspath(self.weights)
        self._classifier: LatentClassifier | None = None

    @classmethod
    def from_classifier(cls, classifier: LatentClassifier, **kwargs: Any) -> "LVD":
        """A guard using an in-memory classifier (e.g. just returned by :func:`train_classifier`)."""
        if not isinstance(classifier, LatentClassifier):
            raise TypeError(f"from_classifier needs a LatentClassifier, got {type(classifier).__name__}")
        guard = cls(**kwargs)
        guard._classifier = classifier
        return guard

    @property
    def required(self) -> int:
        """Checked window steps that must look unsafe in a call long enough to fill the window:
        ceil(checks in the window × ratio)."""
        return self.required_for(None)

    def checks_for(self, num_steps: int | None) -> int:
        """Checks a call of ``num_steps`` steps can make: the window's checked steps that the call has."""
        span = self.window if num_steps is None else min(self.window, max(1, int(num_steps)))
        return len(range(0, span, self.check_every))

    def required_for(self, num_steps: int | None) -> int:
        """Flagged checks needed to stop an item in a call of ``num_steps`` steps: the ratio applied to the checks
        that call can make (so a 2-step call can stop an item, which a fixed count from the full window could
        not), at least 1."""
        return max(1, math.ceil(self.checks_for(num_steps) * self.ratio - 1e-9))

    def _weights_path(self, pipe=None) -> Path:
        """The classifier file: ``weights``, else the shipped one (for ``pipe``: the one trained on its model)."""
        return Path(self.weights) if self.weights is not None else default_weights_path(pipe)

    def weight_files(self) -> list:
        if self._classifier is not None:
            return []  # an in-memory classifier: no file
        if self.weights is None:  # which shipped one applies depends on the pipeline: all of them
            return [default_weights_path(), *(p for p in _shipped_paths() if p.name != SHIPPED_WEIGHTS[0])]
        return [self._weights_path()]

    # ------------------------------------------------------------------ lifecycle
    def attach(self, protection) -> None:
        if self._classifier is not None:
            clf, source = self._classifier, "the in-memory LVD classifier"
        else:
            path = self._weights_path(protection.pipe)
            clf, source = LatentClassifier.load(path), str(path)
        clf.check_model(protection.pipe, source)
        unknown = [c for c in clf.categories if c not in protection.policy.categories]
        if unknown:
            raise LVDWeightsError(f"{source} predicts categories {unknown} that policy {protection.policy.name!r} "
                                  f"does not have ({list(protection.policy.categories)})")
        protection.set_state(self, clf.eval())

    def detach(self, protection) -> None:
        protection.drop_state(self)

    def prepare(self, call) -> None:
        clf: LatentClassifier = call.protection.state(self)
        device = call.device
        if next(clf.parameters()).device != device:
            clf.to(device)
        policy = call.policy
        stoppable = torch.tensor([policy.categories[c].action != "log" for c in clf.categories], device=device)
        scale = self._scale(clf, call.num_steps, call.protection.cache) if self.threshold is None else None
        values, budgets = guard_thresholds(policy, self.name, clf.categories, scale=scale, fixed=self.threshold,
                                           default=self._default_threshold(clf))
        thresholds = torch.tensor(values, device=device).clamp(max=1.0)
        if not bool(torch.isfinite(thresholds).all()):
            raise NonFiniteError(f"LVD thresholds {thresholds.tolist()} are not all finite numbers")
        n = len(call.running_items)
        tap = _X0Tap(call.pipe.scheduler, unpack=latent_unpacker(call.pipe, call.spec.layout,
                                                                 call.args.get("height"), call.args.get("width")))
        call.defer(tap.remove)
        call.set_state(self, _CallState(
            tap=tap, clf=clf, thresholds=thresholds, stoppable=stoppable, budgets=budgets, scale=scale,
            count=torch.zeros(n, len(clf.categories), dtype=torch.long, device=device),
            peak=torch.zeros(n, len(clf.categories), device=device),
            trace=torch.full((n, self.checks_for(call.num_steps), len(clf.categories)), -1.0, device=device),
            open=[True] * n, need=self.required_for(call.num_steps), total=self.checks_for(call.num_steps),
            video=call.spec.video, layout=call.spec.layout,
            # CogVideoX's VAE makes ~4 output frames of each latent frame; UNet video models decode frame by frame
            time_ratio=int(getattr(call.pipe, "vae_scale_factor_temporal", 1)) if call.spec.time != "frame" else 1,
            causal=call.spec.time == "causal",
        ))

    def step_end(self, call, step: int, timestep, tensors):
        st = call.state(self)
        if st is None or step >= self.window or step % self.check_every or not any(st.open):
            return None
        x0, noise = st.tap.last
        n = len(st.open)
        frames, F = latent_frames(x0, n, st.layout)  # (n·F, C, H, W); F = 1 for images
        rows = [j for j, o in enumerate(st.open) if o]  # only undecided items are classified
        sel = torch.tensor(rows, device=x0.device)
        if len(rows) < n:
            frames = frames.index_select(0, _expand_rows(sel, F))
        # a non-finite latent (clamping would hide an inf) or score cannot be decided on: that item is an error
        finite_in = torch.isfinite(frames.reshape(len(rows), -1)).all(1)
        per_frame = torch.sigmoid(st.clf(frames, noise)).view(len(rows), F, -1)  # (rows, F, K)
        finite = finite_in & torch.isfinite(per_frame.reshape(len(rows), -1)).all(1)
        probs = per_frame.amax(1) if self.clip_score == "max" else per_frame.mean(1)  # the clip's (rows, K)
        if st.video:
            flagged = ((per_frame >= st.thresholds) & st.stoppable).any(2)  # (rows, F)
            if st.frame_flags is None:
                st.frame_flags = torch.zeros(n, F, dtype=torch.long, device=flagged.device)
            st.frame_flags[sel] += flagged
        st.peak[sel] = torch.maximum(st.peak[sel], probs)
        st.trace[sel, st.checks] = probs
        hits = probs >= st.thresholds  # (rows, K): the categories this check flags
        count = st.count[sel] + hits
        st.count[sel] = count
        st.checks += 1
        left = st.total - st.checks
        stop = ((count >= st.need) & st.stoppable).any(1)  # a category that may stop flagged at enough checks
        last = call.num_steps - 1
        if step == last:  # a call no longer than the window: its last x0 is all but the output, it decides too
            stop = stop | (hits & st.stoppable).any(1)
        # accepted once no category can reach the count, unless the call's last step is still to be checked
        hopeless = ((count.amax(1) + left < st.need)
                    & (step >= last or last >= self.window or last % self.check_every > 0))
        settled = stop | hopeless | ~finite
        # the one host copy of a checked step: which items to stop, accept, or fail closed now
        decided = torch.stack([stop, settled, ~finite, ~finite_in], 1).cpu().tolist()
        items = call.running_items
        for r, (j, (s, done, bad, bad_latent)) in enumerate(zip(rows, decided)):
            if not done:
                continue
            st.open[j] = False
            if bad:
                what = "the predicted latents" if bad_latent else "the classifier's scores"
                call.stop_item(items[j], self.name, f"{what} at step {step} are not finite numbers (NaN or inf): "
                               "item blocked (fail closed)", steps_run=step + 1, verdict="error",
                               stopped_at_step=step)
            elif s:
                self._stop(call, st, j, items[j], step, per_frame[r], last_check=step == last)
        return None

    def _rule(self, st) -> dict[str, Any]:
        """The decision rule this call used; when the call has fewer steps than the window, the report says the
        rule was scaled to the checks the call could make."""
        full = self.checks_for(None)
        if st.total >= full:
            return {"checks_possible": st.total}
        return {"checks_possible": st.total,
                "rule_scaled": (f"the call has fewer steps than the {self.window}-step window: {st.need} of its "
                                f"{st.total} checks must flag (ratio {self.ratio}) instead of {self.required} of "
                                f"{full}, and a flag at its last step, whose x0 is all but the output, stops the "
                                "item too")}

    def _frame_details(self, st, j: int, k: int, per_frame: torch.Tensor | None = None) -> dict[str, Any]:
        """Which frames drove a video decision: those at or above category ``k``'s threshold (at the stopping
        step when ``per_frame`` (F, K) is given), and per frame how many checked steps flagged it."""
        if not st.video or st.frame_flags is None:
            return {}
        flags = st.frame_flags[j].cpu().tolist()
        out: dict[str, Any] = {"num_frames": len(flags), "frame_flags": flags}
        if per_frame is not None:
            scores = per_frame[:, k].cpu()
            thr = float(st.thresholds[k])
            out["frames"] = [f for f, p in enumerate(scores.tolist()) if p >= thr]
            out["frame_scores"] = [round(float(p), 4) for p in scores]
        else:
            out["frames"] = [f for f, c in enumerate(flags) if c]
        out["clip_score"] = self.clip_score
        if st.time_ratio > 1:  # the listed frames are latent frames: say which output frames each one makes
            out["output_frames"] = {f: _output_span(f, len(flags), st.time_ratio, st.causal) for f in out["frames"]}
        return out

    def rule_scores(self, st, j: int) -> torch.Tensor:
        """Item ``j``'s rule score per category (K,): the ``need``-th highest probability among its checks so far,
        the number the stop rule compares with the threshold (a category stops the item once ``need`` checks
        reach it) and the one the calibration ranks (-1 before ``need`` checks were made)."""
        return _rule_of(st.trace[j], st.need)

    def _risk_fields(self, st, scores: torch.Tensor, k: int) -> dict[str, Any]:
        """The report's calibrated fields for rule scores (K,) and deciding category ``k``."""
        out: dict[str, Any] = {"budget": st.budgets[k]}
        if st.scale is not None:
            risk = st.scale.risk(scores.view(1, -1))[0].tolist()
            out.update(risk=round(risk[k], 4), risks={c: round(v, 4) for c, v in zip(st.clf.categories, risk)})
        return out

    def _stop(self, call, st, j: int, item: int, step: int, per_frame: torch.Tensor | None = None, *,
              last_check: bool = False) -> None:
        clf = st.clf
        thr = st.thresholds.cpu()
        stoppable = st.stoppable.cpu()
        count = st.count[j].cpu()
        # the rule score of each category; on a call's last step a single flag decides, so its probability counts
        scores = st.trace[j, st.checks - 1].cpu() if last_check else self.rule_scores(st, j).cpu()
        done = stoppable & ((count >= st.need) | (torch.tensor(last_check) & (scores >= thr)))
        margin = torch.where(done, scores - thr, torch.full_like(scores, float("-inf")))
        k = int(margin.argmax())
        cat = clf.categories[k]
        flagged = int(count[k])
        frames = self._frame_details(st, j, k, per_frame)
        where = ""
        if frames:
            where = f" in frame(s) {frames['frames']} of {frames['num_frames']}"
        reason = (f"latents looked unsafe ({cat!r}, p={float(scores[k]):.2f} ≥ {float(thr[k]):.2f}{where}) at "
                  f"{flagged} of the {st.checks} steps checked; stopped after step {step}")
        latest = st.trace[j, st.checks - 1].cpu()
        call.stop_item(item, self.name, reason, steps_run=step + 1, category=cat, score=float(scores[k]),
                       threshold=float(thr[k]), stopped_at_step=step,
                       scores={c: round(float(v), 4) for c, v in zip(clf.categories, scores)},
                       **self._risk_fields(st, scores, k),
                       details={"unsafe_checks": flagged, "checks": st.checks, "window": self.window,
                                "required": st.need, "last_probabilities": {
                                    c: round(float(v), 4) for c, v in zip(clf.categories, latest)},
                                **self._rule(st), **frames})

    def finish(self, call) -> None:
        st = call.state(self)
        if st is None:
            return
        call.set_state(self, None)  # reported once, even when a failing call runs finish again
        clf = st.clf
        peak, count, thr = st.peak.cpu(), st.count.cpu(), st.thresholds.cpu()  # one host copy each
        rule = _rule_of(st.trace, st.need).cpu()  # (n, K) rule scores, one host copy
        for j, item in enumerate(call.running_items):
            if item in call.stopped_items:
                continue
            res = call.result(item, self.name)
            k = int((rule[j] - thr).argmax())  # the category closest to (or past) its threshold
            res.verdict = "pass"
            res.category = clf.categories[k] if float(rule[j, k]) >= float(thr[k]) else None
            res.score = round(float(rule[j, k]), 4)
            res.threshold = float(thr[k])
            res.scores = {c: round(float(v), 4) for c, v in zip(clf.categories, rule[j])}
            for key, v in self._risk_fields(st, rule[j], k).items():
                setattr(res, key, v)
            flagged = int(count[j, k])
            res.details = {"unsafe_checks": flagged, "checks": st.checks, "window": self.window,
                           "required": st.need, "peak": {c: round(float(v), 4) for c, v in zip(clf.categories,
                                                                                              peak[j])},
                           **self._rule(st), **self._frame_details(st, j, k)}
            if res.category is not None:  # the rule was met by a category whose action is log
                res.verdict = "log"
                res.reason = (f"latents looked unsafe ({res.category!r}, p={res.score:.2f} ≥ {res.threshold:.2f}) "
                              f"at {flagged} of {st.checks} checked steps (action: log)")
            elif int(count[j].max()):
                res.verdict = "log"
                res.reason = (f"latents looked unsafe at {int(count[j].max())} of {st.checks} checked steps, fewer "
                              f"than the {st.need} needed to stop")

    def _scale(self, clf: LatentClassifier, num_steps: int | None = None, cache: dict | None = None):
        """The classifier's risk scale (stored with its weights by :meth:`calibrate`) when it was measured for this
        rule and this call's step count, else ``None`` (the trained threshold applies, fixed). Built once per stored
        calibration and kept in ``cache`` (the protection's), not refitted every call."""
        from ..calibration import RiskScale

        data = clf.metadata.get("risk_scale")
        if not data or data.get("window") != self.window or data.get("ratio") != self.ratio \
                or data.get("check_every") != self.check_every:
            return None  # measured for another rule: its numbers mean nothing for this one
        if num_steps is not None and data.get("steps") not in (None, num_steps):
            return None  # x0 predictions of another schedule: the benign scores do not carry over
        hit = None if cache is None else cache.get(("lvd", "scale", id(clf)))
        if hit is not None and hit[0] is data:
            return hit[1]
        scale = RiskScale.from_dict(data)
        if cache is not None:
            cache[("lvd", "scale", id(clf))] = (data, scale)
        return scale

    def calibrate(self, pipe, *, steps: int = 25, batch_size: int = 16, limit: int | None = None,
                  exclude: "Sequence[int]" = (), progress: bool = True, **call_kwargs) -> "RiskScale":
        """Fit this guard's risk scale: the rule scores (:meth:`rule_scores`) of the benign reference prompts
        (:func:`safegen.calibration.reference_prompts`, item ``i`` seeded with ``i``, ``steps`` steps, each call
        cut after the window) on ``pipe``, stored in the classifier's metadata under ``"risk_scale"`` (with the
        rule it was measured for); save the classifier (:meth:`LatentClassifier.save`) to keep it.

        ``exclude``: reference indices whose own generation (same seed and steps) is unsafe by the labeller the
        classifier was trained with. Stopping those is no false positive, so they are left out of the benign
        scores. LVD judges generations, not prompts, and a model may draw unsafe content for a benign prompt: the
        embedded default model marks 34 of the 1,000 (the metadata lists them under
        ``excluded_unsafe_generations``). Without ``weights`` the classifier is the shipped one trained on
        ``pipe``'s model (:func:`default_weights_path`); ``call_kwargs`` go to every call (a video model's
        ``num_frames``).

        Example:
            >>> import torch
            >>> from safegen.guards.lvd import LVD, LVDConfig, LatentClassifier, unet_fingerprint
            >>> from safegen.testing import tiny_sd_pipeline
            >>> pipe = tiny_sd_pipeline()
            >>> guard = LVD.from_classifier(LatentClassifier(LVDConfig(4, categories=["violence"],
            ...                                                        model=unet_fingerprint(pipe))), window=2)
            >>> scale = guard.calibrate(pipe, steps=3, limit=8, progress=False)
            >>> len(scale), guard.classifier.metadata["risk_scale"]["window"]
            (8, 2)
        """
        from tqdm.auto import tqdm

        from ..calibration import RiskScale, reference_prompts
        from ..policy import load_policy
        from ..protection import install, is_protected, unprotect

        if is_protected(pipe):
            raise ValueError("LVD.calibrate needs an unprotected pipeline (safegen.unprotect(pipe) first)")
        clf = self._classifier_for(pipe)
        policy = load_policy("default").copy()
        for cat in policy.categories.values():
            cat.action = "log"  # measure only: nothing stopped
        probe = LVD.from_classifier(clf, window=self.window, ratio=self.ratio, check_every=self.check_every,
                                    threshold=0.5, clip_score=self.clip_score)
        prompts = reference_prompts()[:limit]
        rows = []
        install(pipe, policy, [probe])
        try:
            def cut(p, i, t, kw):  # nothing after the window is checked: stop the call there
                if i + 1 >= min(self.window, steps):
                    p._interrupt = True
                return {}

            for start in tqdm(range(0, len(prompts), batch_size), desc="LVD calibration: reference prompts",
                              unit="batch", disable=not progress):
                chunk = prompts[start:start + batch_size]
                gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
                out = pipe(prompt=chunk, num_inference_steps=steps, generator=gens, output_type="latent",
                           callback_on_step_end=cut, **call_kwargs)
                rows += [[r.result(self.name).scores[c] for c in clf.categories] for r in out.safety]
        finally:
            unprotect(pipe)
        drop = set(int(i) for i in exclude)
        kept = [r for i, r in enumerate(rows) if i not in drop]
        scale = RiskScale(torch.tensor(kept, dtype=torch.float32), clf.categories)
        clf.metadata["risk_scale"] = {**scale.to_dict(), "window": self.window, "ratio": self.ratio,
                                      "check_every": self.check_every, "steps": steps,
                                      "excluded_unsafe_generations": sorted(drop & set(range(len(rows))))}
        return scale

    @property
    def classifier(self) -> LatentClassifier:
        """The classifier (the in-memory one, else loaded from ``weights`` or the shipped image model's file; a
        protected pipeline's own is the one :func:`default_weights_path` picks for it)."""
        return self._classifier_for(None)

    def _classifier_for(self, pipe) -> LatentClassifier:
        """The in-memory classifier, else the file for ``pipe`` (:meth:`_weights_path`), loaded once per path."""
        if self._classifier is not None:
            return self._classifier
        path = self._weights_path(pipe)
        loaded = getattr(self, "_loaded", None)
        if loaded is None or loaded[0] != path:
            self._loaded = loaded = (path, LatentClassifier.load(path))
        return loaded[1]

    def _default_threshold(self, clf: LatentClassifier) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        stored = clf.metadata.get("threshold")
        return float(stored) if stored is not None else 0.5
