"""Training the output classifier (:class:`safegen.guards.output_classifier.OutputClassifier`) for a model.

1. **Images** (:func:`generate_images`): the *unprotected* model draws the training prompts (:func:`training_prompts`:
   CoProV2 training prompts, unsafe rows, and benign COCO captions outside every evaluation and calibration
   list), item ``i`` seeded with ``seed + i``, in batches with a progress bar. Every chunk of images is written
   to the work folder as it is made (a safetensors bundle, :mod:`safegen._bundle`), so a killed run resumes where
   it stopped; a chunk made with other prompts, seeds, steps or another model is made again.
2. **Labels** (:func:`oracle_labels`): an oracle reads each *training* image (the world oracle for the embedded
   default model; NudeNet or human labels for a real one): one label per policy category. The oracle never runs
   at guard time.
3. **Training** (:func:`train_network`): a small CNN, multi-label (binary cross-entropy, positives weighted up),
   through :class:`safegen.training.loop.TrainingLoop` (seeded, checkpointed in the work folder, resumable); a
   share of the images is held out for validation.
4. **Calibration**: the model draws the benign reference prompts (:func:`safegen.calibration.reference_prompts`,
   item ``i`` seeded with ``i``); their scores are the classifier's :class:`~safegen.calibration.RiskScale`,
   stored with the weights. The validation figures (per-category AUC, balanced accuracy at the 1% budget's
   thresholds) come last: :func:`validation_report`.

   ``calibrate_on="clean"`` (the default, and the shipped classifier's) fits it on the reference images the
   labeller finds clean, so the budget counts false flags on benign *images* (the labeller reads the reference
   images at build time, like the training images; never at guard time). ``calibrate_on="all"`` fits the scale
   on every reference image, as the text guards do on the reference prompts; but a model that draws unsafe content
   for some benign prompts (the embedded default model marks 34 of the 1,000 reference images) then spends the
   budget on true positives: at a 1% budget the thresholds sit among real hazard marks and recall drops (38% on
   CoProV2 test, against 100% with "clean"; BENCHMARKS.md). The summary reports how many reference
   images the labeller finds unsafe either way.

:func:`build_output_classifier` runs all four. From the command line::

    safegen train-output-classifier --out assets/output/default-model.safetensors --work outputs/train-output-clf

Example:
    >>> import tempfile
    >>> from safegen.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> work = tempfile.mkdtemp()
    >>> imgs = generate_images(pipe, ["a red bus", "blood", "a cat"], steps=2, batch_size=2, work=work,
    ...                        name="demo", progress=False)
    >>> tuple(imgs.images.shape), imgs.seeds, imgs.images.dtype
    ((3, 32, 32, 3), [0, 1, 2], torch.uint8)
    >>> again = generate_images(pipe, ["a red bus", "blood", "a cat"], steps=2, batch_size=2, work=work,
    ...                         name="demo", progress=False)  # read back from the work folder
    >>> bool((again.images == imgs.images).all())
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..guards.output_classifier import (DEFAULT_BUDGET, OutputClassifier, OutputClassifierConfig,
                                        OutputClassifierNet, images_to_tensor)
from .loop import Checkpoints, TrainingLoop, positive_weight, progress_bar, seeded_init, seeded_split

__all__ = ["BENIGN_START", "ImageSet", "training_prompts", "generate_images", "oracle_labels", "train_network",
           "validation_report", "build_output_classifier"]

#: COCO captions before this row (file order) are never trained on: evaluations read rows 0-4999 (the output
#: classifier's false-positive benchmark samples them), and the benign reference prompts are excluded wherever
#: they sit.
BENIGN_START = 5000
_IMAGES = "safegen.output-classifier.images"


# ---------------------------------------------------------------------- prompts
def training_prompts(n_unsafe: int, n_benign: int, seed: int = 0, data_dir=None) -> tuple[list[str], list[str]]:
    """``(prompts, sources)``: ``n_unsafe`` distinct unsafe CoProV2 *training* prompts (source ``"coprov2"``) and
    ``n_benign`` distinct COCO captions from row :data:`BENIGN_START` on (source ``"coco"``), less any caption
    that also occurs in rows 0-4999 or among the benign reference prompts; a seeded sample, shuffled."""
    from ..calibration import reference_prompts
    from ..eval.datasets import load_coco, load_coprov2_pairs

    rng = random.Random(seed)
    unsafe = list(dict.fromkeys(u for u, _, _ in load_coprov2_pairs(data_dir)))
    coco = load_coco(data_dir)
    held = set(coco[:BENIGN_START]) | set(reference_prompts())
    benign = [p for p in dict.fromkeys(coco[BENIGN_START:]) if p not in held]
    if n_unsafe > len(unsafe) or n_benign > len(benign):
        raise ValueError(f"asked for {n_unsafe} unsafe and {n_benign} benign training prompts; the data has "
                         f"{len(unsafe)} and {len(benign)}")
    rows = [(p, "coprov2") for p in rng.sample(unsafe, n_unsafe)] + [(p, "coco") for p in rng.sample(benign, n_benign)]
    rng.shuffle(rows)
    return [p for p, _ in rows], [s for _, s in rows]


# ---------------------------------------------------------------------- images
@dataclass
class ImageSet:
    """Images a model drew: ``images`` (N, H, W, 3) uint8, the ``prompts``, each item's ``seeds``, the
    denoising ``steps`` and the ``model`` fingerprint (:func:`safegen.guards.lvd.unet_fingerprint`)."""

    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    steps: int
    model: dict

    def __len__(self) -> int:
        return len(self.prompts)


def _to_uint8(images) -> torch.Tensor:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr))


def generate_images(pipe, prompts: Sequence[str], *, seed: int = 0, steps: int = 25, batch_size: int = 32,
                    work: "str | os.PathLike | None" = None, name: str = "images", chunk: int = 128,
                    guidance_scale: float | None = None, progress: bool = True) -> ImageSet:
    """Draw ``prompts`` with an *unprotected* pipeline, item ``i`` seeded with ``seed + i`` (a CPU generator).

    With ``work``, every ``chunk`` images are saved to ``work/name/`` as they are made and read back on the next
    run (a killed run resumes; a chunk whose prompts, seeds, steps or model differ is made again).
    """
    from .._bundle import load_bundle, save_bundle
    from ..guards.lvd import unet_fingerprint
    from ..protection import is_protected

    if is_protected(pipe):
        raise ValueError("generate_images needs an unprotected pipeline (the classifier learns the model's own "
                         "images, unsafe ones included)")
    prompts = [str(p) for p in prompts]
    if int(batch_size) < 1 or int(chunk) < 1:
        raise ValueError("batch_size and chunk must be positive")
    model = unet_fingerprint(pipe)
    folder = Path(work) / name if work is not None else None
    kw: dict[str, Any] = {"num_inference_steps": int(steps), "output_type": "np"}
    if guidance_scale is not None:
        kw["guidance_scale"] = float(guidance_scale)
    pipe.set_progress_bar_config(disable=True)
    parts: list[torch.Tensor] = []
    bar = progress_bar(total=len(prompts), desc=f"generate {name}", unit="image", disable=not progress)
    for start in range(0, len(prompts), chunk):
        todo = prompts[start:start + chunk]
        seeds = [seed + start + i for i in range(len(todo))]
        meta = {"prompts": todo, "seeds": seeds, "steps": int(steps), "model": model,
                "guidance_scale": kw.get("guidance_scale")}
        path = folder / f"chunk-{start:07d}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            try:
                tensors, stored = load_bundle(path, _IMAGES)
            except (OSError, ValueError):  # torn or foreign: made again
                stored = None
            if stored == meta:
                parts.append(tensors["images"])
                bar.update(len(todo))
                continue
        made = []
        for s in range(0, len(todo), batch_size):
            gens = [torch.Generator("cpu").manual_seed(x) for x in seeds[s:s + batch_size]]
            with torch.no_grad():
                out = pipe(prompt=todo[s:s + batch_size], generator=gens, **kw)
            made.append(_to_uint8(out.images))
            bar.update(len(gens))
        images = torch.cat(made)
        if path is not None:  # written whole, then renamed: a killed run never leaves a torn chunk behind
            tmp = path.with_name(path.name + ".tmp")
            save_bundle(tmp, {"images": images}, _IMAGES, meta)
            os.replace(tmp, path)
        parts.append(images)
    bar.close()
    images = torch.cat(parts) if parts else torch.zeros(0, 0, 0, 3, dtype=torch.uint8)
    return ImageSet(images, prompts, [seed + i for i in range(len(prompts))], int(steps), model)


def oracle_labels(judge: Callable[[str, Any], dict], prompts: Sequence[str], images: torch.Tensor,
                  categories: Sequence[str], progress: bool = False) -> torch.Tensor:
    """(N, K) multi-hot labels: category k is 1 when ``judge(prompt, image)`` finds the image unsafe in it.

    Example:
        >>> import torch
        >>> judge = lambda p, img: {"unsafe": "blood" in p, "category": "violence" if "blood" in p else None}
        >>> oracle_labels(judge, ["blood", "a bus"], torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ["sexual", "violence"])
        tensor([[0., 1.],
                [0., 0.]])
    """
    from ..policy import normalize_category

    categories = list(categories)
    out = torch.zeros(len(prompts), len(categories))
    arr = images.numpy()
    for i in progress_bar(range(len(prompts)), desc="label", unit="image", disable=not progress):
        j = judge(prompts[i], arr[i])
        if j.get("unsafe") and j.get("category"):
            c = normalize_category(j["category"])
            if c in categories:
                out[i, categories.index(c)] = 1.0
    return out


# ---------------------------------------------------------------------- training
def _data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def train_network(images: torch.Tensor, labels: torch.Tensor, categories: Sequence[str], *, size: int = 32,
                  width: int = 16, steps: int = 2000, batch_size: int = 128, lr: float = 3e-3,
                  val_share: float = 0.15, noise: float = 0.03, seed: int = 0, model: dict | None = None,
                  checkpoints: Checkpoints | None = None, checkpoint_every: int = 250, progress: bool = True
                  ) -> tuple[OutputClassifierNet, dict[str, Any]]:
    """Train an :class:`OutputClassifierNet` on images (N, H, W, 3) uint8 (or float in [0, 1]) and their
    labels (N, K); ``val_share`` of the images (a seeded draw) are held out.

    Each step draws ``batch_size`` training images (seeded from the step: :class:`TrainingLoop`), adds Gaussian
    pixel noise of a random strength up to ``noise`` and a small brightness shift, and takes an AdamW step on the
    binary cross-entropy, each category's positives weighted by its negatives/positives ratio (at most 20). With
    ``checkpoints`` a killed run resumes from the newest checkpoint (one made on other data is discarded).

    Returns ``(net, info)``; ``info`` has ``train`` and ``val`` (index tensors), ``losses``, ``resumed_from``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.rand(64, 32, 32, 3, generator=g) * 0.2 + 0.6
        >>> y = (torch.arange(64) % 2).float().unsqueeze(1)
        >>> x[y[:, 0] == 1, :8, :8] = 0.0  # positives carry a dark corner
        >>> net, info = train_network(x, y, ["violence"], size=16, width=8, steps=60, batch_size=32, progress=False)
        >>> s = net.scores(x[info["val"]])
        >>> bool((s[y[info["val"], 0] == 1].min() > s[y[info["val"], 0] == 0].max()))
        True
    """
    categories = list(categories)
    if labels.shape != (images.shape[0], len(categories)):
        raise ValueError(f"labels must be (N={images.shape[0]}, K={len(categories)}), got {tuple(labels.shape)}")
    n = images.shape[0]
    train, val = seeded_split(n, val_share, seed)
    if len(train) == 0:
        raise ValueError("no training images left after the validation share")
    x, _ = images_to_tensor(images, size)  # (N, 3, size, size) in [0, 1], computed once
    y = labels.float()
    cfg = OutputClassifierConfig(categories=categories, size=size, width=width, model=dict(model or {}))
    net = seeded_init(lambda: OutputClassifierNet(cfg), seed)
    pos_weight = positive_weight(y[train])
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    digest = _data_digest(images if images.dtype == torch.uint8 else images.float(), y)
    meta = {"data": digest, "config": {"size": size, "width": width, "categories": categories},
            "batch_size": batch_size, "lr": lr, "seed": seed, "val_share": val_share}
    if checkpoints is not None:
        latest = checkpoints.latest()
        if latest is not None:
            old = Checkpoints.metadata(latest)
            if any(old.get(k) != v for k, v in meta.items()):
                checkpoints.clear()  # made on other data or settings: never resumed
    loop = TrainingLoop(net, opt, steps=steps, seed=seed, stream="output-classifier", schedule="cosine", warmup=50,
                        checkpoints=checkpoints, checkpoint_every=checkpoint_every if checkpoints else 0,
                        final_checkpoint=checkpoints is not None, meta=meta, desc="output classifier",
                        progress=progress, log_every=20)
    resumed = loop.resume() if checkpoints is not None else None
    net.train()
    for _, step_gen in loop:
        rows = train[torch.randint(len(train), (batch_size,), generator=step_gen)]
        xb = x[rows]
        sigma = torch.rand(len(rows), 1, 1, 1, generator=step_gen) * noise
        shift = (torch.rand(len(rows), 1, 1, 1, generator=step_gen) - 0.5) * 2 * noise
        xb = (xb + sigma * torch.randn(xb.shape, generator=step_gen) + shift).clamp(0.0, 1.0)
        loop.update(F.binary_cross_entropy_with_logits(net(xb), y[rows], pos_weight=pos_weight))
    net.eval()
    return net, {"train": train, "val": val, "losses": loop.losses, "resumed_from": (resumed or {}).get("step"),
                 "steps": steps}


def _auc(score: torch.Tensor, truth: torch.Tensor) -> float | None:
    from sklearn.metrics import roc_auc_score

    t = truth.bool().numpy()
    if t.all() or not t.any():
        return None
    return float(roc_auc_score(t, score.double().numpy()))


def validation_report(scores: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor,
                      categories: Sequence[str]) -> dict[str, Any]:
    """Per category: positives, AUC (None with one class only) and the balanced accuracy of ``score >=
    threshold``; and over all categories (an image is unsafe in any): recall, false-positive rate, balanced
    accuracy, and how often a caught image is put in its oracle category.

    Example:
        >>> import torch
        >>> s = torch.tensor([[3.0], [2.0], [-1.0], [-2.0]])
        >>> r = validation_report(s, torch.tensor([[1.0], [1.0], [0.0], [0.0]]), torch.tensor([0.0]), ["violence"])
        >>> r["per_category"]["violence"]["auc"], r["any"]["recall"], r["any"]["fpr"]
        (1.0, 1.0, 0.0)
    """
    from .lvd import balanced_accuracy

    categories = list(categories)
    hit = scores >= thresholds.view(1, -1)
    truth = labels.bool()
    per = {}
    for k, c in enumerate(categories):
        per[c] = {"positives": int(truth[:, k].sum()), "auc": _auc(scores[:, k], truth[:, k]),
                  "balanced_accuracy": round(balanced_accuracy(hit[:, k], truth[:, k]), 4)}
        if per[c]["auc"] is not None:
            per[c]["auc"] = round(per[c]["auc"], 4)
    unsafe, flagged = truth.any(1), hit.any(1)
    caught = unsafe & flagged
    # the category the guard would name: the flagged one with the highest score margin
    named = torch.where(hit, scores - thresholds.view(1, -1), torch.full_like(scores, float("-inf"))).argmax(1)
    right = truth[torch.arange(len(named)), named] & caught
    return {"per_category": per, "any": {
        "n": int(len(labels)), "unsafe": int(unsafe.sum()),
        "recall": round(float(caught.sum() / unsafe.sum().clamp(min=1)), 4),
        "fpr": round(float((flagged & ~unsafe).sum() / (~unsafe).sum().clamp(min=1)), 4),
        "balanced_accuracy": round(balanced_accuracy(flagged, unsafe), 4),
        "category_right": round(float(right.sum() / caught.sum().clamp(min=1)), 4)}}


# ---------------------------------------------------------------------- the whole run
def build_output_classifier(pipe, *, n_unsafe: int = 1200, n_benign: int = 1200, seed: int = 0, steps: int = 25,
                            train_steps: int = 2000, batch_size: int = 32, work: "str | os.PathLike",
                            judge: Callable[[str, Any], dict] | None = None, categories: Sequence[str] | None = None,
                            data_dir=None, size: int = 32, width: int = 16, trained_on: str = "",
                            calibrate_on: str = "clean", progress: bool = True) -> tuple[OutputClassifier, dict[str, Any]]:
    """Generate, label, train, calibrate and validate (module docstring); everything resumable in ``work``.

    ``judge`` labels the training images (default: the world oracle, right for the embedded default model);
    ``categories`` default to the world's (the policy categories). Returns ``(classifier, summary)``: save the
    classifier with :meth:`OutputClassifier.save`; the summary (also stored in its metadata) has the data
    counts, the validation figures (:func:`validation_report` at the 1% budget's thresholds) and timings.
    """
    from ..calibration import RiskScale, reference_digest, reference_prompts
    from ..policy import CATEGORIES

    if calibrate_on not in ("all", "clean"):
        raise ValueError(f"calibrate_on must be 'all' or 'clean', got {calibrate_on!r}")
    t0 = time.time()
    work = Path(work)
    categories = list(categories or CATEGORIES)
    judge_name = getattr(getattr(judge, "__self__", None), "name", None) or getattr(judge, "__name__", "a judge")
    if judge is None:
        from ..eval.oracles import WorldOracle

        judge, judge_name = WorldOracle().judge, "the world oracle"
    prompts, sources = training_prompts(n_unsafe, n_benign, seed, data_dir)
    data = generate_images(pipe, prompts, seed=seed, steps=steps, batch_size=batch_size, work=work, name="train",
                           progress=progress)
    t_gen = time.time()
    labels = oracle_labels(judge, data.prompts, data.images, categories)
    net, info = train_network(data.images, labels, categories, size=size, width=width, steps=train_steps, seed=seed,
                              model=data.model, checkpoints=Checkpoints(work / "checkpoints", "output-classifier"),
                              progress=progress)
    t_train = time.time()
    ref = generate_images(pipe, reference_prompts(), seed=0, steps=steps, batch_size=batch_size, work=work,
                          name="reference", progress=progress)
    ref_scores = net.scores(ref.images)
    ref_unsafe = oracle_labels(judge, ref.prompts, ref.images, categories).bool().any(1)
    if calibrate_on == "clean":
        if bool(ref_unsafe.all()):
            raise ValueError("the labeller finds every reference image unsafe: nothing to calibrate on")
        ref_scores = ref_scores[~ref_unsafe]
    scale = RiskScale(ref_scores, categories)
    t_ref = time.time()
    val = info["val"]
    src = np.array(sources)
    summary: dict[str, Any] = {
        "trained_on": trained_on, "images": len(data), "steps": steps, "seed": seed, "train_steps": train_steps,
        "size": size, "width": width, "parameters": sum(p.numel() for p in net.parameters()),
        "sources": {s: int((src == s).sum()) for s in ("coprov2", "coco")},
        "unsafe_images": {c: int(labels[:, k].sum()) for k, c in enumerate(categories)},
        "coco_unsafe_images": int(labels[torch.from_numpy(src == "coco")].any(1).sum()),
        "train_images": int(len(info["train"])), "val_images": int(len(val)),
        "final_loss": round(float(np.mean(info["losses"][-50:])), 4) if info["losses"] else None,
        "resumed_from_step": info["resumed_from"],
        "reference": {"prompts": len(ref), "digest": reference_digest(), "seeds": "i",
                      "labeller_unsafe": int(ref_unsafe.sum()), "calibrated_on": calibrate_on,
                      "calibration_images": int(len(scale))},
        "labels": f"{judge_name} on each training image (never at guard time)",
    }
    clf = OutputClassifier(net, scale, metadata=summary)
    if len(val):
        val_scores = net.scores(data.images[val])
        summary["validation"] = validation_report(val_scores, labels[val], clf.thresholds, categories)
        summary["validation"]["budget"] = DEFAULT_BUDGET
    summary["seconds"] = {"generate": round(t_gen - t0, 1), "train": round(t_train - t_gen, 1),
                          "reference": round(t_ref - t_train, 1), "total": round(time.time() - t0, 1)}
    clf.metadata = json.loads(json.dumps(summary, default=str))
    return clf, summary
