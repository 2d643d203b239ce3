"""Reading and writing safetensors files with metadata: :func:`read_safetensors` (every weights file safegen
loads goes through it: one open, clear errors) and named tensors plus JSON metadata for recorded datasets
(LVD trajectories, preference pairs). Safetensors only: nothing is ever unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def read_safetensors(path: "str | os.PathLike", *, missing: Exception, error: type, hint: str = ""
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, header metadata)`` of a safetensors file, read in one pass. Raises ``missing`` when there is
    no such file, and ``error`` (naming the file, the reason and ``hint``) when it is not safetensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise missing
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbage files
        raise error(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"
                    + (f"; {hint}" if hint else "")) from None
    return tensors, header


def read_tagged(path: "str | os.PathLike", fmt: str, *, kind: str, missing: Exception, error: type, hint: str
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`read_safetensors` of a weights file whose ``format`` metadata must be ``fmt``; otherwise ``error``
    saying the file is not ``kind`` (e.g. "an LVD classifier"), with ``hint``."""
    tensors, header = read_safetensors(path, missing=missing, error=error, hint=hint)
    if header.get("format") != fmt:
        raise error(f"{path}: not {kind} (format {header.get('format')!r}, expected {fmt!r}); {hint}")
    return tensors, header


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
    tensors, header = read_safetensors(path, missing=FileNotFoundError(f"{path}: file not found"), error=ValueError)
    if header.pop("format", None) != kind:
        raise ValueError(f"{path}: not a {kind} file")
    return tensors, {k: json.loads(v) for k, v in header.items()}
