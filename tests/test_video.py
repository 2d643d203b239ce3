"""Every guard on the video pipelines: AnimateDiff (motion UNet, CLIP), CogVideoX (DiT, T5) and the deprecated
TextToVideoSDPipeline (3-D UNet, CLIP, legacy callback only), on tiny random pipelines."""

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.latent_guard import LatentGuard, LatentGuardHead
from safegen.guards.lvd import LVD, LatentClassifier, latent_frames

BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore on the street"

#: name -> (builder, extra call arguments): 2 frames for the UNet models, CogVideoX's default 9 (3 latent frames)
VIDEO = {
    "animatediff": ("tiny_animatediff_pipeline", {"num_frames": 2}),
    "cogvideox": ("tiny_cogvideox_pipeline", {}),
    "text-to-video-sd": ("tiny_text_to_video_pipeline", {"num_frames": 2}),
    "wan": ("tiny_wan_pipeline", {"height": 32, "width": 32, "num_frames": 5}),  # 2 latent frames of 4×4
}
#: Wan runs the conditional and the unconditional branch as two transformer calls of one row per item; the others
#: run [uncond; cond] as one call of two rows per item
SEPARATE_CFG = {"wan"}


def cfg_calls(kind):
    """(denoiser calls per step, rows per item in each)."""
    return (2, 1) if kind in SEPARATE_CFG else (1, 2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny video models are many small ops: a second thread only adds synchronisation (and, on a shared CPU,
    spins: 5× slower here), so this module runs on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=list(VIDEO))
def video(request):
    from safegen import testing

    name, extra = VIDEO[request.param]
    return request.param, getattr(testing, name)(), extra


def run(pipe, extra, prompts, steps=3, seed=0, **kw):
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    kw.setdefault("output_type", "np")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * kw.get("num_videos_per_prompt", 1))]
    return pipe(prompts, generator=gens, num_inference_steps=steps, **extra, **kw)


def denoiser(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def record_calls(pipe):
    """Per denoiser call: (batch rows, encoder_hidden_states) as the pipeline passes them."""
    seen = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        seen.append((sample.shape[0], kwargs["encoder_hidden_states"].clone()))

    return seen, denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)


def record_rows(pipe, frames):
    """Rows the denoiser really runs per call, extra rows of other hooks included (counted at its first layer)."""
    rows = []
    if getattr(pipe, "unet", None) is not None:  # frames are folded into the batch at conv_in
        h = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0] // frames))
    elif hasattr(pipe.transformer, "patch_embedding"):  # Wan: a 3-D patch convolution over (B, C, F, H, W)
        h = pipe.transformer.patch_embedding.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    else:
        h = pipe.transformer.patch_embed.register_forward_pre_hook(lambda m, a: rows.append(a[1].shape[0]))
    return rows, h


def count_decodes(pipe):
    calls = []
    return calls, pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))


def classifier(pipe, flag):
    """A one-category ('violence') LVD classifier whose verdict per row is ``flag(x0) -> bool rows``."""
    return LatentClassifier.scripted(pipe, flag)


def frames_of(out):
    return out.frames


# ---------------------------------------------------------------------- protect / unprotect


def test_round_trip_bit_identical_and_steering(video, lexical_policy):
    kind, pipe, extra = video
    cls = type(pipe)
    plain = frames_of(run(pipe, extra, [BENIGN, UNSAFE]))
    never = classifier(pipe, lambda x: torch.zeros(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(), LVD.from_classifier(never)])
    assert type(pipe).__mro__[1] is cls
    out = run(pipe, extra, [BENIGN, UNSAFE])
    assert np.array_equal(out.frames[0], plain[0])  # nothing fired: bit-identical while protected
    assert not np.array_equal(out.frames[1], plain[1])  # SAFREE steered the unsafe prompt
    assert [r.verdict for r in out.safety] == ["pass", "steer"] and len(out.safety) == 2
    assert out.safety[1].result("safree").category == "violence"
    safegen.unprotect(pipe)
    assert type(pipe) is cls and not safegen.is_protected(pipe)
    den = denoiser(pipe)
    assert not den._forward_pre_hooks and not den._forward_hooks
    assert "step" not in pipe.scheduler.__dict__ and "decode_latents" not in pipe.__dict__
    assert np.array_equal(frames_of(run(pipe, extra, [BENIGN, UNSAFE])), plain)


