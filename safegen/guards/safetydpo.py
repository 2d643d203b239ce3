"""SafetyDPO as a safegen guard: LoRA safety experts (or their merge) loaded into the denoiser at protect time
(the UNet of SD 1.x/2.x, the transformer of SD3/SD3.5 and FLUX.1).

The LoRA files come from :func:`safegen.training.safetydpo.train_expert` / :func:`~safegen.training.safetydpo.merge_experts`
(``safegen train-expert``, ``safegen merge-experts``). They go through diffusers' own LoRA loaders
(``load_lora_weights``, ``set_adapters``, ``fuse_lora``); fused by default, then the LoRA layers are unloaded, so
a step costs exactly what the plain model's does. ``unprotect`` restores the original weights bit for bit (the
adapted weights are copied aside at protect time and copied back).
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..guard import Guard


def default_merged_path():
    """``assets/safetydpo/default-model-comerge.safetensors``: the Co-Merge of all categories' experts trained for
    the embedded default model (the ``"safetydpo"`` preset)."""
    from .._paths import assets_dir

    return assets_dir() / "safetydpo" / "default-model-comerge.safetensors"


@dataclass
class _Attached:
    """What SafetyDPO changed on one pipeline: the denoiser's weights before the LoRA (for the exact undo)."""

    component: str
    originals: dict
    adapters: list
    metas: list
    fused: bool
    had_merged: bool


