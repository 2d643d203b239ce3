"""Every guard on Qwen-Image (``QwenImagePipeline``), on a tiny random pipeline: an LLM text encoder (Qwen2.5-VL)
read through a chat template, conditioning as long as the call's longest prompt with a mask, true CFG as a second,
separate transformer call, latents packed as 2×2-patch tokens and decoded by a video VAE as one-frame clips.
"""

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.lvd import LVD, LatentClassifier
from safegen.testing import tiny_qwenimage_pipeline

BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore on the street"
TRUE_CFG = {"negative_prompt": "a photo of a green field", "true_cfg_scale": 2.0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def qwen():
    return tiny_qwenimage_pipeline()


def run(pipe, prompts, steps=3, seed=0, **kw):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kw.setdefault("output_type", "np")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * kw.get("num_images_per_prompt", 1))]
    return pipe(prompts, generator=gens, num_inference_steps=steps, **kw)


class record_calls:
    """Per transformer call, as the transformer finally runs it (after every hook that adds or drops rows):
    ``(rows, states, mask)``. Wraps the module's ``forward`` until ``remove()``."""

    def __init__(self, pipe):
        self.module, self.seen = pipe.transformer, []
        original = self.module.forward

        def forward(*args, **kwargs):
            mask = kwargs.get("encoder_hidden_states_mask")
            self.seen.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"].clone(),
                              None if mask is None else mask.clone()))
            return original(*args, **kwargs)

        self.module.forward = forward

    def __iter__(self):  # seen, h = record_calls(pipe)
        return iter((self.seen, self))

    def remove(self):
        del self.module.forward


def count_decodes(pipe):
    calls = []
    return calls, pipe.vae.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))


def test_the_adapter_reads_the_states_the_pipeline_conditions_on(qwen):
    """Prompts of different lengths in one batch: the adapter's states, content span and padding are the
    pipeline's own (the template's system tokens dropped, zeros after each prompt's end)."""
    from safegen.encoders import ChatTemplateAdapter, pipeline_adapter

    ad = pipeline_adapter(qwen, max_sequence_length=512)
    assert isinstance(ad, ChatTemplateAdapter) and ad.first == 0 and ad.tail == 5
    texts = ["a red cat", UNSAFE]
    batch = ad.tokenize(texts)
    pe, mask = qwen.encode_prompt(texts, device="cpu")
    assert torch.equal(batch.attention_mask, mask) and batch.n_content.tolist() == [3, 9]
    assert torch.allclose(ad.encode(batch).tokens, pe, atol=1e-5)
    assert ad.token_strings(batch.ids[1, :9].tolist()) == UNSAFE.split()
    # the masked copies of one prompt, alone: the same states as in the batch, where not masked
    alone = ad.encode(ad.tokenize(texts[:1])).tokens
    assert torch.allclose(alone[0], pe[0, :alone.shape[1]], atol=1e-5)


def test_round_trip_bit_identical_and_steering(qwen, lexical_policy):
    cls = type(qwen)
    plain = run(qwen, [BENIGN, UNSAFE]).images
    never = LatentClassifier.scripted(qwen, lambda x: torch.zeros(x.shape[0], dtype=torch.bool))
    safegen.protect(qwen, policy=lexical_policy, guards=[safegen.Safree(), LVD.from_classifier(never)])
    out = run(qwen, [BENIGN, UNSAFE])
    assert np.array_equal(out.images[0], plain[0])  # nothing fired: bit-identical while protected
    assert not np.array_equal(out.images[1], plain[1])
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    res = out.safety[1].result("safree")
    assert res.category == "violence" and res.trigger_tokens and res.details["reattention"] is False
    safegen.unprotect(qwen)
    assert type(qwen) is cls and not qwen.transformer._forward_pre_hooks and not qwen.transformer._forward_hooks
    assert "step" not in qwen.scheduler.__dict__ and "decode" not in qwen.vae.__dict__
    assert np.array_equal(run(qwen, [BENIGN, UNSAFE]).images, plain)


