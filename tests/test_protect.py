"""protect / unprotect, the protected call, reports and failing closed, on tiny random pipelines."""

import numpy as np
import pytest
import torch

import safegen
from safegen.guard import Guard

BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore on the street"


def run(pipe, prompt, seed=0, **kw):
    kw.setdefault("num_inference_steps", 2)
    kw.setdefault("output_type", "np")
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw)


def test_unsupported_pipeline_type_error():
    from diffusers import DDPMPipeline, UNet2DModel, DDPMScheduler

    pipe = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(32, 32), norm_num_groups=8,
                                         down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                        scheduler=DDPMScheduler())
    with pytest.raises(TypeError, match="supported pipelines: .*StableDiffusionPipeline"):
        safegen.protect(pipe)
    with pytest.raises(TypeError):
        safegen.protect(object())


def test_protect_is_idempotent_and_reversible(sd, lexical_policy):
    cls = type(sd)
    safegen.protect(sd, policy=lexical_policy)
    first = type(sd)
    safegen.protect(sd, policy=lexical_policy)
    assert type(sd) is first and type(sd).__mro__[1] is cls
    assert type(sd).__name__ == cls.__name__
    safegen.unprotect(sd)
    assert type(sd) is cls and not safegen.is_protected(sd) and "_safegen" not in sd.__dict__
    safegen.unprotect(sd)  # no-op
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks


def test_untouched_prompt_bit_identical_then_unprotect(sd, lexical_policy):
    never = run(sd, [BENIGN, "a blue bird on a tree"]).images
    safegen.protect(sd, policy=lexical_policy, guards=["safree"])
    out = run(sd, [BENIGN, "a blue bird on a tree"])
    assert np.array_equal(out.images, never)
    assert all(r.verdict == "pass" and not r.blocked for r in out.safety)
    safegen.unprotect(sd)
    assert np.array_equal(run(sd, [BENIGN, "a blue bird on a tree"]).images, never)


def test_keyword_prompt_changes_conditioning_and_reports(sd, lexical_policy):
    plain = run(sd, UNSAFE).images
    safegen.protect(sd, policy=lexical_policy)
    seen = []
    h = sd.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                          with_kwargs=True)
    out = run(sd, UNSAFE, num_inference_steps=4)
    h.remove()
    unprotected_embeds = sd.encode_prompt(UNSAFE, "cpu", 1, True)
    assert not torch.equal(seen[0][1], unprotected_embeds[0][0])  # cond row steered
    assert not torch.equal(seen[0][0], unprotected_embeds[1][0])  # uncond row: concept keywords
    rep = out.safety[0]
    res = rep.result("safree")
    assert rep.verdict == "steer" and res.category == "violence" and res.concept in ("blood", "gore")
    assert res.trigger_tokens and all(isinstance(t, str) for t in res.trigger_tokens)
    assert 1 <= res.filtered_steps <= 4
    assert "violence" in rep.reason and "blood" in res.details["negative_prompt"]
    assert rep.unet_steps_run == 4 and rep.unet_steps_saved == 0
    # after the filtered window the callback switches the cond rows back to the original embedding
    if res.filtered_steps < 4:
        assert torch.equal(seen[-1][1], unprotected_embeds[0][0])
    assert not np.array_equal(run(sd, UNSAFE).images, plain)


def test_batch_mixed_and_num_images_per_prompt(sd, lexical_policy):
    prompts = [BENIGN, UNSAFE, "a nude woman on the beach"]
    plain = run(sd, prompts, num_images_per_prompt=2).images
    safegen.protect(sd, policy=lexical_policy)
    out = run(sd, prompts, num_images_per_prompt=2)
    assert out.images.shape == plain.shape == (6, 32, 32, 3)
    assert [r.verdict for r in out.safety] == ["pass", "pass", "steer", "steer", "steer", "steer"]
    assert [r.prompt for r in out.safety[::2]] == prompts
    assert out.safety[4].result("safree").category == "sexual"
    assert np.array_equal(out.images[:2], plain[:2])
    assert not np.array_equal(out.images[2:], plain[2:])
    # batched call == single calls for the steered prompt (each item's conditioning is its own)
    single = run(sd, UNSAFE, num_images_per_prompt=2, seed=0)
    assert single.safety[0].result("safree").trigger_tokens == out.safety[2].result("safree").trigger_tokens


