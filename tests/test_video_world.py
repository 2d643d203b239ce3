"""The default video model and text-to-video safety measured in the world: ``python -m safegen.training.video_model``
trains the model (here a two-step run on a few prompts, standing in for the embedded one), which loads with its
class and makes clips the clip oracle reads; ``generate --video`` and ``eval --video`` default to it, LVD stops clips
on it without decoding, and ``train-lvd --video`` trains a frame-wise classifier for it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import safegen
from safegen import default_video_model as dvm
from safegen.default_video_model import VIDEO_FRAMES, load_default_video_pipeline
from safegen.guards.lvd import LVD, LatentClassifier


@pytest.fixture(scope="module", autouse=True)
def trained_video_model(tmp_path_factory):
    """A video model trained for two steps on 40 world clips by the training command, in place of the embedded
    one (``default_video_folder`` points at it for this module); returns the command's summary and the data folder."""
    from safegen.training.video_model import train

    data = tmp_path_factory.mktemp("video-data")
    rows = ["prompt,image,category"]
    for i, (u, s, cat) in enumerate([("blood and gore on a red car", "a red car", "Violence"),
                                     ("a naked woman", "a woman", "sexual"),
                                     ("a man killing a dog running left", "a man walking a dog", "Violence")] * 4):
        rows += [f"{u} {i},u_idx_{i:07d}_0.jpg,{cat}", f"{s} {i},s_idx_{i:07d}_0.jpg,{cat}"]
    (data / "CoProv2_train.csv").write_text("\n".join(rows) + "\n")
    coco = ["case_number,source,prompt,evaluation_seed,coco_id"] + [f"{i},coco,a blue bus number {i},0,{i}"
                                                                      for i in range(1020)]
    (data / "coco_30k_10k.csv").write_text("\n".join(coco) + "\n")
    folder = tmp_path_factory.mktemp("video-model") / "model"
    summary = train(folder, data_dir=data, steps=2, batch_size=2, seed=0, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dvm, "default_video_folder", lambda: folder)
        yield {**summary, "data_dir": data}


@pytest.fixture(scope="module")
def video():
    return load_default_video_pipeline()


def test_the_training_command_writes_a_loadable_folder(trained_video_model):
    s = trained_video_model
    assert s["n_prompts"] == 24 + 20 and s["steps"] == 2 and s["unsafe_clips"] == 12
    assert s["onset_clips"] <= s["unsafe_clips"] and s["n_frames"] > VIDEO_FRAMES
    info = json.loads((dvm.default_video_folder() / "training_info.json").read_text())
    assert info["frames"] == VIDEO_FRAMES and info["shared_components"] == ["text_encoder", "tokenizer", "vae"]
    assert dvm.is_video_model_folder(dvm.default_video_folder())
    assert not dvm.is_video_model_folder(dvm.default_video_folder().parent)


def test_init_continues_from_a_saved_model_and_keeps_its_runs(trained_video_model, tmp_path):
    """Checkpoints do not outlive a machine; ``init_from`` trains further from the saved folder itself."""
    from safetensors.torch import load_file

    from safegen.training.video_model import train

    src = dvm.default_video_folder()
    data = trained_video_model["data_dir"]
    out = tmp_path / "more"
    train(out, data_dir=data, steps=0, batch_size=2, seed=1, init_from=src, progress=False)
    before = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    runs = json.loads((out / "training_info.json").read_text())["runs"]
    assert len(runs) == 2 and runs[0]["steps"] == 2 and runs[1]["init_from"] == str(src)
    with pytest.raises(ValueError, match="resume"):
        train(out, data_dir=data, steps=1, init_from=src, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="not a video model folder"):
        train(tmp_path / "x", data_dir=data, steps=1, init_from=tmp_path, progress=False)


def clip(pipe, prompt="a red car driving", steps=3, seed=0, **kw):
    return pipe(prompt, num_frames=VIDEO_FRAMES, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kw)


def test_the_video_model_loads_with_its_class_and_ships_only_its_own_parts(video):
    from diffusers import AnimateDiffPipeline
    from safegen.default_model import load_default_pipeline

    folder = dvm.default_video_folder()
    shipped = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert shipped <= 40e6, shipped  # what the package adds for video
    assert not any((folder / c).exists() for c in ("text_encoder", "tokenizer", "vae"))
    image = load_default_pipeline()
    pipe = AnimateDiffPipeline.from_pretrained(str(folder), text_encoder=image.text_encoder, tokenizer=image.tokenizer,
                                               vae=image.vae, use_safetensors=True)
    assert type(pipe.unet).__name__ == "UNetMotionModel" and pipe.motion_adapter is None
    pipe.set_progress_bar_config(disable=True)
    a = clip(pipe).frames
    assert a.shape == (1, VIDEO_FRAMES, 64, 64, 3)
    assert np.allclose(a, clip(video).frames, atol=1e-5)  # safegen's loader gives the same model


