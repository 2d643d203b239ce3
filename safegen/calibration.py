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
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

__all__ = ["REFERENCE_FILE", "reference_prompts", "budget_thresholds", "fire_rate", "encoder_fingerprint",
           "cache_dir", "shipped_path", "load_cached", "save_cached"]

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
    """Per-column thresholds at which at most ``budget`` of the rows fire in any column, each column at the same
    quantile level (so no category takes the whole budget), the largest level that keeps the rate within it.

    ``scores`` (N, K): benign prompts' scores per category. A threshold sits just above the highest benign score
    it must not fire on, so the budget holds on the reference set exactly (ties fire together). Returns (K,).
    """
    import torch

    if not 0 < budget < 1:
        raise ValueError(f"a false-positive budget is a share in (0, 1), got {budget!r}")
    scores = scores.float()  # thresholds are compared with float32 scores: computed in float32, exactly
    n = scores.shape[0]
    if n == 0:
        raise ValueError("calibration needs at least one reference prompt")
    ordered = scores.sort(0, descending=True).values  # (N, K): column k's scores, highest first
    top = torch.cat([ordered, torch.full((1, scores.shape[1]), -torch.inf, dtype=scores.dtype)])

    def thresholds_at(m: int):  # let the m highest of each column fire: just above the (m+1)-th highest
        return torch.nextafter(top[m], torch.full_like(top[m], torch.inf))

    lo, hi = 0, n  # the largest m per column with fire_rate <= budget (fire_rate grows with m)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fire_rate(scores, thresholds_at(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return thresholds_at(lo).float()


def encoder_fingerprint(encoder, tokenizer=None, **settings: Any) -> str:
    """A hex key of a text encoder's weights (every parameter and buffer, bytes), its tokenizer's vocabulary
    and the reading ``settings`` (layer, summary...): two encoders share a calibration only when all agree."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(type(encoder).__name__.encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
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
