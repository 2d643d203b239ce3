"""Hostile-input regressions (issue: close every fail-open path): each test reproduces a path that let unsafe output
through or left the pipeline modified, on tiny pipelines (and the embedded default model where the world oracle
can tell an unsafe image)."""

import logging
import math

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.latent_guard import LatentGuard, LatentGuardHead
from safegen.guards.lvd import LVD, LatentClassifier, LVDConfig, unet_fingerprint
from safegen.hooks import add_hook, safegen_hooks

UNSAFE = "a photo of blood and gore"
BENIGN = "a red bus"
FILLER = ("a red bus on the street with a tree and a man , " * 8).split()


def run(pipe, prompt, steps=2, seed=0, **kw):
    kw.setdefault("output_type", "np")
    n = 1 if isinstance(prompt, str) else len(prompt)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt, num_inference_steps=steps, generator=gens, **kw)


def all_actions(policy, action):
    for cat in policy.categories.values():
        cat.action = action
    return policy


# ---------------------------------------------------------------------- 1. a check reads what the model reads
def test_latent_guard_reads_an_unsafe_phrase_at_every_position_the_pipeline_keeps(sd):
    """The MiniLM backbone reads 64 WordPiece tokens, the pipeline 77 CLIP tokens: the phrase is placed after
    0, 1, 2... filler words, up to where the pipeline's tokenizer would cut it off."""
    tok = sd.tokenizer
    prompts = []
    for k in range(len(FILLER)):
        p = " ".join(FILLER[:k] + [UNSAFE])
        if len(tok(p)["input_ids"]) > tok.model_max_length:  # the pipeline would no longer read the phrase
            break
        prompts.append(p)
    assert len(prompts) > 60  # past the backbone's own 64-token window
    rows = LatentGuard().check(prompts)
    missed = [i for i, r in enumerate(rows) if not r["unsafe"]]
    assert missed == []
    assert rows[-1]["windows"] > 1 and rows[0]["windows"] == 1
    # inside a pipeline: the longest one is blocked, with no UNet step, and the report says it was windowed
    safegen.protect(sd, guards=["latent-guard"])
    out = run(sd, prompts[-1])
    res = out.safety[0].result("latent_guard")
    assert res.verdict == "block" and out.safety[0].unet_steps_run == 0
    assert res.details["windows"] > 1


def test_windows_cover_a_long_text_and_a_short_one_is_untouched():
    from safegen.default_model import minilm_components
    from safegen.encoders import TextEncoderAdapter

    te, tok = minilm_components(16)
    ad = TextEncoderAdapter(tok, te, summary="mean", causal=False)
    short = ad.tokenize(["a red bus"])
    batch, owner = ad.tokenize_windows(["a red bus"])
    assert torch.equal(batch.ids, short.ids) and owner.tolist() == [0]
    long_text = " ".join(f"w{i}" for i in range(40))
    content = tok(long_text, add_special_tokens=False)["input_ids"]
    batch, owner = ad.tokenize_windows(["a cat", long_text])
    rows = batch.ids[owner == 1]
    assert (owner == 0).sum() == 1 and len(rows) > 2
    seen = set()
    for r, m in zip(rows, batch.attention_mask[owner == 1]):
        ids = r[m.bool()].tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) <= 16
        inner = ids[1:-1]
        start = next(i for i in range(len(content)) if content[i:i + len(inner)] == inner)
        seen.update(range(start, start + len(inner)))
    assert seen == set(range(len(content)))  # every token of the text is in some window


# ---------------------------------------------------------------------- 2. every prompt argument
def test_safree_reads_sdxl_prompt_2(sdxl, lexical_policy):
    safegen.protect(sdxl, policy=lexical_policy, guards=["safree"])
    res = run(sdxl, BENIGN, prompt_2=UNSAFE).safety[0].result("safree")
    assert res.verdict == "steer" and res.category == "violence"
    assert {"blood", "gore"} & set(res.trigger_tokens)
    assert run(sdxl, BENIGN, prompt_2="a blue bird").safety[0].result("safree").verdict == "pass"


def test_steered_sdxl_conditioning_keeps_prompt_2(sdxl, lexical_policy):
    safegen.protect(sdxl, policy=lexical_policy, guards=["safree"])
    a = run(sdxl, UNSAFE, prompt_2="a red bus")
    b = run(sdxl, UNSAFE, prompt_2="a green field")
    assert a.safety[0].verdict == "steer" and b.safety[0].verdict == "steer"
    assert not np.array_equal(a.images, b.images)


