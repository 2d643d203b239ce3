"""Calibration helpers shared by the guards: the benign reference prompts, thresholds at a false-positive budget,
an encoder's fingerprint, and the on-disk cache that keeps calibrations computed once per encoder.

A threshold means something only for the encoder it was measured on: a cosine of 0.55 is rare on CLIP and
common on a sentence encoder. Guards that compare a score with a threshold calibrate it on
:func:`reference_prompts` (1,000 benign COCO captions that ship with the package, outside every evaluation
list) at a stated budget: "at most 1% of benign prompts fire". The result is cached on disk under a key of the
encoder's weights, so it costs its seconds once per encoder and machine.

Example:
    >>> import torch
    >>> from safegen.calibration import budget_thresholds, fire_rate, reference_prompts
    >>> len(reference_prompts()) >= 1000
    True
    >>> scores = torch.rand(1000, 3, generator=torch.Generator().manual_seed(0))
    >>> th = budget_thresholds(scores, 0.05)
    >>> fire_rate(scores, th) <= 0.05
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

__all__ = ["REFERENCE_FILE", "reference_prompts", "budget_thresholds", "fire_rate", "encoder_fingerprint",
           "cache_dir", "shipped_path", "load_cached", "save_cached", "RiskScale", "guard_thresholds", "digest"]

#: The benign reference set, relative to the assets folder.
REFERENCE_FILE = "reference/benign_prompts.txt"


@lru_cache(maxsize=None)
def _reference() -> tuple[str, ...]:
    from ._paths import assets_dir

    path = assets_dir() / REFERENCE_FILE
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(s for s in (ln.strip() for ln in lines) if s and not s.startswith("#"))


def reference_prompts() -> list[str]:
    """The benign reference prompts (COCO captions; attribution in the file's header)."""
    return list(_reference())


def reference_digest() -> str:
    """sha256 of the reference prompts (part of every calibration's cache key)."""
    return hashlib.sha256("\n".join(_reference()).encode()).hexdigest()


def fire_rate(scores, thresholds) -> float:
    """Share of rows (prompts) with any column (category) at or above its threshold."""
    import torch

    th = torch.as_tensor(thresholds, dtype=scores.dtype).view(1, -1)
    return int((scores >= th).any(1).sum()) / len(scores) if len(scores) else 0.0  # exact: count / n


def budget_thresholds(scores, budget: float):
    """Per-column thresholds at which a new benign prompt fires in some column at an expected rate of at most
    ``budget``, each column at the same quantile level (so no category takes the whole budget), the largest level
    that keeps the rate within it (see :class:`RiskScale`: the expected rate at level m is the reference rate at
    level m + 1, so fewer than ``budget`` of the rows themselves fire).

    ``scores`` (N, K): benign prompts' scores per category. A threshold sits just above the highest benign score
    it must not fire on (ties fire together). Returns (K,): :meth:`RiskScale.thresholds` of a scale fitted on
    ``scores``.
    """
    if not 0 < budget < 1:
        raise ValueError(f"a false-positive budget is a share in (0, 1), got {budget!r}")
    return RiskScale(scores, [str(k) for k in range(scores.shape[1])]).thresholds(budget)


class RiskScale:
    """The shared score scale: a guard's raw per-category scores as calibrated risk in [0, 1].

    Fitted on the scores of the benign reference prompts (N, K). A raw score ``s`` of category ``k`` sits at
    *level* ``m`` = how many reference scores of column ``k`` reach it; at level ``m`` every column lets its ``m``
    highest reference scores fire, and ``g(m)`` is the share of reference prompts that then fire in some column.
    The **benign rate** of ``s`` is the rate a *new* benign prompt is expected to be flagged at that level,
    ``g(m + 1)``: a new prompt exchangeable with the reference ones passes a column's m-th highest score with
    probability (m + 1) / (N + 1), not m / N, which matters where a budget leaves each category a handful of
    reference prompts (at 1% over seven categories, one or two each: the in-sample share underestimates the
    benign rate on new prompts by about half; measured in BENCHMARKS.md). The **risk** is ``1 - benign rate``.
    A guard at a benign false-positive budget ``b`` flags exactly when ``risk >= 1 - b``, the same as comparing
    the raw score with :meth:`thresholds` ``(b)``, whatever the raw scale (cosines, logits, probabilities), so
    one budget means the same for every guard: the expected share of new benign prompts flagged. A score above
    every reference score (level 0) has risk 1.0, so a budget below what the reference can resolve still flags
    those; a non-finite score has risk NaN (guards treat it as an error).

    Example:
        >>> import torch
        >>> from safegen.calibration import RiskScale
        >>> scale = RiskScale(torch.arange(100.0).view(100, 1), ["violence"])  # benign scores 0..99
        >>> [round(r, 4) for r in scale.risk(torch.tensor([[99.0], [95.0], [200.0]])).flatten().tolist()]
        [0.98, 0.94, 1.0]
        >>> t = float(scale.thresholds(0.05)[0])  # flag when risk >= 0.95: the 4 highest reference scores fire
        >>> 95.0 < t <= 96.0
        True
    """

    def __init__(self, reference, categories):
        import torch

        self.reference = torch.as_tensor(reference).detach().float().cpu()  # (N, K) benign reference scores
        self.categories = [str(c) for c in categories]
        n = self.reference.shape[0] if self.reference.dim() == 2 else 0
        if self.reference.dim() != 2 or self.reference.shape[1] != len(self.categories) or n == 0:
            raise ValueError(f"a risk scale needs reference scores of shape (n >= 1, {len(self.categories)}), "
                             f"got {tuple(self.reference.shape)}")
        if not bool(torch.isfinite(self.reference).all()):
            raise ValueError("the reference scores are not all finite numbers: the calibration cannot be trusted")
        self._asc = self.reference.t().sort(1).values.contiguous()  # (K, N): each column ascending
        level = self._levels(self.reference).amin(1)  # (N,): the lowest level at which each reference row fires
        in_sample = torch.bincount(level, minlength=n + 1).cumsum(0).double() / n  # (N + 1,): g(m), m = 0..N
        # the expected rate of a new prompt at level m >= 1: g(m + 1) (level N lets every reference prompt fire: 1);
        # level 0, above every reference score, stays 0: no benign reference prompt scores that high
        self._rate = torch.cat([torch.zeros(1, dtype=torch.float64), in_sample[2:], torch.ones(1, dtype=torch.float64)])

    def __len__(self) -> int:
        return self.reference.shape[0]

    def _levels(self, scores):
        """(B, K) levels: how many reference scores of each column are >= the score (0 above them all)."""
        import torch

        asc = self._asc if self._asc.device == scores.device else self._asc.to(scores.device)
        below = torch.searchsorted(asc, scores.t().contiguous(), side="left")  # (K, B)
        return (asc.shape[1] - below).t()

    def benign_rate(self, scores):
        """(B, K) the expected share of new benign prompts flagged at the level of each score (the reference rate one
        level further; NaN for a non-finite score)."""
        import torch

        scores = torch.as_tensor(scores).float()
        if scores.dim() != 2 or scores.shape[1] != len(self.categories):
            raise ValueError(f"scores must be (B, {len(self.categories)}), got {tuple(scores.shape)}")
        rate = self._rate.to(scores.device)[self._levels(scores.nan_to_num(0.0, 0.0, 0.0))]
        return torch.where(torch.isfinite(scores), rate, torch.full_like(rate, float("nan")))

    def risk(self, scores):
        """(B, K) calibrated risk in [0, 1]: ``1 - benign_rate`` (NaN for a non-finite score)."""
        return 1.0 - self.benign_rate(scores)

    def thresholds(self, budget: float):
        """(K,) raw thresholds at which a new benign prompt is expected to fire with rate at most ``budget``
        (``risk >= 1 - budget``; fewer than ``budget`` of the reference prompts themselves fire); equal to
        :func:`budget_thresholds` on the reference scores. A budget below what the reference can resolve still lets
        each column's scores above every reference score fire (level 0, rate 0)."""
        import torch

        if not 0 < budget < 1:
            raise ValueError(f"a false-positive budget is a share in (0, 1), got {budget!r}")
        m = int((self._rate <= budget).nonzero().max())  # the largest level within the budget (rate(0) = 0)
        top = torch.cat([self._asc.flip(1), torch.full((self._asc.shape[0], 1), -torch.inf)], 1)  # highest first
        return torch.nextafter(top[:, m], torch.full_like(top[:, m], torch.inf))

    def subset(self, categories) -> "RiskScale":
        """The scale of some of its categories (refitted: a policy without a category spends no budget on it)."""
        idx = [self.categories.index(c) for c in categories]
        return RiskScale(self.reference[:, idx], [self.categories[i] for i in idx])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the categories and the reference scores (exactly: float32 values)."""
        import numpy as np

        # the shortest decimal that reads back as the same float32: exact, and half the size of a double's
        return {"categories": self.categories,
                "reference": [[float(str(v)) for v in row] for row in self.reference.numpy().astype(np.float32)]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RiskScale":
        return cls(data["reference"], data["categories"])


def guard_thresholds(policy, guard: str, categories, *, scale: "RiskScale | None" = None,
                     fixed: float | None = None, default: float | None = None,
                     budget: float | None = None) -> tuple[list[float], list]:
    """Each category's raw threshold for ``guard`` and the budget it stands for (``None`` when it is fixed).

    In order: the policy's fixed threshold for the category; the guard's own fixed ``fixed`` setting (an
    argument like ``LatentGuard(threshold=...)``); the calibrated one, ``scale.thresholds(policy.budget())``;
    the guard's uncalibrated ``default``. ``scale`` must cover ``categories`` in that order; ``budget`` replaces
    ``policy.budget()`` (a guard given its own budget).

    Example:
        >>> import safegen, torch
        >>> from safegen.calibration import RiskScale, guard_thresholds
        >>> policy = safegen.load_policy("default")
        >>> cats = list(policy.categories)
        >>> scale = RiskScale(torch.rand(1000, len(cats), generator=torch.Generator().manual_seed(0)), cats)
        >>> policy.categories["hate"].set_threshold("lvd", 0.9)
        >>> th, budgets = guard_thresholds(policy, "lvd", cats, scale=scale)
        >>> budgets[cats.index("hate")], th[cats.index("hate")], budgets[0]
        (None, 0.9, 0.01)
    """
    categories = list(categories)
    if scale is not None and scale.categories != categories:
        raise ValueError(f"the calibration covers {scale.categories}, the guard decides on {categories}")
    budget = policy.budget() if budget is None else float(budget)
    calibrated = scale.thresholds(budget).tolist() if scale is not None else None
    thresholds, budgets = [], []
    for k, cat in enumerate(categories):
        own = policy.fixed_threshold(cat, guard)
        if own is not None:
            thresholds.append(own)
            budgets.append(None)
        elif fixed is not None:
            thresholds.append(float(fixed))
            budgets.append(None)
        elif calibrated is not None:
            thresholds.append(float(calibrated[k]))
            budgets.append(budget)
        else:
            thresholds.append(policy.threshold(cat, guard, default))  # the policy's error when there is none
            budgets.append(None)
    return thresholds, budgets


def digest(*parts: Any) -> str:
    """A short hex key of JSON-able ``parts`` (cache keys)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _hash_tensors(h, tensors: Mapping[str, Any]) -> None:
    """Feed named tensors (names, shapes, dtypes and bytes, in name order) into the hash ``h``."""
    import torch

    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """A hex key of named tensors' bytes (a small module's state dict)."""
    h = hashlib.blake2b(digest_size=16)
    _hash_tensors(h, tensors)
    return h.hexdigest()


#: per module: (what its tensors are now, the hash state after its type name and their bytes)
_WEIGHT_HASHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_hash(module):
    """A blake2b state fed with the module's class name and its state dict (:func:`_hash_tensors`), computed once
    per module while its tensors stay as they are: the same storage, shapes and dtypes, at the same version (every
    in-place change, such as loading weights or fusing a LoRA, bumps a tensor's version). A 5B-parameter text
    encoder is 20 GB of bytes to hash; a second ``protect`` of the same pipeline reads none of them. Returns a
    copy to go on from."""
    state = module.state_dict(keep_vars=True)
    now = tuple((k, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device)) for k, t in state.items())
    hit = _WEIGHT_HASHES.get(module)
    if hit is None or hit[0] != now:
        h = hashlib.blake2b(digest_size=16)
        h.update(type(module).__name__.encode())
        _hash_tensors(h, state)
        hit = _WEIGHT_HASHES[module] = (now, h)
    return hit[1].copy()