def test_negative_prompt_is_kept_and_extended(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy)
    out = run(sd, [BENIGN, UNSAFE], negative_prompt=["blurry", "low quality"])
    assert out.safety[0].verdict == "pass"
    neg = out.safety[1].result("safree").details["negative_prompt"]
    assert neg.startswith("low quality, ") and "blood" in neg
    safegen.unprotect(sd)
    plain = run(sd, [BENIGN, UNSAFE], negative_prompt=["blurry", "low quality"]).images
    safegen.protect(sd, policy=lexical_policy)
    again = run(sd, [BENIGN, UNSAFE], negative_prompt=["blurry", "low quality"]).images
    assert np.array_equal(again[0], plain[0]) and not np.array_equal(again[1], plain[1])


def test_prompt_embeds_input(sd, lexical_policy):
    pe, npe = sd.encode_prompt(UNSAFE, "cpu", 1, True)
    plain = run(sd, None, prompt_embeds=pe, negative_prompt_embeds=npe).images
    # with an always-firing gate, embeddings-only input is still steered (no text to mask: token-space rule)
    pol = lexical_policy.copy()
    pol.categories["violence"].thresholds["safree"] = 0.0
    safegen.protect(sd, policy=pol)
    out = run(sd, None, prompt_embeds=pe, negative_prompt_embeds=npe)
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.trigger_tokens and res.trigger_tokens[0].startswith("#")
    assert out.safety[0].prompt is None
    assert not np.array_equal(out.images, plain)
    # and with the lexical-only policy nothing fires on embeddings: bit-identical
    safegen.protect(sd, policy=lexical_policy)
    assert np.array_equal(run(sd, None, prompt_embeds=pe, negative_prompt_embeds=npe).images, plain)


def test_sd2_v_prediction(sd2v, lexical_policy):
    plain = run(sd2v, [BENIGN, UNSAFE]).images
    safegen.protect(sd2v, policy=lexical_policy)
    out = run(sd2v, [BENIGN, UNSAFE])
    assert sd2v.scheduler.config.prediction_type == "v_prediction"
    assert np.array_equal(out.images[0], plain[0]) and not np.array_equal(out.images[1], plain[1])
    assert out.safety[1].result("safree").verdict == "steer"


def test_sdxl_both_encoders_and_pooled(sdxl, lexical_policy):
    plain = run(sdxl, [BENIGN, UNSAFE], num_images_per_prompt=2).images
    safegen.protect(sdxl, policy=lexical_policy)
    seen = []
    h = sdxl.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"].clone(), kw["added_cond_kwargs"]["text_embeds"].clone())),
        with_kwargs=True)
    out = run(sdxl, [BENIGN, UNSAFE], num_images_per_prompt=2)
    h.remove()
    assert out.images.shape == plain.shape
    assert np.array_equal(out.images[:2], plain[:2]) and not np.array_equal(out.images[2:], plain[2:])
    pe, npe, ppe, nppe = sdxl.encode_prompt(UNSAFE, device="cpu", num_images_per_prompt=1)
    ehs, te = seen[0]
    cond = ehs[4 + 2]  # rows: 4 uncond, then cond rows of BENIGN x2, UNSAFE x2
    assert not torch.equal(cond[..., :32], pe[0][..., :32]) and not torch.equal(cond[..., 32:], pe[0][..., 32:])
    assert not torch.equal(te[4 + 2], ppe[0])  # pooled embedding projected during filtered steps
    res = out.safety[2].result("safree")
    assert res.verdict == "steer" and res.category == "violence" and res.trigger_tokens