def test_condition_texts_lists_every_text_per_prompt(sdxl):
    from safegen.protection import _new_call

    safegen.protect(sdxl, guards=[])
    call = _new_call(sdxl._safegen, {"prompt": ["a", "b"], "prompt_2": ["a", "c"]})
    assert call.condition_texts() == [[("prompt", "a")], [("prompt", "b"), ("prompt_2", "c")]]
    call = _new_call(sdxl._safegen, {"prompt": ["a", "b"], "prompt_2": "x"})
    assert call.condition_texts() == [[("prompt", "a"), ("prompt_2", "x")], [("prompt", "b"), ("prompt_2", "x")]]


# ---------------------------------------------------------------------- 3. non-finite numbers fail closed
class NaNHead(LatentGuardHead):
    def score(self, *args, **kwargs):
        return super().score(*args, **kwargs) * float("nan")


def test_latent_guard_nan_scores_block_with_error(sd):
    head = NaNHead.mean_match(sd.text_encoder.config.hidden_size)
    safegen.protect(sd, guards=[LatentGuard.from_head(head, backbone="pipeline", threshold=0.5)])
    out = run(sd, [BENIGN, UNSAFE])
    for r in out.safety:
        assert r.blocked and r.result("latent_guard").verdict == "error"
        assert "not a finite number" in r.reason and r.unet_steps_run == 0
    assert np.allclose(out.images, 0.5)


def test_nan_threshold_set_in_code_blocks(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy, guards=["safree"])
    # behind the validating setter, after protect (the policy object is shared: edits apply to the next call)
    lexical_policy.categories["violence"].thresholds["safree"] = float("nan")
    out = run(sd, [BENIGN, "a blue bird"])
    assert all(r.blocked and r.verdict == "error" for r in out.safety)


def _lvd_guard(pipe, logits, **kw):
    clf = LatentClassifier(LVDConfig(4, categories=["violence"], model=unet_fingerprint(pipe)))
    clf.forward = lambda x0, noise: torch.full((x0.shape[0], 1), logits)
    return LVD.from_classifier(clf, **kw)


def test_lvd_nan_scores_block_with_error(sd):
    safegen.protect(sd, guards=[_lvd_guard(sd, float("nan"))])
    out = run(sd, [BENIGN, UNSAFE], steps=4)
    for r in out.safety:
        res = r.result("lvd")
        assert r.blocked and res.verdict == "error" and "not finite" in res.reason
        assert r.unet_steps_run == 1  # stopped at the first check: no more steps, no decode
    assert np.allclose(out.images, 0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_are_an_error_for_lvd_and_the_output_check(sd, bad):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    latents[0, 0, 0, 0] = bad
    safegen.protect(sd, guards=[_lvd_guard(sd, -10.0)])  # a classifier that finds nothing unsafe
    out = sd(BENIGN, latents=latents, num_inference_steps=3, output_type="np")
    assert out.safety[0].blocked and out.safety[0].result("lvd").verdict == "error"
    assert np.isfinite(out.images).all()

    class Never:
        name, protocol = "never", "never unsafe"

        def judge(self, prompt, image):
            return {"unsafe": False, "category": None, "fidelity": None}

    safegen.protect(sd, guards=[safegen.OutputGuard(oracle=Never())])
    out = sd(BENIGN, latents=latents, num_inference_steps=3, output_type="np")
    assert out.safety[0].blocked and out.safety[0].result("output").verdict == "error"
    assert np.isfinite(out.images).all()


# ---------------------------------------------------------------------- 4. `block` blocks, `log` only reports
def test_block_action_blocks_with_safree(sd, lexical_policy):
    all_actions(lexical_policy, "block")
    safegen.protect(sd, policy=lexical_policy, guards=["safree"])
    out = run(sd, [BENIGN, UNSAFE])
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    res = out.safety[1].result("safree")
    assert res.category == "violence" and "action: block" in res.reason
    assert out.safety[1].unet_steps_run == 0 and np.allclose(out.images[1], 0.5)


def test_log_action_only_reports_with_safree(sd, lexical_policy):
    plain = run(sd, UNSAFE).images
    all_actions(lexical_policy, "log")
    safegen.protect(sd, policy=lexical_policy, guards=["safree"])
    out = run(sd, UNSAFE)
    assert out.safety[0].verdict == "log" and np.array_equal(out.images, plain)


@pytest.mark.parametrize("action,verdict", [("block", "block"), ("steer", "steer"), ("log", "log")])
def test_sld_flag_honours_the_action(sd, action, verdict):
    plain = run(sd, [BENIGN, UNSAFE], steps=3).images
    policy = all_actions(safegen.load_policy("default"), action)
    # flag threshold -1: every item's guidance counts as pointing at the concept (the flag always fires)
    safegen.protect(sd, policy=policy, guards=[safegen.SLD.max(flag_threshold=-1.0)])
    out = run(sd, [BENIGN, UNSAFE], steps=3)
    assert [r.verdict for r in out.safety] == [verdict] * 2
    res = out.safety[0].result("sld")
    assert res.category in policy.categories and res.score is not None and math.isfinite(res.score)
    if action == "block":
        assert np.allclose(out.images, 0.5) and "action: block" in res.reason
    elif action == "log":  # log: measured, never steered (equal up to the float rounding of a larger UNet batch)
        assert np.allclose(out.images, plain, atol=1e-5)
    else:
        assert not np.array_equal(out.images, plain)


def test_sld_flag_below_threshold_does_not_block(sd):
    policy = all_actions(safegen.load_policy("default"), "block")
    safegen.protect(sd, policy=policy, guards=[safegen.SLD.max(flag_threshold=1.0)])
    out = run(sd, [BENIGN, UNSAFE], steps=3)
    assert [r.verdict for r in out.safety] == ["steer", "steer"]
    assert all(r.result("sld").category is None for r in out.safety)


def test_latent_guard_check_reports_the_action_the_pipeline_takes(sd):
    head = LatentGuardHead.mean_match(sd.text_encoder.config.hidden_size)
    guard = LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())
    policy = safegen.load_policy("default")
    policy.categories["shocking"].action = "log"
    prompts = [BENIGN, "gore", "vomit"]  # pass, violence (steer → blocked), shocking (log)
    rows = guard.check(prompts, policy, pipe=sd)
    safegen.protect(sd, policy=policy, guards=[guard])
    out = run(sd, prompts)
    assert [r["action"] for r in rows] == ["pass", "block", "log"]
    assert [r.result("latent_guard").verdict for r in out.safety] == [r["action"] for r in rows]