def test_keyword_prompt_changes_conditioning_then_switches_back(video, lexical_policy):
    kind, pipe, extra = video
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    seen, h = record_calls(pipe)
    out = run(pipe, extra, UNSAFE, steps=6)
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.trigger_tokens and 1 <= res.filtered_steps < 6
    assert "blood" in res.details["negative_prompt"]
    safegen.unprotect(pipe)
    with torch.no_grad():  # as inside the pipeline call (attention kernels differ under autograd)
        pe, npe = pipe.encode_prompt(UNSAFE, negative_prompt=None, **_encode_kwargs(kind, pipe))
    calls, _ = cfg_calls(kind)
    assert len(seen) == 6 * calls
    if calls == 2:  # separate branches: the conditional call, then the unconditional one
        cond = [ehs[0] for _, ehs in seen[0::2]]
        uncond_first = seen[1][1][0]
    else:
        rows = [ehs for _, ehs in seen]
        per = rows[0].shape[0] // 2  # rows of each CFG half (AnimateDiff: one per frame)
        cond = [r[per] for r in rows]
        uncond_first = rows[0][0]
    assert not torch.equal(cond[0], pe[0])  # the filtered conditioning on the first step...
    assert torch.equal(cond[-1], pe[0])  # ...switched back to the original after the filtered steps
    assert not torch.equal(uncond_first, npe[0])  # uncond row: the concept keywords
    assert sum(not torch.equal(c, pe[0]) for c in cond) == res.filtered_steps


def _encode_kwargs(kind, pipe):
    if kind == "wan":  # its call reads 512 tokens, its encode_prompt 226 by default
        return dict(do_classifier_free_guidance=True, device="cpu", max_sequence_length=512)
    if kind == "cogvideox":
        return dict(do_classifier_free_guidance=True, device="cpu")
    return dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)


def test_batched_prompts(video, lexical_policy):
    kind, pipe, extra = video
    prompts = [BENIGN, UNSAFE, "a nude woman on the beach"]
    plain = run(pipe, extra, prompts).frames
    safegen.protect(pipe, policy=lexical_policy, guards=["safree"])
    out = run(pipe, extra, prompts)
    assert out.frames.shape == plain.shape and len(out.safety) == 3
    assert [r.verdict for r in out.safety] == ["pass", "steer", "steer"]
    assert [r.prompt for r in out.safety] == prompts
    assert out.safety[2].result("safree").category == "sexual"
    assert np.array_equal(out.frames[0], plain[0]) and not np.array_equal(out.frames[1:], plain[1:])
    single = run(pipe, extra, UNSAFE)  # each prompt's conditioning is its own
    assert single.safety[0].result("safree").trigger_tokens == out.safety[1].result("safree").trigger_tokens
    if kind != "text-to-video-sd":
        two = pipe(prompts[:2], num_inference_steps=1, num_videos_per_prompt=2, output_type="np", **extra)
        # AnimateDiff and CogVideoX accept num_videos_per_prompt but make one video per prompt; Wan makes them
        n = 4 if kind == "wan" else 2
        assert len(two.frames) == len(two.safety) == n
        if kind == "wan":
            assert [r.verdict for r in two.safety] == ["pass", "pass", "steer", "steer"]
    safegen.unprotect(pipe)


# ---------------------------------------------------------------------- LVD


