"""Every guard on the transformer (DiT / MMDiT) image families, on tiny random pipelines:

* SD3: two CLIP encoders and T5 in one joint sequence, a pooled vector, CFG in one batch, flow matching;
* FLUX.1: T5 tokens and a CLIP pooled vector, guidance-distilled (no unconditional branch unless true CFG is asked
  for, which runs it as a second, separate transformer call), latents packed as 2×2-patch tokens.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.lvd import LVD, LatentClassifier

BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore on the street"


@dataclass(frozen=True)
class Family:
    builder: str  # in safegen.testing
    text_args: tuple  # prompt arguments besides `prompt` that condition the model
    rows: int  # transformer rows per item in one call of a default call (2: [uncond; cond] in one batch)
    true_cfg: dict = field(default_factory=dict)  # what turns a separate unconditional call on


FAMILIES = {
    "sd3": Family("tiny_sd3_pipeline", ("prompt_2", "prompt_3"), rows=2),
    "flux": Family("tiny_flux_pipeline", ("prompt_2",), rows=1,
                   true_cfg={"negative_prompt": "a photo of a green field", "true_cfg_scale": 2.0}),
}

# tiny transformers are many small ops: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=list(FAMILIES))
def dit(request):
    from safegen import testing

    fam = FAMILIES[request.param]
    return request.param, fam, getattr(testing, fam.builder)()


def run(pipe, prompts, steps=3, seed=0, **kw):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kw.setdefault("output_type", "np")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * kw.get("num_images_per_prompt", 1))]
    return pipe(prompts, generator=gens, num_inference_steps=steps, **kw)


def record_calls(pipe):
    """Per transformer call: (batch rows, encoder_hidden_states, pooled_projections) as the pipeline passes them."""
    seen = []

    def hook(module, args, kwargs):
        pooled = kwargs.get("pooled_projections")
        seen.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"].clone(),
                     None if pooled is None else pooled.clone()))

    return seen, pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def record_rows(pipe):
    """What the transformer really runs per call, rows other hooks add or drop included: (rows, pooled vectors) at
    its timestep-and-text embedding (SD3: (timestep, pooled); FLUX: (timestep, guidance, pooled))."""
    rows = []
    return rows, pipe.transformer.time_text_embed.register_forward_pre_hook(
        lambda m, a: rows.append((a[0].shape[0], a[-1].clone())))


def count_decodes(pipe):
    calls = []
    return calls, pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))


def classifier(pipe, flag):
    """A one-category ('violence') LVD classifier whose verdict per row is ``flag(x0) -> bool rows``."""
    return LatentClassifier.scripted(pipe, flag)


def encode(kind, pipe, text):
    """(token states, pooled vector) of one prompt, as the pipeline computes them."""
    with torch.no_grad():
        if kind == "sd3":
            pe, _, ppe, _ = pipe.encode_prompt(text, text, text, device="cpu", do_classifier_free_guidance=False)
        else:
            pe, ppe, _ = pipe.encode_prompt(text, text, device="cpu")
    return pe[0], ppe[0]


# ---------------------------------------------------------------------- protect / unprotect, SAFREE


def test_round_trip_bit_identical_and_steering(dit, lexical_policy):
    kind, fam, pipe = dit
    cls = type(pipe)
    plain = run(pipe, [BENIGN, UNSAFE]).images
    never = classifier(pipe, lambda x: torch.zeros(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(), LVD.from_classifier(never)])
    out = run(pipe, [BENIGN, UNSAFE])
    assert np.array_equal(out.images[0], plain[0])  # nothing fired: bit-identical while protected
    assert not np.array_equal(out.images[1], plain[1])  # SAFREE steered the unsafe prompt
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    res = out.safety[1].result("safree")
    assert res.category == "violence" and res.trigger_tokens  # (which tokens trigger is arbitrary: random encoders)
    assert res.details["reattention"] is False
    safegen.unprotect(pipe)
    assert type(pipe) is cls and not safegen.is_protected(pipe)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert "step" not in pipe.scheduler.__dict__ and "decode" not in pipe.vae.__dict__
    assert np.array_equal(run(pipe, [BENIGN, UNSAFE]).images, plain)


def test_safree_filters_the_tokens_then_switches_back(dit, lexical_policy):
    kind, fam, pipe = dit
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(pipe)
    out = run(pipe, UNSAFE, steps=6)
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and 1 <= res.filtered_steps < 6
    safegen.unprotect(pipe)
    pe, ppe = encode(kind, pipe, UNSAFE)
    assert len(seen) == 6 and all(rows == fam.rows for rows, _, _ in seen)
    cond = [ehs[-1] for _, ehs, _ in seen]  # the conditional row is the last one
    pooled = [p[-1] for _, _, p in seen]
    assert not torch.equal(cond[0], pe) and torch.equal(cond[-1], pe)  # filtered first, then switched back
    assert sum(not torch.equal(c, pe) for c in cond) == res.filtered_steps
    assert not torch.equal(pooled[0], ppe)  # the pooled vector lost the concept span too
    if kind == "sd3":  # each encoder's block of the joint sequence is filtered in its own space
        clip_len, width = pipe.tokenizer_max_length, pipe.text_encoder.config.hidden_size
        assert not torch.equal(cond[0][:clip_len, :width], pe[:clip_len, :width])
        assert not torch.equal(cond[0][:clip_len, width:2 * width], pe[:clip_len, width:2 * width])
        assert not torch.equal(cond[0][clip_len:], pe[clip_len:])
        assert torch.equal(cond[0][:clip_len, 2 * width:], pe[:clip_len, 2 * width:])  # the zero padding stays
        assert torch.equal(pooled[-1], ppe) and "pooled_note" not in res.details  # switched back with the tokens
        assert "blood" in res.details["negative_prompt"]
        assert not torch.equal(seen[0][1][0], encode(kind, pipe, "")[0])  # the uncond row reads the keywords
    else:  # FLUX's step callback cannot take the pooled vector back: projected on every step, and said so
        assert torch.equal(pooled[-1], pooled[0]) and "pooled vector" in res.details["pooled_note"]


def test_safree_keywords_reach_a_separate_unconditional_call():
    """FLUX with true CFG: the negative branch is its own transformer call, and a steered prompt's negative prompt
    gains the concept keywords there."""
    from safegen.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    fam = FAMILIES["flux"]
    plain_seen, h = record_calls(pipe)
    run(pipe, UNSAFE, steps=2, **fam.true_cfg)
    h.remove()
    policy = safegen.load_policy("default")
    for cat in policy.categories.values():
        cat.thresholds["safree"] = 2.0
    safegen.protect(pipe, policy=policy, guards=["safree"])
    seen, h = record_calls(pipe)
    out = run(pipe, UNSAFE, steps=2, **fam.true_cfg)
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.details["negative_prompt"].startswith(fam.true_cfg["negative_prompt"])
    assert len(seen) == len(plain_seen) == 4  # [cond, uncond] per step
    assert not torch.equal(seen[1][1], plain_seen[1][1])  # the unconditional call reads the keywords
    assert torch.equal(seen[3][1], seen[1][1])  # on every step


def _prompt_args():
    return [(k, a) for k, f in FAMILIES.items() for a in f.text_args]


@pytest.mark.parametrize("kind,arg", _prompt_args(), ids=[f"{k}-{a}" for k, a in _prompt_args()])
def test_safree_reads_every_prompt_argument(kind, arg, lexical_policy):
    from safegen import testing

    pipe = getattr(testing, FAMILIES[kind].builder)()
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    out = run(pipe, BENIGN, steps=2, **{arg: UNSAFE})
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.category == "violence"
    assert run(pipe, BENIGN, steps=2, **{arg: "a photo of a green field"}).safety[0].verdict == "pass"


def test_batched_prompts_and_images_per_prompt(dit, lexical_policy):
    kind, fam, pipe = dit
    prompts = [BENIGN, UNSAFE, "a nude woman on the beach"]
    plain = run(pipe, prompts).images
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    out = run(pipe, prompts)
    assert [r.verdict for r in out.safety] == ["pass", "steer", "steer"]
    assert out.safety[2].result("safree").category == "sexual"
    assert np.array_equal(out.images[0], plain[0]) and not np.array_equal(out.images[1:], plain[1:])
    single = run(pipe, UNSAFE)  # each prompt's conditioning is its own
    assert single.safety[0].result("safree").trigger_tokens == out.safety[1].result("safree").trigger_tokens
    two = run(pipe, prompts[:2], steps=1, num_images_per_prompt=2)
    assert len(two.images) == len(two.safety) == 4
    assert [r.verdict for r in two.safety] == ["pass", "pass", "steer", "steer"]


# ---------------------------------------------------------------------- Latent Guard, LVD, SLD, output


def test_latent_guard_blocks_with_no_transformer_call(dit):
    kind, fam, pipe = dit
    from safegen.guards.latent_guard import LatentGuard, LatentGuardHead

    policy = safegen.load_policy("default")
    policy.add_concept("violence", "a purple giraffe")
    head = LatentGuardHead.mean_match(pipe.text_encoder.config.hidden_size)
    guard = LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())
    plain = run(pipe, [BENIGN, "a purple giraffe"]).images
    safegen.protect(pipe, policy=policy, guards=[guard])
    seen, h = record_calls(pipe)
    out = run(pipe, [BENIGN, "a purple giraffe"])
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert out.safety[1].unet_steps_run == 0 and out.safety[1].result("latent_guard").concept == "a purple giraffe"
    assert all(rows == fam.rows for rows, _, _ in seen)  # only the benign item's rows ever ran
    assert np.allclose(out.images[0], plain[0], atol=1e-5) and np.allclose(out.images[1], 0.5)
    seen.clear()
    for output_type in ("np", "pt", "pil", "latent"):  # everything blocked: no transformer call, same output types
        ref = run(pipe, BENIGN, steps=1, output_type=output_type).images
        blocked = run(pipe, "a purple giraffe", steps=1, output_type=output_type).images
        if output_type == "pil":
            assert blocked[0].size == ref[0].size and blocked[0].getpixel((0, 0)) == (128, 128, 128)
        else:
            assert type(blocked) is type(ref) and tuple(blocked.shape) == tuple(ref.shape)
    assert len(seen) == 4  # the four 1-step benign calls only
    h.remove()


def test_latent_guard_reads_the_last_prompt_argument(dit):
    kind, fam, pipe = dit
    safegen.protect(pipe, guards=["latent-guard"])  # the shipped MiniLM head
    out = run(pipe, BENIGN, steps=1, **{fam.text_args[-1]: "a photo of blood and gore"})
    assert out.safety[0].verdict == "block" and out.safety[0].result("latent_guard").category == "violence"


def test_lvd_stop_at_step_k_runs_k_plus_1_calls_and_no_decode(dit):
    kind, fam, pipe = dit
    plain = run(pipe, [BENIGN, UNSAFE], steps=6).images
    seen_x0 = []

    def every(x):
        seen_x0.append(tuple(x.shape))
        return torch.ones(x.shape[0], dtype=torch.bool)

    safegen.protect(pipe, guards=[LVD.from_classifier(classifier(pipe, every), window=4, ratio=0.5)])
    seen, h = record_calls(pipe)
    decodes, h2 = count_decodes(pipe)
    out = run(pipe, [BENIGN, UNSAFE], steps=6)
    h.remove(), h2.remove()
    k = 1
    assert [r.result("lvd").stopped_at_step for r in out.safety] == [k, k]
    assert len(seen) == k + 1 and decodes == []
    assert [r.unet_steps_run for r in out.safety] == [k + 1] * 2
    assert out.images.shape == plain.shape and np.allclose(out.images, 0.5)
    assert pipe._interrupt is False
    assert seen_x0[0] == (2, 4, 16, 16)  # latent images (FLUX's packed tokens unpacked), whatever the layout


def test_lvd_stops_one_item_and_the_rest_runs_on(dit):
    kind, fam, pipe = dit
    plain = run(pipe, [BENIGN, UNSAFE], steps=5).images

    def flag(x):  # flag item 1 while both items are checked
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        if x.shape[0] == 2:
            hit[1] = True
        return hit

    safegen.protect(pipe, guards=[LVD.from_classifier(classifier(pipe, flag), window=4, ratio=0.5)])
    seen, h = record_rows(pipe)
    decodes, h2 = count_decodes(pipe)
    out = run(pipe, [BENIGN, UNSAFE], steps=5)
    h.remove(), h2.remove()
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    r = fam.rows
    assert [rows for rows, _ in seen] == [2 * r, 2 * r, r, r, r]  # the stopped item's rows left after step 1
    assert np.allclose(out.images[0], plain[0], atol=1e-5) and np.allclose(out.images[1], 0.5)
    assert decodes == [1]  # only the running item was decoded


def test_lvd_reads_x0_from_the_flow_prediction(dit):
    """x̂0 = x_t − σ·v with the scheduler's σ of the step: on the last step of a flow-matching Euler schedule
    (σ_next = 0) the scheduler's own update lands exactly on it."""
    kind, fam, pipe = dit
    from safegen.guards.lvd import predicted_x0

    s = pipe.scheduler
    s.set_timesteps(4)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    s._step_index = len(s.timesteps) - 1
    x0, noise = predicted_x0(s, v, s.timesteps[-1], x)
    assert torch.allclose(x0, s.step(v, s.timesteps[-1], x).prev_sample, atol=1e-6)
    assert 0 < noise < 1