# ---------------------------------------------------------------------- 5. LVD at any step count
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 25])
def test_lvd_can_stop_at_any_step_count(sd, steps):
    guard = _lvd_guard(sd, 10.0)  # every latent looks unsafe
    safegen.protect(sd, guards=[guard])
    out = run(sd, BENIGN, steps=steps)
    res = out.safety[0].result("lvd")
    need = guard.required_for(steps)
    assert out.safety[0].blocked and res.stopped_at_step == need - 1
    assert need == max(1, math.ceil(min(steps, 5) * 0.6))
    assert ("rule_scaled" in res.details) == (steps < 5)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_lvd_last_step_flag_stops_a_short_call(sd, steps):
    """Only the last step's x0 looks unsafe: in a call no longer than the window, that check decides."""
    clf = LatentClassifier(LVDConfig(4, categories=["violence"], model=unet_fingerprint(sd)))
    seen = []

    def forward(x0, noise):
        seen.append(noise)
        last = len(seen) == steps
        return torch.full((x0.shape[0], 1), 10.0 if last else -10.0)

    clf.forward = forward
    safegen.protect(sd, guards=[LVD.from_classifier(clf)])
    out = run(sd, BENIGN, steps=steps)
    assert out.safety[0].blocked and out.safety[0].result("lvd").stopped_at_step == steps - 1


# ---------------------------------------------------------------------- 6. unprotect leaves a clean pipeline
def test_unprotect_is_clean_after_a_guard_fails_in_finish(sd, monkeypatch):
    never = run(sd, [BENIGN, UNSAFE], steps=3).images
    monkeypatch.setattr(safegen.SLD, "finish", lambda self, call: (_ for _ in ()).throw(RuntimeError("boom")))
    safegen.protect(sd, guards=["sld-max"])
    out = run(sd, [BENIGN, UNSAFE], steps=3)
    assert all(r.verdict == "error" for r in out.safety)
    safegen.unprotect(sd)
    assert safegen_hooks(sd) == [] and "_diffusers_hook" not in sd.unet.__dict__
    assert np.array_equal(run(sd, [BENIGN, UNSAFE], steps=3).images, never)


def test_unprotect_removes_what_a_guard_left_behind(sd, caplog):
    never = run(sd, BENIGN).images
    safegen.protect(sd, guards=["safree"])
    add_hook(sd.unet, "safegen.leftover.test", post=lambda m, out: out)  # as a buggy guard would leave it
    with caplog.at_level(logging.WARNING, logger="safegen"):
        safegen.unprotect(sd)
    assert "safegen.leftover.test" in caplog.text
    assert safegen_hooks(sd) == [] and "forward" not in sd.unet.__dict__
    assert np.array_equal(run(sd, BENIGN).images, never)


