"""LVD: predicted x0 on every scheduler family, the online rule, per-item stops inside a batch, files, training."""

import doctest
import json
import math

import numpy as np
import pytest
import torch

import safegen
from safegen.training import lvd as lvd_training
from safegen.guards.lvd import LVD, LatentClassifier, LVDConfig, LVDWeightsError, predicted_x0, unet_fingerprint

CATS = ["sexual", "violence"]


def classifier(pipe, flag=lambda x0: torch.zeros(x0.shape[0], dtype=torch.bool), calls=None):
    """A classifier whose verdict per row is given by ``flag`` (bool per row of the running batch): violence."""
    return LatentClassifier.scripted(pipe, flag, CATS, calls)


def count_unet_rows(pipe):
    """Rows the UNet computes per call (counted at its first layer, inside safegen's row hooks)."""
    rows = []
    pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return rows


def count_decodes(pipe):
    rows = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    return rows


def run(pipe, prompts, steps=6, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(list(prompts), generator=gens, num_inference_steps=steps, output_type="np", **kw)


# ---------------------------------------------------------------------- predicted x0


def _truth(shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                                  "UniPCMultistepScheduler"])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_x0_on_vp_schedulers_recovers_the_clean_latent(name, kind):
    import diffusers

    s = getattr(diffusers, name)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type=kind)
    s.set_timesteps(10)
    x0, eps = _truth()
    for i in (0, 4, 9):
        t = s.timesteps[i]
        abar = s.alphas_cumprod[int(t)]
        a, sg = abar.sqrt(), (1 - abar).sqrt()
        xt = a * x0 + sg * eps
        out = eps if kind == "epsilon" else a * eps - sg * x0
        got, noise = predicted_x0(s, out, t, xt)
        assert torch.allclose(got, x0, atol=2e-4), (name, kind, i)
        assert noise == pytest.approx(float(sg), abs=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_x0_matches_ddim_and_euler_own_estimates(kind):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    x, out = _truth()
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        s = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
        if cls is DDIMScheduler:
            s.register_to_config(clip_sample=False)  # as SD's config: the estimate is not clipped
        s.set_timesteps(8)
        for t in s.timesteps[:3]:
            got, _ = predicted_x0(s, out, t, x)
            ref = s.step(out, t, x).pred_original_sample
            assert torch.allclose(got, ref, atol=1e-5), (cls.__name__, kind)


def test_x0_on_euler_recovers_the_clean_latent():
    from diffusers import EulerDiscreteScheduler

    s = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(10)
    x0, eps = _truth()
    sigma = s.sigmas[0]
    got, noise = predicted_x0(s, eps, s.timesteps[0], x0 + sigma * eps)  # VE form: x = x0 + σ ε
    assert torch.allclose(got, x0, atol=1e-4)
    assert noise == pytest.approx(float(sigma / (sigma ** 2 + 1).sqrt()), abs=1e-6)


def test_x0_on_flow_matching_recovers_the_clean_latent():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(10)
    x0, eps = _truth()
    for i in (0, 5):
        sigma = s.sigmas[i]
        xt = (1 - sigma) * x0 + sigma * eps
        v = eps - x0
        if i:
            s._step_index = i
        got, noise = predicted_x0(s, v, s.timesteps[i], xt)
        assert torch.allclose(got, x0, atol=1e-5)
        assert noise == pytest.approx(float(sigma))
        # and it is where one Euler step to σ = 0 would land
        assert torch.allclose(xt + (0 - sigma) * v, got, atol=1e-5)


def test_x0_rejects_unknown_prediction_type():
    from diffusers import DDIMScheduler

    s = DDIMScheduler()
    s.set_timesteps(4)
    s.register_to_config(prediction_type="weird")
    with pytest.raises(ValueError, match="prediction_type 'weird'"):
        predicted_x0(s, torch.zeros(1, 4, 2, 2), s.timesteps[0], torch.zeros(1, 4, 2, 2))


# ---------------------------------------------------------------------- the guard in a call


def test_stop_at_step_k_runs_k_plus_1_unet_calls_and_no_decode_others_unaffected(sd):
    plain = run(sd, ["a red bus", "a blue cat"]).images
    calls = []
    # only undecided items are classified: while both are, item 0 is the first row
    flag = lambda x0: (torch.arange(x0.shape[0]) == 0) & (x0.shape[0] == 2)  # noqa: E731
    guard = LVD.from_classifier(classifier(sd, flag, calls), window=4, ratio=0.5)  # 2 of 4 checks → stop at 1
    safegen.protect(sd, guards=[guard])
    rows, decodes = count_unet_rows(sd), count_decodes(sd)
    out = run(sd, ["a red bus", "a blue cat"])
    r0, r1 = out.safety
    k = r0.result("lvd").stopped_at_step
    assert k == 1 and r0.verdict == "block" and r0.unet_steps_run == k + 1 and r0.unet_steps_saved == 6 - k - 1
    assert r0.result("lvd").category == "violence" and "stopped after step 1" in r0.reason
    # CFG: 2 rows per item; item 0's rows ran at steps 0..k only
    assert rows == [4] * (k + 1) + [2] * (6 - k - 1)
    assert decodes == [1]  # only item 1 was decoded
    assert np.allclose(out.images[0], 0.5)  # the flat placeholder
    assert r1.verdict == "pass" and r1.unet_steps_run == 6
    assert np.allclose(out.images[1], plain[1], atol=1e-5)
    # item 1 was never flagged: with 4 checks needing 2, it is accepted once 3 checks found nothing
    assert r1.result("lvd").details["checks"] == 3
    assert calls == [2, 2, 1]
    safegen.unprotect(sd)


def test_all_items_stopped_interrupts_the_loop_and_skips_the_decode(sd):
    guard = LVD.from_classifier(classifier(sd, lambda x0: torch.ones(x0.shape[0], dtype=torch.bool)),
                                window=5, ratio=0.6)  # 3 of 5 → stop after step 2
    safegen.protect(sd, guards=[guard])
    rows, decodes = count_unet_rows(sd), count_decodes(sd)
    out = run(sd, ["blood", "gore"], steps=10)
    assert [r.result("lvd").stopped_at_step for r in out.safety] == [2, 2]
    assert [r.unet_steps_run for r in out.safety] == [3, 3] and len(rows) == 3 and decodes == []
    assert sd._interrupt is False  # the next call starts clean
    again = run(sd, ["a red bus"], steps=4)  # the classifier still flags: stopped again, after step 2
    assert again.safety[0].unet_steps_run == 3
    safegen.unprotect(sd)
    assert "step" not in sd.scheduler.__dict__ and "decode" not in sd.vae.__dict__


def test_accepted_items_are_not_checked_again_and_check_every(sd):
    calls = []
    safegen.protect(sd, guards=[LVD.from_classifier(classifier(sd, calls=calls), window=6, ratio=0.5,
                                                    check_every=2)])
    out = run(sd, ["a red bus"], steps=8)
    # checks at steps 0, 2, 4 (need 2 of 3): after two clean checks it can no longer reach 2
    assert calls == [1, 1] and out.safety[0].verdict == "pass"
    safegen.unprotect(sd)


def test_classifier_error_fails_closed(sd):
    def boom(x0):
        raise RuntimeError("classifier exploded")

    safegen.protect(sd, guards=[LVD.from_classifier(classifier(sd, boom))])
    out = run(sd, ["a red bus", "a blue cat"])
    assert [r.verdict for r in out.safety] == ["error", "error"]
    assert "classifier exploded" in out.safety[0].reason
    assert "step" not in sd.scheduler.__dict__ and "decode" not in sd.vae.__dict__  # hooks removed
    safegen.unprotect(sd)


def test_log_category_reports_without_stopping(sd):
    policy = safegen.load_policy("default")
    policy.categories["violence"].action = "log"
    safegen.protect(sd, policy=policy, guards=[LVD.from_classifier(
        classifier(sd, lambda x0: torch.ones(x0.shape[0], dtype=torch.bool)))])
    out = run(sd, ["blood"])
    assert not out.safety[0].blocked and out.safety[0].unet_steps_run == 6
    safegen.unprotect(sd)


def test_works_with_sdxl_and_latent_guard_blocked_prompts(sdxl):
    from safegen.guards.latent_guard import LatentGuard, LatentGuardHead

    head = LatentGuardHead.mean_match(sdxl.text_encoder.config.hidden_size)
    lg = LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item())
    flag = lambda x0: torch.arange(x0.shape[0]) == x0.shape[0] - 1  # noqa: E731  (last undecided running item)
    safegen.protect(sdxl, guards=[lg, LVD.from_classifier(classifier(sdxl, flag), window=2, ratio=1.0)])
    out = run(sdxl, ["a red bus", "gore", "a blue cat"], steps=4)  # "gore" is a policy concept
    assert [r.verdict for r in out.safety] == ["pass", "block", "block"]
    assert out.safety[1].result("latent_guard").verdict == "block" and out.safety[1].unet_steps_run == 0
    assert out.safety[2].result("lvd").stopped_at_step == 1 and out.safety[2].unet_steps_run == 2
    safegen.unprotect(sdxl)


