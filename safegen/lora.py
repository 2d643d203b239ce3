"""LoRA files of safegen's weight-level safety (SafetyDPO experts and merges): diffusers LoRA safetensors
(``load_lora_weights`` reads them) with safegen metadata (category, rank, training settings) in the header; never a
pickle. A leaf module: the SafetyDPO guard reads these files, the trainer writes them.

The keys carry the denoiser's attribute as their prefix, as diffusers' loaders expect: ``unet.`` for a UNet
(SD 1.x/2.x), ``transformer.`` for a DiT (SD3/SD3.5, FLUX.1).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["TARGET_MODULES", "COMPONENTS", "LoRAFileError", "save_lora", "read_lora"]

#: The attention projections the authors' code adapts (self- and cross-attention of every transformer block).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
_FORMAT = "safegen.lora"
#: The denoiser attributes a LoRA file may adapt (its keys' prefix).
COMPONENTS = ("unet", "transformer")


class LoRAFileError(ValueError):
    """A LoRA file that is missing, unreadable or made for another architecture."""


# ---------------------------------------------------------------------- LoRA files
def _lora_modules(model) -> dict[str, torch.nn.Module]:
    """The linear layers of a denoiser (UNet or transformer) that SafetyDPO adapts, by module name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) or name == t for t in TARGET_MODULES)}


def save_lora(path: "str | os.PathLike", factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
              metadata: Mapping[str, Any] | None = None, component: str = "unet") -> Path:
    """Write ``{module: (A (r, in), B (out, r))}`` as a diffusers LoRA safetensors file (peft key layout, prefix
    ``component.``: ``"unet"`` or ``"transformer"``; no alpha, so the scale is 1 and the update is exactly B·A)
    with safegen metadata."""
    from safetensors.torch import save_file

    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{component}.{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"{component}.{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": _FORMAT, "safegen": json.dumps(dict(metadata or {}),
                                                                                     default=str)})
    return path


def read_lora(path: "str | os.PathLike", model=None, *, component: str | None = None
              ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    """``({module: (A, B)}, metadata)`` of a LoRA file written by :func:`save_lora`; the metadata's ``component``
    says which denoiser its keys name (``"unet"`` or ``"transformer"``). With ``component``, a file made for
    another one is refused; with ``model`` (the denoiser), every module must exist there with matching shapes
    (:class:`LoRAFileError` naming the first mismatch)."""
    from ._bundle import read_safetensors

    path = Path(path)
    tensors, header = read_safetensors(
        path, missing=LoRAFileError(f"{path}: LoRA file not found (train one with `safegen train-expert`)"),
        error=LoRAFileError)
    factors: dict[str, list] = {}
    prefixes = set()
    for key, t in tensors.items():
        for part, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if key.endswith(part):
                name = key[: -len(part)]
                head, _, rest = name.partition(".")
                if head in COMPONENTS and rest:
                    prefixes.add(head)
                    name = rest
                factors.setdefault(name, [None, None])[slot] = t
    if not factors or any(a is None or b is None for a, b in factors.values()):
        raise LoRAFileError(f"{path}: not a LoRA file (needs lora_A/lora_B pairs for the denoiser's modules)")
    if len(prefixes) > 1:
        raise LoRAFileError(f"{path}: the LoRA adapts both {' and '.join(sorted(prefixes))}; SafetyDPO reads a "
                            "LoRA of one denoiser")
    found = prefixes.pop() if prefixes else "unet"
    if component is not None and found != component:
        raise LoRAFileError(f"{path}: the LoRA was made for a pipeline's {found}, and this pipeline's denoiser is "
                            f"its {component}; the LoRA was made for another architecture")
    out = {k: (v[0], v[1]) for k, v in factors.items()}
    if model is not None:
        modules = _lora_modules(model)
        kind = type(model).__name__
        for name, (a, b) in out.items():
            m = modules.get(name)
            if m is None:
                raise LoRAFileError(f"{path}: module {name!r} does not exist in this {kind}; the LoRA was made for "
                                    "another architecture")
            if a.shape[1] != m.in_features or b.shape[0] != m.out_features or a.shape[0] != b.shape[1]:
                raise LoRAFileError(f"{path}: module {name!r} is {m.out_features}×{m.in_features} in this {kind} "
                                    f"but the LoRA has A {tuple(a.shape)}, B {tuple(b.shape)}; the LoRA was made "
                                    "for another architecture")
    meta = json.loads(header.get("safegen") or "{}")
    return out, {**meta, "component": found}
