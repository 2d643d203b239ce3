"""Safe Latent Diffusion guard: golden math, end-to-end equivalence with a hand-written SLD loop, SDXL, batching,
reversibility, the no-CFG case and config validation."""

import numpy as np
import pytest
import torch

import safegen
from safegen.guard import Guard
from safegen.guards.sld import PRESETS, SLD, policy_concept, sld_guidance

KW = dict(num_inference_steps=3, output_type="np")
CONCEPT = "an image showing blood and gore"


def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


# ---------------------------------------------------------------------- reference math (float64, from the equations)
def ref_sld(u, p, s, nu, i, *, s_s, lam, s_m, beta, delta):
    """SLD as written in the paper / diffusers' inline loop. Returns (guidance direction g, new momentum)."""
    u, p, s = u.double(), p.double(), s.double()
    nu = torch.zeros_like(p) if nu is None else nu.double()
    g = p - u
    mu = torch.clamp(s_s * (p - s).abs(), max=1.0)
    mu = torch.where(p - s >= lam, torch.zeros_like(mu), mu)
    gamma = mu * (s - u) + s_m * nu
    nu = beta * nu + (1 - beta) * gamma
    if i >= delta:
        g = g - gamma
    return g, nu


def _cfg_kwargs(cfg: SLD):
    return dict(s_s=cfg.guidance_scale, lam=cfg.threshold, s_m=cfg.momentum_scale, beta=cfg.momentum_beta,
                delta=cfg.warmup_steps)


def _sld_kwargs(cfg: SLD):
    return dict(guidance_scale=cfg.guidance_scale, threshold=cfg.threshold, momentum_scale=cfg.momentum_scale,
                momentum_beta=cfg.momentum_beta, warmup_steps=cfg.warmup_steps)


