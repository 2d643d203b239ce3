"""Every guard on the transformer (DiT / MMDiT) image families, on tiny random pipelines: SD3 (two CLIP encoders and
T5 in one joint sequence, a pooled vector, CFG in one batch, flow matching)."""

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.lvd import LVD, LatentClassifier

BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore on the street"

#: name -> builder in safegen.testing
DIT = {"sd3": "tiny_sd3_pipeline"}


# tiny transformers are many small ops: a second thread only adds synchronisation
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=list(DIT))
def dit(request):
    from safegen import testing

    return request.param, getattr(testing, DIT[request.param])()


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
    its timestep-and-text embedding."""
    rows = []
    return rows, pipe.transformer.time_text_embed.register_forward_pre_hook(
        lambda m, a: rows.append((a[1].shape[0], a[1].clone())))


def count_decodes(pipe):
    calls = []
    return calls, pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))


def classifier(pipe, flag):
    """A one-category ('violence') LVD classifier whose verdict per row is ``flag(x0) -> bool rows``."""
    return LatentClassifier.scripted(pipe, flag)


# ---------------------------------------------------------------------- protect / unprotect, SAFREE


def test_round_trip_bit_identical_and_steering(dit, lexical_policy):
    kind, pipe = dit
    cls = type(pipe)
    plain = run(pipe, [BENIGN, UNSAFE]).images
    never = classifier(pipe, lambda x: torch.zeros(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(), LVD.from_classifier(never)])
    out = run(pipe, [BENIGN, UNSAFE])
    assert np.array_equal(out.images[0], plain[0])  # nothing fired: bit-identical while protected
    assert not np.array_equal(out.images[1], plain[1])  # SAFREE steered the unsafe prompt
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    res = out.safety[1].result("safree")
    assert res.category == "violence" and "blood" in res.trigger_tokens
    assert res.details["reattention"] is False
    safegen.unprotect(pipe)
    assert type(pipe) is cls and not safegen.is_protected(pipe)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert "step" not in pipe.scheduler.__dict__ and "decode" not in pipe.vae.__dict__
    assert np.array_equal(run(pipe, [BENIGN, UNSAFE]).images, plain)


def test_safree_filters_every_stream_then_switches_back(dit, lexical_policy):
    kind, pipe = dit
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(pipe)
    out = run(pipe, UNSAFE, steps=6)
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and 1 <= res.filtered_steps < 6
    assert "blood" in res.details["negative_prompt"]
    safegen.unprotect(pipe)
    with torch.no_grad():
        pe, npe, ppe, nppe = pipe.encode_prompt(UNSAFE, UNSAFE, UNSAFE, device="cpu", do_classifier_free_guidance=True)
    assert len(seen) == 6 and all(rows == 2 for rows, _, _ in seen)  # [uncond; cond] in one batch
    cond = [ehs[1] for _, ehs, _ in seen]
    pooled = [p[1] for _, _, p in seen]
    clip_len = pipe.tokenizer_max_length
    first = cond[0]
    # the filtered conditioning changes the CLIP-L and bigG halves of the first 77 positions and the T5 positions
    width = pipe.text_encoder.config.hidden_size
    assert not torch.equal(first[:clip_len, :width], pe[0, :clip_len, :width])
    assert not torch.equal(first[:clip_len, width:2 * width], pe[0, :clip_len, width:2 * width])
    assert not torch.equal(first[clip_len:], pe[0, clip_len:])
    assert torch.equal(first[:clip_len, 2 * width:], pe[0, :clip_len, 2 * width:])  # SD3's zero padding stays zero
    assert not torch.equal(pooled[0], ppe[0])  # the pooled vector lost the concept span too...
    assert torch.equal(cond[-1], pe[0]) and torch.equal(pooled[-1], ppe[0])  # ...and both switched back
    assert sum(not torch.equal(c, pe[0]) for c in cond) == res.filtered_steps
    assert not torch.equal(seen[0][1][0], npe[0])  # uncond row: the concept keywords


@pytest.mark.parametrize("arg", ["prompt_2", "prompt_3"])
def test_safree_reads_every_prompt_argument(dit, lexical_policy, arg):
    kind, pipe = dit
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    out = run(pipe, BENIGN, **{arg: UNSAFE})
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.category == "violence"
    assert run(pipe, BENIGN, **{arg: "a photo of a green field"}).safety[0].verdict == "pass"


def test_batched_prompts_and_images_per_prompt(dit, lexical_policy):
    kind, pipe = dit
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
    kind, pipe = dit
    from safegen.guards.latent_guard import LatentGuard, LatentGuardHead

    policy = safegen.load_policy("default")
    policy.add_concept("violence", "a purple giraffe")
    hidden = pipe.text_encoder.config.hidden_size
    head = LatentGuardHead.mean_match(hidden)
    guard = LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())
    plain = run(pipe, [BENIGN, "a purple giraffe"]).images
    safegen.protect(pipe, policy=policy, guards=[guard])
    seen, h = record_calls(pipe)
    out = run(pipe, [BENIGN, "a purple giraffe"])
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert out.safety[1].unet_steps_run == 0 and out.safety[1].result("latent_guard").concept == "a purple giraffe"
    assert all(rows == 2 for rows, _, _ in seen)  # only the benign item's two CFG rows ever ran
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


def test_latent_guard_reads_prompt_3(dit):
    kind, pipe = dit
    safegen.protect(pipe, guards=["latent-guard"])  # the shipped MiniLM head
    out = run(pipe, BENIGN, steps=1, prompt_3="a photo of blood and gore")
    assert out.safety[0].verdict == "block" and out.safety[0].result("latent_guard").category == "violence"


def test_lvd_stop_at_step_k_runs_k_plus_1_calls_and_no_decode(dit):
    kind, pipe = dit
    plain = run(pipe, [BENIGN, UNSAFE], steps=6).images
    every = classifier(pipe, lambda x: torch.ones(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, guards=[LVD.from_classifier(every, window=4, ratio=0.5)])  # 2 of 4 → stop after step 1
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


def test_lvd_stops_one_item_and_the_rest_runs_on(dit):
    kind, pipe = dit
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
    assert [rows for rows, _ in seen] == [4, 4, 2, 2, 2]  # the stopped item's CFG rows left after step 1
    assert np.allclose(out.images[0], plain[0], atol=1e-5) and np.allclose(out.images[1], 0.5)
    assert decodes == [1]  # only the running item was decoded


def test_lvd_reads_x0_from_the_flow_prediction(dit):
    """x̂0 = x_t − σ·v with the scheduler's σ of the step: on the last step of a flow-matching Euler schedule
    (σ_next = 0) the scheduler's own update lands exactly on it."""
    kind, pipe = dit
    from safegen.guards.lvd import predicted_x0

    s = pipe.scheduler
    s.set_timesteps(4)
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    s._step_index = len(s.timesteps) - 1
    x0, noise = predicted_x0(s, v, s.timesteps[-1], x)
    assert torch.allclose(x0, s.step(v, s.timesteps[-1], x).prev_sample, atol=1e-6)
    assert 0 < noise < 1