def test_lvd_stop_at_step_k_runs_k_plus_1_calls_and_no_decode(video):
    kind, pipe, extra = video
    plain = run(pipe, extra, [BENIGN, UNSAFE], steps=6).frames
    every = classifier(pipe, lambda x: torch.ones(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, guards=[LVD.from_classifier(every, window=4, ratio=0.5)])  # 2 of 4 → stop after step 1
    seen, h = record_calls(pipe)
    decodes, h2 = count_decodes(pipe)
    out = run(pipe, extra, [BENIGN, UNSAFE], steps=6)
    h.remove(), h2.remove()
    k = 1
    assert [r.result("lvd").stopped_at_step for r in out.safety] == [k, k]
    assert len(seen) == (k + 1) * cfg_calls(kind)[0] and decodes == []
    assert [r.unet_steps_run for r in out.safety] == [k + 1] * 2 and out.safety[0].unet_steps_saved == 6 - k - 1
    assert out.frames.shape == plain.shape and np.allclose(out.frames, 0.5)  # flat placeholder clips
    details = out.safety[0].result("lvd").details
    f = pipe.transformer.config.sample_frames // 4 + 1 if kind == "cogvideox" else 2  # latent frames
    assert details["num_frames"] == f and details["frames"] == list(range(f))
    if kind == "cogvideox":  # 3 latent frames → 9 output frames: which output frames each one decodes to
        assert details["output_frames"] == {0: [0, 0], 1: [1, 4], 2: [5, 8]}
    if kind == "wan":  # causal: the first latent frame makes one frame, the next one four (2 → 5)
        assert details["output_frames"] == {0: [0, 0], 1: [1, 4]}
    assert "frame(s)" in out.safety[0].reason
    assert pipe._interrupt is False
    safegen.unprotect(pipe)
    assert "decode_latents" not in pipe.__dict__ and "step" not in pipe.scheduler.__dict__


def test_lvd_stops_one_item_of_a_batch_and_names_its_frames(video):
    kind, pipe, extra = video
    plain = run(pipe, extra, [BENIGN, UNSAFE], steps=5).frames
    f = 3 if kind == "cogvideox" else 2  # latent frames per item

    def flag(x):  # rows are item-major frames: flag the LAST frame of item 1 while both items are checked
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        if x.shape[0] == 2 * f:
            hit[2 * f - 1] = True
        return hit

    guard = LVD.from_classifier(classifier(pipe, flag), window=4, ratio=0.5)
    safegen.protect(pipe, guards=[guard])
    seen, h = record_rows(pipe, extra.get("num_frames", 1))
    decodes, h2 = count_decodes(pipe)
    out = run(pipe, extra, [BENIGN, UNSAFE], steps=5)
    h.remove(), h2.remove()
    r0, r1 = out.safety
    assert r0.verdict == "pass" and r1.verdict == "block" and r1.result("lvd").stopped_at_step == 1
    last = f - 1
    assert r1.result("lvd").details["frames"] == [last] and r1.result("lvd").details["frame_flags"][last] == 2
    assert f"frame(s) [{last}]" in r1.reason
    # CFG: 2 rows per item; the stopped item's rows ran at steps 0 and 1 only
    calls, per = cfg_calls(kind)
    assert seen == [2 * per] * (2 * calls) + [per] * (3 * calls)
    # item 0 ran on a smaller batch from step 2 on: equal up to batch-size rounding
    assert np.allclose(out.frames[0], plain[0], atol=1e-5) and np.allclose(out.frames[1], 0.5)
    assert sum(decodes) > 0  # item 0 was decoded...
    # ...and item 1 was not: the decoder saw one item's worth of frames
    safegen.unprotect(pipe)
    plain_decodes, h2 = count_decodes(pipe)
    run(pipe, extra, [BENIGN], steps=1)
    h2.remove()
    assert sum(decodes) == sum(plain_decodes)


def test_latent_frames_layouts():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 3, 2, 2)  # BCFHW
    frames, f = latent_frames(x, 2, "BCFHW")
    assert f == 3 and torch.equal(frames[3 + 2], x[1, :, 2])
    y = x.transpose(1, 2).contiguous()  # BFCHW (CogVideoX)
    frames_y, _ = latent_frames(y, 2, "BFCHW")
    assert torch.equal(frames, frames_y)
    folded = y.reshape(6, 4, 2, 2)  # ZeroScope folds frames into the batch around scheduler.step
    frames_z, fz = latent_frames(folded, 2, "BCFHW")
    assert fz == 3 and torch.equal(frames_z, frames)


def test_lvd_clip_score_max_vs_mean(lexical_policy):
    from safegen.testing import tiny_animatediff_pipeline

    pipe = tiny_animatediff_pipeline()
    one_frame = lambda x: torch.arange(x.shape[0]) % 4 == 0  # noqa: E731  (1 frame of 4 per item)
    results = {}
    for score in ("max", "mean"):
        safegen.protect(pipe, guards=[LVD.from_classifier(classifier(pipe, one_frame), window=2, ratio=1.0,
                                                          clip_score=score)])
        out = pipe("a red bus", num_frames=4, num_inference_steps=3, output_type="np")
        results[score] = out.safety[0]
    assert results["max"].verdict == "block" and results["max"].result("lvd").details["frames"] == [0]
    # the mean over 4 frames (one at p≈1, three at p≈0) is 0.25 < 0.5: never stopped, but the flagged frame is named
    mean = results["mean"].result("lvd")
    assert results["mean"].verdict == "pass" and mean.details["frames"] == [0] and mean.details["frame_flags"] == [1, 0, 0, 0]
    assert mean.details["checks"] == 1  # 2 of 2 needed, the first check found nothing: accepted at once
    safegen.unprotect(pipe)