def _eps(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


# ---------------------------------------------------------------------- 1. golden math
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_sld_math_matches_reference_over_warmup_and_momentum(dtype, tol):
    cfg = SLD(warmup_steps=1, guidance_scale=5.0, threshold=0.01, momentum_scale=0.5, momentum_beta=0.7)
    nu_ref = None
    nu = None
    for i in range(3):  # step 0: warm-up (momentum only); steps 1, 2: guided, with accumulated momentum
        u, p, s = _eps(dtype, seed=i)
        g_ref, nu_ref = ref_sld(u, p, s, nu_ref, i, **_cfg_kwargs(cfg))
        new_p, nu = sld_guidance(u, p, s, nu, i, **_sld_kwargs(cfg))
        assert new_p.dtype == dtype
        torch.testing.assert_close((new_p.double() - u.double()), g_ref, rtol=0, atol=tol)
        torch.testing.assert_close(nu.double(), nu_ref, rtol=0, atol=tol)
        if i == 0:
            assert new_p is p  # warm-up: ε_p untouched (bit for bit) ...
            assert nu.abs().max() > 0  # ... but the momentum accumulates
        else:
            assert not torch.equal(new_p, p)
    # all branches of Eq. 6 were exercised: clamped, unclamped and thresholded elements
    u, p, s = _eps(torch.float64, seed=2)
    d = p - s
    assert bool((d >= cfg.threshold).any()) and bool(((d < cfg.threshold) & (5 * d.abs() < 1)).any())
    assert bool(((d < cfg.threshold) & (5 * d.abs() > 1)).any())


def test_sld_math_matches_diffusers_safe_pipeline():
    """Cross-check against diffusers' own ``perform_safety_guidance`` (its labels: out[0] text, out[1] uncond)."""
    try:
        from diffusers import StableDiffusionPipelineSafe
    except Exception:  # pragma: no cover - deprecated pipelines may go away
        pytest.skip("diffusers' StableDiffusionPipelineSafe is not available")
    cfg = SLD.strong(warmup_steps=1)
    mom_d, nu = None, None
    for i in range(3):
        u, p, s = _eps(torch.float32, seed=10 + i)
        guid_d, mom_d = StableDiffusionPipelineSafe.perform_safety_guidance(
            None, True, mom_d, p - u, (p, u, s), i, cfg.guidance_scale, cfg.warmup_steps, cfg.threshold,
            cfg.momentum_scale, cfg.momentum_beta)
        new_p, nu = sld_guidance(u, p, s, nu, i, **_sld_kwargs(cfg))
        torch.testing.assert_close(new_p - u, guid_d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(nu, mom_d, rtol=1e-6, atol=1e-6)


def test_sld_math_half_precision_computes_in_float32():
    u, p, s = _eps(torch.float16, seed=3)
    cfg = SLD.max()
    new_p, nu = sld_guidance(u, p, s, None, 0, **_sld_kwargs(cfg))
    g_ref, nu_ref = ref_sld(u, p, s, None, 0, **_cfg_kwargs(cfg))
    assert new_p.dtype == torch.float16 and nu.dtype == torch.float32
    torch.testing.assert_close(new_p.double() - u.double(), g_ref, rtol=0, atol=2e-2)


# ---------------------------------------------------------------------- 2. end-to-end equivalence
@torch.no_grad()
def reference_sld_loop(pipe, prompts, cfg: SLD, concept: str, steps: int, seed: int, w: float = 7.5):
    """SLD written out by hand: encode, UNet on [uncond; prompt; concept], SLD + CFG, DDIM step, decode."""
    dev = torch.device("cpu")
    n = len(prompts)
    pe, npe = pipe.encode_prompt(prompts, dev, 1, True)
    cpe, _ = pipe.encode_prompt([concept], dev, 1, False)
    ehs = torch.cat([npe, pe, cpe.expand(n, -1, -1)])
    pipe.scheduler.set_timesteps(steps, device=dev)
    g = gen(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, size, size, pe.dtype, dev, g)
    nu = None
    for i, t in enumerate(pipe.scheduler.timesteps):
        x = pipe.scheduler.scale_model_input(torch.cat([latents] * 3), t)
        u, p, s = pipe.unet(x, t, encoder_hidden_states=ehs).sample.chunk(3)
        guidance, nu = ref_sld(u, p, s, nu, i, **_cfg_kwargs(cfg))
        noise = (u.double() + w * guidance).float()
        latents = pipe.scheduler.step(noise, t, latents, eta=0.0, generator=g).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


def test_end_to_end_equals_hand_written_sld_loop(sd):
    prompts = ["a photo of a red cat", "a dog on the beach"]
    cfg = SLD(warmup_steps=1, guidance_scale=50.0, threshold=0.01, momentum_scale=0.5, momentum_beta=0.7,
              concept=CONCEPT)
    plain = sd(prompts, generator=gen(0), **KW).images
    ref = reference_sld_loop(sd, prompts, cfg, CONCEPT, steps=3, seed=0)
    assert np.abs(ref - plain).max() > 1e-3  # SLD does change the images
    safegen.protect(sd, guards=[cfg])
    out = sd(prompts, generator=gen(0), **KW)
    np.testing.assert_allclose(out.images, ref, rtol=0, atol=1e-5)
    rep = out.safety[1].result("sld")
    assert rep.verdict == "steer" and "custom preset" in rep.reason and "2 of 3 steps" in rep.reason
    assert rep.details["concept"] == CONCEPT and rep.details["guided_steps"] == 2


def _count_rows(pipe):
    """Batch sizes the UNet's first conv sees (after every row extender)."""
    seen = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    return seen, handle


def test_unet_sees_3n_rows_and_vanishing_gamma_is_bit_identical(sd):
    prompts = ["a photo of a red cat", "a dog on the beach"]
    plain = sd(prompts, generator=gen(1), num_images_per_prompt=2, **KW).images
    # λ = -1e30: ε_p − ε_S ≥ λ everywhere, so μ = 0, ν stays 0 and γ is exactly 0 from step 0 on
    safegen.protect(sd, guards=[SLD(warmup_steps=0, threshold=-1e30)])
    seen, h = _count_rows(sd)
    out = sd(prompts, generator=gen(1), num_images_per_prompt=2, **KW)
    h.remove()
    assert seen == [3 * 4] * 3  # N = 4 items: [uncond; cond; safety] on each of the 3 steps
    assert np.array_equal(out.images, plain)
    assert out.safety[0].result("sld").details["unet_calls_with_safety_rows"] == 3
    safegen.protect(sd, guards=[SLD.max()])
    out = sd(prompts, generator=gen(1), num_images_per_prompt=2, **KW)
    assert out.images.shape == plain.shape
    assert all(np.abs(out.images[i] - plain[i]).max() > 1e-3 for i in range(4))
    assert [r.result("sld").verdict for r in out.safety] == ["steer"] * 4
    assert out.safety[0].result("sld").details["preset"] == "max"


def test_warmup_not_reached_reports_pass_and_weak_preset_skips_rows(sd):
    plain = sd("a red cat", generator=gen(2), **KW).images
    safegen.protect(sd, guards=["sld-weak"])  # δ = 15, s_m = 0: no step of 3 is guided, momentum unused
    seen, h = _count_rows(sd)
    out = sd("a red cat", generator=gen(2), **KW)
    h.remove()
    assert seen == [2, 2, 2]  # the safety rows are not even run
    assert np.array_equal(out.images, plain)
    r = out.safety[0].result("sld")
    assert r.verdict == "pass" and "warm-up" in r.reason and r.details["preset"] == "weak"


# ---------------------------------------------------------------------- 3. SDXL and batching
def test_sdxl_batched_prompts_and_images_per_prompt(sdxl):
    prompts = ["a photo of a red cat", "a dog on the beach"]
    kw = dict(num_inference_steps=2, output_type="np", num_images_per_prompt=2)
    plain = sdxl(prompts, generator=gen(3), **kw).images
    safegen.protect(sdxl, guards=[SLD(warmup_steps=0, threshold=-1e30)])
    seen, h = _count_rows(sdxl)
    same = sdxl(prompts, generator=gen(3), **kw).images
    h.remove()
    assert seen == [12, 12]
    assert np.array_equal(same, plain)  # SDXL: pooled text_embeds and time_ids of the extra rows line up
    safegen.protect(sdxl, guards=[SLD.max()])
    out = sdxl(prompts, generator=gen(3), **kw)
    assert out.images.shape == plain.shape == (4, 32, 32, 3)
    assert np.isfinite(out.images).all()
    assert all(np.abs(out.images[i] - plain[i]).max() > 1e-3 for i in range(4))
    assert [r.verdict for r in out.safety] == ["steer"] * 4
    # the concept conditioning is encoded once and cached on the protection
    keys = [k for k in sdxl._safegen.cache if k[0] == "sld-embeds"]
    assert len(keys) == 1 and set(sdxl._safegen.cache[keys[0]]) == {"prompt_embeds", "pooled_prompt_embeds"}
    sdxl(prompts, generator=gen(3), **kw)
    assert len([k for k in sdxl._safegen.cache if k[0] == "sld-embeds"]) == 1


class _BlockSecond(Guard):
    name = "block-second"
    stage = "prompt"

    def prepare(self, call):
        call.block_prompt(1, self.name, "test block")


def test_blocked_prompts_use_the_kept_items_only(sd):
    safegen.protect(sd, guards=[SLD.max(), _BlockSecond()])
    out = sd(["a red cat", "a dog"], generator=[gen(5), gen(6)], num_images_per_prompt=1, **KW)
    assert [r.verdict for r in out.safety] == ["steer", "block"]
    assert out.safety[1].result("sld") is None
    safegen.protect(sd, guards=[SLD.max()])
    alone = sd(["a red cat"], generator=[gen(5)], **KW).images
    assert np.array_equal(out.images[0], alone[0])


# ---------------------------------------------------------------------- 4. reversibility
def test_unprotect_restores_bit_identical_outputs_and_removes_hooks(sd):
    from safegen.testing import tiny_sd_pipeline

    never = tiny_sd_pipeline()(["a red cat", "a dog"], generator=gen(4), **KW).images
    safegen.protect(sd, guards=[SLD.strong()])
    sd(["a red cat", "a dog"], generator=gen(4), **KW)
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks  # per-call hooks are gone after a call
    safegen.unprotect(sd)
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks
    assert np.array_equal(sd(["a red cat", "a dog"], generator=gen(4), **KW).images, never)


class _FailingFinish(Guard):
    name = "fails"
    stage = "output"

    def finish(self, call):
        raise RuntimeError("boom")


def test_failure_after_the_loop_fails_closed_and_finish_twice_is_safe(sd):
    safegen.protect(sd, guards=[SLD.max(), _FailingFinish()])
    out = sd("a red cat", generator=gen(0), **KW)  # SLD.finish runs twice: normally, then in the cleanup
    assert out.safety[0].blocked and out.safety[0].result("fails").verdict == "error"
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks


# ---------------------------------------------------------------------- 5. no CFG
def test_without_cfg_sld_is_inactive_and_output_identical(sd):
    kw = dict(KW, guidance_scale=1.0)
    plain = sd("a red cat", generator=gen(7), **kw).images
    safegen.protect(sd, guards=[SLD.max()])
    seen, h = _count_rows(sd)
    out = sd("a red cat", generator=gen(7), **kw)
    h.remove()
    assert seen == [1, 1, 1]
    assert np.array_equal(out.images, plain)
    r = out.safety[0].result("sld")
    assert r.verdict == "pass" and "inactive" in r.reason and "classifier-free guidance" in r.reason
    assert r.details["active"] is False


def test_sld_guidance_scale_at_most_one_disables_it_as_in_diffusers(sd):
    plain = sd("a red cat", generator=gen(8), **KW).images
    safegen.protect(sd, guards=[SLD(guidance_scale=1.0, warmup_steps=0)])
    out = sd("a red cat", generator=gen(8), **KW)
    assert np.array_equal(out.images, plain)
    assert out.safety[0].result("sld").verdict == "pass"


# ---------------------------------------------------------------------- 6. config
@pytest.mark.parametrize("kwargs,field", [
    (dict(momentum_beta=-0.1), "momentum_beta"),
    (dict(momentum_beta=1.5), "momentum_beta"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=2.5), "warmup_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(threshold=float("inf")), "threshold"),
    (dict(momentum_scale=-0.5), "momentum_scale"),
    (dict(concept="  "), "concept"),
])
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SLD(**kwargs)


def test_presets_and_registry():
    from safegen.guards import GUARD_PRESETS

    for name, (delta, s_s, lam, s_m, beta) in PRESETS.items():
        g = getattr(SLD, name)()
        assert (g.warmup_steps, g.guidance_scale, g.threshold, g.momentum_scale, g.momentum_beta) == (
            delta, s_s, lam, s_m, beta)
        assert g.preset == name and g.config_dict()["preset"] == name
        assert GUARD_PRESETS[f"sld-{name}"]().preset == name
    assert PRESETS["strong"] == (7, 2000.0, 0.025, 0.5, 0.7)
    assert GUARD_PRESETS["sld"]().preset == "medium" == SLD().preset
    assert SLD.strong(warmup_steps=3).preset == "custom"
    assert repr(SLD.strong()) == "SLD.strong()"
    with pytest.raises(TypeError, match="not supported|does not support"):
        safegen.protect(object(), guards=[SLD()])


def test_default_concept_is_built_from_the_policy_and_fits_the_tokenizer(sd):
    pol = safegen.load_policy("default")
    text = policy_concept(pol, [sd.tokenizer])
    assert text.startswith("an image showing ")
    phrases = text[len("an image showing "):].split(", ")
    assert len(sd.tokenizer(text)["input_ids"]) <= 77
    for cat in pol.categories:  # one phrase per category in turn: every category survives the cut
        assert pol.concepts(cat)[0] in phrases
    safegen.protect(sd, policy=pol, guards=[SLD.max()])
    out = sd("a red cat", generator=gen(0), **KW)
    assert out.safety[0].result("sld").details["concept"] == text


def test_conditioning_of_another_length_fails_closed(sd):
    pe, npe = sd.encode_prompt("a red cat", torch.device("cpu"), 1, True)
    long = dict(prompt_embeds=torch.cat([pe, pe], 1), negative_prompt_embeds=torch.cat([npe, npe], 1))
    safegen.protect(sd, guards=[SLD.max()])
    out = sd(generator=gen(0), **long, **KW)  # 154-token conditioning vs the 77-token safety concept
    r = out.safety[0]
    assert r.blocked and r.result("sld").verdict == "error" and "encoder_hidden_states" in r.reason
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks
