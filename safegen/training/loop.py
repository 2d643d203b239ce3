"""The one training loop of :mod:`safegen.training`: seeded, resumable, with a progress bar.

Every trainer (the Latent Guard head, the LVD classifier, SafetyDPO experts, the default model's VAE and UNet, the
distilled text encoder) writes only its loss; :class:`TrainingLoop` does the rest the same way for all of them:

* **seeded**: each step gets a :class:`torch.Generator` re-seeded from ``(seed, stream, step)`` (see
  :func:`step_seed`), and the global RNG (dropout) is re-seeded the same way inside a fork, so the caller's RNG is
  untouched. A step's randomness depends on nothing but its number: a run resumed from a checkpoint draws exactly
  what the uninterrupted run drew.
* **resumable**: :meth:`TrainingLoop.resume` loads the newest checkpoint of its :class:`Checkpoints` (weights,
  optimizer state, step and the caller's metadata) and the loop continues after it.
* **checkpoints**: safetensors files ``<name>-<step:07d>.safetensors`` (weights as ``model.<key>``, optimizer state
  as ``opt.<param index>.<key>``, JSON metadata in the header under ``"safegen"``), written to a temporary file and
  renamed (a crash never leaves a torn checkpoint); the newest ``keep`` are kept.
* **progress bar**: tqdm with the running mean loss (redrawn at most every 30 s when stderr is a log file).
* **optimizer step**: zero grad, backward, optional gradient clipping (total norm), step, LR schedule: constant,
  or diffusers' :func:`~diffusers.optimization.get_cosine_schedule_with_warmup` over the run (``restart=True``:
  a fresh warm-up and cosine cycle over the steps left after a resume). A non-finite loss is an error.

Example:
    >>> import torch
    >>> from safegen.training.loop import TrainingLoop
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    >>> loop = TrainingLoop(model, opt, steps=30, seed=0, schedule="cosine", warmup=2, clip=1.0, progress=False)
    >>> for step, gen in loop:
    ...     x = torch.randn(16, 2, generator=gen)
    ...     loop.update(((model(x) - x.sum(1, keepdim=True)) ** 2).mean())
    >>> len(loop.losses), loop.losses[-1] < loop.losses[0]
    (30, True)

With ``checkpoints=Checkpoints(folder, "unet")`` and ``checkpoint_every=N`` it writes a checkpoint every N steps
and at the end; ``loop.resume()`` before the ``for`` continues from the newest one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import TrainingDivergedError

__all__ = ["step_seed", "progress_bar", "Checkpoints", "TrainingLoop", "seeded_split", "seeded_init",
           "positive_weight"]


def step_seed(seed: int, stream: str, step: int) -> int:
    """The seed of one training step: a 63-bit hash of ``(seed, stream, step)``.

    ``stream`` keeps loops that share a seed apart (the default model's VAE and UNet phases).

    Example:
        >>> step_seed(0, "unet", 5) == step_seed(0, "unet", 5) != step_seed(0, "vae", 5)
        True
    """
    digest = hashlib.blake2b(f"{int(seed)}/{stream}/{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def progress_bar(iterable=None, **kw):
    """A tqdm bar that redraws at most every 30 s when stderr is not a terminal (a log file stays readable)."""
    from tqdm.auto import tqdm

    kw.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 30.0)
    return tqdm(iterable, **kw)


def seeded_split(n: int, val_share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` indices of ``n`` examples: a seeded permutation, the first ``round(val_share · n)`` held
    out (at least one when there are two or more examples and a share is asked for)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_share * n))) if n > 1 and val_share > 0 else 0
    return order[n_val:], order[:n_val]


def seeded_init(make, seed: int):
    """``make()`` (a module) initialised from ``seed``, leaving the caller's global RNG as it was."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return make()
    finally:
        torch.random.set_rng_state(state)


def positive_weight(labels: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """Per-label ``pos_weight`` for a multi-label BCE: negatives / positives among ``labels`` (N, K), capped."""
    pos = labels.float().mean(0).clamp(1e-3, 1 - 1e-3)
    return ((1 - pos) / pos).clamp(max=cap)


def _named_tensors(model: "torch.nn.Module | Mapping[str, torch.Tensor]") -> Mapping[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return model.state_dict()
    return model


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order its ``state_dict`` numbers them."""
    return [p for group in optimizer.param_groups for p in group["params"]]


class Checkpoints:
    """The checkpoints of one training phase: ``folder/<name>-<step:07d>.safetensors``, the newest ``keep`` kept.

    A file holds the weights (``model.<key>``: a module's ``state_dict`` or a mapping of named tensors), the
    optimizer state (``opt.<i>.<key>``, ``i`` numbering the parameters as ``optimizer.state_dict()`` does) and the
    metadata as JSON under the header key ``"safegen"`` (with ``phase`` = ``name`` and ``step`` added). Param-group
    settings (learning rate, weight decay) are not stored: the run that loads a checkpoint sets them.

    Example:
        >>> import tempfile, torch
        >>> from safegen.training.loop import Checkpoints
        >>> model = torch.nn.Linear(2, 2)
        >>> ckpts = Checkpoints(tempfile.mkdtemp(), "head", keep=1)
        >>> _ = ckpts.save(10, model, meta={"seed": 3})
        >>> _ = ckpts.save(20, model, meta={"seed": 3})
        >>> [p.name for p in ckpts.paths()], ckpts.load(ckpts.latest(), torch.nn.Linear(2, 2))["step"]
        (['head-0000020.safetensors'], 20)
    """

    def __init__(self, folder: "str | os.PathLike", name: str, keep: int = 2):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"a checkpoint name is a file-name prefix, got {name!r}")
        self.folder = Path(folder)
        self.name = name
        self.keep = int(keep)
        self._pattern = re.compile(rf"^{re.escape(name)}-(\d{{7,}})\.safetensors$")

    def __repr__(self) -> str:
        return f"Checkpoints({str(self.folder)!r}, {self.name!r}, keep={self.keep})"

    def path(self, step: int) -> Path:
        return self.folder / f"{self.name}-{int(step):07d}.safetensors"

    def paths(self) -> list[Path]:
        """This phase's checkpoint files, oldest step first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := self._pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        found = self.paths()
        return found[-1] if found else None

    def clear(self) -> None:
        """Delete this phase's checkpoints (a fresh run must not resume stale ones later)."""
        for p in self.paths():
            p.unlink()

    def save(self, step: int, model: "torch.nn.Module | Mapping[str, torch.Tensor]",
             optimizer: torch.optim.Optimizer | None = None, meta: Mapping[str, Any] | None = None) -> Path:
        """Write the checkpoint of ``step`` atomically and drop all but the newest ``keep``; returns its path."""
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().to("cpu", copy=True).contiguous()
                   for k, v in _named_tensors(model).items()}
        if optimizer is not None:
            for i, p in enumerate(_params(optimizer)):
                for k, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        tensors[f"opt.{i}.{k}"] = v.detach().to("cpu", copy=True).contiguous()
        header = {"safegen": json.dumps({**(meta or {}), "phase": self.name, "step": int(step)}), "format": "pt"}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(step)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata=header)
            with open(tmp, "rb") as f:  # on disk before the rename makes it the newest checkpoint
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        for old in self.paths()[:-self.keep]:
            old.unlink()
        return path

    @staticmethod
    def metadata(path: "str | os.PathLike") -> dict:
        """The JSON metadata of a checkpoint file (without reading its tensors)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("safegen", "{}"))

    def load(self, path: "str | os.PathLike", model: "torch.nn.Module | Mapping[str, torch.Tensor]",
             optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Load a checkpoint's weights into ``model`` (every key must match) and its state into ``optimizer``;
        returns the metadata."""
        from safetensors.torch import load_file

        meta = self.metadata(path)
        tensors = load_file(str(path))
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        if isinstance(model, torch.nn.Module):
            model.load_state_dict(weights)
        else:
            missing, extra = sorted(set(model) - set(weights)), sorted(set(weights) - set(model))
            if missing or extra:
                raise ValueError(f"{path}: checkpoint does not match the parameters (missing {missing[:3]}, "
                                 f"unexpected {extra[:3]})")
            with torch.no_grad():
                for k, t in model.items():
                    t.copy_(weights[k])
        if optimizer is not None:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, v in tensors.items():
                if key.startswith("opt."):
                    _, i, name = key.split(".", 2)
                    state.setdefault(int(i), {})[name] = v
            n = len(_params(optimizer))
            if state and max(state) >= n:
                raise ValueError(f"{path}: optimizer state for {max(state) + 1} parameters, this optimizer has {n}")
            sd = optimizer.state_dict()
            sd["state"] = state
            optimizer.load_state_dict(sd)  # casts to each parameter's device and dtype as torch does
        return meta


class TrainingLoop:
    """Drive one training phase: iterate it for ``(step, generator)``, compute the loss, call :meth:`update`.

    Args:
        model: what a checkpoint stores: a module (its ``state_dict``) or a mapping of named tensors (e.g. only
            the LoRA parameters of a UNet).
        optimizer: steps the parameters; gradient clipping applies to its parameters.
        steps: the step count the phase runs up to (a resumed run continues to it).
        seed, stream: seed the per-step generator and global RNG (:func:`step_seed`).
        schedule: ``"constant"`` or ``"cosine"`` (diffusers' ``get_cosine_schedule_with_warmup``: ``warmup``
            linear steps from 0, then a half cosine to 0 at ``steps``).
        restart: with a resume, run a fresh warm-up + cosine cycle over the remaining steps instead of continuing
            the schedule over ``0..steps``.
        clip: clip the gradients' total norm to this (``None``: no clipping).
        checkpoints: where checkpoints go (``None``: none are written); ``checkpoint_every``: every N steps
            (0: only at the end); ``final_checkpoint``: write one when the phase completes having run a step.
        meta: metadata stored with each checkpoint: a dict, or a function of the step giving one.
        desc, progress, log_every: the tqdm bar (its running loss is the mean of the last 20 steps, updated every
            ``log_every`` steps).
        device: the device the model trains on (a CUDA device's RNG is seeded and restored as well).

    After the run: ``start`` (the step it began at), ``position`` (steps done in all), ``ran``, ``losses`` (this
    run's, per step) and ``metrics`` (extra values passed to :meth:`update`, per name).
    """

    def __init__(self, model: "torch.nn.Module | Mapping[str, torch.Tensor]", optimizer: torch.optim.Optimizer, *,
                 steps: int, seed: int = 0, stream: str = "", schedule: str = "constant", warmup: int = 0,
                 restart: bool = False, clip: float | None = None, checkpoints: Checkpoints | None = None,
                 checkpoint_every: int = 0, final_checkpoint: bool = True,
                 meta: "Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None" = None, desc: str = "train",
                 progress: bool = True, log_every: int = 10, device: "str | torch.device | None" = None):
        if int(steps) < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        if int(warmup) < 0 or int(checkpoint_every) < 0 or int(log_every) < 1:
            raise ValueError("warmup and checkpoint_every must be >= 0, log_every >= 1")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 (or None), got {clip}")
        self.model, self.optimizer = model, optimizer
        self.steps, self.seed, self.stream = int(steps), int(seed), str(stream)
        self.schedule, self.warmup, self.restart, self.clip = schedule, int(warmup), bool(restart), clip
        self.checkpoints, self.checkpoint_every = checkpoints, int(checkpoint_every)
        self.final_checkpoint, self.meta = bool(final_checkpoint), meta
        self.desc, self.progress, self.log_every = desc, bool(progress), int(log_every)
        self.device = torch.device(device) if device is not None else None
        self.start = self.position = 0
        self.losses: list[float] = []
        self.metrics: dict[str, list[float]] = {}
        self.scheduler = None
        self._pending: int | None = None
        self._iterated = False

    @property
    def ran(self) -> int:
        """Steps this run has done (after a resume: not counting the checkpoint's)."""
        return self.position - self.start

    def resume(self) -> dict | None:
        """Continue from the newest checkpoint, if there is one: load it and return its metadata (else ``None``)."""
        if self.checkpoints is None:
            raise ValueError("resume() needs checkpoints=")
        if self._iterated:
            raise RuntimeError("resume() comes before the loop runs")
        path = self.checkpoints.latest()
        if path is None:
            return None
        meta = self.checkpoints.load(path, self.model, self.optimizer)
        self.start = self.position = int(meta["step"])
        return meta

    def save(self) -> Path:
        """Write a checkpoint of the current position."""
        if self.checkpoints is None:
            raise ValueError("save() needs checkpoints=")
        meta = self.meta(self.position) if callable(self.meta) else (self.meta or {})
        return self.checkpoints.save(self.position, self.model, self.optimizer, meta)

    def _make_scheduler(self):
        if self.schedule == "constant" or self.start >= self.steps:
            return None
        from diffusers.optimization import get_cosine_schedule_with_warmup

        if self.restart:
            return get_cosine_schedule_with_warmup(self.optimizer, self.warmup, self.steps - self.start)
        for group in self.optimizer.param_groups:  # positioned at `start`: torch wants the base LR recorded
            group["initial_lr"] = group["lr"]
        return get_cosine_schedule_with_warmup(self.optimizer, self.warmup, self.steps, last_epoch=self.start - 1)

    def _seed_global(self, seed: int, cuda: list[torch.device]) -> None:
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            torch.cuda.default_generators[d.index if d.index is not None else torch.cuda.current_device()
                                          ].manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[int, torch.Generator]]:
        if self._iterated:
            raise RuntimeError("a TrainingLoop runs once")
        self._iterated = True
        self.scheduler = self._make_scheduler()
        cuda = [self.device] if self.device is not None and self.device.type == "cuda" else []
        gen = torch.Generator()
        bar = progress_bar(total=self.steps, initial=min(self.start, self.steps), desc=self.desc, unit="step",
                           disable=not self.progress)
        try:
            with torch.random.fork_rng(devices=cuda):
                for step in range(self.start, self.steps):
                    seed = step_seed(self.seed, self.stream, step)
                    gen.manual_seed(seed)
                    self._seed_global(seed, cuda)
                    self._pending = step
                    yield step, gen
                    if self._pending is not None:
                        raise RuntimeError(f"{self.desc}: call update(loss) once in every step")
                    self.position = step + 1
                    bar.update(1)
                    if self.position % self.log_every == 0 or self.position == self.steps:
                        bar.set_postfix(self._postfix(), refresh=False)
                    if (self.checkpoints is not None and self.checkpoint_every
                            and self.position % self.checkpoint_every == 0 and self.position < self.steps):
                        self.save()
            if self.ran and self.final_checkpoint and self.checkpoints is not None:
                self.save()
        finally:
            self._pending = None
            bar.close()

    def _postfix(self) -> dict[str, str]:
        out = {"loss": f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.4f}"} if self.losses else {}
        for k, v in self.metrics.items():
            out[k] = f"{sum(v[-20:]) / len(v[-20:]):.3f}"
        return out

    def update(self, loss: torch.Tensor, **metrics: float) -> float:
        """One optimizer step on ``loss``: zero the gradients, backward, clip, step, advance the LR schedule;
        record the loss (and ``metrics``, e.g. an accuracy) and return it as a float. A NaN or infinite loss is
        an error (the weights are not touched)."""
        if self._pending is None:
            raise RuntimeError(f"{self.desc}: update() runs once per step, inside the loop")
        value = float(loss.detach())
        if not math.isfinite(value):
            extra = f" ({', '.join(f'{k}={float(v):.4g}' for k, v in metrics.items())})" if metrics else ""
            raise TrainingDivergedError(f"{self.desc}: non-finite loss {value} at step {self._pending}{extra}; "
                                        "the weights were not updated: resume from the last checkpoint with a "
                                        "lower learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(_params(self.optimizer), self.clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.losses.append(value)
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append(float(v))
        self._pending = None
        return value