# ---------------------------------------------------------------------- Latent Guard, placeholders


def latent_guard(pipe):
    head = LatentGuardHead.mean_match(pipe.text_encoder.config.d_model if hasattr(pipe.text_encoder.config, "d_model")
                                      else pipe.text_encoder.config.hidden_size)
    return LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())


def test_latent_guard_blocks_before_the_loop(video):
    kind, pipe, extra = video
    policy = safegen.load_policy("default")
    policy.add_concept("violence", "a purple giraffe")
    plain = run(pipe, extra, [BENIGN, "a purple giraffe"]).frames
    safegen.protect(pipe, policy=policy, guards=[latent_guard(pipe)])
    seen, h = record_calls(pipe)
    out = run(pipe, extra, [BENIGN, "a purple giraffe"])
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert out.safety[1].unet_steps_run == 0 and out.safety[1].result("latent_guard").concept == "a purple giraffe"
    assert all(b == cfg_calls(kind)[1] for b, _ in seen)  # only the benign item's CFG rows ever ran
    # (the benign item alone in its batch: equal up to batch-size rounding)
    assert np.allclose(out.frames[0], plain[0], atol=1e-5) and np.allclose(out.frames[1], 0.5)
    seen.clear()
    for output_type in ("np", "pt", "pil", "latent"):  # everything blocked: no denoiser call, same output types
        ref = run(pipe, extra, BENIGN, steps=1, output_type=output_type).frames
        blocked = run(pipe, extra, "a purple giraffe", steps=1, output_type=output_type).frames
        if output_type == "pil":
            assert isinstance(blocked[0], list) and len(blocked[0]) == len(ref[0])
            assert blocked[0][0].size == ref[0][0].size and blocked[0][0].getpixel((0, 0)) == (128, 128, 128)
        else:
            assert type(blocked) is type(ref) and tuple(blocked.shape) == tuple(ref.shape)
    assert len(seen) == 4 * cfg_calls(kind)[0]  # the four 1-step benign calls only
    h.remove()
    safegen.unprotect(pipe)


# ---------------------------------------------------------------------- encoders: T5, DiT, legacy callback


def test_t5_adapter_matches_pipeline_states_and_has_no_bos_offset():
    from safegen.encoders import pipeline_adapter
    from safegen.guards.safree import masked_copies
    from safegen.testing import tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline()
    ad = pipeline_adapter(pipe)
    batch = ad.tokenize([UNSAFE, BENIGN])
    with torch.no_grad():  # as inside the pipeline call (attention kernels differ under autograd)
        pe, _ = pipe.encode_prompt([UNSAFE, BENIGN], do_classifier_free_guidance=False, device="cpu")
    assert torch.equal(ad.encode(batch).tokens, pe)  # the space the pipeline conditions on, bit for bit
    assert ad.first == 0 and ad.padding_matters and ad.token_strings([ad.mask_token_id]) == ["<extra_id_0>"]
    n = len(pipe.tokenizer(UNSAFE, add_special_tokens=False)["input_ids"])
    assert int(batch.n_content[0]) == n  # every word counts, </s> does not
    copies, _, owner, position, _ = masked_copies(batch.ids, batch.attention_mask, batch.n_content, ad.first,
                                                  ad.mask_token_id, cut=not ad.padding_matters)
    assert copies.shape[1] == 226  # padded like the pipeline: T5 here attends to its padding
    assert int(copies[0, 0]) == ad.mask_token_id  # the FIRST word is tested too (no +1 BOS offset)
    assert torch.equal(copies[0, 1:], batch.ids[0, 1:])


def test_dit_reattention_is_a_documented_no_op(lexical_policy):
    from safegen.testing import tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline()
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree()])
    base = run(pipe, {}, [BENIGN, UNSAFE]).frames
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(reattention=True)])
    out = run(pipe, {}, [BENIGN, UNSAFE])
    res = out.safety[1].result("safree")
    assert np.array_equal(out.frames, base)
    assert res.details["reattention"] is False and "no U-Net skip" in res.details["reattention_skipped"]
    safegen.unprotect(pipe)


