"""SAFREE's latent re-attention (paper version): the Fourier rule, the hooks, and the guard end to end."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import safegen
from safegen.guard import Guard
from safegen.guards.reattention import LatentReattention, fourier_reattention, low_band_mask

TRIGGERED = "a photo of blood and gore"
BENIGN = "a photo of a red bus"


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


# ---------------------------------------------------------------------- 1. the rule, against float64 numpy
def ref_reattention(filtered, reference, tau, s):
    """Straight from the rule: fftshift-ed 2-D FFT over (H, W); inside [H//2 - tau, H//2 + tau) x
    [W//2 - tau, W//2 + tau), multiply the filtered coefficient by s where its magnitude exceeds the
    reference's; inverse shift, inverse FFT, real part."""
    filtered = np.asarray(filtered, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    out = np.empty_like(filtered)
    R, C, H, W = filtered.shape
    for r in range(R):
        for c in range(C):
            F = np.fft.fftshift(np.fft.fft2(filtered[r, c]))
            G = np.fft.fftshift(np.fft.fft2(reference[r, c]))
            for u in range(H):
                for v in range(W):
                    in_band = H // 2 - tau <= u < H // 2 + tau and W // 2 - tau <= v < W // 2 + tau
                    if in_band and abs(F[u, v]) > abs(G[u, v]):
                        F[u, v] = F[u, v] * s
            out[r, c] = np.fft.ifft2(np.fft.ifftshift(F)).real
    return out


@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (2, 3, 7, 9), (1, 2, 5, 6), (2, 1, 6, 5)])
@pytest.mark.parametrize("tau,s", [(1, 0.2), (2, 0.9), (3, 0.0)])
def test_fourier_reattention_matches_reference(shape, tau, s):
    g = torch.Generator().manual_seed(hash((shape, tau)) % 1000)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = x + 0.7 * torch.randn(shape, generator=g, dtype=torch.float64)  # correlated, like the real branches
    want = ref_reattention(x.numpy(), y.numpy(), tau, s)
    got64 = fourier_reattention(x, y, tau, s)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), want, rtol=0, atol=1e-10)
    got32 = fourier_reattention(x.float(), y.float(), tau, s)
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=0, atol=2e-5)
    assert not np.allclose(want, x.numpy(), atol=1e-6)  # the rule did something on these inputs
    half = fourier_reattention(x.half(), y.half(), tau, s)
    assert half.dtype == torch.float16


def test_fourier_reattention_identity_cases():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    y = torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(fourier_reattention(x, x.clone(), 1, 0.2), x, atol=1e-5, rtol=0)  # equal rows
    torch.testing.assert_close(fourier_reattention(x, y, 1, 1.0), x, atol=1e-5, rtol=0)  # s = 1
    torch.testing.assert_close(fourier_reattention(x, y, 0, 0.2), x, atol=1e-5, rtol=0)  # empty band
    m = low_band_mask(8, 8, 1)
    assert m.sum() == 4 and m[3:5, 3:5].all()  # tau = 1: the 2x2 block around DC (FreeU's window)
    assert low_band_mask(5, 5, 10).all()


