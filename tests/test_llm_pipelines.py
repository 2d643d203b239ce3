"""Every guard on the pipelines conditioned by a decoder-only LLM, on tiny random versions:

* Qwen-Image (``QwenImagePipeline``): a Qwen2.5-VL model's last hidden states after the chat template's system
  tokens, as long as the call's longest prompt, with a mask; true CFG (``negative_prompt``, ``true_cfg_scale``)
  as a second, separate transformer call; a video VAE that decodes one-frame clips.
* FLUX.2 [klein] (``Flux2KleinPipeline``): a Qwen3 model's layers 9, 18 and 27 side by side, padded to
  ``max_sequence_length`` without a mask; CFG against the empty prompt as a separate call; latents the pipeline
  unpacks and unpatchifies itself before returning them.

* FLUX.2 [dev] (``Flux2Pipeline``): a Mistral 3 model's layers 10, 20 and 30 side by side, its system prompt
  kept, padded on the *left* to ``max_sequence_length``; guidance-distilled, with no unconditional branch at all.

All step on 2×2-patch tokens (``layout="packed"``).
"""

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
    cfg: dict  # what gives the call an unconditional branch (a second transformer call per step)
    no_cfg: dict  # and what leaves it out (one call per step)
    masked: bool  # the conditioning is as long as the call's longest prompt, with a mask
    layers: int  # hidden layers side by side in the conditioning
    first: int  # template tokens before the prompt in the conditioning
    tail: int  # template tokens after it
    left: bool = False  # the pipeline pads its conditioning on the left
    guided: bool = True  # the call can have an unconditional branch


def needs_guidance(fam):
    if not fam.guided:
        pytest.skip("guidance-distilled: the pipeline has no unconditional branch")


FAMILIES = {
    "qwenimage": Family("tiny_qwenimage_pipeline", {"negative_prompt": "a photo of a green field",
                                                    "true_cfg_scale": 2.0}, {}, masked=True, layers=1, first=0,
                        tail=5),
    "flux2klein": Family("tiny_flux2_klein_pipeline", {}, {"guidance_scale": 1.0}, masked=False, layers=3, first=3,
                         tail=11),
    # (the tiny tokeniser splits the real system message into 91 tokens with <s>, [SYSTEM_PROMPT] and [INST])
    "flux2": Family("tiny_flux2_pipeline", {}, {}, masked=False, layers=3, first=91, tail=1, left=True,
                    guided=False),
}


def content_offset(fam, pe, n_tokens):
    """Where a prompt of ``n_tokens`` tokens starts its template in the pipeline's conditioning row ``pe`` (L, D):
    0, or after the left padding."""
    return pe.shape[0] - (fam.first + n_tokens + fam.tail) if fam.left else 0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=list(FAMILIES))
def llm(request):
    from safegen import testing

    fam = FAMILIES[request.param]
    return request.param, fam, getattr(testing, fam.builder)()


def run(pipe, prompts, steps=3, seed=0, **kw):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kw.setdefault("output_type", "np")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * kw.get("num_images_per_prompt", 1))]
    return pipe(prompt=prompts, generator=gens, num_inference_steps=steps, **kw)


def encode(pipe, texts):
    """The pipeline's own conditioning of ``texts`` (one row each)."""
    return pipe.encode_prompt(texts, device="cpu")[0]


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


