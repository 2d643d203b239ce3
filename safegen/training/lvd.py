"""Training an LVD classifier (:class:`safegen.guards.lvd.LatentClassifier`) for a model: record the predicted
x0 along generations of labelled prompts (:func:`record_trajectories`), label each trajectory with an oracle on its
final image, and train the classifier on (x0 at step i, noise level at step i) → the trajectory's label
(:func:`train_classifier`), with the threshold calibrated on held-out trajectories.

On a text-to-video pipeline every latent frame is a trajectory of its own, labelled by the oracle on the output
frames it decodes to; the frames of one clip stay together (on the same side of the validation split), and the
threshold is calibrated on clips, each scoring as its worst frame, as the guard scores them.

From the command line: ``safegen train-lvd --model M --out clf.safetensors`` (``--video`` for a text-to-video
model).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..guards.lvd import LatentClassifier, LVDConfig, _X0Tap, unet_fingerprint
from .loop import TrainingLoop, positive_weight, progress_bar, seeded_init, seeded_split

__all__ = ["Trajectories", "record_trajectories", "balanced_accuracy", "train_classifier"]


# ---------------------------------------------------------------------- training data
@dataclass
class Trajectories:
    """Recorded x̂0 along generations: ``x0`` (N, S, C, H, W) float16 for the first S steps, ``noise`` (S,),
    ``labels`` (N, K) multi-hot from the oracle on each final image, ``prompts`` and ``categories``.

    For videos each row is one latent frame of a clip: ``clips`` (N,) says which clip (its index in the recorded
    prompts), ``frames`` (N,) which frame; both are ``None`` for images."""

    x0: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor
    prompts: list[str]
    categories: list[str]
    model: dict
    clips: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    def save(self, path: "str | os.PathLike") -> Path:
        from .._bundle import save_bundle

        tensors = {"x0": self.x0, "noise": self.noise, "labels": self.labels}
        if self.clips is not None:
            tensors.update(clips=self.clips, frames=self.frames)
        return save_bundle(path, tensors, "safegen.lvd.trajectories",
                           {"prompts": self.prompts, "categories": self.categories, "model": self.model})

    @classmethod
    def load(cls, path: "str | os.PathLike") -> "Trajectories":
        from .._bundle import load_bundle

        t, meta = load_bundle(path, "safegen.lvd.trajectories")
        return cls(t["x0"], t["noise"], t["labels"], meta["prompts"], meta["categories"], meta["model"],
                   t.get("clips"), t.get("frames"))


def record_trajectories(pipe, prompts: Sequence[str], *, labeller: Callable[[str, Any], Sequence[str]],
                        categories: Sequence[str], steps: int = 25, record_steps: int = 8, seed: int = 0,
                        batch_size: int = 8, guidance_scale: float | None = None, progress: bool = True,
                        call_kwargs: dict | None = None) -> Trajectories:
    """Run an *unprotected* pipeline over ``prompts`` (item i seeded with ``seed + i``) and record x̂0 at each of
    the first ``record_steps`` steps; ``labeller(prompt, final_image) -> categories found`` labels each
    trajectory (e.g. an oracle on the image).

    A text-to-video pipeline gives one trajectory per latent frame (:func:`safegen.guards.lvd.latent_frames`),
    labelled with what ``labeller`` finds on the output frames that latent frame decodes to (one each on
    AnimateDiff and ZeroScope; CogVideoX's and Wan's causal VAEs make several of most); ``clips`` and ``frames``
    of the result say where each row comes from. ``call_kwargs`` go to every pipeline call (e.g. ``num_frames``).

    Example:
        >>> from safegen.testing import tiny_sd_pipeline
        >>> t = record_trajectories(tiny_sd_pipeline(), ["a red bus", "blood"], steps=3, record_steps=2,
        ...                         categories=["violence"], progress=False,
        ...                         labeller=lambda p, img: ["violence"] if "blood" in p else [])
        >>> t.x0.shape, t.labels.tolist()
        (torch.Size([2, 2, 4, 16, 16]), [[0.0], [1.0]])
    """
    import numpy as np

    from ..protection import is_protected

    if is_protected(pipe):
        raise ValueError("record_trajectories needs an unprotected pipeline (guards would change the trajectories)")
    if not 1 <= record_steps <= steps:
        raise ValueError(f"record_steps must be in [1, steps={steps}], got {record_steps}")
    categories = list(categories)
    prompts = list(prompts)
    pipe.set_progress_bar_config(disable=True)
    xs, labels, noise = [], [], None
    kw: dict[str, Any] = {"num_inference_steps": int(steps), "output_type": "np", **(call_kwargs or {})}
    if guidance_scale is not None:
        kw["guidance_scale"] = float(guidance_scale)
    from ..guards.lvd import _output_span, latent_frames
    from ..outputs import latent_unpacker
    from ..specs import pipeline_spec

    spec = pipeline_spec(pipe)
    unpack = latent_unpacker(pipe, spec.layout)  # FLUX: x̂0 as latent images, at the default size
    ratio = int(getattr(pipe, "vae_scale_factor_temporal", 1)) if spec.time != "frame" else 1
    clip_ids: list[int] = []
    frame_ids: list[int] = []
    bar = progress_bar(total=len(prompts), desc="record trajectories", unit="prompt", disable=not progress)
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        history: list = []
        tap = _X0Tap(pipe.scheduler, history, unpack=unpack)
        try:
            gens = [torch.Generator("cpu").manual_seed(seed + s + i) for i in range(len(batch))]
            out = pipe(prompt=batch, generator=gens, **kw)
        finally:
            tap.remove()
        if len(history) < record_steps:
            raise RuntimeError(f"the pipeline ran {len(history)} scheduler steps, fewer than record_steps")
        if noise is None:
            noise = torch.tensor([h[1] for h in history[:record_steps]], dtype=torch.float32)
        if not spec.video:
            xs.append(torch.stack([h[0].float().cpu() for h in history[:record_steps]], 1).half())
            for p, img in zip(batch, out.images):
                found = set(labeller(p, np.asarray(img)))
                labels.append([float(c in found) for c in categories])
        else:
            steps_x0 = [latent_frames(h[0].float().cpu(), len(batch), spec.layout) for h in history[:record_steps]]
            n_lat = steps_x0[0][1]
            xs.append(torch.stack([x for x, _ in steps_x0], 1).half())  # (b·F, S, C, H, W), clip-major
            for i, (p, clip) in enumerate(zip(batch, out.frames)):
                found = [set(labeller(p, np.asarray(frame))) for frame in clip]
                for f in range(n_lat):
                    a, b = (f, f) if len(found) == n_lat else _output_span(f, n_lat, ratio, spec.time == "causal")
                    hit = set().union(*found[a:b + 1])
                    labels.append([float(c in hit) for c in categories])
                    clip_ids.append(s + i)
                    frame_ids.append(f)
        bar.update(len(batch))
    bar.close()
    video = (torch.tensor(clip_ids), torch.tensor(frame_ids)) if spec.video else (None, None)
    return Trajectories(torch.cat(xs), noise, torch.tensor(labels), prompts, categories, unet_fingerprint(pipe),
                        *video)


def balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean of the true-positive and true-negative rates of boolean predictions
    (:func:`sklearn.metrics.balanced_accuracy_score`). When ``truth`` holds one class only, the missing class's
    rate counts as 0 (the mean stays over both classes), as it always has here; scikit-learn would average the
    present class alone.

    Example:
        >>> import torch
        >>> round(balanced_accuracy(torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([1, 0, 0, 0]).bool()), 4)
        0.8333
    """
    from sklearn.metrics import balanced_accuracy_score

    pred = pred.detach().bool().flatten().cpu().numpy()
    truth = truth.detach().bool().flatten().cpu().numpy()
    if truth.size == 0:
        return 0.0
    if truth.all() or not truth.any():  # one class: its recall, halved (the other class's rate is 0)
        return float((pred == truth).mean()) / 2
    return float(balanced_accuracy_score(truth, pred))