# ---------------------------------------------------------------------- 2. the hooks on a bare UNet
class _Capture:
    """Pre-hooks on up blocks recording the skip tensors they are given. ``inner=False``: torch pre-hooks, which run
    before any hook of diffusers' registry (safegen's) and so see the skips as the down path made them;
    ``inner=True``: hooks in diffusers' registry registered *before* safegen's, so they run inside them and see
    what safegen's hooks made of the skips."""

    def __init__(self, blocks, inner: bool = False):
        self.seen = {i: [] for i in range(len(blocks))}
        if inner:
            from safegen.hooks import add_hook

            self.handles = [add_hook(b, "safegen.test.capture", pre=self._make(i)) for i, b in enumerate(blocks)]
        else:
            self.handles = [b.register_forward_pre_hook(self._make(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def _make(self, i):
        def hook(module, args, kwargs):
            self.seen[i].append(tuple(t.clone() for t in kwargs["res_hidden_states_tuple"]))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _unet_inputs(unet, n_prompts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n_prompts, 4, 16, 16, generator=g)
    sample = torch.cat([lat, lat])
    d = unet.config.cross_attention_dim
    ehs = torch.randn(2 * n_prompts, 77, d, generator=g)
    orig = torch.randn(n_prompts, 77, d, generator=g)
    return sample, ehs, orig


@pytest.mark.parametrize("step", [2, 4])
def test_hooks_change_only_in_window_filtered_rows(sd, step):
    unet = sd.unet
    blocks = list(unet.up_blocks[:2])
    sample, ehs, orig = _unet_inputs(unet)
    # prompt 0 filtered on steps <= 1, prompt 1 on steps <= 3; at step 2 only prompt 1 is in its window
    state = {"t_prime": torch.tensor([1, 3]), "orig": orig, "orig_pooled": None, "last_filtered_step": 3}
    call = SimpleNamespace(step=step, num_images_per_prompt=1, do_cfg=True, kept_prompts=[0, 1])
    from safegen.hooks import add_hook

    before = _Capture(blocks)  # torch pre-hooks: see the skips as the down path made them
    after = _Capture(blocks, inner=True)  # inside the re-attention hooks: sees what they made of the skips
    mid_rows = []  # rows the mid block computes (inside the hook that drops the reference rows)
    h3 = add_hook(unet.mid_block, "safegen.test.mid-rows", pre=lambda m, a, k: mid_rows.append(a[0].shape[0]))
    lra = LatentReattention(unet, tau=1, s1=0.9, s2=0.2).begin(call, **state)
    batches, ehs_seen = [], []
    h1 = unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    h2 = unet.down_blocks[0].register_forward_pre_hook(  # a cross-attention down block: the reference rows run here
        lambda m, a, k: ehs_seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = unet(sample, torch.tensor(500), encoder_hidden_states=ehs, return_dict=False)[0]
    finally:
        lra.end()
        before.remove()
        after.remove()
        h1.remove()
        h2.remove()
        h3.remove()
    assert out.shape[0] == 4  # the pipeline gets back the batch it asked for
    assert mid_rows == [4]  # reference rows stop after the down path (their skips are all that is used)
    if step > state["last_filtered_step"]:
        assert batches == [4]
        for i in range(2):
            for a, b in zip(before.seen[i][0], after.seen[i][0]):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
        return
    assert batches == [6]  # one reference row per filtered item: rows 4, 5 pair with cond rows 2, 3
    torch.testing.assert_close(ehs_seen[0][4:], orig, atol=0, rtol=0)  # reference rows: original conditioning
    changed_somewhere = False
    for i, s in enumerate((0.9, 0.2)):
        for a, b in zip(before.seen[i][0], after.seen[i][0]):
            assert a.shape[0] == 6 and b.shape[0] == 4  # filtered with the reference rows, then cut off
            keep = [0, 1, 2]  # uncond rows, prompt 0 (past its window)
            torch.testing.assert_close(b[keep], a[keep], atol=0, rtol=0)
            want = fourier_reattention(a[3:4], a[5:6], 1, s)
            torch.testing.assert_close(b[3:4], want, atol=1e-6, rtol=0)
            changed_somewhere |= not torch.allclose(b[3], a[3], atol=1e-6)
    assert changed_somewhere


def test_end_twice_and_no_rows_without_filtered_items(sd):
    unet = sd.unet
    sample, ehs, orig = _unet_inputs(unet)
    state = {"t_prime": torch.tensor([-1, -1]), "orig": orig, "orig_pooled": None, "last_filtered_step": 0}
    call = SimpleNamespace(step=0, num_images_per_prompt=1, do_cfg=True, kept_prompts=[0, 1])
    batches = []
    h = unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    lra = LatentReattention(unet).begin(call, **state)
    with torch.no_grad():
        unet(sample, torch.tensor(500), encoder_hidden_states=ehs, return_dict=False)
    lra.end()
    lra.end()
    h.remove()
    assert batches == [4]
    _assert_no_hooks(unet)


# ---------------------------------------------------------------------- 3. end to end through safegen.protect
def _hook_counts(module):
    return tuple(len(getattr(module, a)) for a in ("_forward_pre_hooks", "_forward_hooks",
                                                     "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs"))


def _assert_no_hooks(unet):
    from safegen.hooks import safegen_hooks

    for m in [unet, *unet.up_blocks]:
        assert _hook_counts(m) == (0, 0, 0, 0), type(m).__name__
    assert safegen_hooks(unet) == []


def _run(pipe, pol, guard, prompt, steps=6, **kw):
    batches = []
    h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        if guard is not None:
            safegen.protect(pipe, policy=pol, guards=[guard])
        out = pipe(prompt, num_inference_steps=steps, generator=gen(0), output_type="np", **kw)
    finally:
        h.remove()
        safegen.unprotect(pipe)
    return out, batches


def test_triggered_prompt_gets_reference_rows_on_filtered_steps_only(sd, lexical_policy):
    steps = 6
    out, batches = _run(sd, lexical_policy, safegen.Safree(reattention=True), TRIGGERED, steps)
    res = out.safety[0].result("safree")
    assert res.verdict == "steer"
    k = res.filtered_steps
    assert 0 < k < steps  # the setting leaves some steps unfiltered (gamma rescaled to 6 steps: t' <= 1)
    assert batches == [3] * k + [2] * (steps - k)
    _assert_no_hooks(sd.unet)
    off, off_batches = _run(sd, lexical_policy, safegen.Safree(reattention=False), TRIGGERED, steps)
    assert off_batches == [2] * steps
    assert off.safety[0].result("safree").filtered_steps == k
    # s1 = s2 = 1 makes the filter the identity: only batch-size noise is left, far below the filter's effect
    ident, _ = _run(sd, lexical_policy, safegen.Safree(reattention=True, reattention_s1=1.0, reattention_s2=1.0),
                    TRIGGERED, steps)
    noise = np.abs(ident.images - off.images).max()
    effect = np.abs(out.images - off.images).max()
    assert noise < 1e-4
    assert effect > 1e-3 and effect > 100 * noise


def test_reattention_every_step_without_svf_scaling(sd, lexical_policy):
    steps = 4
    out, batches = _run(sd, lexical_policy, safegen.Safree(reattention=True, svf_scale_steps=False), TRIGGERED,
                        steps)
    k = out.safety[0].result("safree").filtered_steps
    assert k >= 1
    assert batches == [3] * k + [2] * (steps - k)


def test_benign_prompt_untouched(sd, lexical_policy):
    ref, ref_batches = _run(sd, lexical_policy, None, BENIGN, 3)
    out, batches = _run(sd, lexical_policy, safegen.Safree(reattention=True), BENIGN, 3)
    assert out.safety[0].verdict == "pass"
    assert batches == ref_batches == [2, 2, 2]
    np.testing.assert_array_equal(out.images, ref.images)
    _assert_no_hooks(sd.unet)


def test_mixed_batch_rows_per_item(sd, lexical_policy):
    prompts = [TRIGGERED, BENIGN]
    out, batches = _run(sd, lexical_policy, safegen.Safree(reattention=True), prompts, 4, num_images_per_prompt=2)
    off, _ = _run(sd, lexical_policy, safegen.Safree(reattention=False), prompts, 4, num_images_per_prompt=2)
    k = out.safety[0].result("safree").filtered_steps
    assert k >= 1
    assert batches == [8 + 2] * k + [8] * (4 - k)  # 2 prompts x 2 images x (uncond, cond) + 2 reference rows
    diff = np.abs(out.images - off.images).reshape(4, -1).max(1)
    assert (diff[:2] > 1e-3).all()  # the triggered prompt's two images are re-attended
    assert (diff[2:] < 1e-5).all()  # the benign prompt's are not (up to batch-size noise)


class _BlockFirst(Guard):
    name = "block-first"
    stage = "prompt"

    def prepare(self, call):
        call.block_prompt(0, self.name, "test")


def test_kept_prompts_subset(sd, lexical_policy):
    """A prompt blocked by another guard is not in the UNet batch: the rows follow ``kept_prompts``."""
    steps = 4
    batches = []
    h = sd.unet.conv_in.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    try:
        safegen.protect(sd, policy=lexical_policy, guards=[_BlockFirst(), safegen.Safree(reattention=True)])
        out = sd([TRIGGERED, TRIGGERED + " on a street"], num_inference_steps=steps, generator=[gen(0), gen(1)],
                 output_type="np")
    finally:
        h.remove()
        safegen.unprotect(sd)
    assert out.safety[0].verdict == "block"
    k = out.safety[1].result("safree").filtered_steps
    assert k >= 1
    assert batches == [3] * k + [2] * (steps - k)
    _assert_no_hooks(sd.unet)


def test_sdxl(sdxl, lexical_policy):
    steps = 4
    out, batches = _run(sdxl, lexical_policy, safegen.Safree(reattention=True), TRIGGERED, steps)
    off, _ = _run(sdxl, lexical_policy, safegen.Safree(reattention=False), TRIGGERED, steps)
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.details["reattention"] is True
    k = res.filtered_steps
    assert k >= 1
    assert batches == [3] * k + [2] * (steps - k)
    assert np.isfinite(out.images).all()
    assert np.abs(out.images - off.images).max() > 1e-3
    _assert_no_hooks(sdxl.unet)


def test_hooks_removed_after_call_error_and_unprotect(sd, lexical_policy):
    before = [_hook_counts(m) for m in [sd.unet, *sd.unet.up_blocks]]
    safegen.protect(sd, policy=lexical_policy, guards=[safegen.Safree(reattention=True)])
    sd(TRIGGERED, num_inference_steps=2, output_type="np")
    assert [_hook_counts(m) for m in [sd.unet, *sd.unet.up_blocks]] == before

    def boom(pipe, i, t, tensors):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        sd(TRIGGERED, num_inference_steps=2, output_type="np", callback_on_step_end=boom)
    assert [_hook_counts(m) for m in [sd.unet, *sd.unet.up_blocks]] == before
    safegen.unprotect(sd)
    assert [_hook_counts(m) for m in [sd.unet, *sd.unet.up_blocks]] == before
    _assert_no_hooks(sd.unet)