def test_return_dict_false_and_last_reports(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy)
    images, nsfw = run(sd, UNSAFE, return_dict=False)
    assert images.shape == (1, 32, 32, 3)
    assert safegen.last_reports(sd)[0].verdict == "steer"


def test_user_callback_still_runs(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy)
    steps = []

    def cb(pipe, i, t, kw):
        steps.append((i, kw["latents"].shape))
        return kw

    run(sd, UNSAFE, num_inference_steps=3, callback_on_step_end=cb)
    assert [s[0] for s in steps] == [0, 1, 2]


class Broken(Guard):
    name = "broken"
    stage = "conditioning"

    def prepare(self, call):
        raise RuntimeError("kaboom")


class BrokenInLoop(Guard):
    name = "broken_loop"
    stage = "loop"
    tensor_inputs = ("latents",)

    def step_end(self, call, step, t, tensors):
        if step == 1:
            raise RuntimeError("mid-loop failure")


@pytest.mark.parametrize("guard,output_type", [(Broken(), "np"), (BrokenInLoop(), "pil"), (BrokenInLoop(), "pt")])
def test_guard_failure_fails_closed(sd, lexical_policy, guard, output_type):
    safegen.protect(sd, policy=lexical_policy, guards=[guard])
    out = run(sd, [BENIGN, UNSAFE], output_type=output_type, num_inference_steps=3)
    assert all(r.blocked and r.verdict == "error" for r in out.safety)
    assert all("fail closed" in r.reason for r in out.safety)
    assert len(out.images) == 2
    if output_type == "pil":
        assert out.images[0].size == (32, 32) and out.images[0].getpixel((0, 0)) == (128, 128, 128)
    elif output_type == "pt":
        assert out.images.shape == (2, 3, 32, 32) and torch.allclose(out.images, torch.full_like(out.images, 0.5))
    else:
        assert np.allclose(out.images, 0.5)
    assert all(r.unet_steps_run == 0 for r in out.safety)
    assert sd._interrupt is False
    # the pipeline is usable afterwards
    safegen.protect(sd, policy=lexical_policy)
    assert run(sd, BENIGN).safety[0].verdict == "pass"


class BlockUnsafe(Guard):
    """A minimal prompt-stage guard that blocks prompts containing 'gore' (exercises the batch split)."""

    name = "blocker"
    stage = "prompt"

    def prepare(self, call):
        for b, p in enumerate(call.prompts):
            if "gore" in p:
                call.block_prompt(b, self.name, "test block", category="violence")


def test_blocked_items_get_no_unet_step_and_placeholder(sd, lexical_policy):
    calls = []
    sd.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[0]), with_kwargs=True)
    safegen.protect(sd, policy=lexical_policy, guards=[BlockUnsafe()])
    out = run(sd, [BENIGN, UNSAFE, "a blue bird on a tree"], num_inference_steps=2)
    assert calls == [4, 4]  # 2 kept prompts x CFG, 2 steps
    assert [r.blocked for r in out.safety] == [False, True, False]
    assert out.safety[1].unet_steps_run == 0 and out.safety[1].unet_steps_saved == 2
    assert np.allclose(out.images[1], 0.5) and out.images.shape == (3, 32, 32, 3)
    calls.clear()
    out = run(sd, UNSAFE)
    assert calls == [] and out.safety[0].blocked and out.images.shape == (1, 32, 32, 3)


def test_bad_call_arguments_raise_like_unprotected(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy)
    with pytest.raises(TypeError):
        sd(BENIGN, 32, 32, 2, None, None, 7.5, None, 1, 0.0, None, None, None, None, None, None, "np", True,
           None, 0.0, None, None, ["latents"], "one positional too many")
    with pytest.raises(ValueError):
        sd([BENIGN, UNSAFE], negative_prompt=["only one"], num_inference_steps=2)


def test_guard_resolution_errors(sd):
    with pytest.raises(ValueError, match="unknown guard"):
        safegen.protect(sd, guards=["nope"])
    with pytest.raises(ValueError, match="more than once"):
        safegen.protect(sd, guards=["safree", safegen.Safree()])
    assert not safegen.is_protected(sd)