def test_the_adapter_reads_the_states_the_pipeline_conditions_on(llm):
    """Prompts of different lengths in one batch: the adapter's states and content span are the pipeline's own
    (template tokens around the prompt, each layer the pipeline reads side by side)."""
    from safegen.encoders import ChatTemplateAdapter, pipeline_adapter

    kind, fam, pipe = llm
    ad = pipeline_adapter(pipe, max_sequence_length=512)
    assert isinstance(ad, ChatTemplateAdapter) and (ad.first, ad.tail) == (fam.first, fam.tail)
    texts = ["a red cat", UNSAFE]
    batch = ad.tokenize(texts)
    pe = encode(pipe, texts)
    assert batch.n_content.tolist() == [3, 9]
    states = ad.encode(batch).tokens
    cfg = pipe.text_encoder.config
    assert states.shape[-1] == pe.shape[-1] == fam.layers * getattr(cfg, "text_config", cfg).hidden_size
    for r in range(2):  # every position the prompt and its template fill
        n = int(batch.attention_mask[r].sum())
        at = pe.shape[1] - n if fam.left else 0  # (FLUX.2 [dev]: after the row's left padding)
        assert torch.allclose(states[r, :n], pe[r, at:at + n], atol=1e-5)
    if fam.left:  # the stream moves the pipeline's rows into the adapter's positions and back, exactly
        from safegen.encoders import ConditioningStream

        st = ConditioningStream("text_encoder", ad, slice(None))
        moved = st.block(pe, batch)
        assert torch.allclose(moved[:, :batch.ids.shape[1]] * batch.attention_mask.unsqueeze(-1), states, atol=1e-5)
        back = torch.zeros_like(pe)
        st.put(back, torch.arange(2), moved, batch)
        assert torch.equal(back, pe)
    assert ad.token_strings(batch.ids[1, fam.first:fam.first + 9].tolist()) == UNSAFE.split()
    if fam.masked:
        assert torch.equal(batch.attention_mask, pipe.encode_prompt(texts, device="cpu")[1])
    # the template's tokens before the prompt ran once; every batch runs on from their keys and values
    assert ad._cache_prefix and ad._prefix_kv
    ad._cache_prefix = False  # the whole template with every row: the same states
    assert torch.allclose(ad.encode(batch).tokens, states, atol=1e-5)


def test_round_trip_bit_identical_and_steering(llm, lexical_policy):
    kind, fam, pipe = llm
    cls = type(pipe)
    plain = run(pipe, [BENIGN, UNSAFE]).images
    never = LatentClassifier.scripted(pipe, lambda x: torch.zeros(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(), LVD.from_classifier(never)])
    out = run(pipe, [BENIGN, UNSAFE])
    assert np.array_equal(out.images[0], plain[0])  # nothing fired: bit-identical while protected
    assert not np.array_equal(out.images[1], plain[1])
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    res = out.safety[1].result("safree")
    assert res.category == "violence" and res.trigger_tokens and res.details["reattention"] is False
    safegen.unprotect(pipe)
    assert type(pipe) is cls and not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    assert "step" not in pipe.scheduler.__dict__ and "decode" not in pipe.vae.__dict__
    assert np.array_equal(run(pipe, [BENIGN, UNSAFE]).images, plain)


def test_safree_filters_the_llm_states_then_switches_back(llm, lexical_policy):
    kind, fam, pipe = llm
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(pipe)
    out = run(pipe, UNSAFE, steps=6, **fam.no_cfg)
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and 1 <= res.filtered_steps < 6
    safegen.unprotect(pipe)
    pe = encode(pipe, UNSAFE)[0]
    cond = [ehs[0] for _, ehs, _ in seen]
    assert len(seen) == 6 and not torch.equal(cond[0], pe) and torch.equal(cond[-1], pe)
    assert sum(not torch.equal(c, pe) for c in cond) == res.filtered_steps
    at = content_offset(fam, pe, len(UNSAFE.split()))
    start, end = at + fam.first, at + fam.first + len(UNSAFE.split())
    # only the prompt's own positions are projected: the template's tokens around it are left as they are
    assert torch.equal(cond[0][:start], pe[:start]) and torch.equal(cond[0][end:], pe[end:])
    assert not torch.equal(cond[0][start:end], pe[start:end])