# ---------------------------------------------------------------------- 11. a true drop-in
def test_fully_blocked_call_leaves_the_call_state_a_plain_call_leaves(sd, lexical_policy):
    all_actions(lexical_policy, "block")
    safegen.protect(sd, policy=lexical_policy, guards=["safree"])
    out = run(sd, UNSAFE, guidance_scale=6.5, guidance_rescale=0.3)
    assert out.safety[0].blocked
    assert sd.guidance_scale == 6.5 and sd.guidance_rescale == 0.3 and sd.do_classifier_free_guidance
    assert sd.num_timesteps == 2 and sd.interrupt is False


def _embeds_only(pipe):
    pe, npe = pipe.encode_prompt(UNSAFE, "cpu", 1, True)
    pipe.text_encoder, pipe.tokenizer = None, None
    return pe, npe


@pytest.mark.parametrize("guard", ["safree", "latent-guard"])
def test_no_text_encoder_is_said_at_protect_time_and_follows_the_policy(sd, guard, caplog):
    pe, npe = _embeds_only(sd)
    with caplog.at_level(logging.WARNING, logger="safegen"):
        safegen.protect(sd, guards=[guard])
    assert "no text encoder" in caplog.text and "embeddings_only" in caplog.text
    out = sd(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=1, output_type="np")
    r = out.safety[0]
    assert r.blocked and r.verdict == "block" and "embeddings_only: block" in r.reason
    policy = safegen.load_policy("default")
    policy.embeddings_only = "allow"
    safegen.protect(sd, policy=policy, guards=[guard])
    out = sd(prompt_embeds=pe, negative_prompt_embeds=npe, num_inference_steps=1, output_type="np")
    r = out.safety[0]
    assert not r.blocked and r.verdict == "log" and "not checked" in r.reason


@pytest.mark.xfail(strict=True, reason="the shipped MiniLM head's evidence path reads 'a squirrel eating a burger' "
                   "as violence (16.3 against a calibrated 12.5; concept score 3.1): CoProV2 labels animal-and-burger "
                   "prompts unsafe, and neither the 1% calibration nor the retrain on benign captions from the whole "
                   "COCO file fixes it; the Latent Guard rework of the trust issue must make this pass")
def test_shipped_latent_guard_passes_diffusers_benign_test_prompt():
    rows = LatentGuard().check(["A painting of a squirrel eating a burger", "a photo of a red bus"])
    assert [r["unsafe"] for r in rows] == [False, False], rows


def test_steered_call_keeps_the_callers_negative_prompt_embeds(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy, guards=["safree"])
    pe, _ = sd.encode_prompt(UNSAFE, "cpu", 1, False)
    outs = []
    for neg in ("a blue bird", "a green field"):
        npe = sd.encode_prompt(neg, "cpu", 1, False)[0]
        out = run(sd, UNSAFE, negative_prompt_embeds=npe)
        assert out.safety[0].verdict == "steer"
        assert "negative_prompt_skipped" in out.safety[0].result("safree").details
        outs.append(out.images)
    assert not np.array_equal(*outs)  # the caller's negative embeddings still count


def test_steered_sdxl_call_keeps_negative_prompt_2(sdxl, lexical_policy):
    safegen.protect(sdxl, policy=lexical_policy, guards=["safree"])
    a = run(sdxl, UNSAFE, negative_prompt="blurry")
    b = run(sdxl, UNSAFE, negative_prompt="blurry", negative_prompt_2="a red bus on a street")
    assert a.safety[0].verdict == "steer" and b.safety[0].verdict == "steer"
    assert not np.array_equal(a.images, b.images)


def test_safree_says_at_protect_time_when_the_encoder_is_too_narrow(sd, caplog, lexical_policy):
    with caplog.at_level(logging.WARNING, logger="safegen"):
        safegen.protect(sd, guards=["safree"])  # tiny CLIP: 32 dimensions, the default policy's thresholds
    assert "cannot be selective" in caplog.text and "32-dimensional" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safegen"):
        # fixed thresholds above any cosine: literal phrases only, selective again (sensitivity scales a budget,
        # so even its lowest setting leaves the gate calibrated, and as unselective, on this encoder)
        safegen.protect(sd, guards=["safree"], policy=lexical_policy)
    assert "cannot be selective" not in caplog.text


def test_step_callback_contract_is_the_pipelines(sd, lexical_policy):
    safegen.protect(sd, policy=lexical_policy, guards=["safree", _lvd_guard(sd, -10.0)])
    seen = []

    def cb(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        return {}

    out = run(sd, UNSAFE, callback_on_step_end=cb)
    assert out.safety[0].verdict == "steer"
    assert seen == [["latents"], ["latents"]]  # not the guards' prompt_embeds
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(sd, UNSAFE, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "not_a_tensor"])
