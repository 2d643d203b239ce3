"""SafetyDPO (AlignGuard, ICCV 2025): per-category LoRA safety experts trained with Diffusion-DPO, merged into one.

The reusable parts (recipes that chain them live in ``erasure/``; the guard is :class:`safegen.SafetyDPO`):

* :func:`make_preference_pairs` — preference data made by the model itself: for each CoProV2 pair, the image of
  the *safe twin* (preferred) and of the *unsafe prompt* (dispreferred), same seed, both verified by a pluggable
  oracle (the unsafe one must show its category, the safe one nothing); stored as the latents the denoiser
  steps (UNet latents; SD3's latent images; FLUX.1's packed tokens) with the unsafe prompt's conditioning (the
  caption the model learns to render safely).
* :func:`dpo_loss` — Diffusion-DPO: same noise and timestep for both images of a pair, a frozen reference
  (the adapter switched off), ``L = −log σ(−β/2 · [(e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l))])`` with
  ``e = ‖target − prediction‖²`` averaged per image; β = 5000 by default (paper and code). The target is the
  noise ε on epsilon-prediction UNets (SD 1.x/2.x) and the velocity ε − x0 on the rectified-flow transformers
  (SD3/SD3.5, FLUX.1: ``x_t = (1 − σ)·x0 + σ·ε``), the flow-matching form of Diffusion-DPO.
* :func:`train_expert` — one LoRA expert (peft, rank 4 on ``to_q/to_k/to_v/to_out.0``, like the authors' code;
  on an MMDiT those are the image stream's projections of every joint-attention block) per category, in
  :class:`~safegen.training.loop.TrainingLoop`: seeded per step, progress bar, resumable safetensors checkpoints
  (LoRA and optimiser state).
* :func:`merge_experts` — Co-Merge: for every weight entry, keep the update of the expert whose activation on
  its *own* category's data is largest — |ΔW_i[o, j]| · E_{x∈D_i}|h_j(x)| on the dense products ΔW_i = B_i A_i
  (never mixing A and B of different experts) — plus, for comparison, linear averaging and TIES (peft's merge
  utilities). The merged dense update is factored back into a LoRA (truncated SVD, the residual reported).

LoRA files are diffusers LoRA safetensors (``load_lora_weights`` reads them) with safegen metadata (category,
rank, training settings) in the header.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TARGET_MODULES", "TRAINABLE", "PreferencePairs", "make_preference_pairs", "dpo_loss", "train_expert",
           "lora_deltas", "comerge", "merge_experts", "save_lora", "read_lora", "LoRAFileError"]

from ..lora import TARGET_MODULES, LoRAFileError, _lora_modules, read_lora, save_lora  # noqa: F401 (re-exported)
from .loop import Checkpoints, TrainingLoop, progress_bar


# ---------------------------------------------------------------------- the families Diffusion-DPO trains
#: Pipeline kinds (:data:`safegen.specs.PIPELINE_SPECS`) that :func:`train_expert` trains, with their names.
TRAINABLE = {"sd": "SD 1.x/2.x", "sd3": "SD3/SD3.5", "flux": "FLUX.1"}
#: FLUX.1's guidance input during training: the pipeline's default ``guidance_scale``, the one the preference
#: images are generated at.
FLUX_GUIDANCE = 3.5


class _Family:
    """How Diffusion-DPO reads one pipeline family: its conditioning, its noising and its denoiser's call.

    * SD 1.x/2.x (epsilon prediction): ``x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε`` (the DDPM schedule), target ``ε``;
      the UNet reads the CLIP tokens.
    * SD3/SD3.5 and FLUX.1 (rectified flow): ``x_t = (1 − σ)·x0 + σ·ε`` with σ drawn uniformly from the
      scheduler's training sigmas (its shift included), target the velocity ``ε − x0``; the transformer reads
      the joint text tokens and the pooled vector (FLUX.1 also its guidance input, :data:`FLUX_GUIDANCE`, and
      the position ids of its packed latent grid).
    """

    def __init__(self, pipe):
        from ..specs import pipeline_kind, pipeline_spec

        kind = pipeline_kind(pipe)
        if kind not in TRAINABLE:
            raise ValueError(f"SafetyDPO trains experts for {', '.join(TRAINABLE.values())}; "
                             f"{type(pipe).__name__} is not one of them")
        self.pipe, self.kind = pipe, kind
        self.component = pipeline_spec(pipe).denoiser
        self.model = getattr(pipe, self.component)
        self.device = pipe._execution_device
        self.flow = kind != "sd"
        if self.flow:
            from diffusers import FlowMatchEulerDiscreteScheduler

            sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            self.sigmas = sched.sigmas[sched.sigmas > 0].float()
            self.n_train = len(self.sigmas)
            self.t_scale = 1.0 if kind == "flux" else float(sched.config.num_train_timesteps)
        else:
            from diffusers import DDPMScheduler

            if getattr(self.model.config, "time_cond_proj_dim", None) is not None:
                raise ValueError("train_expert supports UNets without timestep conditioning embeddings (SD 1.x/2.x)")
            pred_type = pipe.scheduler.config.get("prediction_type", "epsilon")
            if pred_type != "epsilon":
                raise ValueError(f"Diffusion-DPO on a UNet is epsilon-prediction only (the authors assert it); "
                                 f"this model predicts {pred_type!r}")
            self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
            self.n_train = self.sched.config.num_train_timesteps

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning of ``prompts`` as the pipeline makes it: tokens (N, L, D) and pooled vectors (N, P)
        (``None`` on SD)."""
        pipe, device = self.pipe, self.device
        if self.kind == "sd":
            return pipe.encode_prompt(prompts, device, 1, False)[0], None
        if self.kind == "sd3":
            e, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                 num_images_per_prompt=1, do_classifier_free_guidance=False)
            return e, pooled
        e, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1)
        return e, pooled

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, idx: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, the denoiser's timestep input, the training target)`` for training index ``idx`` per row."""
        if not self.flow:
            return self.sched.add_noise(x0, noise, idx), idx, noise
        sigma = self.sigmas[idx.cpu()].to(x0.device)
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * noise, sigma * self.t_scale, noise - x0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor | None,
                 size: tuple[int, int] | None) -> torch.Tensor:
        """The denoiser's prediction for latents ``x`` at timestep inputs ``t``; ``size`` (the images' pixel
        height and width) places FLUX.1's packed tokens on their grid."""
        if self.kind == "sd":
            return self.model(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if self.kind == "sd3":
            return self.model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                              return_dict=False)[0]
        n = x.shape[0]
        patch = 2 * self.pipe.vae_scale_factor
        if size is None:
            raise ValueError("FLUX.1 preference pairs need the images' size (PreferencePairs.size)")
        ids = self.pipe._prepare_latent_image_ids(n, size[0] // patch, size[1] // patch, x.device, x.dtype)
        txt = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = (torch.full((n,), FLUX_GUIDANCE, device=x.device, dtype=torch.float32)
                    if self.model.config.guidance_embeds else None)
        return self.model(hidden_states=x, timestep=t, guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=txt, img_ids=ids, return_dict=False)[0]


# ---------------------------------------------------------------------- preference data
@dataclass
class PreferencePairs:
    """Verified preference pairs: ``preferred``/``dispreferred`` latents as the denoiser steps them (N, …), the
    unsafe prompts' conditioning ``embeds`` (N, L, D) and, for the DiT families, ``pooled`` (N, P); the empty
    prompt's ``empty`` (1, L, D) and ``empty_pooled`` (1, P); ``prompts``, ``categories``; ``kind``: the pipeline
    kind that made them (``"sd"``, ``"sd3"``, ``"flux"``); ``size``: the images' (height, width) in pixels."""

    preferred: torch.Tensor
    dispreferred: torch.Tensor
    embeds: torch.Tensor
    empty: torch.Tensor
    prompts: list[str]
    categories: list[str]
    pooled: torch.Tensor | None = None
    empty_pooled: torch.Tensor | None = None
    kind: str = "sd"
    size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.preferred.shape[0]

    def subset(self, category: str) -> "PreferencePairs":
        idx = torch.tensor([i for i, c in enumerate(self.categories) if c == category], dtype=torch.long)
        return PreferencePairs(self.preferred[idx], self.dispreferred[idx], self.embeds[idx], self.empty,
                               [self.prompts[i] for i in idx.tolist()], [category] * len(idx),
                               None if self.pooled is None else self.pooled[idx], self.empty_pooled, self.kind,
                               self.size)

    def conditioning(self, rows: torch.Tensor, blank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeds, pooled)`` of ``rows`` in fp32, the empty prompt's where ``blank`` is set."""
        def pick(x, empty):
            if x is None:
                return None
            out = x[rows].detach().float()
            out[blank] = empty.detach().float().expand(int(blank.sum()), *empty.shape[1:])
            return out

        return pick(self.embeds, self.empty), pick(self.pooled, self.empty_pooled)

    def save(self, path: "str | os.PathLike") -> Path:
        from .._bundle import save_bundle

        tensors = {"preferred": self.preferred, "dispreferred": self.dispreferred, "embeds": self.embeds,
                   "empty": self.empty}
        if self.pooled is not None:
            tensors.update(pooled=self.pooled, empty_pooled=self.empty_pooled)
        return save_bundle(path, tensors, "safegen.preference_pairs",
                           {"prompts": self.prompts, "categories": self.categories, "kind": self.kind,
                            "size": list(self.size) if self.size else None})

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "PreferencePairs":
        from .._bundle import load_bundle

        t, meta = load_bundle(path, "safegen.preference_pairs")
        size = meta.get("size")
        return cls(t["preferred"], t["dispreferred"], t["embeds"], t["empty"], meta["prompts"], meta["categories"],
                   t.get("pooled"), t.get("empty_pooled"), meta.get("kind", "sd"), tuple(size) if size else None)


@torch.no_grad()
def make_preference_pairs(pipe, pairs: Sequence[tuple[str, str, str]], *,
                          judge: Callable[[str, Any], tuple[bool, str | None]], steps: int = 25, seed: int = 0,
                          batch_size: int = 8, verify: bool = True, progress: bool = True) -> tuple[PreferencePairs, dict]:
    """Generate (safe-twin image, unsafe image) latents for ``(unsafe, safe, category)`` pairs with ``pipe`` (a
    pipeline of a :data:`TRAINABLE` family, at its default size and guidance).

    Pair ``i`` uses seed ``seed + i`` for both images. ``judge(prompt, image) -> (unsafe, category)`` verifies
    them: with ``verify`` a pair is kept only when the unsafe prompt's image is unsafe in its category and the
    safe twin's image is not unsafe. The latents kept are the denoiser's own at the last step (read by the step
    callback), so they are what training noises. Returns the pairs and counts (``generated``, ``kept``).

    Example:
        >>> from safegen.testing import tiny_sd_pipeline
        >>> data, stats = make_preference_pairs(tiny_sd_pipeline(), [("blood", "a red bus", "violence")],
        ...                                     judge=lambda p, img: (False, None), steps=2, verify=False,
        ...                                     progress=False)
        >>> data.preferred.shape, data.embeds.shape[0], stats
        (torch.Size([1, 4, 16, 16]), 1, {'generated': 1, 'kept': 1})
    """
    import numpy as np

    from ..protection import is_protected

    if is_protected(pipe):
        raise ValueError("make_preference_pairs needs the unprotected model (guards would change its images)")
    family = _Family(pipe)
    pipe.set_progress_bar_config(disable=True)
    keep: dict[str, list] = {"w": [], "l": [], "e": [], "pool": [], "p": [], "c": []}
    last: dict[str, torch.Tensor] = {}

    def grab(_pipe, _i, _t, kwargs):  # the latents after each step; the last call leaves the final ones
        last["latents"] = kwargs["latents"]
        return {}

    size = None
    bar = progress_bar(total=len(pairs), desc="preference pairs", unit="pair", disable=not progress)
    for s in range(0, len(pairs), batch_size):
        chunk = list(pairs[s:s + batch_size])
        n = len(chunk)
        prompts = [u for u, _, _ in chunk] + [t for _, t, _ in chunk]
        gens = [torch.Generator("cpu").manual_seed(seed + s + (i % n)) for i in range(2 * n)]  # same seed per pair
        images = pipe(prompt=prompts, generator=gens, num_inference_steps=steps, output_type="np",
                      callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"]).images
        lat = last.pop("latents")
        size = tuple(int(v) for v in np.asarray(images[0]).shape[:2])
        embeds, pooled = family.encode([u for u, _, _ in chunk])
        for i, (u, t, cat) in enumerate(chunk):
            ok = True
            if verify:
                bad_u, cat_u = judge(u, np.asarray(images[i]))
                bad_s, _ = judge(t, np.asarray(images[n + i]))
                ok = bad_u and cat_u == cat and not bad_s
            if ok:
                keep["w"].append(lat[n + i].cpu())
                keep["l"].append(lat[i].cpu())
                keep["e"].append(embeds[i].cpu())
                if pooled is not None:
                    keep["pool"].append(pooled[i].cpu())
                keep["p"].append(u)
                keep["c"].append(cat)
        bar.update(n)
    bar.close()
    empty, empty_pooled = family.encode([""])
    if not keep["w"]:
        raise ValueError("no preference pair passed verification; check the oracle and the model")
    data = PreferencePairs(torch.stack(keep["w"]), torch.stack(keep["l"]), torch.stack(keep["e"]).half(),
                           empty.cpu().half(), keep["p"], keep["c"],
                           torch.stack(keep["pool"]).half() if keep["pool"] else None,
                           None if empty_pooled is None else empty_pooled.cpu().half(), family.kind, size)
    return data, {"generated": len(pairs), "kept": len(data)}


# ---------------------------------------------------------------------- the loss
def dpo_loss(pred_w: torch.Tensor, pred_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             target: torch.Tensor, beta: float = 5000.0, *, target_l: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO loss for a batch of pairs that share their noise (and timestep): returns ``(loss, accuracy)``,
    accuracy being the share of pairs where the policy already prefers the preferred image more than the
    reference does (the authors' "implicit accuracy").

    ``target`` is what the denoiser should predict for the preferred images: the shared noise ε for an
    epsilon-prediction model, the same for both images. A rectified-flow model predicts the velocity ε − x0,
    which differs between the two images of a pair: give the dispreferred one's as ``target_l``.

    Example:
        >>> import torch
        >>> eps = torch.zeros(1, 1, 1, 1)
        >>> loss, acc = dpo_loss(eps + 0.1, eps + 0.3, eps + 0.2, eps + 0.2, eps, beta=100.0)
        >>> round(float(loss), 4), float(acc)  # Δ = (0.01 − 0.09) − 0 = −0.08; −log σ(4) = 0.0181
        (0.0181, 1.0)
    """
    target_l = target if target_l is None else target_l

    def err(pred, want):
        return (pred.float() - want.float()).pow(2).flatten(1).mean(1)

    delta = (err(pred_w, target) - err(pred_l, target_l)) - (err(ref_w, target) - err(ref_l, target_l))
    inside = -0.5 * beta * delta
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


# ---------------------------------------------------------------------- training one expert
def _peft_factors(model, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, m in model.named_modules():
        a = getattr(m, "lora_A", None)
        if isinstance(a, torch.nn.ModuleDict) and adapter in a:
            scale = m.scaling[adapter]
            out[name] = (a[adapter].weight.detach().clone() * scale, m.lora_B[adapter].weight.detach().clone())
    return out


def train_expert(pipe, data: PreferencePairs, *, out: "str | os.PathLike", category: str | None = None,
                 steps: int = 500, batch_size: int = 8, lr: float = 1e-4, beta: float = 5000.0, rank: int = 4,
                 empty_share: float = 0.2, seed: int = 0, checkpoint_every: int = 100, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Train one LoRA safety expert on ``data`` with Diffusion-DPO and write it to ``out`` (a diffusers LoRA file).

    ``pipe`` is a pipeline of a :data:`TRAINABLE` family, the one that made ``data``: the expert adapts its UNet
    (SD 1.x/2.x, epsilon prediction) or its transformer (SD3/SD3.5, FLUX.1: the flow-matching form, see
    :func:`dpo_loss`). Each step draws ``batch_size`` pairs, one timestep and one noise per pair (shared by its
    two images), blanks the caption of an ``empty_share`` of them, and minimises :func:`dpo_loss` of the adapted
    denoiser against the same denoiser with the adapter switched off (the frozen reference): AdamW on the LoRA parameters
    only, gradients clipped to norm 1, constant learning rate, in :class:`~safegen.training.loop.TrainingLoop`
    (each step's draws seeded from ``seed`` and the step number). Every ``checkpoint_every`` steps the LoRA and
    optimiser state go to ``<stem of out>.ckpt-<step:07d>.safetensors`` next to ``out`` (the newest kept;
    deleted once ``out`` is written); with ``resume`` training continues from there, without it old checkpoints
    are deleted first. The pipeline's denoiser is left without the adapter.

    Returns a summary: ``losses``, ``accuracy`` (implicit accuracy over the last 50 steps), ``steps``,
    ``start``, ``seconds``.
    """
    from peft import LoraConfig

    if steps < 0 or batch_size < 1 or rank < 1 or not 0 <= empty_share < 1:
        raise ValueError(f"need steps ≥ 0, batch_size ≥ 1, rank ≥ 1, 0 ≤ empty_share < 1; got {steps}, "
                         f"{batch_size}, {rank}, {empty_share}")
    if len(data) == 0:
        raise ValueError("no preference pairs to train on")
    family = _Family(pipe)
    if data.kind != family.kind:
        raise ValueError(f"these preference pairs were made with a {TRAINABLE.get(data.kind, data.kind)} pipeline "
                         f"and this one is {TRAINABLE[family.kind]}; make pairs with the model you train")
    model = family.model
    out = Path(out)
    ckpts = Checkpoints(out.parent, out.stem + ".ckpt", keep=1)
    if not resume:  # a fresh run: a stale checkpoint must not be resumed later
        ckpts.clear()
    elif ckpts.latest() is None and out.with_name(out.stem + ".ckpt.safetensors").is_file():
        import warnings

        warnings.warn(f"{out.stem}.ckpt.safetensors is a checkpoint of an older safegen (another format); it is "
                      "not resumed: training starts from step 0", stacklevel=2)
    device = family.device
    adapter = "safegen_expert"
    model.requires_grad_(False)
    torch_state = torch.random.get_rng_state()  # the LoRA init is seeded; the caller's RNG is restored after
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                 target_modules=list(TARGET_MODULES)), adapter_name=adapter)
    named = {n: p for n, p in model.named_parameters() if "lora_" in n}  # what a checkpoint holds
    params = list(named.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    loop = TrainingLoop(named, opt, steps=steps, seed=seed, stream="safetydpo", clip=1.0, checkpoints=ckpts,
                        checkpoint_every=checkpoint_every, final_checkpoint=False,
                        meta={"seed": seed, "category": category, "rank": rank},
                        desc=f"expert {category or ''}".strip(), progress=progress, device=device)
    t0 = time.time()
    try:
        if resume:
            loop.resume()
        model.train()
        for _, g in loop:
            rows = torch.randint(len(data), (batch_size,), generator=g)
            lw, ll = data.preferred[rows].detach().to(device), data.dispreferred[rows].detach().to(device)
            blank = torch.rand(batch_size, generator=g) < empty_share
            cond, pooled = (None if c is None else c.to(device) for c in data.conditioning(rows, blank))
            idx = torch.randint(0, family.n_train, (batch_size,), generator=g)
            noise = torch.randn(lw.shape, generator=g).to(device)
            xw, t, target_w = family.noised(lw, noise, idx.to(device))
            xl, _, target_l = family.noised(ll, noise, idx.to(device))
            x, tt = torch.cat([xw, xl]), torch.cat([t, t])
            cc, pp = torch.cat([cond, cond]), None if pooled is None else torch.cat([pooled, pooled])
            with torch.no_grad():  # the frozen reference: the same denoiser with the adapter switched off
                model.disable_adapters()
                ref = family(x, tt, cc, pp, data.size)
                model.enable_adapters()
            for p in params:  # switching adapters resets their trainable flags
                p.requires_grad_(True)
            pred = family(x, tt, cc, pp, data.size)
            loss, acc = dpo_loss(pred[:batch_size], pred[batch_size:], ref[:batch_size], ref[batch_size:],
                                 target_w, beta, target_l=target_l)
            loop.update(loss, acc=float(acc))
        factors = _peft_factors(model, adapter)
    finally:
        model.eval()
        model.unload_lora()  # removes the peft layers: the denoiser is as it was
        model.requires_grad_(False)
        torch.random.set_rng_state(torch_state)
    losses, accs = loop.losses, loop.metrics.get("acc", [])
    summary = {"category": category, "steps": steps, "start": loop.start, "pairs": len(data), "beta": beta,
               "rank": rank, "lr": lr, "batch_size": batch_size, "empty_share": empty_share, "seed": seed,
               "target": "velocity" if family.flow else "noise",
               "loss_last": sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else None,
               "accuracy": sum(accs[-50:]) / max(1, len(accs[-50:])) if accs else None,
               "seconds": round(time.time() - t0, 2)}
    save_lora(out, factors, {**summary, "kind": "expert", "family": family.kind}, component=family.component)
    ckpts.clear()
    return {**summary, "losses": losses}


# ---------------------------------------------------------------------- merging
def lora_deltas(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Dense updates ΔW = B·A per module."""
    return {name: b.float() @ a.float() for name, (a, b) in factors.items()}


def comerge(deltas: Sequence[Mapping[str, torch.Tensor]], activations: Sequence[Mapping[str, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
    """Co-Merge of dense expert updates: entry (o, j) of each module comes from the expert i maximising
    |ΔW_i[o, j]| · act_i[j], where ``act_i`` is the mean |input| of that module on expert i's own category data.

    Example:
        >>> import torch
        >>> d1 = {"m": torch.tensor([[1.0, 0.0], [0.0, 0.1]])}
        >>> d2 = {"m": torch.tensor([[0.5, 2.0], [0.0, 0.2]])}
        >>> a1, a2 = {"m": torch.tensor([1.0, 1.0])}, {"m": torch.tensor([1.0, 1.0])}
        >>> comerge([d1, d2], [a1, a2])["m"]
        tensor([[1.0000, 2.0000],
                [0.0000, 0.2000]])
    """
    names = set(deltas[0])
    for d in deltas[1:]:
        if set(d) != names:
            raise ValueError("experts adapt different modules; Co-Merge needs experts of the same architecture")
    merged = {}
    for name in names:
        stack = torch.stack([d[name] for d in deltas])  # (N, out, in)
        act = torch.stack([a[name].float().reshape(1, -1) for a in activations])  # (N, 1, in)
        winner = (stack.abs() * act).argmax(0, keepdim=True)  # (1, out, in)
        merged[name] = stack.gather(0, winner).squeeze(0)
    return merged


def _ties(deltas: Sequence[Mapping[str, torch.Tensor]], density: float) -> dict[str, torch.Tensor]:
    from peft.utils.merge_utils import ties

    out = {}
    for name in deltas[0]:
        stack = torch.stack([d[name] for d in deltas])
        out[name] = ties(stack, torch.ones(len(deltas)), density=density)
    return out


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A (r, in), B (out, r) with B·A the best rank-r approximation of ``delta``; and the relative residual."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
    total = float(s.pow(2).sum())
    resid = float(s[r:].pow(2).sum()) / total if total > 0 else 0.0
    return a, b, math.sqrt(resid)


@torch.no_grad()
def category_activations(pipe, data: PreferencePairs, *, n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mean |input| of every LoRA-target module of the base denoiser over ``n`` of ``data``'s pairs (both images,
    noised at random timesteps, with their captions): the activation statistics Co-Merge weighs updates by."""
    family = _Family(pipe)
    modules = _lora_modules(family.model)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}
    counts = {name: 0 for name in modules}
    handles = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1])
            sums[name] += x.sum(0).double().cpu()
            counts[name] += x.shape[0]
        return fn

    for name, m in modules.items():
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        g = torch.Generator().manual_seed(seed)
        device = family.device
        idx = torch.randperm(len(data), generator=g)[:n]
        for s in range(0, len(idx), 16):
            rows = idx[s:s + 16]
            lat = torch.cat([data.preferred[rows], data.dispreferred[rows]]).to(device)
            cond, pooled = data.conditioning(torch.cat([rows, rows]), torch.zeros(2 * len(rows), dtype=torch.bool))
            t = torch.randint(0, family.n_train, (lat.shape[0],), generator=g).to(device)
            noise = torch.randn(lat.shape, generator=g).to(device)
            x, tt, _ = family.noised(lat, noise, t)
            family(x, tt, cond.to(device), None if pooled is None else pooled.to(device), data.size)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / max(1, counts[name])).float() for name in modules}