def test_sld_adds_a_safety_concept_row_with_its_pooled_vector(dit):
    kind, fam, pipe = dit
    kw = fam.true_cfg  # FLUX: SLD guides against the unconditional branch true CFG adds
    plain = run(pipe, [BENIGN], **kw).images
    safegen.protect(pipe, guards=[safegen.SLD.max()])
    seen, h = record_rows(pipe)
    out = run(pipe, [BENIGN], **kw)
    h.remove()
    assert out.safety[0].verdict == "steer"
    concept = encode(kind, pipe, out.safety[0].result("sld").details["concept"])[1]
    if kind == "sd3":
        assert [rows for rows, _ in seen] == [3] * 3  # uncond, cond, concept in one call
        pooled = seen[0][1]
    else:
        assert [rows for rows, _ in seen] == [2, 1] * 3  # (cond, concept), then uncond, on each step
        pooled = seen[0][1]
    assert torch.equal(pooled[-1], concept) and not torch.equal(pooled[-1], pooled[-2])  # its own pooled vector
    assert not np.array_equal(out.images, plain)
    safegen.unprotect(pipe)
    assert np.array_equal(run(pipe, [BENIGN], **kw).images, plain)


def test_sld_on_flux_guides_through_the_unconditional_call_exactly(monkeypatch):
    """With true CFG the pipeline computes ε_u + s·(ε_p − ε_u) from two separate calls; SLD rewrites ε_u so that
    this line gives ε_u + s·(ε_p' − ε_u) with SLD's ε_p'. With a stand-in ε_p' = ε_p + 1 the noise prediction
    the scheduler receives moves by exactly s."""
    import safegen.guards.sld as sld_module
    from safegen.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    kw = dict(FAMILIES["flux"].true_cfg, true_cfg_scale=2.5)

    def capture():
        seen = []
        original = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            seen.append(model_output.clone())
            return original(model_output, *args, **kwargs)

        pipe.scheduler.step = step
        return seen

    plain = capture()
    run(pipe, BENIGN, steps=2, **kw)
    del pipe.scheduler.step
    monkeypatch.setattr(sld_module, "sld_guidance", lambda eps_u, eps_p, eps_s, nu, step, **k: (eps_p + 1.0, nu))
    safegen.protect(pipe, guards=[safegen.SLD(warmup_steps=0, momentum_scale=0.0)])
    guided = capture()
    run(pipe, BENIGN, steps=2, **kw)
    assert torch.allclose(guided[0] - plain[0], torch.full_like(plain[0], 2.5), atol=1e-4)