def test_safree_filters_the_llm_states_then_switches_back(qwen, lexical_policy):
    safegen.protect(qwen, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(qwen)
    out = run(qwen, UNSAFE, steps=6)
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and 1 <= res.filtered_steps < 6
    safegen.unprotect(qwen)
    pe = qwen.encode_prompt(UNSAFE, device="cpu")[0][0]
    cond = [ehs[0] for _, ehs, _ in seen]
    assert len(seen) == 6 and not torch.equal(cond[0], pe) and torch.equal(cond[-1], pe)
    assert sum(not torch.equal(c, pe) for c in cond) == res.filtered_steps
    n = len(UNSAFE.split())
    assert torch.equal(cond[0][n:], pe[n:])  # the template's closing tokens are not the prompt's: left as they are


def test_safree_keywords_join_the_separate_negative_call(qwen, lexical_policy):
    """True CFG: the steered prompt's negative prompt gains the concept keywords. It is longer than the call's
    negative prompt: the negative batch is padded to it, with its mask, on every step."""
    plain_seen, h = record_calls(qwen)
    run(qwen, [BENIGN, UNSAFE], steps=2, **TRUE_CFG)
    h.remove()
    safegen.protect(qwen, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(qwen)
    out = run(qwen, [BENIGN, UNSAFE], steps=2, **TRUE_CFG)
    h.remove()
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    neg = out.safety[1].result("safree").details["negative_prompt"]
    assert neg.startswith(TRUE_CFG["negative_prompt"]) and "blood" in neg
    assert len(seen) == len(plain_seen) == 4  # (cond, uncond) per step
    _, uncond, mask = seen[1]
    _, plain_uncond, _ = plain_seen[1]
    length = qwen.encode_prompt(neg, device="cpu")[0].shape[1]
    assert uncond.shape[1] == length > plain_uncond.shape[1]
    assert mask[1].sum() == length and mask[0].sum() == plain_uncond.shape[1]  # the benign row's padding is hidden
    assert torch.equal(uncond[0, :plain_uncond.shape[1]], plain_uncond[0]) and not uncond[0, plain_uncond.shape[1]:].any()
    assert torch.equal(seen[3][1], uncond)


def test_batched_prompts_and_images_per_prompt(qwen, lexical_policy):
    prompts = [BENIGN, UNSAFE, "a nude woman on the beach"]
    plain = run(qwen, prompts).images
    safegen.protect(qwen, policy=lexical_policy, guards=["safree"])
    out = run(qwen, prompts)
    assert [r.verdict for r in out.safety] == ["pass", "steer", "steer"]
    assert out.safety[2].result("safree").category == "sexual"
    assert np.array_equal(out.images[0], plain[0]) and not np.array_equal(out.images[1:], plain[1:])
    single = run(qwen, UNSAFE)
    assert single.safety[0].result("safree").trigger_tokens == out.safety[1].result("safree").trigger_tokens
    two = run(qwen, prompts[:2], steps=1, num_images_per_prompt=2)
    assert len(two.images) == len(two.safety) == 4
    assert [r.verdict for r in two.safety] == ["pass", "pass", "steer", "steer"]


def test_latent_guard_blocks_with_no_transformer_call(qwen):
    safegen.protect(qwen, guards=["latent-guard"])  # the shipped MiniLM head: its own backbone
    seen, h = record_calls(qwen)
    out = run(qwen, [BENIGN, UNSAFE])
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert out.safety[1].unet_steps_run == 0 and np.allclose(out.images[1], 0.5)
    assert all(rows == 1 for rows, _, _ in seen)  # only the benign item ever ran
    seen.clear()
    for output_type in ("np", "pt", "pil", "latent"):
        blocked = run(qwen, UNSAFE, steps=1, output_type=output_type).images
        ref = run(qwen, BENIGN, steps=1, output_type=output_type).images
        if output_type == "pil":
            assert blocked[0].size == ref[0].size
        else:
            assert type(blocked) is type(ref) and tuple(blocked.shape) == tuple(ref.shape)
    h.remove()
    assert len(seen) == 4  # the benign 1-step calls only


def test_lvd_stop_at_step_k_runs_k_plus_1_calls_and_no_decode(qwen):
    plain = run(qwen, [BENIGN, UNSAFE], steps=6).images
    shapes = []

    def every(x):
        shapes.append(tuple(x.shape))
        return torch.ones(x.shape[0], dtype=torch.bool)

    safegen.protect(qwen, guards=[LVD.from_classifier(LatentClassifier.scripted(qwen, every), window=4, ratio=0.5)])
    seen, h = record_calls(qwen)
    decodes, h2 = count_decodes(qwen)
    out = run(qwen, [BENIGN, UNSAFE], steps=6)
    h.remove(), h2.remove()
    assert [r.result("lvd").stopped_at_step for r in out.safety] == [1, 1]
    assert len(seen) == 2 and decodes == [] and qwen._interrupt is False
    assert out.images.shape == plain.shape and np.allclose(out.images, 0.5)
    assert shapes[0] == (2, 4, 8, 8)  # packed tokens unpacked to latent images (the VAE's one frame dropped)


def test_lvd_stops_one_item_in_both_branches(qwen):
    plain = run(qwen, [BENIGN, UNSAFE], steps=5, **TRUE_CFG).images

    def flag(x):
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        if x.shape[0] == 2:
            hit[1] = True
        return hit

    safegen.protect(qwen, guards=[LVD.from_classifier(LatentClassifier.scripted(qwen, flag), window=4, ratio=0.5)])
    seen, h = record_calls(qwen)
    out = run(qwen, [BENIGN, UNSAFE], steps=5, **TRUE_CFG)
    h.remove()
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert [rows for rows, _, _ in seen] == [2, 2, 2, 2] + [1] * 6  # cond and uncond both skip it after step 1
    assert np.allclose(out.images[0], plain[0], atol=1e-5) and np.allclose(out.images[1], 0.5)


def test_sld_pads_its_concept_rows_to_the_batch(qwen):
    plain = run(qwen, [BENIGN], **TRUE_CFG).images
    safegen.protect(qwen, guards=[safegen.SLD.max()])
    seen, h = record_calls(qwen)
    out = run(qwen, [BENIGN], **TRUE_CFG)
    h.remove()
    assert out.safety[0].verdict == "steer"
    assert [rows for rows, _, _ in seen] == [2, 1] * 3  # (cond, concept), then uncond, on each step
    concept_text = out.safety[0].result("sld").details["concept"]
    concept = qwen.encode_prompt(concept_text, device="cpu")[0][0]
    prompt = qwen.encode_prompt(BENIGN, device="cpu")[0][0]
    _, ehs, mask = seen[0]
    assert mask is not None and mask[0].sum() == prompt.shape[0] and mask[1].sum() == concept.shape[0]
    assert torch.equal(ehs[1, :concept.shape[0]], concept) and torch.equal(ehs[0, :prompt.shape[0]], prompt)
    assert not np.array_equal(out.images, plain)
    safegen.unprotect(qwen)
    assert np.array_equal(run(qwen, [BENIGN], **TRUE_CFG).images, plain)
    bare = safegen.protect(tiny_qwenimage_pipeline(), guards=["sld"])  # no negative prompt: no CFG to steer
    r = run(bare, BENIGN, steps=1).safety[0]
    assert r.verdict == "error" and "negative_prompt" in r.reason


def test_default_policy_runs(qwen):
    safegen.protect(qwen, policy="default")
    out = run(qwen, [BENIGN, UNSAFE], steps=1)
    assert out.safety[1].verdict == "block" and out.safety[1].result("latent_guard").verdict == "block"
    assert "skipped" in out.safety[0].result("lvd").reason
    assert out.safety[0].result("output") is not None


def test_cli_train_lvd_on_qwenimage_then_protect(tiny_prompt_data, capsys):
    from safegen.cli import main

    out = tiny_prompt_data / "lvd.safetensors"
    code = main(["train-lvd", "--model", "tiny-qwenimage", "--data-dir", str(tiny_prompt_data), "--prompts", "6",
                 "--steps", "3", "--window", "2", "--train-steps", "2", "--batch-size", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    clf = LatentClassifier.load(out)
    assert clf.config.model["class"] == "QwenImageTransformer2DModel" and clf.config.latent_channels == 4
    pipe = safegen.protect(tiny_qwenimage_pipeline(), guards=[LVD(weights=str(out), window=2)])
    assert len(run(pipe, [BENIGN, UNSAFE], steps=2).safety) == 2