def test_with_sld_rows_are_kept_but_item_still_stopped(sd):
    flag = lambda x0: torch.arange(x0.shape[0]) == 0  # noqa: E731
    safegen.protect(sd, guards=["sld", LVD.from_classifier(classifier(sd, flag), window=2, ratio=1.0)])
    out = run(sd, ["a red bus", "a blue cat"], steps=4)
    assert out.safety[0].blocked and out.safety[0].unet_steps_run == 2 and not out.safety[1].blocked
    safegen.unprotect(sd)


# ---------------------------------------------------------------------- files and config


def test_save_load_round_trip_and_model_check(sd, sdxl, tmp_path):
    clf = LatentClassifier(LVDConfig(4, categories=list(CATS), model=unet_fingerprint(sd)))
    path = clf.save(tmp_path / "c.safetensors", {"threshold": 0.7})
    back = LatentClassifier.load(path)
    x = torch.randn(3, 4, 8, 8)
    assert torch.equal(back(x, 0.3), clf.eval()(x, 0.3)) and back.metadata["threshold"] == 0.7
    back.check_model(sd)
    with pytest.raises(LVDWeightsError, match="another model's latents"):
        back.check_model(sdxl)
    with pytest.raises(LVDWeightsError, match="another model's latents"):
        safegen.protect(sdxl, guards=[LVD(weights=str(path))])
    assert not safegen.is_protected(sdxl)
    guard = LVD(weights=str(path))
    safegen.protect(sd, guards=[guard])
    assert sd._safegen.state(guard).metadata["threshold"] == 0.7  # the classifier attached to this pipeline
    safegen.unprotect(sd)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(LVDWeightsError, match="not found.*safegen train-lvd"):
        LatentClassifier.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LVDWeightsError, match="not a readable safetensors file"):
        LatentClassifier.load(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(LVDWeightsError, match="not an LVD classifier"):
        LatentClassifier.load(other)


@pytest.mark.parametrize("kwargs,field", [({"window": 0}, "window"), ({"ratio": 1.5}, "ratio"),
                                          ({"check_every": 0}, "check_every"), ({"threshold": 1.0}, "threshold")])
def test_guard_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LVD(**kwargs)


def test_required_count_follows_window_ratio_and_check_every():
    assert LVD(window=20, ratio=0.6).required == 12  # the paper's README setting
    assert LVD(window=5, ratio=0.6).required == 3
    assert LVD(window=6, ratio=0.5, check_every=2).required == 2
    assert LVD(window=3, ratio=0.01).required == 1


def test_preset_and_export():
    from safegen.guards import GUARD_PRESETS

    assert isinstance(GUARD_PRESETS["lvd"](), safegen.LVD) and safegen.LVD is LVD


# ---------------------------------------------------------------------- training


def test_record_and_train_on_tiny_pipeline(sd):
    prompts = ["a red bus", "blood and gore", "a blue cat", "a nude woman"] * 3
    data = lvd_training.record_trajectories(sd, prompts, categories=CATS, steps=4, record_steps=3, batch_size=4,
                                   progress=False,
                                   labeller=lambda p, img: ["violence"] if "blood" in p else [])
    assert data.x0.shape == (12, 3, 4, 16, 16) and data.x0.dtype == torch.float16
    assert data.labels[:, 1].tolist() == [float("blood" in p) for p in prompts]
    assert data.noise[0] > data.noise[1] > data.noise[2]  # noise falls along the trajectory
    clf, summary = lvd_training.train_classifier(data, window=3, steps=5, batch_size=8, progress=False)
    assert len(summary["losses"]) == 5 and clf.config.model == unet_fingerprint(sd)
    clf2, _ = lvd_training.train_classifier(data, window=3, steps=5, batch_size=8, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), clf2.state_dict().values()))  # seeded
    with pytest.raises(ValueError, match="only 3 steps were recorded"):
        lvd_training.train_classifier(data, window=4, steps=1, progress=False)
    safegen.protect(sd, guards=[LVD.from_classifier(clf, window=3)])
    with pytest.raises(ValueError, match="unprotected pipeline"):
        lvd_training.record_trajectories(sd, prompts, categories=CATS, labeller=lambda p, i: [], progress=False)
    safegen.unprotect(sd)