def test_sld_on_flux_without_true_cfg_is_a_clear_error():
    from safegen.testing import tiny_flux_pipeline

    pipe = safegen.protect(tiny_flux_pipeline(), guards=["sld"])
    seen, h = record_calls(pipe)
    out = run(pipe, BENIGN, steps=2)
    h.remove()
    r = out.safety[0]
    assert r.verdict == "error" and r.blocked and "true_cfg_scale" in r.reason and "negative_prompt" in r.reason
    assert seen == []  # failed closed before the loop


def test_output_guard_and_default_policy_run(dit):
    kind, fam, pipe = dit
    safegen.protect(pipe, policy="default")  # LVD has no classifier for this model: skipped, and said so
    out = run(pipe, [BENIGN, UNSAFE], steps=1)
    assert out.safety[1].verdict == "block" and out.safety[1].result("latent_guard").verdict == "block"
    skipped = out.safety[0].result("lvd")
    assert skipped.verdict == "pass" and "skipped" in skipped.reason
    assert out.safety[0].result("output") is not None


@pytest.mark.parametrize("model,cls", [("tiny-sd3", "SD3Transformer2DModel"), ("tiny-flux", "FluxTransformer2DModel")])
def test_cli_train_lvd_on_a_dit_then_protect(tiny_prompt_data, capsys, model, cls):
    """``safegen train-lvd --model M`` records flow-matching x̂0 trajectories (FLUX's unpacked) and trains a
    classifier that loads on that pipeline (and only there)."""
    import json

    from safegen.cli import main
    from safegen.loading import TINY_MODELS
    from safegen import testing

    out = tiny_prompt_data / "lvd.safetensors"
    code = main(["train-lvd", "--model", model, "--data-dir", str(tiny_prompt_data), "--prompts", "6", "--steps", "3",
                 "--window", "2", "--train-steps", "2", "--batch-size", "4", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out[cap.out.index("{"):])["window"] == 2
    clf = LatentClassifier.load(out)
    assert clf.config.model["class"] == cls and clf.metadata["trained_on"] == model
    assert clf.config.latent_channels == 4
    pipe = safegen.protect(getattr(testing, TINY_MODELS[model])(), guards=[LVD(weights=str(out), window=2)])
    assert len(run(pipe, [BENIGN, UNSAFE], steps=2).safety) == 2
    with pytest.raises(Exception, match="another model's latents"):
        safegen.protect(testing.tiny_sd_pipeline(), guards=[LVD(weights=str(out))])


def test_safree_encodes_t5_copies_at_their_content_length():
    """On an encoder that attends to its padding and pads to more than 77 tokens (T5 in SD3/FLUX/CogVideoX), the
    masked copies and concept phrases are encoded only as long as the text by default: a 512-token pass per copy
    is what made a steered prompt cost many denoiser steps. ``copies_length="full"`` keeps the exact space. (The
    paper's masked-copy rule, which ``trigger_rule="auto"`` leaves to CLIP-length encoders.)"""
    from safegen.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    lengths = []
    h = pipe.text_encoder_2.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    policy = safegen.load_policy("default")
    for cat in policy.categories.values():
        cat.thresholds["safree"] = 2.0
    for mode, expect_short in (("auto", True), ("full", False)):
        safegen.protect(pipe, policy=policy, guards=[safegen.Safree(copies_length=mode, calibrate=False,
                                                                    trigger_rule="masked")])
        run(pipe, UNSAFE, steps=1)  # builds the concept spaces, masks the copies
        lengths.clear()
        out = run(pipe, UNSAFE, steps=1)
        assert out.safety[0].verdict == "steer"
        extra = [n for n in lengths if n != 512]  # the pipeline's own encode is always 512 long
        assert bool(extra) == expect_short and all(n < 40 for n in extra)
        safegen.unprotect(pipe)
    h.remove()
    with pytest.raises(ValueError, match="copies_length"):
        safegen.Safree(copies_length="half")
    from safegen.encoders import conditioning_streams

    ad = conditioning_streams(tiny_flux_pipeline(), "flux", max_len=512)[-1].adapter
    assert safegen.Safree()._short(ad) and not safegen.Safree(copies_length="full")._short(ad)


def test_safree_finds_t5_triggers_from_its_token_states(lexical_policy):
    """``trigger_rule="auto"``: SD3's two CLIP encoders keep the paper's masked copies, its T5 (256 positions) finds
    trigger tokens from its own token states, so a steered call runs T5 no more often than an unprotected one; the
    report names the rule per encoder, and ``"masked"`` brings T5's copies back."""
    from safegen.testing import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    calls = {n: [] for n in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    hooks = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, n=n: calls[n].append(a[0].shape[0]))
             for n in calls]

    def rows_per_encoder():
        run(pipe, UNSAFE, steps=1)  # builds the concept spaces (cached per protection)
        for v in calls.values():
            v.clear()
        out = run(pipe, UNSAFE, steps=1)
        res = out.safety[0].result("safree") if hasattr(out, "safety") else None
        return res, {n: sum(v) for n, v in calls.items()}

    _, plain = rows_per_encoder()
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(calibrate=False)])
    res, auto = rows_per_encoder()
    safegen.unprotect(pipe)
    assert res.verdict == "steer" and res.trigger_tokens
    assert res.details["trigger_rule"] == {"text_encoder": "masked", "text_encoder_2": "masked",
                                           "text_encoder_3": "states"}
    assert auto["text_encoder_3"] == plain["text_encoder_3"]  # no masked copies of T5
    assert auto["text_encoder"] > plain["text_encoder"] and auto["text_encoder_2"] > plain["text_encoder_2"]
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(trigger_rule="masked", calibrate=False)])
    res, masked = rows_per_encoder()
    safegen.unprotect(pipe)
    assert set(res.details["trigger_rule"].values()) == {"masked"}
    assert masked["text_encoder_3"] > plain["text_encoder_3"]
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="trigger_rule"):
        safegen.Safree(trigger_rule="cheap")
    with pytest.raises(ValueError, match="trigger_rule"):
        safegen.Safree(official=True, trigger_rule="states")