def test_sensitivity_scales_gate(sd):
    pol = safegen.load_policy("default")
    safegen.protect(sd, policy=pol, guards=["safree"])
    res = run(sd, BENIGN).safety[0].result("safree")
    base = res.threshold
    assert res.budget == 0.01
    pol.sensitivity = 4.0  # edits in code apply to the next call: the budget is fpr × sensitivity
    res = run(sd, BENIGN).safety[0].result("safree")
    cal = safegen.Safree().calibration(sd, pol)
    assert res.budget == pytest.approx(0.04) and res.threshold in cal["thresholds"].values()
    assert max(cal["thresholds"].values()) <= base


class BrokenUNetHook(Guard):
    """A guard whose UNet-level hook raises mid-loop: must fail closed, not leak the exception."""

    name = "broken_hook"
    stage = "loop"

    def prepare(self, call):
        from safegen.unet_rows import RowExtender

        def provide(batch, inputs):
            if call.step == 1:
                raise RuntimeError("hook exploded")
            return None

        self.ext = RowExtender(call.pipe.unet, provide, lambda *a: None, guard=self.name).install()

    def finish(self, call):
        self.ext.remove()


def test_unet_hook_failure_fails_closed(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy, guards=[BrokenUNetHook()])
    out = run(sd, [BENIGN, UNSAFE], num_inference_steps=3)
    assert all(r.verdict == "error" and "hook exploded" in r.reason for r in out.safety)
    assert np.allclose(out.images, 0.5)
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks


def test_one_guard_object_protects_two_pipelines(sd, sdxl, lexical_policy):
    guard = safegen.Safree()
    safegen.protect(sd, policy=lexical_policy, guards=[guard])
    safegen.protect(sdxl, policy=lexical_policy, guards=[guard])
    a = run(sd, UNSAFE).safety[0].result("safree")
    b = run(sdxl, UNSAFE).safety[0].result("safree")
    assert a.verdict == b.verdict == "steer"
    assert run(sd, UNSAFE).images.shape == (1, 32, 32, 3)  # each pipeline uses its own encoders and bases


@pytest.mark.parametrize("kwargs,field", [({"alpha": -1}, "alpha"), ({"sdxl_pooled": "drop"}, "sdxl_pooled"),
                                          ({"reattention_tau": 0}, "reattention_tau"),
                                          ({"reattention_s2": 1.5}, "reattention_s2"),
                                          ({"encode_batch": 0}, "encode_batch")])
def test_safree_rejects_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        safegen.Safree(**kwargs)


def test_default_policy_skips_what_a_model_cannot_run_and_says_so(sd, monkeypatch):
    """The default stack on a model it has no LVD classifier or output classifier for: those guards are skipped,
    every report says why; a guard named explicitly fails instead (never a silent skip)."""
    from safegen.errors import GuardUnavailable
    from safegen.guards import output as output_mod

    monkeypatch.setattr(output_mod.OutputGuard, "_auto", lambda self, pipe, policy: (_ for _ in ()).throw(
        GuardUnavailable("no output check runs on this model (NudeNet is not installed)")))
    pipe = safegen.protect(sd)  # policy="default": its own guard list, skip_unavailable
    prot = pipe._safegen
    assert [g.name for g in prot.guards] == ["latent-guard", "safree"]
    assert set(prot.skipped) == {"lvd", "output"}
    out = pipe("a photo of a dog on a sofa", num_inference_steps=2, output_type="np")
    for name in ("lvd", "output"):
        res = out.safety[0].result(name)
        assert res.details["skipped"] and res.reason.startswith("skipped: ") and res.verdict == "pass"
    assert "another model" in out.safety[0].result("lvd").reason
    safegen.unprotect(pipe)
    with pytest.raises(GuardUnavailable, match="another model"):
        safegen.protect(sd, guards=["lvd"])  # asked for by name: fail, with what to do
    assert not safegen.is_protected(sd)
