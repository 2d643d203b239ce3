"""SafetyDPO (AlignGuard, ICCV 2025): per-category LoRA safety experts trained with Diffusion-DPO, merged into one.

The reusable parts (recipes that chain them live in ``erasure/``; the guard is :class:`safegen.SafetyDPO`):

* :func:`make_preference_pairs` — preference data made by the model itself: for each CoProV2 pair, the image of
  the *safe twin* (preferred) and of the *unsafe prompt* (dispreferred), same seed, both verified by a pluggable
  oracle (the unsafe one must show its category, the safe one nothing); stored as UNet-space latents with the
  unsafe prompt's conditioning (the caption the model learns to render safely).
* :func:`dpo_loss` — Diffusion-DPO: same noise and timestep for both images of a pair, a frozen reference
  (the adapter switched off), ``L = −log σ(−β/2 · [(e_θ(w) − e_θ(l)) − (e_ref(w) − e_ref(l))])`` with
  ``e = ‖ε − ε̂‖²`` averaged per image; β = 5000 by default (paper and code).
* :func:`train_expert` — one LoRA expert (peft, rank 4 on ``to_q/to_k/to_v/to_out.0``, like the authors' code)
  per category, in :class:`~safegen.training.loop.TrainingLoop`: seeded per step, progress bar, resumable
  safetensors checkpoints (LoRA and optimiser state).
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

__all__ = ["TARGET_MODULES", "PreferencePairs", "make_preference_pairs", "dpo_loss", "train_expert",
           "lora_deltas", "comerge", "merge_experts", "save_lora", "read_lora", "LoRAFileError"]

from ..lora import TARGET_MODULES, LoRAFileError, _lora_modules, read_lora, save_lora  # noqa: F401 (re-exported)
from .loop import Checkpoints, TrainingLoop, progress_bar


# ---------------------------------------------------------------------- preference data
@dataclass
class PreferencePairs:
    """Verified preference pairs: ``preferred``/``dispreferred`` UNet-space latents (N, C, H, W), the unsafe
    prompts' conditioning ``embeds`` (N, L, D), the empty prompt's ``empty`` (1, L, D), ``prompts``, ``categories``."""

    preferred: torch.Tensor
    dispreferred: torch.Tensor
    embeds: torch.Tensor
    empty: torch.Tensor
    prompts: list[str]
    categories: list[str]

    def __len__(self) -> int:
        return self.preferred.shape[0]

    def subset(self, category: str) -> "PreferencePairs":
        idx = torch.tensor([i for i, c in enumerate(self.categories) if c == category], dtype=torch.long)
        return PreferencePairs(self.preferred[idx], self.dispreferred[idx], self.embeds[idx], self.empty,
                               [self.prompts[i] for i in idx.tolist()], [category] * len(idx))

    def save(self, path: "str | os.PathLike") -> Path:
        from .._bundle import save_bundle

        return save_bundle(path, {"preferred": self.preferred, "dispreferred": self.dispreferred,
                                  "embeds": self.embeds, "empty": self.empty}, "safegen.preference_pairs",
                           {"prompts": self.prompts, "categories": self.categories})

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "PreferencePairs":
        from .._bundle import load_bundle

        t, meta = load_bundle(path, "safegen.preference_pairs")
        return cls(t["preferred"], t["dispreferred"], t["embeds"], t["empty"], meta["prompts"], meta["categories"])


@torch.no_grad()
def make_preference_pairs(pipe, pairs: Sequence[tuple[str, str, str]], *,
                          judge: Callable[[str, Any], tuple[bool, str | None]], steps: int = 25, seed: int = 0,
                          batch_size: int = 8, verify: bool = True, progress: bool = True) -> tuple[PreferencePairs, dict]:
    """Generate (safe-twin image, unsafe image) latents for ``(unsafe, safe, category)`` pairs with ``pipe``.

    Pair ``i`` uses seed ``seed + i`` for both images. ``judge(prompt, image) -> (unsafe, category)`` verifies
    them: with ``verify`` a pair is kept only when the unsafe prompt's image is unsafe in its category and the
    safe twin's image is not unsafe. Returns the pairs and counts (``generated``, ``kept``).

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
    pipe.set_progress_bar_config(disable=True)
    device = pipe._execution_device
    keep: dict[str, list] = {"w": [], "l": [], "e": [], "p": [], "c": []}
    bar = progress_bar(total=len(pairs), desc="preference pairs", unit="pair", disable=not progress)
    for s in range(0, len(pairs), batch_size):
        chunk = list(pairs[s:s + batch_size])
        n = len(chunk)
        prompts = [u for u, _, _ in chunk] + [t for _, t, _ in chunk]
        gens = [torch.Generator("cpu").manual_seed(seed + s + (i % n)) for i in range(2 * n)]  # same seed per pair
        lat = pipe(prompt=prompts, generator=gens, num_inference_steps=steps, output_type="latent").images
        images = pipe.vae.decode(lat / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(images, output_type="np")
        embeds, _ = pipe.encode_prompt([u for u, _, _ in chunk], device, 1, False)
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
                keep["p"].append(u)
                keep["c"].append(cat)
        bar.update(n)
    bar.close()
    empty, _ = pipe.encode_prompt([""], device, 1, False)
    if not keep["w"]:
        raise ValueError("no preference pair passed verification; check the oracle and the model")
    data = PreferencePairs(torch.stack(keep["w"]), torch.stack(keep["l"]), torch.stack(keep["e"]).half(),
                           empty.cpu().half(), keep["p"], keep["c"])
    return data, {"generated": len(pairs), "kept": len(data)}


# ---------------------------------------------------------------------- the loss
def dpo_loss(pred_w: torch.Tensor, pred_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             noise: torch.Tensor, beta: float = 5000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion-DPO loss for a batch of pairs that share ``noise`` (and timestep): returns ``(loss, accuracy)``,
    accuracy being the share of pairs where the policy already prefers the preferred image more than the
    reference does (the authors' "implicit accuracy").

    Example:
        >>> import torch
        >>> eps = torch.zeros(1, 1, 1, 1)
        >>> loss, acc = dpo_loss(eps + 0.1, eps + 0.3, eps + 0.2, eps + 0.2, eps, beta=100.0)
        >>> round(float(loss), 4), float(acc)  # Δ = (0.01 − 0.09) − 0 = −0.08; −log σ(4) = 0.0181
        (0.0181, 1.0)
    """
    def err(pred):
        return (pred.float() - noise.float()).pow(2).flatten(1).mean(1)

    delta = (err(pred_w) - err(pred_l)) - (err(ref_w) - err(ref_l))
    inside = -0.5 * beta * delta
    return -F.logsigmoid(inside).mean(), (inside > 0).float().mean()


# ---------------------------------------------------------------------- training one expert
def _peft_factors(unet, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, m in unet.named_modules():
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

    Each step draws ``batch_size`` pairs, one timestep and one noise per pair (shared by its two images),
    blanks the caption of an ``empty_share`` of them, and minimises :func:`dpo_loss` of the adapted UNet
    against the same UNet with the adapter switched off (the frozen reference): AdamW on the LoRA parameters
    only, gradients clipped to norm 1, constant learning rate, in :class:`~safegen.training.loop.TrainingLoop`
    (each step's draws seeded from ``seed`` and the step number). Every ``checkpoint_every`` steps the LoRA and
    optimiser state go to ``<stem of out>.ckpt-<step:07d>.safetensors`` next to ``out`` (the newest kept;
    deleted once ``out`` is written); with ``resume`` training continues from there, without it old checkpoints
    are deleted first. The pipeline's UNet is left without the adapter.

    Returns a summary: ``losses``, ``accuracy`` (implicit accuracy over the last 50 steps), ``steps``,
    ``start``, ``seconds``.
    """
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    if steps < 0 or batch_size < 1 or rank < 1 or not 0 <= empty_share < 1:
        raise ValueError(f"need steps ≥ 0, batch_size ≥ 1, rank ≥ 1, 0 ≤ empty_share < 1; got {steps}, "
                         f"{batch_size}, {rank}, {empty_share}")
    if len(data) == 0:
        raise ValueError("no preference pairs to train on")
    unet = pipe.unet
    if getattr(unet.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("train_expert supports UNets without timestep conditioning embeddings (SD 1.x/2.x)")
    pred_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    if pred_type != "epsilon":
        raise ValueError(f"Diffusion-DPO here is epsilon-prediction only (the authors assert it); this model "
                         f"predicts {pred_type!r}")
    out = Path(out)
    ckpts = Checkpoints(out.parent, out.stem + ".ckpt", keep=1)
    if not resume:  # a fresh run: a stale checkpoint must not be resumed later
        ckpts.clear()
    elif ckpts.latest() is None and out.with_name(out.stem + ".ckpt.safetensors").is_file():
        import warnings

        warnings.warn(f"{out.stem}.ckpt.safetensors is a checkpoint of an older safegen (another format); it is "
                      "not resumed: training starts from step 0", stacklevel=2)
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    device = pipe._execution_device
    adapter = "safegen_expert"
    unet.requires_grad_(False)
    torch_state = torch.random.get_rng_state()  # the LoRA init is seeded; the caller's RNG is restored after
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(TARGET_MODULES)), adapter_name=adapter)
    named = {n: p for n, p in unet.named_parameters() if "lora_" in n}  # what a checkpoint holds
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
        unet.train()
        for _, g in loop:
            rows = torch.randint(len(data), (batch_size,), generator=g)
            lw, ll = data.preferred[rows].detach().to(device), data.dispreferred[rows].detach().to(device)
            cond = data.embeds[rows].detach().float()
            blank = torch.rand(batch_size, generator=g) < empty_share
            cond[blank] = data.empty.detach().float().expand(int(blank.sum()), -1, -1)
            cond = cond.to(device)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=g).to(device)
            noise = torch.randn(lw.shape, generator=g).to(device)
            x = torch.cat([noise_sched.add_noise(lw, noise, t), noise_sched.add_noise(ll, noise, t)])
            tt, cc = torch.cat([t, t]), torch.cat([cond, cond])
            with torch.no_grad():  # the frozen reference: the same UNet with the adapter switched off
                unet.disable_adapters()
                ref = unet(x, tt, encoder_hidden_states=cc, return_dict=False)[0]
                unet.enable_adapters()
            for p in params:  # switching adapters resets their trainable flags
                p.requires_grad_(True)
            pred = unet(x, tt, encoder_hidden_states=cc, return_dict=False)[0]
            loss, acc = dpo_loss(pred[:batch_size], pred[batch_size:], ref[:batch_size], ref[batch_size:],
                                 noise, beta)
            loop.update(loss, acc=float(acc))
        factors = _peft_factors(unet, adapter)
    finally:
        unet.eval()
        unet.unload_lora()  # removes the peft layers: the UNet is as it was
        unet.requires_grad_(False)
        torch.random.set_rng_state(torch_state)
    losses, accs = loop.losses, loop.metrics.get("acc", [])
    summary = {"category": category, "steps": steps, "start": loop.start, "pairs": len(data), "beta": beta,
               "rank": rank, "lr": lr, "batch_size": batch_size, "empty_share": empty_share, "seed": seed,
               "loss_last": sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else None,
               "accuracy": sum(accs[-50:]) / max(1, len(accs[-50:])) if accs else None,
               "seconds": round(time.time() - t0, 2)}
    save_lora(out, factors, {**summary, "kind": "expert"})
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
    """Mean |input| of every LoRA-target module of the base UNet over ``n`` of ``data``'s pairs (both images,
    noised at random timesteps, with their captions): the activation statistics Co-Merge weighs updates by."""
    from diffusers import DDPMScheduler

    unet = pipe.unet
    modules = _lora_modules(unet)
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
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        device = pipe._execution_device
        idx = torch.randperm(len(data), generator=g)[:n]
        for s in range(0, len(idx), 16):
            rows = idx[s:s + 16]
            lat = torch.cat([data.preferred[rows], data.dispreferred[rows]]).to(device)
            cond = torch.cat([data.embeds[rows], data.embeds[rows]]).float().to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=g).to(device)
            noise = torch.randn(lat.shape, generator=g).to(device)
            unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=cond)
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
        rank: rank of the merged LoRA, capped by each module's size (default: the sum of the experts' ranks for
            ``linear``, which is exact; 128 for ``comerge``/``ties``, whose entry-wise merges are not low-rank).

    Returns a summary with the per-module relative residual of the low-rank factorisation (``max_residual``).
    """
    if method not in ("comerge", "linear", "ties"):
        raise ValueError(f"method must be 'comerge', 'linear' or 'ties', got {method!r}")
    loaded = [read_lora(p, pipe.unet if pipe is not None else None) for p in experts]
    if not loaded:
        raise ValueError("no experts to merge")
    deltas = [lora_deltas(f) for f, _ in loaded]
    cats = [m.get("category") for _, m in loaded]
    if method == "comerge":
        if pipe is None or data is None:
            raise ValueError("Co-Merge needs pipe= and data= (the experts' own category data)")
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
    save_lora(out, factors, summary)
    return summary