def test_safree_keywords_join_the_separate_negative_call(llm, lexical_policy):
    """With CFG the steered prompt's negative prompt gains the concept keywords, in the separate unconditional
    call of every step. Qwen-Image's keyword states are longer than the call's negative prompt: the negative batch
    is padded to them, with a mask that hides the padding from the other rows."""
    kind, fam, pipe = llm
    needs_guidance(fam)
    plain_seen, h = record_calls(pipe)
    run(pipe, [BENIGN, UNSAFE], steps=2, **fam.cfg)
    h.remove()
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(pipe)
    out = run(pipe, [BENIGN, UNSAFE], steps=2, **fam.cfg)
    h.remove()
    assert [r.verdict for r in out.safety] == ["pass", "steer"]
    neg = out.safety[1].result("safree").details["negative_prompt"]
    assert neg.startswith(fam.cfg.get("negative_prompt", "")) and "blood" in neg
    assert len(seen) == len(plain_seen) == 4  # (cond, uncond) per step
    _, uncond, mask = seen[1]
    _, plain_uncond, _ = plain_seen[1]
    keywords = encode(pipe, neg)[0]
    n = plain_uncond.shape[1]
    if fam.masked:
        assert uncond.shape[1] == keywords.shape[0] > n
        assert mask[1].sum() == keywords.shape[0] and mask[0].sum() == n  # the benign row's padding is hidden
        assert not uncond[0, n:].any()
    else:  # FLUX.2 pads every prompt to max_sequence_length: the rows fit as they are
        assert uncond.shape == plain_uncond.shape and mask is None
    assert torch.equal(uncond[0, :n], plain_uncond[0]) and torch.equal(uncond[1, :keywords.shape[0]], keywords)
    assert torch.equal(seen[3][1], uncond)


def test_batched_prompts_and_images_per_prompt(llm, lexical_policy):
    kind, fam, pipe = llm
    prompts = [BENIGN, UNSAFE, "a nude woman on the beach"]
    plain = run(pipe, prompts).images
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    out = run(pipe, prompts)
    assert [r.verdict for r in out.safety] == ["pass", "steer", "steer"]
    assert out.safety[2].result("safree").category == "sexual"
    assert np.array_equal(out.images[0], plain[0]) and not np.array_equal(out.images[1:], plain[1:])
    single = run(pipe, UNSAFE)
    assert single.safety[0].result("safree").trigger_tokens == out.safety[1].result("safree").trigger_tokens
    two = run(pipe, prompts[:2], steps=1, num_images_per_prompt=2)
    assert len(two.images) == len(two.safety) == 4
    assert [r.verdict for r in two.safety] == ["pass", "pass", "steer", "steer"]


def test_latent_guard_blocks_with_no_transformer_call(llm):
    kind, fam, pipe = llm
    safegen.protect(pipe, guards=["latent-guard"])  # the shipped MiniLM head: its own backbone
    seen, h = record_calls(pipe)
    out = run(pipe, [BENIGN, UNSAFE], **fam.no_cfg)
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert out.safety[1].unet_steps_run == 0 and np.allclose(out.images[1], 0.5)
    assert all(rows == 1 for rows, _, _ in seen)  # only the benign item ever ran
    seen.clear()
    for output_type in ("np", "pt", "pil", "latent"):
        blocked = run(pipe, UNSAFE, steps=1, output_type=output_type).images
        ref = run(pipe, BENIGN, steps=1, output_type=output_type, **fam.no_cfg).images
        if output_type == "pil":
            assert blocked[0].size == ref[0].size
        else:
            assert type(blocked) is type(ref) and tuple(blocked.shape) == tuple(ref.shape)
    h.remove()
    assert len(seen) == 4  # the benign 1-step calls only