def _compiled_inner(module):
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) wraps; ``None`` for a plain module."""
    return module._orig_mod if type(module).__name__ == "OptimizedModule" else None


@dataclass(repr=False)
class SafetyDPO(Guard):
    """Weight-level safety: Diffusion-DPO LoRA experts, one per harm category, or one merged LoRA, in the
    denoiser: the UNet (SD 1.x/2.x, SDXL, the UNet video models) or the transformer (SD3/SD3.5, FLUX.1, FLUX.2
    [klein], Qwen-Image, CogVideoX, Wan 2.1). ``safegen train-expert`` trains experts for SD 1.x/2.x, SD3/SD3.5
    and FLUX.1; a pipeline that switches between two denoisers (Wan 2.2) is refused.

    Args:
        experts (`list[str]`, *optional*): expert LoRA files (loaded as separate adapters and combined with
            ``adapter_weights``, default 1 each — diffusers' linear combination).
        merged (`str`, *optional*): one merged LoRA file (e.g. Co-Merge of all experts). Give ``experts`` or
            ``merged``; with neither, the Co-Merge shipped for the embedded default model
            (:func:`default_merged_path`).
        adapter_weights (`list[float]`, *optional*): per-expert weights.
        fuse (`bool`, defaults to `True`): fuse into the UNet weights and unload the LoRA layers (no per-step
            cost); ``False`` keeps them as live adapters.

    The report of every item says which LoRA is active (a weight guard changes every generation; it never
    blocks).

    Example:
        >>> import safegen, torch, tempfile, pathlib
        >>> from safegen.testing import tiny_sd_pipeline
        >>> from safegen.lora import save_lora, _lora_modules
        >>> pipe = tiny_sd_pipeline()
        >>> tmp = pathlib.Path(tempfile.mkdtemp())
        >>> g = torch.Generator().manual_seed(0)
        >>> f = {n: (torch.randn(2, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, 2, generator=g) * 0.1)
        ...      for n, m in _lora_modules(pipe.unet).items()}
        >>> path = save_lora(tmp / "lora.safetensors", f, {"category": "violence"})
        >>> w0 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
        >>> _ = safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(path))])
        >>> out = pipe("a red bus", num_inference_steps=2, output_type="np")
        >>> out.safety[0].result("safetydpo").verdict
        'steer'
        >>> _ = safegen.unprotect(pipe)
        >>> torch.equal(pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight, w0)
        True
    """

    name: ClassVar[str] = "safetydpo"
    stage: ClassVar[str] = "weights"
    summary: ClassVar[str] = ("Diffusion-DPO LoRA safety experts, merged and fused into the denoiser (no per-step "
                              "cost)")
    weights_needed: ClassVar[str | None] = ("LoRA experts trained for the model (safegen train-expert); the embedded "
                                            "default model's Co-Merge ships")
    pipelines: ClassVar[str] = ("experts trained for SD 1.x/2.x, SD3/SD3.5, FLUX.1; a LoRA fuses on any one-denoiser "
                                "pipeline with diffusers' LoRA loader")

    experts: Sequence[str] | None = None
    merged: str | None = None
    adapter_weights: Sequence[float] | None = None
    fuse: bool = True
    _files: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.experts is not None and self.merged is not None:
            raise ValueError("SafetyDPO takes experts=[files] or merged=file, not both")
        if self.experts is None and self.merged is None:  # the Co-Merge shipped for the embedded default model
            self.merged = os.fspath(default_merged_path())
        files = [self.merged] if self.merged is not None else list(self.experts or [])
        if not files:
            raise ValueError("SafetyDPO(experts=[...]) is empty; give at least one expert file")
        self._files = [os.fspath(f) for f in files]
        if self.adapter_weights is not None:
            if self.merged is not None or len(self.adapter_weights) != len(self._files):
                raise ValueError("adapter_weights needs experts=[...] and one weight per expert")

    def config_dict(self) -> dict[str, Any]:
        return {"experts": self.experts, "merged": self.merged, "adapter_weights": self.adapter_weights,
                "fuse": self.fuse}

    def weight_files(self) -> list:
        return [Path(f) for f in self._files]

    def attach(self, protection) -> None:
        from .._logs import quiet_diffusers
        from ..lora import COMPONENTS, _lora_modules, read_lora

        pipe = protection.pipe
        component = protection.spec.denoiser
        if component not in COMPONENTS or getattr(pipe, component, None) is None:
            raise TypeError(f"SafetyDPO's experts are LoRAs of a UNet or a transformer and {type(pipe).__name__} "
                            f"denoises with its {component}")
        extra = [a for a in protection.spec.extra_denoisers if getattr(pipe, a, None) is not None]
        if extra:
            raise TypeError(f"SafetyDPO adapts one denoiser and {type(pipe).__name__} switches between "
                            f"{component} and {', '.join(extra)}; expert LoRAs for two-expert models are not "
                            "supported")
        if not hasattr(pipe, "load_lora_weights"):
            raise TypeError(f"{type(pipe).__name__} has no LoRA loader; SafetyDPO needs diffusers' LoRA support")
        model = getattr(pipe, component)
        if _compiled_inner(model) is not None:
            raise TypeError(f"SafetyDPO loads LoRA weights into the {component}, and diffusers' LoRA loader cannot "
                            f"reach into a torch.compile(pipe.{component}) wrapper (OptimizedModule): protect before "
                            f"compiling, or compile in place with pipe.{component}.compile()")
        # clear errors before anything changes
        metas = [read_lora(f, model, component=component)[1] for f in self._files]
        modules = _lora_modules(model)
        originals = {n: m.weight.detach().clone() for n, m in modules.items()}
        had_merged = "_merged_adapters" in pipe.__dict__
        names = [f"safegen_dpo_{i}" for i in range(len(self._files))]
        try:
            with quiet_diffusers():  # no text-encoder keys in a denoiser LoRA: expected
                for f, n in zip(self._files, names):
                    pipe.load_lora_weights(f, adapter_name=n)
                pipe.set_adapters(names, adapter_weights=list(self.adapter_weights or [1.0] * len(names)))
                if self.fuse:
                    pipe.fuse_lora(components=[component], adapter_names=names)
                    pipe.unload_lora_weights()
        except Exception:
            self._restore(pipe, component, originals, had_merged)
            raise
        protection.set_state(self, _Attached(component, originals, names, metas, self.fuse, had_merged))

    def _restore(self, pipe, component, originals, had_merged: bool = True) -> None:
        from ..lora import _lora_modules

        try:
            pipe.unload_lora_weights()
        except Exception:  # nothing loaded
            pass
        model = getattr(pipe, component)
        inner = _compiled_inner(model)
        if inner is not None:  # compiled after protect: diffusers' unloader skips the wrapper, unload what it wraps
            if getattr(inner, "peft_config", None):
                inner.unload_lora()
            model = inner
        merged = pipe.__dict__.get("_merged_adapters")
        if isinstance(merged, set):  # diffusers' record of fused adapters: ours are undone by restoring weights
            mine = {n for n in merged if str(n).startswith("safegen_dpo_")}
            pipe._merged_adapters = merged - mine
            if not pipe._merged_adapters and not had_merged:  # as diffusers left it before: the class default
                del pipe.__dict__["_merged_adapters"]
        modules = _lora_modules(model)
        with torch.no_grad():
            for n, w in originals.items():
                modules[n].weight.copy_(w)

    def detach(self, protection) -> None:
        state = protection.drop_state(self)
        if state is not None:
            self._restore(protection.pipe, state.component, state.originals, state.had_merged)

    def prepare(self, call) -> None:
        state = call.protection.state(self)
        cats = sorted({c for m in state.metas for c in (m.get("categories") or [m.get("category")]) if c})
        what = "merged LoRA" if self.merged is not None else f"{len(self._files)} expert LoRA(s)"
        for item in range(call.n_items):
            res = call.result(item, self.name)
            res.verdict = "steer"
            res.reason = f"generated with the SafetyDPO {what} ({', '.join(cats) or 'categories not recorded'})"
            res.details = {"files": list(self._files), "fused": state.fused, "categories": cats}