@pytest.mark.parametrize("kind", ["animatediff", "text-to-video-sd"])
def test_reattention_on_video_unets(kind, lexical_policy):
    from safegen import testing

    pipe = getattr(testing, VIDEO[kind][0])()
    extra = VIDEO[kind][1]
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree()])
    base = run(pipe, extra, [BENIGN, UNSAFE]).frames
    safegen.protect(pipe, policy=lexical_policy, guards=[safegen.Safree(reattention=True)])
    rows, h = record_rows(pipe, extra["num_frames"])
    out = run(pipe, extra, [BENIGN, UNSAFE])
    h.remove()
    res = out.safety[1].result("safree")
    assert res.details["reattention"] is True
    # the benign item is untouched (up to batch-size rounding: its batch had a reference row on some steps)
    assert np.allclose(out.frames[0], base[0], atol=1e-5) and not np.allclose(out.frames[1], base[1], atol=1e-3)
    # one reference row (the unsafe item) on the filtered steps only
    assert rows == [5] * res.filtered_steps + [4] * (3 - res.filtered_steps)
    safegen.unprotect(pipe)


def test_legacy_callback_user_callback_and_stop(lexical_policy):
    from safegen.testing import tiny_text_to_video_pipeline

    pipe = tiny_text_to_video_pipeline()
    calls = []
    every = classifier(pipe, lambda x: torch.ones(x.shape[0], dtype=torch.bool))
    safegen.protect(pipe, policy=lexical_policy, guards=[LVD.from_classifier(every, window=4, ratio=0.75)])
    out = pipe(BENIGN, num_frames=2, num_inference_steps=6, callback=lambda i, t, x: calls.append(i),
               callback_steps=2)
    assert out.safety[0].result("lvd").stopped_at_step == 2 and out.safety[0].unet_steps_run == 3
    assert calls == [0, 2]  # the user's callback ran on its own schedule, after the guards
    assert np.allclose(out.frames, 0.5) and out.frames.shape == (1, 2, 32, 32, 3)  # np: the pipeline's default
    safegen.unprotect(pipe)
    with pytest.raises(TypeError):  # the legacy pipeline has no callback_on_step_end, protected or not
        safegen.protect(pipe)(BENIGN, num_frames=2, num_inference_steps=1, callback_on_step_end=lambda *a: {})
    safegen.unprotect(pipe)


def test_sld_on_video(video):
    kind, pipe, extra = video
    plain = run(pipe, extra, [BENIGN]).frames
    safegen.protect(pipe, guards=[safegen.SLD.max()])
    rows, h = record_rows(pipe, extra.get("num_frames", 1))
    out = run(pipe, extra, [BENIGN])
    h.remove()
    if kind in SEPARATE_CFG:  # (cond, safety concept), then uncond, on each step
        assert out.safety[0].verdict == "steer" and rows == [2, 1] * 3
    else:
        assert out.safety[0].verdict == "steer" and rows == [3] * 3  # uncond, cond, safety concept
    assert not np.array_equal(out.frames, plain)
    safegen.unprotect(pipe)


# ---------------------------------------------------------------------- command line and prompt data


def test_cli_generate_video_writes_gifs_frames_and_report(tmp_path, capsys):
    import json

    from PIL import Image

    from safegen.cli import main

    code = main(["generate", BENIGN, UNSAFE, "--video", "--model", "tiny-text-to-video", "--frames", "3",
                 "--steps", "2", "--save-frames", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000", "000.gif", "001", "001.gif", "report.json"]
    gif = Image.open(tmp_path / "000.gif")  # (the blocked clip's placeholder frames are identical: GIF keeps one)
    assert gif.n_frames == 3 and gif.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "000").iterdir()) == ["00.png", "01.png", "02.png"]
    report = json.loads((tmp_path / "report.json").read_text())
    # the default policy's stack: Latent Guard blocks the unsafe prompt before the loop (a placeholder clip)
    assert [e["verdict"] for e in report] == ["pass", "block"] and [e["frames"] for e in report] == [3, 3]
    assert "BLOCK" in out and "RANDOM" in err


