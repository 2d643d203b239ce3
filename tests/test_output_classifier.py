"""The output classifier: a small CNN trained on a model's images, calibrated on the benign reference images, as
the output guard's oracle (never the world oracle at guard time)."""

import doctest
import importlib

import numpy as np
import pytest
import torch

import safegen
from safegen.calibration import RiskScale
from safegen.guards.lvd import unet_fingerprint
from safegen.guards.output import OutputGuard
from safegen.errors import GuardUnavailable
from safegen.guards.output_classifier import (OutputClassifier, OutputClassifierConfig, OutputClassifierError,
                                              OutputClassifierNet, default_weights_path)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2


def net_for(pipe=None, categories=("violence",), seed=0, size=16, width=4):
    torch.manual_seed(seed)
    cfg = OutputClassifierConfig(categories=list(categories), size=size, width=width,
                                 model=unet_fingerprint(pipe) if pipe is not None else {})
    return OutputClassifierNet(cfg).eval()


def random_images(n, side=32, seed=0):
    return np.random.default_rng(seed).random((n, side, side, 3), dtype=np.float32)


def generate(pipe, prompts):
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=STEPS, generator=gens, output_type="np")


def test_save_load_round_trip_is_bit_exact(tmp_path, sd):
    net = net_for(sd, categories=("sexual", "violence", "hate"))
    ref = random_images(50)
    clf = OutputClassifier(net, RiskScale(net.scores(ref), net.categories), metadata={"trained_on": "tiny"})
    path = clf.save(tmp_path / "clf.safetensors", {"note": "x"})
    back = OutputClassifier.load(path)
    assert back.categories == clf.categories and back.net.config == clf.net.config
    a, b = clf.net.state_dict(), back.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back.scale.reference, clf.scale.reference)
    assert back.metadata == {"trained_on": "tiny", "note": "x"}
    imgs = random_images(7, seed=1)
    assert torch.equal(back.scores(imgs), clf.scores(imgs))
    assert torch.equal(back.thresholds, clf.thresholds)
    # not an output classifier / not safetensors: clear errors naming the file
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(OutputClassifierError, match="junk.safetensors.*not a readable safetensors"):
        OutputClassifier.load(tmp_path / "junk.safetensors")
    with pytest.raises(OutputClassifierError, match="not found.*train-output-classifier"):
        OutputClassifier.load(tmp_path / "missing.safetensors")


def test_a_classifier_for_another_model_is_refused(tmp_path, sd):
    from safegen.testing import tiny_sd_pipeline

    net = net_for(tiny_sd_pipeline(seed=1))  # trained for another model's images
    clf = OutputClassifier(net, RiskScale(net.scores(random_images(20)), net.categories))
    with pytest.raises(OutputClassifierError, match="trained on the images of another model.*train-output-classifier"):
        clf.bind(sd)
    with pytest.raises(GuardUnavailable):  # a policy that skips unavailable guards can leave it out on this model
        clf.bind(sd)
    path = clf.save(tmp_path / "other.safetensors")
    guard = OutputGuard(oracle="classifier", oracle_options={"weights": str(path)})
    with pytest.raises(Exception, match="trained on the images of another model"):
        safegen.protect(sd, guards=[guard])
    assert not safegen.is_protected(sd)


def test_the_shipped_classifier_is_refused_on_another_pipeline(sd):
    assert default_weights_path().is_file()
    with pytest.raises(Exception, match="shipped output classifier.*not this pipeline's.*train-output-classifier.*"
                                        "oracle_options=\\{'weights': FILE\\}"):
        safegen.protect(sd, guards=[OutputGuard(oracle="classifier")])


def test_calibrated_thresholds_keep_the_reference_within_the_budget():
    net = net_for(categories=("sexual", "violence", "hate", "shocking"))
    ref = random_images(400, seed=3)
    scale = RiskScale(net.scores(ref), net.categories)
    flagged = {}
    for budget in (0.01, 0.02, 0.05):
        clf = OutputClassifier(net, scale, budget=budget)
        js = clf.judge_batch([""] * len(ref), list(ref))
        flagged[budget] = sum(j["unsafe"] for j in js)
        assert flagged[budget] <= budget * len(ref)
        hit = [j for j in js if j["unsafe"]]
        assert all(j["risk"] >= 1 - budget and j["score"] >= j["threshold"] - 1e-4 and j["budget"] == budget
                   for j in hit)
        assert all(j["category"] is None for j in js if not j["unsafe"])
    # the budget moves the threshold: more budget, more flags (400 images cannot resolve 1% over four
    # categories: a new image's expected rate one level down is already over it, so only level 0 fires)
    assert flagged[0.01] <= flagged[0.02] < flagged[0.05] and flagged[0.02] > 0
    with pytest.raises(ValueError, match="budget"):
        OutputClassifier(net, scale, budget=1.5)