def test_lvd_stop_at_step_k_runs_k_plus_1_calls_and_no_decode(llm):
    kind, fam, pipe = llm
    plain = run(pipe, [BENIGN, UNSAFE], steps=6, **fam.no_cfg).images
    shapes = []

    def every(x):
        shapes.append(tuple(x.shape))
        return torch.ones(x.shape[0], dtype=torch.bool)

    safegen.protect(pipe, guards=[LVD.from_classifier(LatentClassifier.scripted(pipe, every), window=4, ratio=0.5)])
    seen, h = record_calls(pipe)
    decodes, h2 = count_decodes(pipe)
    out = run(pipe, [BENIGN, UNSAFE], steps=6, **fam.no_cfg)
    h.remove(), h2.remove()
    assert [r.result("lvd").stopped_at_step for r in out.safety] == [1, 1]
    assert len(seen) == 2 and decodes == [] and pipe._interrupt is False
    assert out.images.shape == plain.shape and np.allclose(out.images, 0.5)
    c = pipe.transformer.config.in_channels // 4
    assert shapes[0] == (2, c, 32 // pipe.vae_scale_factor, 32 // pipe.vae_scale_factor)  # latent images


def test_lvd_stops_one_item_in_both_branches(llm):
    kind, fam, pipe = llm
    needs_guidance(fam)
    plain = run(pipe, [BENIGN, UNSAFE], steps=5, **fam.cfg).images

    def flag(x):
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        if x.shape[0] == 2:
            hit[1] = True
        return hit

    safegen.protect(pipe, guards=[LVD.from_classifier(LatentClassifier.scripted(pipe, flag), window=4, ratio=0.5)])
    seen, h = record_calls(pipe)
    out = run(pipe, [BENIGN, UNSAFE], steps=5, **fam.cfg)
    h.remove()
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert [rows for rows, _, _ in seen] == [2, 2, 2, 2] + [1] * 6  # cond and uncond both skip it after step 1
    assert np.allclose(out.images[0], plain[0], atol=1e-5) and np.allclose(out.images[1], 0.5)


def test_sld_adds_the_concept_rows_to_the_conditional_call(llm):
    kind, fam, pipe = llm
    if not fam.guided:  # nothing to guide against: said when protecting, not found out per call
        from safegen.errors import GuardUnavailable

        with pytest.raises(GuardUnavailable, match="guidance-distilled"):
            safegen.protect(pipe, guards=["sld"])
        assert type(pipe).__name__ == "Flux2Pipeline" and "_safegen" not in pipe.__dict__
        return
    plain = run(pipe, [BENIGN], **fam.cfg).images
    safegen.protect(pipe, guards=[safegen.SLD.max()])
    seen, h = record_calls(pipe)
    out = run(pipe, [BENIGN], **fam.cfg)
    h.remove()
    assert out.safety[0].verdict == "steer"
    assert [rows for rows, _, _ in seen] == [2, 1] * 3  # (cond, concept), then uncond, on each step
    concept = encode(pipe, out.safety[0].result("sld").details["concept"])[0]
    prompt = encode(pipe, BENIGN)[0]
    _, ehs, mask = seen[0]
    assert torch.equal(ehs[1, :concept.shape[0]], concept) and torch.equal(ehs[0, :prompt.shape[0]], prompt)
    if fam.masked:  # the concept is longer than the prompt: padded to one length, masks hide the padding
        assert mask[0].sum() == prompt.shape[0] and mask[1].sum() == concept.shape[0]
    assert not np.array_equal(out.images, plain)
    safegen.unprotect(pipe)
    assert np.array_equal(run(pipe, [BENIGN], **fam.cfg).images, plain)
    from safegen import testing

    bare = safegen.protect(getattr(testing, fam.builder)(), guards=["sld"])
    r = run(bare, BENIGN, steps=1, **fam.no_cfg).safety[0]  # no CFG to steer
    if kind == "qwenimage":  # true CFG was asked for by the policy's guard and cannot be had: fail closed
        assert r.verdict == "error" and "negative_prompt" in r.reason
    else:  # plain CFG switched off by the caller: SLD says it was inactive
        assert r.verdict == "pass" and "inactive" in r.result("sld").reason


def test_default_policy_runs(llm):
    kind, fam, pipe = llm
    safegen.protect(pipe, policy="default")
    out = run(pipe, [BENIGN, UNSAFE], steps=1)
    assert out.safety[1].verdict == "block" and out.safety[1].result("latent_guard").verdict == "block"
    assert "skipped" in out.safety[0].result("lvd").reason
    assert out.safety[0].result("output") is not None


@pytest.mark.parametrize("model,cls", [("tiny-qwenimage", "QwenImageTransformer2DModel"),
                                       ("tiny-flux2-klein", "Flux2Transformer2DModel"),
                                       ("tiny-flux2", "Flux2Transformer2DModel")])
def test_cli_train_lvd_then_protect(tiny_prompt_data, capsys, model, cls):
    from safegen import testing
    from safegen.cli import main
    from safegen.loading import TINY_MODELS

    out = tiny_prompt_data / "lvd.safetensors"
    code = main(["train-lvd", "--model", model, "--data-dir", str(tiny_prompt_data), "--prompts", "6",
                 "--steps", "3", "--window", "2", "--train-steps", "2", "--batch-size", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    clf = LatentClassifier.load(out)
    assert clf.config.model["class"] == cls and clf.config.latent_channels == 4
    pipe = safegen.protect(getattr(testing, TINY_MODELS[model])(), guards=[LVD(weights=str(out), window=2)])
    assert len(run(pipe, [BENIGN, UNSAFE], steps=2).safety) == 2


def test_flux2_guards_read_the_prompt_the_model_reads():
    """FLUX.2 [dev] deletes ``[IMG]`` from prompts and can have its LLM rewrite them (caption upsampling) inside the
    call: the guards judge the deleted and rewritten text, and the report keeps the caller's prompt."""
    from safegen.testing import tiny_flux2_pipeline

    pipe = tiny_flux2_pipeline()
    hidden = "a photo of blo[IMG]od and go[IMG]re on the street"
    plain = run(pipe, UNSAFE, steps=1).images
    assert np.array_equal(run(pipe, hidden, steps=1).images, plain)  # the model reads the unsafe prompt
    rewrites = []

    def upsample_prompt(prompt, images=None, temperature=0.15, device=None):
        rewrites.append((list(prompt), temperature))
        return [UNSAFE if p == BENIGN else p for p in prompt]

    pipe.upsample_prompt = upsample_prompt
    safegen.protect(pipe, guards=["latent-guard"])
    seen, h = record_calls(pipe)
    for text in (hidden, "a photo of blood and go[IM[IMG]G]re on the street"):  # (deleted until none is left)
        out = run(pipe, text, steps=1)
        assert out.safety[0].verdict == "block" and out.safety[0].prompt == UNSAFE
    out = run(pipe, [BENIGN, "a red cat"], steps=1, caption_upsample_temperature=0.3)
    h.remove()
    assert rewrites == [([BENIGN, "a red cat"], 0.3)]  # once, by the protected call: the pipeline did not again
    assert [r.verdict for r in out.safety] == ["block", "pass"]
    assert out.safety[0].prompt == UNSAFE and out.safety[0].original_prompt == BENIGN
    assert "rewritten from" in str(out.safety[0]) and out.safety[1].original_prompt == "a red cat"
    assert [rows for rows, _, _ in seen] == [1]  # only the benign rewrite ran


@pytest.mark.parametrize("builder", ["tiny_flux2_pipeline", "tiny_flux2_klein_pipeline"])
def test_flux2_with_a_conditioning_image(builder):
    """FLUX.2 edits: the conditioning image's latents join the transformer's tokens. LVD stops one item and Latent
    Guard blocks one; the other comes out as the plain call's (within float noise: it runs in a smaller batch)."""
    from PIL import Image

    from safegen import testing

    pipe = getattr(testing, builder)()
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    kw = dict(image=image, height=32, width=32)
    plain = run(pipe, [BENIGN, UNSAFE], **kw).images

    def flag(x):
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        hit[1:] = x.shape[0] == 2  # the second item while both run
        return hit

    for guards in ([LVD.from_classifier(LatentClassifier.scripted(pipe, flag), window=2, ratio=0.5)],
                   ["latent-guard"]):
        safegen.protect(pipe, guards=guards)
        out = run(pipe, [BENIGN, UNSAFE], **kw)
        safegen.unprotect(pipe)
        assert [r.verdict for r in out.safety] == ["pass", "block"]
        assert np.allclose(out.images[0], plain[0], atol=1e-5) and np.ptp(out.images[1]) == 0
