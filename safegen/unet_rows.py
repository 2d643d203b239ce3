"""Run extra rows through the denoiser inside the pipeline's own UNet call, and take their outputs back out.

SLD needs a safety-concept row next to the CFG rows; SAFREE's re-attention needs a reference row conditioned
on the original prompt. Both are the same mechanism: a forward pre-hook appends rows to every input that has
a batch dimension, a forward hook splits the output, lets the guard combine them, and hands the pipeline an
output of the batch size it asked for. Several extenders stack: each strips exactly the rows it added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Keyword inputs of UNet2DConditionModel.forward (and UNet3D / motion UNets) that carry a batch dimension.
_BATCHED_KWARGS = ("encoder_hidden_states", "timestep_cond", "class_labels", "attention_mask")


@dataclass
class ExtraRows:
    """Rows a guard wants run alongside the pipeline's batch in one UNet call.

    ``tensors`` holds ``sample`` (required), ``encoder_hidden_states``, and optionally entries of
    ``added_cond_kwargs`` (``text_embeds``, ``time_ids``) and ``timestep_cond``. Anything else with a batch
    dimension that the guard does not give is filled by repeating ``source_rows`` of the pipeline's batch.
    """

    tensors: dict[str, torch.Tensor]
    source_rows: torch.Tensor  # (E,) indices into the pipeline's batch used to fill missing inputs
    info: Any = None


@dataclass
class RowExtender:
    """Registers the hooks on ``unet``; ``provide(batch, inputs)`` returns :class:`ExtraRows` or ``None``,
    ``consume(main_out, extra_out, extra, offset)`` returns the replacement for ``main_out`` (or ``None``)."""

    unet: torch.nn.Module
    provide: Callable[[int, dict[str, Any]], ExtraRows | None]
    consume: Callable[[torch.Tensor, torch.Tensor, ExtraRows, int], torch.Tensor | None]
    guard: str = "guard"  # errors in the hooks fail the call closed in this guard's name
    _stack: list = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def install(self) -> "RowExtender":
        from .guards.base import guarded

        self._handles.append(self.unet.register_forward_pre_hook(guarded(self.guard, self._pre), with_kwargs=True))
        # prepend: the last extender to add rows is the first to strip them
        self._handles.append(self.unet.register_forward_hook(guarded(self.guard, self._post), with_kwargs=True,
                                                             prepend=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    # ------------------------------------------------------------------ hooks
    def _pre(self, module, args, kwargs):
        args = list(args)
        sample = args[0] if args else kwargs["sample"]
        n = sample.shape[0]
        inputs = {"sample": sample, **kwargs}
        extra = self.provide(n, inputs)
        self._stack.append((n, extra))
        if extra is None:
            return None
        e = extra.tensors["sample"].shape[0]
        src = extra.source_rows.to(sample.device)

        def grow(name: str, value: Any, given: torch.Tensor | None):
            if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != n:
                return value
            add = given if given is not None else value.index_select(0, src)
            if add.shape[0] != e:
                raise ValueError(f"extra rows for {name!r}: got {add.shape[0]}, expected {e}")
            return torch.cat([value, add.to(device=value.device, dtype=value.dtype)], 0)

        new_sample = torch.cat([sample, extra.tensors["sample"].to(device=sample.device, dtype=sample.dtype)], 0)
        if args:
            args[0] = new_sample
        else:
            kwargs["sample"] = new_sample
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == n:
            timestep = torch.cat([timestep, timestep.index_select(0, src.to(timestep.device))], 0)
            if len(args) > 1:
                args[1] = timestep
            else:
                kwargs["timestep"] = timestep
        for name in _BATCHED_KWARGS:
            if name in kwargs:
                kwargs[name] = grow(name, kwargs[name], extra.tensors.get(name))
        added = kwargs.get("added_cond_kwargs")
        if added:
            kwargs["added_cond_kwargs"] = {k: grow(k, v, extra.tensors.get(k)) for k, v in added.items()}
        return tuple(args), kwargs

    def _post(self, module, args, kwargs, output):
        n, extra = self._stack.pop()
        if extra is None:
            return None
        is_tuple = isinstance(output, tuple)
        out = output[0] if is_tuple else output.sample
        main, rest = out[:n], out[n:]
        e = extra.tensors["sample"].shape[0]
        mine, others = rest[:e], rest[e:]
        new_main = self.consume(main, mine, extra, n)
        if new_main is None:
            new_main = main
        # rows appended by extenders registered after this one have already been stripped by their hooks
        merged = torch.cat([new_main, others], 0) if others.shape[0] else new_main
        if is_tuple:
            return (merged,) + tuple(output[1:])
        output.sample = merged
        return output