def test_cli_train_lvd(tiny_prompt_data, capsys):
    from safegen.cli import main

    tmp_path = tiny_prompt_data

    out = tmp_path / "lvd.safetensors"
    traj = tmp_path / "traj.safetensors"
    argv = ["train-lvd", "--model", "tiny-sd", "--data-dir", str(tmp_path), "--prompts", "8", "--steps", "3",
            "--window", "2", "--train-steps", "3", "--batch-size", "4", "--out", str(out),
            "--save-trajectories", str(traj)]
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    summary = json.loads(cap.out[cap.out.index("{"):])
    assert summary["train_trajectories"] + summary["val_trajectories"] == 8 and summary["window"] == 2
    clf = LatentClassifier.load(out)
    assert clf.metadata["trajectories"] == 8 and clf.metadata["trained_on"] == "tiny-sd"
    assert main(["train-lvd", "--trajectories", str(traj), "--window", "2", "--train-steps", "2",
                 "--out", str(tmp_path / "again.safetensors")]) == 0
    assert main(["train-lvd", "--out", str(tmp_path / "x.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert main(["train-lvd", "--window", "4", "--record-steps", "2", "--out", str(out)]) == 2
    assert "--record-steps" in capsys.readouterr().err


def test_balanced_accuracy_and_docstrings(monkeypatch):
    assert lvd_training.balanced_accuracy(torch.tensor([True, False]), torch.tensor([True, False])) == 1.0
    assert math.isclose(lvd_training.balanced_accuracy(torch.tensor([True, True]), torch.tensor([True, False])), 0.5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from safegen.guards import lvd

    attempted = 0
    for module in (lvd, lvd_training):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0
        attempted += result.attempted
    assert attempted >= 5


def test_v_prediction_pipeline_reads_x0_and_stops(sd2v):
    seen = []

    def flag(x0):
        seen.append(x0.abs().mean().item())
        return torch.ones(x0.shape[0], dtype=torch.bool)

    safegen.protect(sd2v, guards=[LVD.from_classifier(classifier(sd2v, flag), window=2, ratio=1.0)])
    out = run(sd2v, ["a red bus"], steps=5)
    assert out.safety[0].result("lvd").stopped_at_step == 1 and out.safety[0].unet_steps_run == 2
    assert all(math.isfinite(v) for v in seen) and len(seen) == 2
    safegen.unprotect(sd2v)


def test_the_shipped_video_classifier_is_picked_for_the_shipped_video_model():
    """Both embedded models have their own shipped LVD classifier; each pipeline gets the one trained on it."""
    import safegen
    from safegen.default_model import load_default_pipeline
    from safegen.default_video_model import load_default_video_pipeline
    from safegen.guards.lvd import LVD, LatentClassifier, default_weights_path

    video, image = load_default_video_pipeline(), load_default_pipeline()
    path = default_weights_path(video)
    assert path.name == "default-video-model.safetensors"
    assert default_weights_path(image).name == "default-model.safetensors"
    clf = LatentClassifier.load(path)
    assert clf.metadata["video"] is True and clf.metadata["trained_on"] == "default-video"
    safegen.protect(video, guards=[LVD()])  # attaching checks the classifier against the model: no mismatch
    safegen.unprotect(video)