@pytest.mark.parametrize("argv,needle", [  # (with --video, the default model is the default video model)
    (["--video", "--model", "tiny-sd"], "needs a text-to-video pipeline"),
    (["--model", "tiny-cogvideox"], "add --video"),
    (["--frames", "4", "--model", "tiny-cogvideox"], "add --video"),
])
def test_cli_generate_video_needs_a_video_model(tmp_path, capsys, argv, needle):
    from safegen.cli import main

    code = main(["generate", BENIGN, *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_read_prompts_reads_the_t2v_json(tmp_path):
    import json

    from safegen.eval.datasets import read_prompts

    rows = [["0", "violence", "a man  fights\n in the street"], ["0", "terrorism", "a man  fights\n in the street"],
            ["1", "porn", "a nude woman"]]
    f = tmp_path / "t2v.json"
    f.write_text(json.dumps(rows))
    assert read_prompts(f) == ["a man fights in the street", "a nude woman"]  # each prompt once
    assert read_prompts(f, "1", dedup=False) == ["violence", "terrorism", "porn"]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a red bus"}, "a cat"]))
    assert read_prompts(tmp_path / "p.json") == ["a red bus", "a cat"]
    (tmp_path / "bad.json").write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="JSON list"):
        read_prompts(tmp_path / "bad.json")


def test_safetydpo_refuses_a_unet_lora_on_a_video_dit_clearly(tmp_path):
    """SafetyDPO fuses transformer LoRAs on CogVideoX (tests/test_safetydpo.py); a UNet's LoRA is refused before
    anything changes, naming both denoisers."""
    from safegen.lora import _lora_modules, save_lora
    from safegen.testing import tiny_cogvideox_pipeline, tiny_sd_pipeline

    unet = tiny_sd_pipeline().unet
    path = save_lora(tmp_path / "sd.safetensors", {n: (torch.zeros(2, m.in_features), torch.zeros(m.out_features, 2))
                                                   for n, m in _lora_modules(unet).items()})
    pipe = tiny_cogvideox_pipeline()
    with pytest.raises(ValueError, match="made for a pipeline's unet, and this pipeline's denoiser is its transformer"):
        safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(path))])
    assert not safegen.is_protected(pipe)


# ---------------------------------------------------------------------- Wan 2.2: two experts


def _expert_calls(pipe):
    """Per transformer call: (expert 0 or 1, rows) as each expert really runs them (at its patch convolution)."""
    seen, handles = [], []
    for k, m in enumerate((pipe.transformer, pipe.transformer_2)):
        handles.append(m.patch_embedding.register_forward_pre_hook(lambda mod, a, k=k: seen.append((k, a[0].shape[0]))))
    return seen, handles


def test_wan22_lvd_stops_an_item_in_both_experts():
    from safegen.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(two_experts=True)
    extra = VIDEO["wan"][1]

    def flag(x):  # item 1 (its two latent frames) while both items are checked
        hit = torch.zeros(x.shape[0], dtype=torch.bool)
        if x.shape[0] == 4:
            hit[2:] = True
        return hit

    safegen.protect(pipe, guards=[LVD.from_classifier(classifier(pipe, flag), window=2, ratio=0.5)])
    seen, handles = _expert_calls(pipe)
    out = run(pipe, extra, [BENIGN, UNSAFE], steps=6)
    for h in handles:
        h.remove()
    assert [r.verdict for r in out.safety] == ["pass", "block"]
    assert {k for k, _ in seen} == {0, 1}  # the high-noise expert, then the low-noise one
    assert seen[:2] == [(0, 2), (0, 2)]  # step 0: cond and uncond of both items
    assert all(rows == 1 for _, rows in seen[2:])  # item 1 stopped: one row in every later call, either expert
    safegen.unprotect(pipe)
    from safegen.hooks import safegen_hooks

    assert safegen_hooks(pipe) == []  # nothing left on either expert


