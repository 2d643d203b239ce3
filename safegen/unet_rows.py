"""Change which rows the denoiser runs inside the pipeline's own UNet call.

* :class:`RowExtender` — extra rows. SLD needs a safety-concept row next to the CFG rows; SAFREE's re-attention
  needs a reference row conditioned on the original prompt. Both are the same mechanism: a forward pre-hook
  appends rows to every input that has a batch dimension, a forward hook splits the output, lets the guard
  combine them, and hands the pipeline an output of the batch size it asked for. Several extenders stack: each
  strips exactly the rows it added.
* :class:`ItemStopper` — fewer rows. When a guard stops an item inside the loop (LVD), the UNet runs only the
  rows of the items still going (the stopped rows get zeros, which nobody reads), the VAE decodes only their
  latents, and when every item is stopped the pipeline's loop is interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import weakref

import torch

from .hooks import add_hook, patch

# Keyword inputs of UNet2DConditionModel.forward (and UNet3D / motion UNets) and of the DiT transformers (SD3's and
# FLUX's pooled projections, FLUX's guidance strength) that carry a batch dimension.
_BATCHED_KWARGS = ("encoder_hidden_states", "timestep_cond", "class_labels", "attention_mask", "pooled_projections",
                   "guidance", "encoder_hidden_states_mask")
#: Position ids: laid out per token, not per row, when 2-D (FLUX.1's (L, 3)): never cut; FLUX.2's are per row
#: ((B, L, 4)) and are cut and grown with the batch.
_PER_TOKEN_KWARGS = frozenset({"txt_ids", "img_ids"})


def _per_token(name: str, value: Any) -> bool:
    """Whether ``value`` is position ids laid out per token (never cut or grown with the batch)."""
    return name in _PER_TOKEN_KWARGS and (not torch.is_tensor(value) or value.ndim < 3)


#: Names under which denoisers take their noisy input (UNets: ``sample``; transformers: ``hidden_states``).
_SAMPLE_KWARGS = ("sample", "hidden_states")


def _sample_key(args: list, kwargs: dict) -> "int | str":
    """Where the denoiser's noisy input is in a call: position 0, or the keyword it was given as."""
    if args:
        return 0
    for k in _SAMPLE_KWARGS:
        if k in kwargs:
            return k
    raise TypeError(f"cannot find the denoiser's input among its arguments ({sorted(kwargs)})")


def _rows_per_item(value: Any, n: int) -> int:
    """How many consecutive rows of ``value`` belong to each of ``n`` batch rows: 1 for a tensor with the batch
    dimension, k for one laid out as ``x.repeat_interleave(k, 0)`` (AnimateDiff hands its motion UNet the text
    conditioning repeated once per frame); 0 when ``value`` has no such batch dimension."""
    if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] < n or value.shape[0] % n:
        return 0
    return value.shape[0] // n


