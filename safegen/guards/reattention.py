"""SAFREE's adaptive latent re-attention (LRA), the paper's version: a Fourier filter on UNet up-block skips.

On every denoising step where some prompt still uses SAFREE's filtered conditioning (step i ≤ t'), each such
item gets one *reference row* appended to the pipeline's own UNet call (through :class:`~safegen.unet_rows.
RowExtender`): the same latent as its conditional row, conditioned on the ORIGINAL prompt. Forward pre-hooks on
the first two UNet up blocks then rewrite the skip ("res") features of the filtered rows: in the 2-D Fourier
domain over (H, W), inside the centred low-frequency square around DC, every coefficient where the filtered
row is stronger than its reference (|F_filtered| > |F_reference|) is multiplied by ``s`` (``s1`` on up block
0, ``s2`` on up block 1); everything else is kept. The reference outputs are thrown away.

Choices, on purpose:

* **Stages by up-block index, like diffusers' FreeU** (``up_blocks[0]`` → s1, ``up_blocks[1]`` → s2), not
  SAFREE's rule by backbone channel count (1280 → s1, 640 → s2), which depends on SD-1.x's channel widths and
  would touch different blocks on SDXL or other UNets. UNets with a single up block only get stage 0.
* **The rule is the paper's reading, not the released code's.** The authors' code never runs its filter (the
  ``safree=`` argument is not passed, so a ``NotImplementedError`` is constructed and not raised) and, were it
  run, it would *replace* coefficients by the scalar s and compare real parts. Here coefficients are
  *multiplied* by s and compared by magnitude: "attenuate low-frequency skip components where the filtered
  branch is stronger than the original-prompt branch".
* **No backbone scaling.** The paper's defaults b1 = b2 = 1 make FreeU's backbone multiplication the identity,
  so it is not applied (and it would act on every row, uncond included).
* **The filter stops at t'.** After a prompt's window its conditional row *is* the original prompt, so filtered
  and reference rows are identical and there is nothing to compare (with a strict ">" the rule would do
  nothing; the code's variant would overwrite the low band on every remaining step). Rows of prompts past
  their window are left untouched, and once every prompt is past its window no reference rows are appended at
  all: the extra UNet cost (one row per filtered item) is paid on filtered steps only.
* **Reference rows stop after the down path.** Only their skip features are used, and those come from the
  down blocks; a pre-hook on the mid block and on every up block cuts the reference rows off, so a filtered
  step costs the reference rows' conv_in + down path (about a third of a UNet row), not a whole UNet row.
* **Video UNets** (AnimateDiff's motion UNet, ZeroScope's 3-D UNet) fold the frames into the batch inside
  their blocks: every row is k frame rows there, and the filter runs per frame (the spectrum is over each
  frame's H × W), on all frames of a filtered item. DiT backbones (CogVideoX) have no skip features: SAFREE
  does not apply re-attention there (see :class:`~safegen.guards.safree.Safree`).
* **The low band** is ``[H//2 − tau, H//2 + tau) × [W//2 − tau, W//2 + tau)`` of the fftshift-ed spectrum,
  the window FreeU and SAFREE use (tau = 1 is the 2×2 block around DC).

Everything is batched: one FFT per skip tensor (filtered and reference rows stacked), index tensors for the
row pairs, a per-step window mask applied with ``torch.where``; no host synchronisation inside the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..unet_rows import ExtraRows, RowExtender, _expand_rows, _rows_per_item
from ..hooks import add_hook

__all__ = ["LatentReattention", "fourier_reattention", "low_band_mask"]


def low_band_mask(h: int, w: int, tau: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(H, W) boolean mask of the centred low-frequency square of the fftshift-ed spectrum (FreeU's window)."""
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    if tau > 0:
        cr, cc = h // 2, w // 2
        mask[max(cr - tau, 0):cr + tau, max(cc - tau, 0):cc + tau] = True
    return mask