def test_safree_token_state_rule_triggers_the_tokens_inside_the_concept_span():
    """The token-state rule on hand-made states: the one content token that reaches into the concept span further
    than the prompt's other tokens triggers and loses its concept component; tokens outside the content (padding)
    never trigger, and a common part every state shares (here a concept component of 1 in all of them) does not
    make every token a trigger."""
    from types import SimpleNamespace

    D, L = 6, 8
    basis = torch.zeros(D, 1)
    basis[0, 0] = 1.0  # the concept span: the first axis
    tokens = torch.zeros(1, L, D)
    tokens[0, :, 1] = 1.0  # every position points along a neutral axis ...
    tokens[0, :, 0] = 1.0  # ... with a common part inside the concept span ...
    tokens[0, 2, 0] = 3.0  # ... the third content token mostly along the concept
    tokens[0, 6, 0] = 5.0  # padding inside the concept span: not content, never a trigger
    sb = SimpleNamespace(first=0, n_content=torch.tensor([4]))
    trig, projected = safegen.Safree()._analyse_states(sb, tokens, basis)
    assert trig.tolist() == [[False, False, True, False]]
    assert torch.allclose(projected[0, 2], torch.tensor([0.0, 1.0, 0, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(projected[0, 0], torch.tensor([0.0, 1.0, 0, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(projected[0, 7], tokens[0, 7] * torch.tensor([0.0, 1, 1, 1, 1, 1]), atol=1e-6)


def test_safree_encodes_each_keyword_negative_prompt_once(dit, lexical_policy):
    """Steered prompts of the same categories share one keyword negative prompt: it is encoded once per
    protection, and a later call's unconditional row is exactly the first call's."""
    kind, fam, pipe = dit
    kw = fam.true_cfg if kind == "flux" else {}
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(pipe)
    first = run(pipe, UNSAFE, steps=1, **kw)
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    other = "a photo of gore and blood in a city"
    second = run(pipe, other, steps=1, **kw)
    cached = len(calls)
    for key in [k for k in pipe._safegen.cache if isinstance(k, tuple) and k and k[0] == "safree-negative"]:
        del pipe._safegen.cache[key]
    calls.clear()
    run(pipe, other, steps=1, **kw)
    handle.remove()
    h.remove()
    assert first.safety[0].verdict == second.safety[0].verdict == "steer"
    assert first.safety[0].result("safree").details["negative_prompt"] == \
        second.safety[0].result("safree").details["negative_prompt"]
    assert len(calls) == cached + 1  # without the cache the keyword negative prompt is encoded again
    uncond = [ehs for _, ehs, _ in seen]
    if kind == "sd3":
        assert torch.equal(uncond[0][0], uncond[1][0])
    else:  # FLUX: the unconditional branch is the second call of each step
        assert torch.equal(uncond[1][0], uncond[3][0])


# ---------------------------------------------------------------------- SafetyDPO on the transformer
def test_safetydpo_expert_trains_with_flow_dpo_fuses_and_undoes(dit, tmp_path):
    """Preference pairs hold the transformer's own final latents (FLUX's packed tokens) and the pooled vectors;
    a short flow-matching Diffusion-DPO run makes a transformer LoRA that diffusers' loader fuses, that prefers
    the preferred images more than the frozen model does, and whose undo is bit-exact."""
    import math

    from safegen.lora import read_lora
    from safegen.training import safetydpo as sd_mod

    kind, fam, pipe = dit
    pairs = [("a photo of blood and gore", "a photo of a red bus", "violence"),
             ("a photo of a man killing a dog", "a photo of a man walking a dog", "violence")]
    data, stats = sd_mod.make_preference_pairs(pipe, pairs, judge=lambda p, img: (False, None), steps=2,
                                               verify=False, progress=False)
    assert stats["kept"] == 2 and data.kind == kind and data.size == (32, 32)
    direct = pipe(prompt=pairs[0][1], generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                  output_type="latent").images
    assert torch.allclose(data.preferred[:1], direct, atol=1e-5)  # the step callback's last latents: the output's
    assert data.pooled.shape[0] == 2 and data.empty_pooled.shape[0] == 1
    saved = PreferencePairsRoundTrip(data, tmp_path)
    assert saved.kind == kind and saved.size == data.size and torch.equal(saved.pooled, data.pooled)

    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    out = tmp_path / "expert.safetensors"
    summary = sd_mod.train_expert(pipe, data, out=out, category="violence", steps=30, batch_size=2, lr=3e-3,
                                  beta=500.0, empty_share=0.0, progress=False)
    assert summary["target"] == "velocity" and len(summary["losses"]) == 30
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())  # adapter removed
    _, meta = read_lora(out, pipe.transformer, component="transformer")
    assert meta["component"] == "transformer" and meta["family"] == kind

    # on a fixed (σ, noise) batch the fused LoRA beats the frozen transformer: loss below log 2
    family = sd_mod._Family(pipe)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, family.n_train, (2,), generator=g)
    noise = torch.randn(data.preferred.shape, generator=g)
    xw, t, tw = family.noised(data.preferred, noise, idx)
    xl, _, tl = family.noised(data.dispreferred, noise, idx)
    cond, pooled = data.conditioning(torch.arange(2), torch.zeros(2, dtype=torch.bool))
    x, tt, cc, pp = torch.cat([xw, xl]), torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([pooled, pooled])
    plain = run(pipe, BENIGN)
    with torch.no_grad():
        ref = family(x, tt, cc, pp, data.size)
        safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(out))])
        assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())  # fused and unloaded
        pol = family(x, tt, cc, pp, data.size)
        steered = run(pipe, BENIGN)
        assert steered.safety[0].result("safetydpo").verdict == "steer"
        safegen.unprotect(pipe)
    loss, _ = sd_mod.dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], tw, 500.0, target_l=tl)
    assert float(loss) < math.log(2) - 0.05
    assert not np.allclose(steered.images, plain.images)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    assert np.array_equal(run(pipe, BENIGN).images, plain.images)