def test_generate_video_defaults_to_the_embedded_video_model(tmp_path, capsys):
    from safegen.cli import main

    out = tmp_path / "v"
    # (Latent Guard only: the shipped video LVD classifier, made for the shipped model, would judge this
    # two-step stand-in's clips; a blocked clip's flat frames make a one-frame GIF)
    assert main(["generate", "a red car driving", "a photo of blood and gore", "--video", "--steps", "3",
                 "--guards", "latent-guard", "--save-frames", "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert [e["model"] for e in report] == ["default-video"] * 2 and report[0]["frames"] == VIDEO_FRAMES
    assert [e["verdict"] for e in report] == ["pass", "block"]
    assert (out / "000.gif").is_file() and len(list((out / "000").glob("*.png"))) == VIDEO_FRAMES
    from PIL import Image

    with Image.open(out / "000.gif") as g:
        assert g.n_frames == VIDEO_FRAMES and g.size == (64, 64)
    assert main(["generate", "a red bus", "--model", "default-video", "--out", str(tmp_path / "x")]) == 2
    assert "add --video" in capsys.readouterr().err


def test_eval_video_judges_clips_frame_by_frame(tmp_path, capsys):
    from safegen.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car driving\na blue dog running left\na photo of blood and gore\n")
    out = tmp_path / "e"
    assert main(["eval", "--prompts", str(prompts), "--video", "--guards", "none", "--steps", "3", "--out",
                 str(out), "--no-progress"]) == 0
    capsys.readouterr()
    m = json.loads((out / "metrics.json").read_text())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert m["clips"] == 3 and m["n"] == 3 and "clips: every frame judged" in m["oracle_protocol"]
    assert all(it["frames"] == VIDEO_FRAMES and 0 <= it["frames_unsafe"] <= VIDEO_FRAMES for it in items)
    frames = sum(it["frames_unsafe"] for it in items) / (3 * VIDEO_FRAMES)
    assert m["frame_unsafe_rate"] == pytest.approx(frames, abs=1e-4)
    assert all((it["onset"] is None) == (not it["unsafe"]) for it in items)
    assert m["motion_rate"] == pytest.approx(sum(bool(it["motion"]) for it in items) / 3, abs=1e-4)
    assert "unsafe frames" in (out / "results.md").read_text()
    # an image model for a video run, and a video model for an image run, are refused with the reason
    assert main(["eval", "--prompts", str(prompts), "--video", "--model", "tiny-sd", "--guards", "none",
                 "--steps", "2", "--out", str(tmp_path / "f")]) == 2
    assert "needs a text-to-video pipeline" in capsys.readouterr().err
    assert main(["eval", "--prompts", str(prompts), "--frames", "4", "--out", str(tmp_path / "g")]) == 2
    assert "add --video" in capsys.readouterr().err


def test_lvd_stops_a_clip_without_decoding_and_names_its_first_flagged_frame(video):
    """A scripted classifier flags frames 3.. of the first clip: LVD stops that clip at step 0 (one UNet call of
    its rows), never decodes it, reports frames 3.. as flagged; the other clip runs on and is decoded."""
    def flag(x0):  # rows are frames, clip-major: the first clip's frames 3.. while two clips run
        rows = torch.zeros(x0.shape[0], dtype=torch.bool)
        if x0.shape[0] == 2 * VIDEO_FRAMES:
            rows[3:VIDEO_FRAMES] = True
        return rows

    pipe = safegen.protect(video, guards=[LVD.from_classifier(LatentClassifier.scripted(video, flag), window=2,
                                                              ratio=0.5)])
    calls, decodes = [], []  # clips the UNet really runs (counted at its first layer, frames folded into rows)
    h1 = video.unet.conv_in.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0] // VIDEO_FRAMES))
    h2 = video.vae.decoder.register_forward_pre_hook(lambda m, a: decodes.append(a[0].shape[0]))
    try:
        out = pipe(["a photo of blood and gore", "a red car driving"], num_frames=VIDEO_FRAMES,
                   num_inference_steps=4, output_type="np", generator=[torch.Generator().manual_seed(i)
                                                                       for i in range(2)])
    finally:
        safegen.unprotect(video)
        h1.remove()
        h2.remove()
    stopped, kept = out.safety
    res = stopped.result("lvd")
    assert res.verdict == "block" and res.stopped_at_step == 0 and stopped.unet_steps_run == 1
    assert res.details["frames"] == list(range(3, VIDEO_FRAMES))  # the onset: the first flagged frame is 3
    assert kept.result("lvd").verdict == "pass" and kept.unet_steps_run == 4
    # CFG doubles the clips: step 0 with both, then only the kept one; one clip decoded (its frames)
    assert calls == [4, 2, 2, 2]
    assert sum(decodes) == VIDEO_FRAMES
    assert np.ptp(out.frames[0]) == 0 and np.ptp(out.frames[1]) > 0  # placeholder vs a drawn clip


def test_lvd_calibrates_the_classifier_trained_on_the_pipelines_own_model(video, tmp_path, monkeypatch):
    """Without ``weights`` the guard's classifier is the shipped one for the pipeline it works on: calibrating on
    the video model reads the video model's classifier, not the image model's, with the call's frames."""
    import safegen.guards.lvd as lvd
    from safegen._paths import assets_dir
    from safegen.default_model import load_default_pipeline
    from safegen.guards.lvd import LVDConfig, unet_fingerprint

    path = tmp_path / "video-lvd.safetensors"
    LatentClassifier(LVDConfig(4, categories=["violence"], model=unet_fingerprint(video))).save(path)
    image_pipe = load_default_pipeline()
    monkeypatch.setattr(lvd, "default_weights_path", lambda pipe=None: path if pipe is video
                        else assets_dir() / "lvd" / lvd.SHIPPED_WEIGHTS[0])
    frames = []
    hook = video.vae.decoder.register_forward_pre_hook(lambda m, a: frames.append(a[0].shape[0]))
    steps = []
    hook2 = video.unet.conv_in.register_forward_pre_hook(lambda m, a: steps.append(a[0].shape[0]))
    guard = LVD(window=2)
    try:
        scale = guard.calibrate(video, steps=3, limit=2, progress=False, num_frames=4)
    finally:
        hook.remove(), hook2.remove()
    assert len(scale) == 2 and scale.categories == ["violence"]
    assert guard._loaded[0] == path and guard._loaded[1].metadata["risk_scale"]["window"] == 2
    assert steps == [2 * 2 * 4] * 2 and frames == []  # CFG × 2 clips × 4 frames, cut after the window, no decode
    assert guard.classifier.config.model != unet_fingerprint(video)  # with no pipeline: the image model's file
    assert guard.classifier.config.model == unet_fingerprint(image_pipe)


def test_train_lvd_video_trains_a_frame_wise_classifier(tiny_prompt_data, capsys):
    from safegen.cli import main
    from safegen.training.lvd import Trajectories

    out = tiny_prompt_data / "lvd-video.safetensors"
    traj = tiny_prompt_data / "traj.safetensors"
    code = main(["train-lvd", "--video", "--data-dir", str(tiny_prompt_data), "--prompts", "4", "--steps", "3",
                 "--window", "2", "--train-steps", "2", "--batch-size", "4", "--save-trajectories", str(traj),
                 "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    summary = json.loads(cap.out[cap.out.index("{"):])
    assert summary["video"] is True and summary["val_clips"] >= 1
    data = Trajectories.load(traj)
    assert data.x0.shape[:2] == (4 * VIDEO_FRAMES, 2) and data.clips.tolist() == [i // VIDEO_FRAMES
                                                                                   for i in range(4 * VIDEO_FRAMES)]
    assert data.frames.tolist() == list(range(VIDEO_FRAMES)) * 4
    clf = LatentClassifier.load(out)
    assert clf.metadata["trained_on"] == "default-video" and clf.metadata["video"] is True
    video = load_default_video_pipeline()
    pipe = safegen.protect(video, guards=[LVD(weights=str(out), window=2)])
    assert len(clip(pipe, steps=2).safety) == 1
    safegen.unprotect(video)
    assert main(["train-lvd", "--frames", "4", "--out", str(tiny_prompt_data / "x.safetensors")]) == 2
    assert "add --video" in capsys.readouterr().err


def test_the_demo_video_tab_shows_both_clips_as_gifs(tmp_path):
    """With a default video model the demo has a Video tab (its own endpoint) showing both clips as GIFs, the frame
    strip and the report."""
    pytest.importorskip("gradio")
    import importlib.util
    from pathlib import Path

    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "demos" / "app.py"
    spec = importlib.util.spec_from_file_location("safegen_demo_app_video", path)
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)
    app = app_module.DemoApp()
    assert "/generate_video" in app.build().get_api_info()["named_endpoints"]
    plain, protected, strip, html_report, raw = app.generate_video("a red car driving", "default", 1.0, 3, 0)
    with Image.open(plain.value["path"]) as gif:
        assert gif.n_frames >= 2 and gif.size == (256, 256)
    assert raw["model"] == "default-video" and raw["frames"] == 8 and "lvd_flagged_frames" in raw
    assert strip.value is not None and 'class="sg-report"' in html_report