def encoder_fingerprint(encoder, tokenizer=None, **settings: Any) -> str:
    """A hex key of a text encoder's weights (every parameter and buffer, bytes; hashed once while they do not
    change), its tokenizer's vocabulary and the reading ``settings`` (layer, summary...): two encoders share a
    calibration only when all agree."""
    h = _weights_hash(encoder)
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=True).encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where calibrations are kept: ``$SAFEGEN_CACHE``, else ``$XDG_CACHE_HOME/safegen``, else
    ``~/.cache/safegen``."""
    env = os.environ.get("SAFEGEN_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "safegen"


def _path(kind: str, key: str) -> Path:
    return cache_dir() / "calibration" / f"{kind}-{key}.json"


def shipped_path(kind: str, key: str) -> Path:
    """Where a calibration that ships with the package lives (``assets/calibration/``): the embedded default
    model's, so a fresh installation does not spend its first protect() computing it."""
    from ._paths import assets_dir

    return assets_dir() / "calibration" / f"{kind}-{key}.json"


def load_cached(kind: str, key: str) -> dict | None:
    """A cached calibration (the user's cache, then the package's), or ``None`` (missing, unreadable or of
    another key: recomputed, never trusted)."""
    for path in (_path(kind, key), shipped_path(kind, key)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("key") == key:
            return data
    return None


def save_cached(kind: str, key: str, data: Mapping[str, Any]) -> None:
    """Write a calibration (atomically); a read-only cache is not an error (it is recomputed next time)."""
    path = _path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**data, "key": key}, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