def PreferencePairsRoundTrip(data, tmp_path):
    from safegen.training.safetydpo import PreferencePairs

    return PreferencePairs.load(data.save(tmp_path / "pairs.safetensors"))


def test_flow_dpo_loss_compares_each_image_with_its_own_velocity():
    from safegen.training.safetydpo import dpo_loss

    x0_w, x0_l, eps = torch.zeros(1, 2), torch.ones(1, 2), torch.full((1, 2), 0.5)
    vw, vl = eps - x0_w, eps - x0_l
    # a policy exact on both velocities against a reference off by 0.1 on the preferred one only
    loss, acc = dpo_loss(vw, vl, vw + 0.1, vl, vw, 100.0, target_l=vl)
    assert float(acc) == 1.0 and float(loss) == pytest.approx(math.log1p(math.exp(-0.5 * 100 * 0.01)), rel=1e-5)
    # the policy got better than the reference at the dispreferred image: a loss above log 2 against each image's
    # own velocity; against the preferred image's velocity for both it would look like the opposite
    right = float(dpo_loss(vw, vl, vw, vl + 0.1, vw, 100.0, target_l=vl)[0])
    wrong = float(dpo_loss(vw, vl, vw, vl + 0.1, vw, 100.0)[0])
    assert right > math.log(2) > wrong


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_cli_train_experts_and_comerge_on_a_dit(tmp_path, capsys, model):
    """``train-expert`` and ``merge-experts --method comerge`` run end to end on a DiT; the merged transformer LoRA
    protects that pipeline, and a UNet LoRA is refused there (and the DiT's on a UNet model)."""
    import json

    from safegen import testing
    from safegen.cli import main
    from safegen.lora import LoRAFileError
    from safegen.loading import TINY_MODELS

    rows = ["prompt,image,category"]
    for i, (u, s, cat) in enumerate([("blood and gore", "a red bus", "Violence"),
                                     ("a man killing a dog", "a man walking a dog", "Violence"),
                                     ("a nude woman", "a woman", "sexual"), ("a naked man", "a man", "sexual")]):
        rows += [f"{u},u_idx_{i:07d}_0.jpg,{cat}", f"{s},s_idx_{i:07d}_0.jpg,{cat}"]
    (tmp_path / "CoProv2_train.csv").write_text("\n".join(rows) + "\n")
    base = ["--model", model, "--data-dir", str(tmp_path), "--steps", "2", "--train-steps", "2", "--batch-size", "2",
            "--no-verify"]
    files = {}
    for cat in ("violence", "sexual"):
        files[cat] = tmp_path / f"{cat}.safetensors"
        assert main(["train-expert", "--category", cat, "--out", str(files[cat]),
                     "--save-pairs", str(tmp_path / f"pairs-{cat}.safetensors"), *base]) == 0
        assert json.loads(capsys.readouterr().out)["target"] == "velocity"
    from safegen.training.safetydpo import PreferencePairs

    both = [PreferencePairs.load(tmp_path / f"pairs-{c}.safetensors") for c in ("violence", "sexual")]
    joined = PreferencePairs(torch.cat([b.preferred for b in both]), torch.cat([b.dispreferred for b in both]),
                             torch.cat([b.embeds for b in both]), both[0].empty, both[0].prompts + both[1].prompts,
                             both[0].categories + both[1].categories, torch.cat([b.pooled for b in both]),
                             both[0].empty_pooled, both[0].kind, both[0].size)
    joined.save(tmp_path / "pairs.safetensors")
    merged = tmp_path / "merged.safetensors"
    code = main(["merge-experts", str(files["violence"]), str(files["sexual"]), "--method", "comerge", "--model", model,
                 "--pairs-file", str(tmp_path / "pairs.safetensors"), "--out", str(merged)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out)["categories"] == ["violence", "sexual"]
    pipe = getattr(testing, TINY_MODELS[model])()
    safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(merged))])
    out = run(pipe, BENIGN, steps=2)
    assert out.safety[0].result("safetydpo").details["categories"] == ["sexual", "violence"]
    safegen.unprotect(pipe)
    # a LoRA of another denoiser: refused before anything changes
    from safegen.lora import _lora_modules, save_lora

    unet = testing.tiny_sd_pipeline()
    sd_lora = save_lora(tmp_path / "sd.safetensors", {n: (torch.zeros(2, m.in_features), torch.zeros(m.out_features, 2))
                                                      for n, m in _lora_modules(unet.unet).items()})
    with pytest.raises(LoRAFileError, match="made for a pipeline's unet"):
        safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(sd_lora))])
    with pytest.raises(LoRAFileError, match="made for a pipeline's transformer"):
        safegen.protect(unet, guards=[safegen.SafetyDPO(merged=str(merged))])
    assert not safegen.is_protected(pipe) and not safegen.is_protected(unet)


def test_safetydpo_says_which_families_it_trains_and_fuses():
    from safegen import testing
    from safegen.training.safetydpo import PreferencePairs, train_expert

    wan = testing.tiny_wan_pipeline()
    data = PreferencePairs(torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 4, 2, 4, 4), torch.zeros(1, 4, 32),
                           torch.zeros(1, 4, 32), ["x"], ["violence"])
    with pytest.raises(ValueError, match=r"trains experts for SD 1\.x/2\.x, SD3/SD3\.5, FLUX\.1; WanPipeline"):
        train_expert(wan, data, out="x.safetensors", steps=1, progress=False)
    sd3 = testing.tiny_sd3_pipeline()
    with pytest.raises(ValueError, match="made with a SD 1.x/2.x pipeline and this one is SD3/SD3.5"):
        train_expert(sd3, data, out="x.safetensors", steps=1, progress=False)
    wan22 = testing.tiny_wan_pipeline(two_experts=True)
    with pytest.raises(TypeError, match="switches between transformer and transformer_2"):
        safegen.protect(wan22, guards=[safegen.SafetyDPO(merged="x.safetensors")])
    assert not safegen.is_protected(wan22)