def test_sld_adds_a_safety_concept_row_with_its_pooled_vector(dit):
    kind, pipe = dit
    plain = run(pipe, [BENIGN]).images
    safegen.protect(pipe, guards=[safegen.SLD.max()])
    seen, h = record_rows(pipe)
    out = run(pipe, [BENIGN])
    h.remove()
    assert out.safety[0].verdict == "steer" and [rows for rows, _ in seen] == [3] * 3  # uncond, cond, concept
    pooled = seen[0][1]
    with torch.no_grad():
        concept = pipe.encode_prompt(out.safety[0].result("sld").details["concept"], None, None, device="cpu",
                                     do_classifier_free_guidance=False)[2]
    assert torch.equal(pooled[2], concept[0]) and not torch.equal(pooled[2], pooled[1])  # its own pooled vector
    assert not np.array_equal(out.images, plain)
    safegen.unprotect(pipe)
    assert np.array_equal(run(pipe, [BENIGN]).images, plain)


def test_output_guard_and_default_policy_run(dit):
    kind, pipe = dit
    safegen.protect(pipe, policy="default")  # LVD has no classifier for this model: skipped, and said so
    out = run(pipe, [BENIGN, UNSAFE], steps=1)
    assert out.safety[1].verdict == "block" and out.safety[1].result("latent_guard").verdict == "block"
    skipped = out.safety[0].result("lvd")
    assert skipped.verdict == "pass" and "skipped" in skipped.reason
    assert out.safety[0].result("output") is not None


def test_cli_train_lvd_on_a_dit_then_protect(tiny_prompt_data, capsys):
    """``safegen train-lvd --model tiny-sd3`` records flow-matching x̂0 trajectories and trains a classifier that
    loads on that pipeline (and only there)."""
    import json

    from safegen.cli import main
    from safegen.testing import tiny_sd3_pipeline, tiny_sd_pipeline

    out = tiny_prompt_data / "lvd.safetensors"
    code = main(["train-lvd", "--model", "tiny-sd3", "--data-dir", str(tiny_prompt_data), "--prompts", "6", "--steps", "3",
                 "--window", "2", "--train-steps", "2", "--batch-size", "4", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out[cap.out.index("{"):])["window"] == 2
    clf = LatentClassifier.load(out)
    assert clf.config.model["class"] == "SD3Transformer2DModel" and clf.metadata["trained_on"] == "tiny-sd3"
    pipe = safegen.protect(tiny_sd3_pipeline(), guards=[LVD(weights=str(out), window=2)])
    assert len(run(pipe, [BENIGN, UNSAFE], steps=2).safety) == 2
    with pytest.raises(Exception, match="another model's latents"):
        safegen.protect(tiny_sd_pipeline(), guards=[LVD(weights=str(out))])
