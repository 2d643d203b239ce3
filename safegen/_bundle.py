"""Named tensors plus JSON metadata in one safetensors file (recorded datasets: LVD trajectories, preference
pairs). Safetensors only: nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def save_bundle(path: "str | os.PathLike", tensors: Mapping[str, Any], kind: str, meta: Mapping[str, Any]) -> Path:
    """Write ``tensors`` with ``meta`` (JSON-encoded per key) and a ``format`` tag ``kind``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": kind, **{k: json.dumps(v) for k, v in meta.items()}})
    return path


def load_bundle(path: "str | os.PathLike", kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, meta)`` of a file written by :func:`save_bundle` with the same ``kind`` (``ValueError``
    naming the file otherwise)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
    if header.pop("format", None) != kind:
        raise ValueError(f"{path}: not a {kind} file")
    return load_file(str(path)), {k: json.loads(v) for k, v in header.items()}