def merge_experts(experts: Sequence["str | os.PathLike"], out: "str | os.PathLike", *, method: str = "comerge",
                  pipe=None, data: PreferencePairs | None = None, rank: int | None = None, density: float = 0.5
                  ) -> dict[str, Any]:
    """Merge expert LoRA files into one LoRA file.

    Args:
        experts: LoRA files written by :func:`train_expert` (each with its category in the metadata).
        method: ``"comerge"`` (needs ``pipe`` and ``data``: the preference pairs, whose categories say whose
            data is whose), ``"linear"`` (the mean of the dense updates) or ``"ties"`` (peft's TIES, ``density``).
        pipe: the experts' pipeline (a :data:`TRAINABLE` family); with it every expert is checked against its
            denoiser.
        rank: rank of the merged LoRA, capped by each module's size (default: the sum of the experts' ranks for
            ``linear``, which is exact; 128 for ``comerge``/``ties``, whose entry-wise merges are not low-rank).

    Returns a summary with the per-module relative residual of the low-rank factorisation (``max_residual``).
    """
    if method not in ("comerge", "linear", "ties"):
        raise ValueError(f"method must be 'comerge', 'linear' or 'ties', got {method!r}")
    family = _Family(pipe) if pipe is not None else None
    loaded = [read_lora(p, family.model if family else None, component=family.component if family else None)
              for p in experts]
    if not loaded:
        raise ValueError("no experts to merge")
    components = {m["component"] for _, m in loaded}
    if len(components) > 1:
        raise ValueError(f"the experts adapt different denoisers ({', '.join(sorted(components))}); merge experts "
                         "of one model")
    deltas = [lora_deltas(f) for f, _ in loaded]
    cats = [m.get("category") for _, m in loaded]
    if method == "comerge":
        if pipe is None or data is None:
            raise ValueError("Co-Merge needs pipe= and data= (the experts' own category data)")
        if data.kind != family.kind:
            raise ValueError(f"the preference pairs were made with a {TRAINABLE.get(data.kind, data.kind)} pipeline "
                             f"and the experts' is {TRAINABLE[family.kind]}")
        missing = [c for c in cats if c not in set(data.categories)]
        if missing:
            raise ValueError(f"no preference pairs for the experts' categories {missing}")
        acts = [category_activations(pipe, data.subset(c)) for c in cats]
        merged = comerge(deltas, acts)
    elif method == "linear":
        merged = {name: torch.stack([d[name] for d in deltas]).mean(0) for name in deltas[0]}
    else:
        merged = _ties(deltas, density)
    ranks = [max(a.shape[0] for a, _ in f.values()) for f, _ in loaded]
    r = rank or (sum(ranks) if method == "linear" else 128)
    factors, resid = {}, {}
    for name, d in merged.items():
        a, b, res = _factor(d, min(r, *d.shape))
        factors[name] = (a, b)
        resid[name] = res
    summary = {"kind": "merged", "method": method, "experts": [str(p) for p in experts], "categories": cats,
               "rank": r, "max_residual": max(resid.values()) if resid else 0.0, "density": density}
    save_lora(out, factors, summary, component=components.pop())
    return summary
