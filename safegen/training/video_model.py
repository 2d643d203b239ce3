"""Training safegen's embedded default video model (:mod:`safegen.default_video_model` describes it and loads it).

``python -m safegen.training.video_model --out DIR --steps N [--resume]`` fine-tunes an AnimateDiff
``UNetMotionModel`` — the embedded image model's UNet plus fresh motion modules — on world clips
(:func:`safegen.world.render_clip`) of the same training prompts the image model saw, conditioned on the image
model's frozen text encoder and encoded frame by frame by its frozen VAE (see :func:`train`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .loop import Checkpoints, TrainingLoop

__all__ = ["clip_dataset", "train", "main"]


# ---------------------------------------------------------------------------------------------- data
def clip_dataset(items: Sequence[tuple[str, str | None]], *, frames: int, onset_share: float, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """The world clips of ``items`` (``(prompt, category)``), as unique frames and an index.

    Every prompt's clip is :func:`~safegen.world.render_clip` with the onset :func:`~safegen.world.clip_onset`
    gives it (``onset_share`` of the unsafe prompts, seeded by ``seed``). A frame is fixed by the prompt's colour
    and object, the glyph's offset and whether (and which) mark it carries, so frames are rendered once each.

    Returns ``(images (U, 3, 64, 64) float in [-1, 1], clip_frames (N, frames) indices into images, clips)``;
    ``clips`` has one dict per prompt (``category``, ``onset``).
    """
    from ..world import clip_offsets, clip_onset, parse_prompt, render

    keys: dict[tuple, int] = {}
    images: list[np.ndarray] = []
    index = np.empty((len(items), frames), dtype=np.int64)
    clips = []
    for n, (prompt, category) in enumerate(items):
        a = parse_prompt(prompt)
        onset = clip_onset(prompt, category, share=onset_share, seed=seed, frames=frames)
        for i, dx in enumerate(clip_offsets(prompt, frames)):
            marked = category if category is not None and i >= onset else None
            key = (a.colour, a.object, marked, dx)
            if key not in keys:
                keys[key] = len(images)
                images.append(render(prompt, marked, offset=dx))
            index[n, i] = keys[key]
        clips.append({"category": category, "onset": onset})
    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return arr.contiguous(), torch.from_numpy(index), clips


# ---------------------------------------------------------------------------------------------- training
def train(out_dir: "str | Path", *, data_dir: "str | Path | None" = None, steps: int, batch_size: int = 8,
          lr: float = 1e-4, frames: int | None = None, onset_share: float = 0.3, cfg_dropout: float = 0.1,
          seed: int = 0, limit: int | None = None, resume: bool = False, checkpoint_every: int = 250,
          checkpoint_dir: "str | Path | None" = None, image_folder: "str | Path | None" = None,
          lr_restart: bool = False, high_noise_weight: float = 0.0, init_from: "str | Path | None" = None,
          progress: bool = True) -> dict:
    """Train the default video model and save it to ``out_dir``.

    1. Clips: every training prompt of the image model (:func:`safegen.training.default_model.training_prompts`;
       ``limit`` keeps a seeded subset) as a world clip of ``frames`` frames (default
       :data:`~safegen.default_video_model.VIDEO_FRAMES`); ``onset_share`` of the unsafe ones get their mark
       only from a later frame on. Unique frames go through the frozen VAE once (posterior mean and std).
    2. The prompts' token states come from the frozen text encoder, once (cached beside the checkpoints).
    3. ``steps`` AdamW steps on the whole ``UNetMotionModel`` (image layers and motion modules): the
       epsilon-prediction loss of a clip's frames, noised independently at one timestep per clip (AnimateDiff's
       recipe), the empty prompt's states for a ``cfg_dropout`` share of clips. ``high_noise_weight`` = γ > 0
       weighs each clip's loss by ``1 + min((1 − ᾱ_t)/ᾱ_t, γ)`` (normalised over the batch): the noise loss is
       nearly blind to x0 at high noise (x0's error is scaled by √(ᾱ/(1 − ᾱ))), and that is where a clip's layout,
       and so its motion, is decided; the weight makes those steps count like an x0 loss, capped at γ. Diffusers' cosine schedule with
       100 warm-up steps, gradients clipped to norm 1, in :class:`~safegen.training.loop.TrainingLoop`: seeded
       per step, a progress bar, checkpoints (weights and optimiser state, safetensors) every
       ``checkpoint_every`` steps in ``checkpoint_dir`` (default ``<out_dir>-checkpoints``); ``resume`` continues
       from the last one, and a resumed run draws what an uninterrupted one would. To train further, resume with
       more ``steps`` and ``lr_restart`` (a fresh warm-up and cosine cycle over the added steps).
    4. ``init_from`` starts from the UNet of a saved video model folder (e.g. the shipped
       ``assets/default-video-model``) instead of the image model plus fresh motion modules, with a fresh optimiser:
       the way to train further once the checkpoints are gone. Its ``training_info.json`` runs are kept in the new
       one's, so the folder says every run that made it.

    The saved folder holds the UNet, the scheduler and ``model_index.json``; the text encoder, tokenizer and VAE
    stay the image model's (:func:`safegen.default_video_model.load_default_video_pipeline` joins them).

    Returns a summary: ``n_prompts``, ``n_frames`` (unique), ``onset_clips``, ``start``, ``steps``, ``loss``
    (mean of the last 50 steps), ``seconds``, ``out_dir``.
    """
    from tqdm.auto import tqdm

    from ..default_video_model import SHARED_COMPONENTS, VIDEO_FRAMES, build_video_pipeline
    from .default_model import _alphas_cumprod, _prompt_states, training_prompts

    frames = int(frames or VIDEO_FRAMES)
    if int(steps) < 0 or int(batch_size) < 1 or frames < 2:
        raise ValueError(f"need steps >= 0, batch_size >= 1 and frames >= 2; got {steps}, {batch_size}, {frames}")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1 (or None), got {limit}")
    if init_from is not None and resume:
        raise ValueError("init_from starts a new run from a saved model; it cannot be combined with resume")
    if high_noise_weight < 0:
        raise ValueError(f"high_noise_weight must be >= 0, got {high_noise_weight}")
    if not 0.0 <= onset_share <= 1.0 or not 0.0 <= cfg_dropout < 1.0:
        raise ValueError(f"need 0 <= onset_share <= 1 and 0 <= cfg_dropout < 1; got {onset_share}, {cfg_dropout}")
    t0 = time.time()
    out_dir = Path(out_dir)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.with_name(out_dir.name + "-checkpoints")
    ckpts = Checkpoints(ckpt_dir, "unet")
    if not resume:
        ckpts.clear()

    items = training_prompts(data_dir)
    if limit is not None and int(limit) < len(items):
        keep = np.sort(np.random.default_rng(seed).permutation(len(items))[: int(limit)])
        items = [items[i] for i in keep]
    images, clip_index, clips = clip_dataset(items, frames=frames, onset_share=onset_share, seed=seed)

    pipe = build_video_pipeline(image_folder, seed=seed)
    earlier_runs: list = []
    if init_from is not None:
        earlier_runs = _load_init(pipe.unet, Path(init_from))
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    with torch.no_grad():
        posts = [vae.encode(images[s:s + 256]).latent_dist
                 for s in tqdm(range(0, len(images), 256), desc="encode frames", unit="batch", disable=not progress)]
    lat_mean = torch.cat([p.mean for p in posts])
    lat_std = torch.cat([p.std for p in posts])
    del posts, images

    states, state_index, empty = _prompt_states(ckpt_dir, text_encoder, tokenizer, items, progress)
    acp = _alphas_cumprod()
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    loop = TrainingLoop(unet, opt, steps=int(steps), seed=seed, stream="video-unet", schedule="cosine", warmup=100,
                        restart=lr_restart, clip=1.0, checkpoints=ckpts, checkpoint_every=int(checkpoint_every),
                        meta={"seed": seed, "frames": frames, "scaling_factor": scaling}, desc="video unet",
                        progress=progress)
    last = loop.resume() if resume else None
    if last is not None and int(last.get("frames", frames)) != frames:
        raise RuntimeError(f"{ckpt_dir}: the checkpoint was trained on {last.get('frames')}-frame clips, not "
                           f"{frames}; resume with the same --frames or delete the folder")
    b = int(batch_size)
    for _, gen in loop:
        rows = torch.randint(len(items), (b,), generator=gen)
        fr = clip_index[rows]  # (b, F)
        mean, std = lat_mean[fr], lat_std[fr]  # (b, F, C, h, w)
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
        z0 = z0.permute(0, 2, 1, 3, 4)  # (b, C, F, h, w): the UNetMotionModel's layout
        cond = states[state_index[rows]].float()
        drop = torch.rand(b, generator=gen) < cfg_dropout
        cond[drop] = empty
        t = torch.randint(0, len(acp), (b,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = acp[t].view(-1, 1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        # one row of text states per frame, as AnimateDiffPipeline passes them
        pred = unet(zt, t, encoder_hidden_states=cond.repeat_interleave(frames, dim=0)).sample
        per_clip = (pred - noise).pow(2).flatten(1).mean(1)
        if high_noise_weight > 0:
            w = 1 + ((1 - acp[t]) / acp[t]).clamp(max=float(high_noise_weight))
            loop.update((w * per_clip).sum() / w.sum())
        else:
            loop.update(per_clip.mean())
    if not loop.ran and last is None:
        loop.save()
    unet.eval().requires_grad_(False)

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    import shutil

    for name in SHARED_COMPONENTS:  # the image model's, not copied: the loader passes them in
        shutil.rmtree(out_dir / name, ignore_errors=True)
    summary: dict[str, Any] = {
        "out_dir": str(out_dir), "n_prompts": len(items), "n_frames": int(lat_mean.shape[0]),
        "onset_clips": sum(c["onset"] > 0 for c in clips), "unsafe_clips": sum(c["category"] is not None
                                                                                for c in clips),
        "start": loop.start, "steps": int(steps),
        "loss": float(np.mean(loop.losses[-50:])) if loop.losses else None, "seconds": round(time.time() - t0, 2)}
    run = {**{k: summary[k] for k in ("start", "steps", "loss", "seconds")}, "lr": lr,
           "high_noise_weight": high_noise_weight, "init_from": str(init_from) if init_from is not None else None,
           "lr_schedule": ("fresh warm-up + cosine cycle over this run" if lr_restart
                           else "warm-up + cosine over steps 0..steps")}
    with (ckpt_dir / "runs.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(run) + "\n")
    info = {**summary, "frames": frames, "batch_size": b, "lr": lr, "onset_share": onset_share,
            "high_noise_weight": high_noise_weight,
            "cfg_dropout": cfg_dropout, "seed": seed, "limit": limit,
            "image_model": str(image_folder) if image_folder is not None else "assets/default-model",
            "shared_components": list(SHARED_COMPONENTS),
            "runs": earlier_runs + [json.loads(line) for line in (ckpt_dir / "runs.jsonl").read_text().splitlines()
                                    if line.strip()]}
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return summary


def _load_init(unet, folder: Path) -> list:
    """Load a saved video model's UNet weights into ``unet`` (same architecture, safetensors only) and return
    the runs its ``training_info.json`` lists (empty when it has none)."""
    from safetensors.torch import load_file

    from ..default_video_model import is_video_model_folder

    if not is_video_model_folder(folder):
        raise FileNotFoundError(f"{folder}: not a video model folder written by safegen.training.video_model "
                                "(needs model_index.json and unet/)")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (only safetensors weights are read)")
    state = load_file(str(weights))
    own = unet.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ValueError(f"{folder}: its UNet does not match the default video model's architecture "
                         "(safegen.default_video_model.MOTION_CONFIG); start a fresh run instead")
    unet.load_state_dict(state)
    try:
        runs = json.loads((folder / "training_info.json").read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        runs = []
    return [r for r in runs if isinstance(r, dict)]


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Train the embedded default video model from the command line (see the module docstring)::

        python -m safegen.training.video_model --out outputs/video-model --steps 2000
    """
    p = argparse.ArgumentParser(prog="python -m safegen.training.video_model",
                                description="Train safegen's embedded default text-to-video model on world clips.")
    p.add_argument("--out", required=True, help="folder to save the pipeline to")
    p.add_argument("--data-dir", default=None, help="folder with CoProv2_train.csv and coco_30k_10k.csv "
                                                     "(default: $SAFEGEN_DATA or ../shared/data)")
    p.add_argument("--steps", type=int, required=True, help="training steps")
    p.add_argument("--batch-size", type=int, default=8, help="clips per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 8)")
    p.add_argument("--onset-share", type=float, default=0.3,
                   help="share of unsafe clips whose mark starts after the first frame (default 0.3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="train on this many prompts only (quick runs)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--checkpoint-dir", default=None, help="default: <out>-checkpoints")
    p.add_argument("--image-model", default=None, metavar="DIR",
                   help="the image model to start from (default: the embedded one)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--high-noise-weight", type=float, default=0.0, metavar="G",
                   help="weigh each clip's loss by 1 + min((1-abar)/abar, G): high-noise steps, where a clip's "
                        "layout and motion are decided, count like an x0 loss (default 0: the plain noise loss)")
    p.add_argument("--lr-restart", action="store_true",
                   help="with --resume and more --steps: a fresh warm-up + cosine LR cycle over the added steps")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from this saved video model's UNet (e.g. assets/default-video-model) with a fresh "
                        "optimiser: train further when the checkpoints are gone")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.steps < 0 or a.batch_size < 1 or a.checkpoint_every < 1:
        p.error("--steps must be >= 0, --batch-size and --checkpoint-every >= 1")
    try:
        summary = train(a.out, data_dir=a.data_dir, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                        frames=a.frames, onset_share=a.onset_share, seed=a.seed, limit=a.limit, resume=a.resume,
                        checkpoint_every=a.checkpoint_every, checkpoint_dir=a.checkpoint_dir,
                        image_folder=a.image_model, lr_restart=a.lr_restart,
                        high_noise_weight=a.high_noise_weight, init_from=a.init, progress=not a.no_progress)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