def _expand_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Row indices of a batch with k rows per item: item r → rows r·k .. r·k + k − 1."""
    if k == 1:
        return rows
    return (rows.unsqueeze(1) * k + torch.arange(k, device=rows.device)).flatten()


def _sample_of(output: Any) -> torch.Tensor:
    """The denoiser's prediction in its output (a tuple, or an output object with ``.sample``)."""
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` with its prediction replaced by ``sample`` (same container)."""
    if isinstance(output, tuple):
        return (sample,) + tuple(output[1:])
    output.sample = sample
    return output


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


#: How many RowExtenders are installed on each UNet (an ItemStopper leaves rows alone while any is: the
#: extenders' per-row state follows the pipeline's full batch).
_EXTENDERS: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


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
        _EXTENDERS[self.unet] = _EXTENDERS.get(self.unet, 0) + 1
        # one wrapper hook: the last extender to add rows is the first to strip them
        self._handles.append(add_hook(self.unet, f"safegen.{self.guard}.rows", pre=self._pre, post=self._post,
                                      guard=self.guard))
        return self

    def remove(self) -> None:
        if self._handles:
            _EXTENDERS[self.unet] = max(0, _EXTENDERS.get(self.unet, 1) - 1)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    # ------------------------------------------------------------------ hooks
    def _pre(self, module, args, kwargs):
        args = list(args)
        key = _sample_key(args, kwargs)
        sample = args[0] if key == 0 else kwargs[key]
        n = sample.shape[0]
        inputs = {**{k: v for k, v in kwargs.items() if k not in _SAMPLE_KWARGS}, "sample": sample}
        extra = self.provide(n, inputs)
        self._stack.append((n, extra))
        if extra is None:
            return None
        e = extra.tensors["sample"].shape[0]
        src = extra.source_rows.to(sample.device)
        given_rows = dict(extra.tensors)
        if given_rows.get("encoder_hidden_states_mask") is not None:
            _align_text_lengths(kwargs, given_rows)

        def grow(name: str, value: Any, given: torch.Tensor | None):
            k = _rows_per_item(value, n)
            if not k:
                return value
            if given is not None:
                if given.shape[0] != e:
                    raise ValueError(f"extra rows for {name!r}: got {given.shape[0]}, expected {e}")
                add = given.repeat_interleave(k, 0) if k > 1 else given
            else:
                add = value.index_select(0, _expand_rows(src.to(value.device), k))
            return torch.cat([value, add.to(device=value.device, dtype=value.dtype)], 0)

        new_sample = torch.cat([sample, extra.tensors["sample"].to(device=sample.device, dtype=sample.dtype)], 0)
        if key == 0:
            args[0] = new_sample
        else:
            kwargs[key] = new_sample
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if torch.is_tensor(timestep) and timestep.ndim > 0 and timestep.shape[0] == n:
            timestep = torch.cat([timestep, timestep.index_select(0, src.to(timestep.device))], 0)
            if len(args) > 1:
                args[1] = timestep
            else:
                kwargs["timestep"] = timestep
        for name in _BATCHED_KWARGS + tuple(_PER_TOKEN_KWARGS):
            if name in kwargs and not _per_token(name, kwargs[name]):
                kwargs[name] = grow(name, kwargs[name], given_rows.get(name))
        added = kwargs.get("added_cond_kwargs")
        if added:
            kwargs["added_cond_kwargs"] = {k: grow(k, v, given_rows.get(k)) for k, v in added.items()}
        return tuple(args), kwargs

    def _post(self, module, output):
        n, extra = self._stack.pop()
        if extra is None:
            return None
        out = _sample_of(output)
        main, rest = out[:n], out[n:]
        e = extra.tensors["sample"].shape[0]
        mine, others = rest[:e], rest[e:]
        new_main = self.consume(main, mine, extra, n)
        if new_main is None:
            new_main = main
        # rows appended by extenders registered after this one have already been stripped by their hooks
        merged = torch.cat([new_main, others], 0) if others.shape[0] else new_main
        return _with_sample(output, merged)


def _align_text_lengths(kwargs: dict, given: dict) -> None:
    """Extra rows whose text conditioning has its own length and mask (an LLM encoder's, Qwen-Image): the batch's
    ``encoder_hidden_states`` and the extra rows' are zero-padded to the longer of the two, and the batch gets the
    mask it implied (all ones where the pipeline dropped a mask of ones), padded with zeros: the padding is never
    attended to."""
    from .encoders import pad_tokens

    ehs, extra = kwargs["encoder_hidden_states"], given["encoder_hidden_states"]
    length = max(ehs.shape[1], extra.shape[1])
    mask = kwargs.get("encoder_hidden_states_mask")
    if mask is None:
        mask = torch.ones(ehs.shape[:2], dtype=given["encoder_hidden_states_mask"].dtype, device=ehs.device)
    kwargs["encoder_hidden_states"] = pad_tokens(ehs, length)
    kwargs["encoder_hidden_states_mask"] = pad_tokens(mask, length)
    given["encoder_hidden_states"] = pad_tokens(extra, length)
    given["encoder_hidden_states_mask"] = pad_tokens(given["encoder_hidden_states_mask"], length)


def _select_rows(value: Any, n: int, rows: torch.Tensor) -> Any:
    k = _rows_per_item(value, n)
    if not k:
        return value
    return value.index_select(0, _expand_rows(rows.to(value.device), k))


class ItemStopper:
    """Skip the work of stopped items for the rest of one call (installed by ``Call.stop_item`` on first use).

    ``active`` is a host bool list over the items of the running batch. The UNet's batch holds each item once
    per CFG branch (``[uncond items, cond items]``), so an item's rows are ``j, j + n, ...`` (inputs that repeat
    every row k times, such as the per-frame text conditioning of a motion UNet, are cut the same way, k rows per
    item); a UNet input whose batch is not a multiple of ``n``, or a UNet that also carries a
    :class:`RowExtender`, runs unchanged (the stopped rows are computed and discarded: correct, only not cheaper).
    The decode of the running batch decodes the active rows only: ``vae.decode`` for images; for video pipelines
    (``decoded_shape`` given) the pipeline's ``decode_latents``, whose input is one row per item whatever the
    latent layout, and which returns zeros of ``decoded_shape(latents)`` without decoding when no item is left.
    """

    def __init__(self, pipe: Any, n_items: int, guard: str = "guard",
                 decoded_shape: Callable[[torch.Tensor], tuple] | None = None):
        self.pipe, self.n, self.guard = pipe, int(n_items), guard
        self.active = [True] * self.n
        self._idx = torch.arange(self.n)  # running items still going (updated by stop, read by every UNet call)
        self.unet_rows_skipped = 0  # UNet row-evaluations saved, for tests and reports
        self._stack: list = []
        self._handles: list = []
        self._vae = None
        self._decoded_shape = decoded_shape

    def install(self) -> "ItemStopper":
        # every denoiser the loop may call (Wan 2.2: both experts); registered after the row extenders (during the
        # loop): the outermost hook, so they see only running rows
        self._unets = [m for m in (getattr(self.pipe, n, None) for n in ("unet", "transformer", "transformer_2"))
                       if m is not None]
        for unet in self._unets:
            self._handles.append(add_hook(unet, f"safegen.{self.guard}.stop-items", pre=self._pre,
                                          post=self._post, guard=self.guard))
        vae = getattr(self.pipe, "vae", None)
        self._vae = vae
        if self._decoded_shape is not None and hasattr(self.pipe, "decode_latents"):
            target, name, wrapper = self.pipe, "decode_latents", self._decode_video
        elif vae is not None:
            target, name, wrapper = vae, "decode", self._decode
        else:
            return self

        def make(original):
            def decode(z, *args, **kwargs):
                return wrapper(original, z, *args, **kwargs)
            return decode

        self._handles.append(patch(target, name, make, f"safegen.{self.guard}.skip-decode"))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        self._vae = None

    def stop(self, j: int) -> bool:
        """Mark running item ``j`` stopped; returns True when no item is left (the caller interrupts the loop)."""
        self.active[j] = False
        self._idx = torch.tensor([i for i, a in enumerate(self.active) if a], dtype=torch.long)
        return not any(self.active)

    def _rows(self, n_rows: int) -> torch.Tensor | None:
        if len(self._idx) == self.n or n_rows % self.n or any(_EXTENDERS.get(u, 0) for u in self._unets):
            return None
        return torch.cat([self._idx + r * self.n for r in range(n_rows // self.n)])

    def _pre(self, module, args, kwargs):
        args = list(args)
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        n = sample.shape[0]
        rows = self._rows(n)
        self._stack.append((n, rows))
        if rows is None:
            return None
        self.unet_rows_skipped += n - rows.numel()
        if args:
            args = [_select_rows(a, n, rows) for a in args]
        kwargs = {k: (v if _per_token(k, v)
                      else {kk: _select_rows(vv, n, rows) for kk, vv in v.items()} if isinstance(v, dict)
                      else _select_rows(v, n, rows)) for k, v in kwargs.items()}
        return tuple(args), kwargs

    def _post(self, module, output):
        n, rows = self._stack.pop()
        if rows is None:
            return None
        out = _sample_of(output)
        full = out.new_zeros((n,) + tuple(out.shape[1:]))
        full.index_copy_(0, rows.to(out.device), out)
        return _with_sample(output, full)

    def _decode(self, original, z, *args, **kwargs):
        if z.shape[0] != self.n or len(self._idx) == self.n:
            return original(z, *args, **kwargs)
        idx = self._idx.to(z.device)
        if idx.numel():
            res = original(z.index_select(0, idx), *args, **kwargs)
            image = res[0] if isinstance(res, tuple) else res.sample
            full = image.new_zeros((self.n,) + tuple(image.shape[1:]))
            full.index_copy_(0, idx, image)
        elif self._decoded_shape is not None:  # a video decoded by the VAE itself (Wan): zeros of its clip shape
            full, res = z.new_zeros(self._decoded_shape(z)), None
        else:  # nothing left to decode: a zero image of the decoder's output shape, no decoder call
            # (every image pipeline records its VAE's spatial factor; Qwen-Image's video VAE decodes one-frame
            # clips, (B, C, 1, h, w) latents, and names its channels input_channels)
            f = int(self.pipe.vae_scale_factor)
            cfg = self._vae.config
            out_ch = cfg.get("out_channels") or cfg.get("input_channels") or 3
            full = z.new_zeros((self.n, out_ch) + tuple(z.shape[2:-2]) + tuple(s * f for s in z.shape[-2:]))
            res = None
        if kwargs.get("return_dict", True) is False or isinstance(res, tuple):
            return (full,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=full)

    def _decode_video(self, original, latents, *args, **kwargs):
        """``pipe.decode_latents`` of a video pipeline: (n, ...) latents, one row per item → (n, C, F, H, W)."""
        if latents.shape[0] != self.n or len(self._idx) == self.n:
            return original(latents, *args, **kwargs)
        idx = self._idx.to(latents.device)
        if not idx.numel():  # nothing left to decode: zeros of the decoder's output shape, no decoder call
            return torch.zeros(self._decoded_shape(latents), device=latents.device)
        video = original(latents.index_select(0, idx), *args, **kwargs)
        full = video.new_zeros((self.n,) + tuple(video.shape[1:]))
        full.index_copy_(0, idx, video)
        return full