def test_wan22_sld_uses_each_experts_guidance_scale(monkeypatch):
    """Wan computes ε_u + s·(ε_p − ε_u) with s = guidance_scale on the high-noise expert and guidance_scale_2 on the
    low-noise one: with a stand-in ε_p' = ε_p + 1 from some step on, SLD moves that step's noise prediction by
    exactly its s (the steps before are unchanged, so both runs reach it from the same latents)."""
    import safegen.guards.sld as sld_module
    from safegen.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(two_experts=True)
    extra = dict(VIDEO["wan"][1], guidance_scale=3.0, guidance_scale_2=5.0)

    def capture():
        seen = []
        original = pipe.scheduler.step

        def step(model_output, timestep, *args, **kwargs):
            seen.append((float(timestep), model_output.clone()))
            return original(model_output, timestep, *args, **kwargs)

        pipe.scheduler.step = step
        return seen

    plain = capture()
    run(pipe, extra, BENIGN, steps=4)  # timesteps 1000, 858, 602, 9: the low-noise expert from step 1 on
    del pipe.scheduler.step
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert plain[0][0] >= boundary > plain[1][0]
    safegen.protect(pipe, guards=[safegen.SLD(warmup_steps=0, momentum_scale=0.0)])
    for first, expected in ((0, 3.0), (1, 5.0)):
        monkeypatch.setattr(sld_module, "sld_guidance", lambda eps_u, eps_p, eps_s, nu, step, first=first, **k:
                            (eps_p + (1.0 if step >= first else 0.0), nu))
        guided = capture()
        run(pipe, extra, BENIGN, steps=4)
        del pipe.scheduler.step
        delta = guided[first][1] - plain[first][1]
        assert torch.allclose(delta, torch.full_like(delta, expected), atol=1e-3), (first, delta.mean())
    safegen.unprotect(pipe)


def test_output_guard_judges_every_frame(video):
    """A clip is judged frame by frame and is unsafe when any frame is: the report lists its unsafe frames and the
    clip becomes the placeholder."""
    from safegen.guards.output import OutputGuard

    kind, pipe, extra = video

    class EveryOtherFrame:  # unsafe on the 2nd, 4th, ... frame it is shown
        protocol = "test: every other frame"

        def __init__(self):
            self.seen = []

        def judge(self, prompt, image):
            self.seen.append(image.shape)
            return {"unsafe": len(self.seen) % 2 == 0, "score": 0.9, "category": "violence"}

    judge = EveryOtherFrame()
    safegen.protect(pipe, guards=[OutputGuard(oracle=judge)])
    out = run(pipe, extra, BENIGN, steps=1)
    n = out.frames.shape[1]
    assert len(judge.seen) == n and all(len(s) == 3 for s in judge.seen)  # each frame as an H×W×3 image
    res = out.safety[0].result("output")
    assert out.safety[0].verdict == "block" and res.details["frames"] == list(range(1, n, 2))
    assert res.details["num_frames"] == n and np.allclose(out.frames[0], 0.5)


def test_cli_train_lvd_on_wan_then_protect(tiny_prompt_data, capsys):
    """``safegen train-lvd --video --model tiny-wan`` at a chosen size: every latent frame of the causal VAE is a
    trajectory (the first latent frame stands for output frame 0, each later one for four), and the classifier
    loads on a Wan pipeline, and only there."""
    import json

    from safegen.cli import main
    from safegen.testing import tiny_sd_pipeline, tiny_wan_pipeline
    from safegen.training.lvd import Trajectories

    out, traj = tiny_prompt_data / "lvd-wan.safetensors", tiny_prompt_data / "traj.safetensors"
    code = main(["train-lvd", "--video", "--model", "tiny-wan", "--frames", "5", "--height", "32", "--width", "32",
                 "--data-dir", str(tiny_prompt_data), "--prompts", "4", "--steps", "3", "--window", "2",
                 "--train-steps", "2", "--batch-size", "4", "--save-trajectories", str(traj), "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out[cap.out.index("{"):])["video"] is True
    data = Trajectories.load(traj)
    assert data.x0.shape[:2] == (4 * 2, 2)  # 4 clips × 2 latent frames, 2 recorded steps
    assert tuple(data.x0.shape[-2:]) == (4, 4)  # 32 px ÷ 8: the size asked for, not the pipeline's 480×832
    assert data.frames.tolist() == [0, 1] * 4
    clf = LatentClassifier.load(out)
    assert clf.config.model["class"] == "WanTransformer3DModel" and clf.metadata["video"] is True
    pipe = safegen.protect(tiny_wan_pipeline(), guards=[LVD(weights=str(out), window=2)])
    assert len(run(pipe, VIDEO["wan"][1], [BENIGN, UNSAFE], steps=2).safety) == 2
    with pytest.raises(Exception, match="another model's latents"):
        safegen.protect(tiny_sd_pipeline(), guards=[LVD(weights=str(out))])