def test_bind_takes_the_policy_budget_categories_and_fixed_thresholds(sd):
    net = net_for(sd, categories=("sexual", "violence"))
    clf = OutputClassifier(net, RiskScale(net.scores(random_images(100)), net.categories))

    class Pol:
        name = "p"
        categories = {"violence": None, "hate": None}

        def budget(self):
            return 0.05

        def fixed_threshold(self, category, guard):
            assert guard == "output"
            return None

    bound = clf.bind(sd, Pol())
    assert bound.active == ["violence"] and bound.budget == 0.05 and clf.budget == 0.01  # the original is untouched
    assert torch.equal(bound.thresholds, clf.scale.subset(["violence"]).thresholds(0.05))
    assert OutputClassifier(net, clf.scale, budget=0.02).bind(sd, Pol()).budget == 0.02  # an explicit budget wins
    Pol.fixed_threshold = lambda self, c, g: 123.0
    fixed = clf.bind(sd, Pol())
    assert fixed.thresholds.tolist() == [123.0]
    assert not any(j["unsafe"] for j in fixed.judge_batch(["a"] * 3, list(random_images(3))))
    assert fixed.judge("a", random_images(1)[0])["budget"] is None  # a fixed threshold has no budget
    Pol.categories = {"hate": None}
    with pytest.raises(OutputClassifierError, match="none of which policy 'p' has"):
        clf.bind(sd, Pol())


def test_output_guard_blocks_what_the_classifier_flags_and_passes_the_rest(sd):
    prompts = ["a red bus", "a blue bird"]
    plain = generate(sd, prompts).images
    net = net_for(sd)
    s = net.scores(plain)[:, 0].tolist()
    hi, lo = (0, 1) if s[0] > s[1] else (1, 0)
    mid = (s[0] + s[1]) / 2
    # reference scores: 98 far below both items, 2 at the midpoint: at a 1% budget only scores above it fire
    ref = torch.tensor([[min(s) - 10.0]] * 98 + [[mid]] * 2)
    clf = OutputClassifier(net, RiskScale(ref, ["violence"]))
    guard = OutputGuard(oracle=clf)
    safegen.protect(sd, guards=[guard])
    out = generate(sd, prompts)
    assert out.safety[hi].verdict == "block" and out.safety[lo].verdict == "pass"
    assert np.all(out.images[hi] == 0.5) and np.array_equal(out.images[lo], plain[lo])
    res = out.safety[hi].result("output")
    assert res.category == "violence" and res.threshold > mid and res.score >= res.threshold - 1e-4
    assert res.risk == 1.0 and res.budget == 0.01
    assert res.details["oracle"] == "classifier" and "0.01 benign budget" in res.details["protocol"]
    assert "output check (classifier) found violence" in out.safety[hi].reason
    passed = out.safety[lo].result("output")
    assert passed.category is None and passed.score < passed.threshold
    safegen.unprotect(sd)
    assert np.array_equal(generate(sd, prompts).images, plain)


def test_non_finite_scores_fail_closed(sd):
    net = net_for(sd)
    clf = OutputClassifier(net, RiskScale(net.scores(random_images(20)), net.categories))
    with torch.no_grad():
        net.head.bias.fill_(float("nan"))
    j = clf.judge("a red bus", random_images(1)[0])
    assert j["unsafe"] is True and "not finite" in j["error"]
    nan_frame = random_images(3)
    nan_frame[1, 0, 0, 0] = np.nan  # one frame of a clip: the clip's score is NaN, never the other frames' max
    with torch.no_grad():
        net.head.bias.fill_(0.0)
    assert bool(torch.isnan(net.scores([nan_frame])).all())
    with torch.no_grad():
        net.head.bias.fill_(float("nan"))
    safegen.protect(sd, guards=[OutputGuard(oracle=clf)])
    out = generate(sd, ["a red bus", "a blue bird"])
    assert [r.verdict for r in out.safety] == ["error", "error"] and all(r.blocked for r in out.safety)
    res = out.safety[0].result("output")
    assert res.verdict == "error" and "not finite" in res.reason and np.all(out.images[0] == 0.5)
    safegen.unprotect(sd)