def fourier_reattention(filtered: torch.Tensor, reference: torch.Tensor, tau: int, s: float,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attenuate the low band of ``filtered`` where it is stronger than ``reference``.

    ``filtered`` and ``reference`` are (R, C, H, W) with row r of one paired with row r of the other. Returns
    ``filtered`` with, in the fftshift-ed 2-D spectrum over (H, W), every coefficient inside the low band (see
    :func:`low_band_mask`; ``mask`` may pass a cached one) whose magnitude exceeds the reference's multiplied by
    ``s``; then inverse shift, inverse FFT, real part, cast back to ``filtered``'s dtype. The FFT runs in
    float32 (float64 stays float64); both tensors go through one batched FFT.
    """
    if filtered.shape != reference.shape:
        raise ValueError(f"filtered {tuple(filtered.shape)} and reference {tuple(reference.shape)} differ")
    r = filtered.shape[0]
    h, w = filtered.shape[-2:]
    work = torch.promote_types(filtered.dtype, torch.float32)
    both = torch.cat([filtered, reference.to(filtered.dtype)], 0).to(work)
    spec = torch.fft.fftshift(torch.fft.fft2(both), dim=(-2, -1))
    f, ref = spec[:r], spec[r:]
    if mask is None:
        mask = low_band_mask(h, w, tau, filtered.device)
    hit = mask & (f.abs() > ref.abs())
    f = torch.where(hit, f * s, f)
    out = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real
    return out.to(filtered.dtype)


@dataclass
class _Window:
    """SAFREE's filtered window for one call (what re-attention needs of it)."""

    t_prime: torch.Tensor
    orig: torch.Tensor
    orig_pooled: torch.Tensor | None
    last_filtered_step: int


class LatentReattention:
    """SAFREE's latent re-attention for one pipeline call (see the module docstring).

    Args:
        unet: the pipeline's ``UNet2DConditionModel``.
        tau: half-width of the low-frequency square (paper: 1).
        s1, s2: skip scales of up blocks 0 and 1 (paper: 0.9, 0.2).

    :meth:`begin` registers the hooks for a call, :meth:`end` removes all of them (safe to call twice). All
    state lives on the object.
    """

    def __init__(self, unet: torch.nn.Module, tau: int = 1, s1: float = 0.9, s2: float = 0.2):
        self.unet = unet
        self.tau = int(tau)
        self.scales = (float(s1), float(s2))
        self._extender: RowExtender | None = None
        self._handles: list = []
        self._masks: dict[tuple, torch.Tensor] = {}
        self._call: Any = None
        self._state: _Window | None = None
        self._items: dict[str, Any] | None = None  # per-call item tables, built at the first UNet call
        self._rows: dict[str, torch.Tensor] | None = None  # row pairs of the UNet call in flight

    # ------------------------------------------------------------------ lifecycle
    def begin(self, call, *, t_prime: torch.Tensor, orig: torch.Tensor, orig_pooled: torch.Tensor | None,
              last_filtered_step: int) -> "LatentReattention":
        """Hook the UNet for ``call``, with SAFREE's filtered window: ``t_prime`` (per prompt, host tensor: steps
        ``≤ t'`` are filtered, −1 never), the original conditioning ``orig`` (and SDXL's ``orig_pooled``) the
        reference rows use, and the last step any prompt is filtered."""
        self.end()
        self._call = call
        self._state = _Window(t_prime, orig, orig_pooled, int(last_filtered_step))
        self._items, self._rows = None, None
        self._extender = RowExtender(self.unet, self._provide, self._consume, guard="safree").install()
        # the reference rows are needed only for their skip features, which the down path makes: drop them
        # before the mid block and from every up block's inputs, so they cost conv_in + down path, not a full UNet
        mid = getattr(self.unet, "mid_block", None)
        if mid is not None:
            self._handles.append(add_hook(mid, "safegen.safree.reattention-drop", pre=self._drop_hook, guard="safree"))
        for stage, block in enumerate(getattr(self.unet, "up_blocks", [])):
            s = self.scales[stage] if stage < len(self.scales) else None
            self._handles.append(add_hook(block, f"safegen.safree.reattention-up{stage}", pre=self._make_skip_hook(s),
                                          guard="safree"))
        return self

    def end(self) -> None:
        """Remove every hook this object registered and drop the call's state. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._extender is not None:
            self._extender.remove()
            self._extender = None
        self._call = self._state = self._items = self._rows = None

    # ------------------------------------------------------------------ per-call tables
    def _build_items(self, device: torch.device) -> dict[str, Any]:
        """Items (pipeline batch order) whose prompt is filtered at all, with their t' and original conditioning.

        Built lazily at the first UNet call: which prompts are in the batch (``kept_prompts``) is only final
        once every guard has prepared. ``t_prime`` is a host tensor in SAFREE, so this costs no device sync.
        """
        call, st = self._call, self._state
        nipp = call.num_images_per_prompt
        keep = call.kept_prompts
        tp = st.t_prime.detach().cpu()
        orig, pooled = st.orig, st.orig_pooled
        if keep is not None:
            k = torch.as_tensor(keep, dtype=torch.long)
            tp = tp[k]
            orig = orig.index_select(0, k.to(orig.device))
            pooled = pooled.index_select(0, k.to(pooled.device)) if pooled is not None else None
        n_prompts = tp.shape[0]
        tp_items = tp.repeat_interleave(nipp)  # (n,)
        item = torch.nonzero(tp_items >= 0).flatten()  # (E,) host tensor
        prompt_of = item // nipp
        return {
            "n": n_prompts * nipp,
            "E": int(item.numel()),
            "item": item.to(device),
            "tp": tp_items[item].to(device),
            "ehs": orig.index_select(0, prompt_of.to(orig.device)).to(device),
            "pooled": pooled.index_select(0, prompt_of.to(pooled.device)).to(device) if pooled is not None else None,
        }

    # ------------------------------------------------------------------ RowExtender callbacks
    def _provide(self, batch: int, inputs: dict[str, Any]) -> ExtraRows | None:
        self._rows = None
        call, st = self._call, self._state
        if call is None or call.step > st.last_filtered_step:
            return None
        sample = inputs["sample"]
        if self._items is None:
            self._items = self._build_items(sample.device)
        it = self._items
        n, e = it["n"], it["E"]
        offset = n if call.do_cfg else 0  # first conditional row: the batch is [uncond (n); cond (n)] or [cond]
        if e == 0 or batch < offset + n:
            return None
        cond_rows = it["item"].to(sample.device) + offset
        tensors = {"sample": sample.index_select(0, cond_rows)}
        ehs = inputs.get("encoder_hidden_states")
        if torch.is_tensor(ehs):
            tensors["encoder_hidden_states"] = it["ehs"].to(device=ehs.device, dtype=ehs.dtype)
        added = inputs.get("added_cond_kwargs") or {}
        te = added.get("text_embeds")
        if it["pooled"] is not None and torch.is_tensor(te):
            tensors["text_embeds"] = it["pooled"].to(device=te.device, dtype=te.dtype)
        self._rows = {
            "filtered": cond_rows,
            "reference": torch.arange(batch, batch + e, device=sample.device),
            "active": it["tp"] >= call.step,  # (E,) on device; prompt still in its window at this step
            "keep": batch,  # rows before ours (the pipeline's, and other guards' rows added earlier)
            "total": batch + e,
        }
        return ExtraRows(tensors=tensors, source_rows=cond_rows, info="safree-lra")

    def _consume(self, main_out, extra_out, extra, offset):
        self._rows = None
        return None  # the reference rows only served the skip filter

    # ------------------------------------------------------------------ up-block hooks
    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, self.tau, str(device))
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = low_band_mask(h, w, self.tau, device)
        return m

    def _filter_skip(self, skip: torch.Tensor, rows: dict[str, torch.Tensor], s: float) -> torch.Tensor:
        # video UNets (motion / 3-D) run their blocks on frames folded into the batch: k frame rows per row
        k = _rows_per_item(skip, rows["total"])
        if not torch.is_tensor(skip) or skip.ndim != 4 or not k:
            return skip
        f_idx = _expand_rows(rows["filtered"].to(skip.device), k)
        r_idx = _expand_rows(rows["reference"].to(skip.device), k)
        x = skip.index_select(0, f_idx)
        y = skip.index_select(0, r_idx)
        z = fourier_reattention(x, y, self.tau, s, self._mask(skip.shape[-2], skip.shape[-1], skip.device))
        active = rows["active"].to(skip.device).repeat_interleave(k)
        z = torch.where(active.view(-1, 1, 1, 1), z, x)
        return skip.index_copy(0, f_idx, z)

    @staticmethod
    def _drop(value: Any, rows: dict) -> Any:
        """Cut our reference rows off a block input (any tensor, or tuple of tensors, with the full batch, or k
        rows per batch row when frames are folded into it)."""
        k = _rows_per_item(value, rows["total"])
        if k:
            return value[: rows["keep"] * k]
        if isinstance(value, tuple):
            return tuple(LatentReattention._drop(v, rows) for v in value)
        return value

    def _drop_hook(self, module, args, kwargs):
        rows = self._rows
        if rows is None:
            return None
        return tuple(self._drop(a, rows) for a in args), {k: self._drop(v, rows) for k, v in kwargs.items()}

    def _make_skip_hook(self, s: float | None):
        """Up block pre-hook: filter the skips (stages with a scale ``s``), then drop the reference rows."""

        def hook(module, args, kwargs):
            rows = self._rows
            if rows is None:
                return None
            args = list(args)
            if s is not None:
                if "res_hidden_states_tuple" in kwargs:
                    kwargs["res_hidden_states_tuple"] = tuple(self._filter_skip(t, rows, s)
                                                              for t in kwargs["res_hidden_states_tuple"])
                elif len(args) > 1:  # called positionally: forward(hidden_states, res_hidden_states_tuple, ...)
                    args[1] = tuple(self._filter_skip(t, rows, s) for t in args[1])
            return tuple(self._drop(a, rows) for a in args), {k: self._drop(v, rows) for k, v in kwargs.items()}

        return hook