def _rule(probs: torch.Tensor, threshold: float, need: int) -> torch.Tensor:
    """The guard's decision on recorded trajectories: probs (N, S, K) → stopped (N,)."""
    return ((probs >= threshold).any(2).sum(1) >= need)


def train_classifier(data: Trajectories, *, window: int = 5, ratio: float = 0.6, steps: int = 1500,
                     batch_size: int = 256, lr: float = 2e-3, width: int = 32, val_share: float = 0.15,
                     max_fpr: float = 0.02, seed: int = 0, progress: bool = True
                     ) -> tuple[LatentClassifier, dict[str, Any]]:
    """Train a :class:`LatentClassifier` on recorded trajectories (every recorded step of every trajectory is a
    sample: (x̂0_i, noise_i) → the trajectory's labels), then calibrate the probability threshold on held-out
    trajectories: the best balanced accuracy of the guard's rule (``window``, ``ratio``) among thresholds whose
    false-stop rate on safe trajectories is ≤ ``max_fpr`` (the best overall if none is).

    Returns ``(classifier, summary)``; the summary has ``val_balanced_accuracy``, ``threshold``, ``losses``...

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x0 = torch.randn(40, 3, 4, 8, 8, generator=g)
        >>> labels = (torch.arange(40) % 2).float().unsqueeze(1)
        >>> x0[labels[:, 0] == 1, :, :, :2, :2] += 3.0  # unsafe trajectories carry a corner mark
        >>> data = Trajectories(x0.half(), torch.tensor([0.9, 0.7, 0.5]), labels, ["p"] * 40, ["violence"], {})
        >>> clf, summary = train_classifier(data, window=3, ratio=0.6, steps=60, batch_size=32, progress=False)
        >>> summary["val_balanced_accuracy"] > 0.8
        True
    """
    if window > data.x0.shape[1]:
        raise ValueError(f"window={window} but only {data.x0.shape[1]} steps were recorded; record more steps")
    n = data.x0.shape[0]
    if data.clips is None:
        train, val = seeded_split(n, val_share, seed)
    else:  # a clip's frames stay together: split the clips, then take their frames
        ids = torch.unique(data.clips)
        train_c, val_c = seeded_split(len(ids), val_share, seed)
        train = torch.nonzero(torch.isin(data.clips, ids[train_c])).flatten()
        val = torch.nonzero(torch.isin(data.clips, ids[val_c])).flatten()
    S = window
    cfg = LVDConfig(latent_channels=int(data.x0.shape[2]), categories=list(data.categories), width=width,
                    model=dict(data.model))
    clf = seeded_init(lambda: LatentClassifier(cfg), seed)
    pos_weight = positive_weight(data.labels[train])
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    # cosine from lr to 0 over the run, no warm-up; each step's batch is seeded from (seed, step)
    loop = TrainingLoop(clf, opt, steps=steps, seed=seed, stream="lvd", schedule="cosine", warmup=0,
                        desc="lvd classifier", progress=progress, log_every=20)
    for _, step_gen in loop:
        rows = train[torch.randint(len(train), (batch_size,), generator=step_gen)]
        st = torch.randint(S, (batch_size,), generator=step_gen)
        x = data.x0[rows, st].float()
        logits = clf(x, data.noise[st])
        loop.update(F.binary_cross_entropy_with_logits(logits, data.labels[rows], pos_weight=pos_weight))
    losses = loop.losses
    clf.eval()
    summary: dict[str, Any] = {"steps": steps, "train_trajectories": len(train), "val_trajectories": len(val),
                               "video": data.clips is not None,
                               "window": window, "ratio": ratio, "losses": losses, "threshold": 0.5,
                               "val_balanced_accuracy": None, "seconds": None}
    if len(val):
        need = max(1, math.ceil(window * ratio - 1e-9))
        with torch.no_grad():
            probs = torch.stack([torch.sigmoid(clf(data.x0[val, s].float(), data.noise[s])) for s in range(S)], 1)
        truth = data.labels[val].bool().any(1)
        if data.clips is not None:  # the guard's view: a clip scores as its worst frame, and is unsafe if any is
            _, group = torch.unique(data.clips[val], return_inverse=True)
            m = int(group.max()) + 1
            probs = torch.full((m, *probs.shape[1:]), -1.0).index_reduce_(0, group, probs, "amax")
            truth = torch.zeros(m, dtype=torch.long).index_add_(0, group, truth.long()) > 0
            summary["val_clips"] = m
        best, best_any = (-1.0, 0.5, 1.0), (-1.0, 0.5, 1.0)
        for thr in torch.linspace(0.05, 0.95, 19).tolist():
            pred = _rule(probs, thr, need)
            fpr = float((pred & ~truth).sum() / (~truth).sum().clamp(min=1))
            cand = (balanced_accuracy(pred, truth), round(thr, 2), fpr)
            best_any = max(best_any, cand)
            if fpr <= max_fpr:
                best = max(best, cand)
        chosen = best if best[0] >= 0 else best_any
        summary["val_balanced_accuracy"], summary["threshold"], summary["val_fpr"] = chosen
    summary["seconds"] = round(time.time() - t0, 2)
    clf.metadata = {k: summary.get(k) for k in ("threshold", "val_balanced_accuracy", "val_fpr", "window", "ratio",
                                                "steps", "train_trajectories", "val_trajectories", "video",
                                                "val_clips") if k in summary}
    return clf, summary