def test_generated_images_resume_from_the_work_folder(tmp_path, sd):
    from safegen.training.output_classifier import generate_images

    kw = dict(steps=STEPS, batch_size=2, chunk=2, work=tmp_path, name="x", progress=False)
    first = generate_images(sd, ["a red bus", "a cat", "a dog"], **kw)
    chunks = sorted((tmp_path / "x").iterdir())
    assert [p.name for p in chunks] == ["chunk-0000000.safetensors", "chunk-0000002.safetensors"]
    chunks[1].write_bytes(b"torn")  # a killed write: made again
    again = generate_images(sd, ["a red bus", "a cat", "a dog"], **kw)
    assert torch.equal(again.images, first.images)
    other = generate_images(sd, ["a red bus", "a cat", "a dog"], seed=5, **kw)  # other seeds: not reused
    assert other.seeds == [5, 6, 7] and not torch.equal(other.images, first.images)
    safegen.protect(sd, guards=["sld"])
    with pytest.raises(ValueError, match="unprotected"):
        generate_images(sd, ["a"], **kw)
    safegen.unprotect(sd)


def test_cli_trains_and_writes_a_loadable_classifier(tmp_path, monkeypatch, capsys):
    import json

    import safegen.calibration as calibration
    import safegen.training.output_classifier as training
    from safegen.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = ["prompt,image,category"]
    for i in range(6):
        rows += [f"blood on a red car {i},u_idx_{i}_0.jpg,Violence", f"a red car {i},s_idx_{i}_0.jpg,Violence"]
    (data / "CoProv2_train.csv").write_text("\n".join(rows) + "\n")
    coco = ["case_number,source,prompt,evaluation_seed,coco_id"] + [f"{i},coco,a blue bird {i},1,1" for i in range(8)]
    (data / "coco_30k_10k.csv").write_text("\n".join(coco) + "\n")
    monkeypatch.setattr(training, "BENIGN_START", 2)
    monkeypatch.setattr(calibration, "reference_prompts", lambda: ["a cat", "a dog", "a bus", "a boat"])
    out = tmp_path / "clf.safetensors"
    argv = ["train-output-classifier", "--model", "tiny-sd", "--data-dir", str(data), "--n-unsafe", "4",
            "--n-benign", "4", "--steps", "2", "--train-steps", "3", "--work", str(tmp_path / "work"), "--out",
            str(out), "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 8 and summary["sources"] == {"coprov2": 4, "coco": 4}
    assert summary["reference"]["prompts"] == 4 and "validation" in summary
    clf = OutputClassifier.load(out)
    assert len(clf.scale) == 4 and clf.metadata["images"] == 8 and clf.net.config.model["class"]
    # a second run reads the images back and resumes the finished training (no step runs again)
    assert main(argv + ["--calibrate-on", "clean"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["resumed_from_step"] == 3 and again["reference"]["calibrated_on"] == "clean"
    assert torch.equal(OutputClassifier.load(out).net.head.weight, clf.net.head.weight)
    assert main(argv[:-2] + ["--out", str(tmp_path / "x.pt")]) == 2  # weights are safetensors only
    many = [("99" if a == "4" and argv[i - 1] == "--n-unsafe" else a) for i, a in enumerate(argv)]
    assert main(many) == 2  # more prompts than the data has: a usage error, no traceback


@pytest.mark.parametrize("name", ["safegen.guards.output_classifier", "safegen.training.output_classifier"])
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_the_embedded_model_gets_the_shipped_classifier_by_default():
    from safegen.default_model import load_default_pipeline
    from safegen.world import render

    pipe = load_default_pipeline()
    pipe.set_progress_bar_config(disable=True)
    guard = OutputGuard(oracle="classifier")
    assert guard.weight_files() == [default_weights_path()]
    policy = safegen.load_policy("default")
    safegen.protect(pipe, policy=policy, guards=[guard])
    bound = pipe._safegen.state(guard).oracle
    assert bound.active == list(policy.categories) and bound.budget == 0.01
    out = pipe(["a red bus"], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    res = out.safety[0].result("output")
    assert res.details["oracle"] == "classifier" and res.budget == 0.01 and res.risk is not None
    policy.sensitivity = 5.0  # budget 0.05: the next call's thresholds follow the policy
    out = pipe(["a red bus"], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    res5 = out.safety[0].result("output")
    assert res5.budget == policy.budget() == 0.05 and res5.threshold < res.threshold
    # the guard's own decision on a clearly marked world image at a looser budget (5%): flagged, right category
    j = OutputClassifier.load(budget=0.05).bind(pipe, policy).judge("a red bus", render("a red bus", "hate"))
    assert j["unsafe"] and j["category"] == "hate"
    safegen.unprotect(pipe)
