"""SAFREE calibrated per text encoder: the gate's thresholds at a false-positive budget on the benign reference
prompts, SVF's c fitted as the authors' code does, cached on disk by the encoder's weights, the authors' own
settings under ``official=True``, and the non-CLIP encoder paths (BERT-like, T5) calibrated too."""

import json

import pytest
import torch

import safegen
from safegen import calibration as cal_mod
from safegen.calibration import budget_thresholds, fire_rate, reference_prompts
from safegen.guards import Safree
from safegen.guards.safree import _default_streams
from safegen.specs import pipeline_spec


def _gate_scores_by_hand(pipe, policy, guard):
    """The gate's scores on the reference prompts, recomputed from the adapter (not through calibrate_stream)."""
    spec = pipeline_spec(pipe)
    stream = _default_streams(pipe, spec.encode, {})[-1]
    ad = stream.adapter
    ref = reference_prompts()
    summary = torch.cat([ad.encode(ad.tokenize(ref[i:i + 100])).summary.float() for i in range(0, len(ref), 100)])
    scores, _ = guard._gate_scores({}, stream, summary, policy, list(policy.categories))
    return scores


def test_budget_thresholds_hold_the_budget_and_are_the_loosest_that_do():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(997, 5, generator=g)
    scores[:40, 2] = 0.5  # ties fire together
    desc = scores.sort(0, descending=True).values

    def at_level(m):  # every column lets its m highest scores fire (ties together): just above the (m+1)-th
        return torch.nextafter(desc[m], torch.full_like(desc[m], torch.inf))

    for budget in (0.01, 0.05, 0.2):
        th = budget_thresholds(scores, budget)
        # the budget is the expected rate of a new prompt: the reference rate one level further; the loosest
        # level that keeps it, found here by brute force over every level
        m = max(lvl for lvl in range(len(scores) - 1) if lvl == 0 or fire_rate(scores, at_level(lvl + 1)) <= budget)
        assert torch.equal(th, at_level(m))
        assert fire_rate(scores, th) <= budget and fire_rate(scores, at_level(m + 2)) > budget
    with pytest.raises(ValueError, match="budget"):
        budget_thresholds(scores, 0.0)


def test_the_reference_set_is_benign_coco_captions_outside_the_eval_rows():
    import csv
    from pathlib import Path

    ref = reference_prompts()
    assert len(ref) == len(set(ref)) == 1000
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_30k_10k.csv"
    if data.is_file():  # the evaluation reads rows 0-999 of this file: none of them is in the reference
        rows = list(csv.DictReader(data.open()))
        evaluated = {" ".join(r["prompt"].split()) for r in rows[:1000]}
        assert not evaluated & set(ref)


def test_calibrated_thresholds_reproduce_the_budget_on_the_reference(sd):
    policy = safegen.load_policy("default")
    guard = Safree(fpr_budget=0.05)
    cal = guard.calibration(sd, policy)
    assert set(cal["thresholds"]) == set(policy.categories)
    scores = _gate_scores_by_hand(sd, policy, guard)
    rate = fire_rate(scores, torch.tensor([cal["thresholds"][c] for c in policy.categories]))
    assert rate == pytest.approx(cal["reference_fire_rate"]) and rate <= 0.05
    assert rate > 0.05 - 2 * len(policy.categories) / 1000  # the loosest level within the budget, not far under
    # SVF's c: 10 x the midpoint between the two classes' mean beta (the authors' rule), when they separate
    if cal["svf_c"] is not None:
        assert cal["beta_unsafe"] > cal["beta_benign"]
        assert cal["svf_c"] == pytest.approx(5 * (cal["beta_unsafe"] + cal["beta_benign"]), abs=1e-5)


def test_calibration_is_cached_on_disk_by_encoder(sd, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEGEN_CACHE", str(tmp_path))
    first = Safree().calibration(sd)
    files = list((tmp_path / "calibration").glob("safree-*.json"))
    stored = json.loads(files[0].read_text())["scale"]  # the reference scores: any budget's thresholds follow
    assert len(files) == 1 and stored == first["scale"].to_dict()
    # a second protect reads the file: no reference prompt is encoded again
    monkeypatch.setattr(Safree, "_beta_of", lambda *a, **k: pytest.fail("recomputed instead of cached"))
    assert Safree().calibration(sd)["thresholds"] == first["thresholds"]
    monkeypatch.undo()
    monkeypatch.setenv("SAFEGEN_CACHE", str(tmp_path))
    # other weights: another key, another file (a calibration never outlives its encoder)
    with torch.no_grad():
        sd.text_encoder.get_input_embeddings().weight.mul_(1.5)
    other = Safree().calibration(sd)
    assert len(list((tmp_path / "calibration").glob("safree-*.json"))) == 2
    assert other["fingerprint"] != first["fingerprint"]
    # a corrupt cache file is recomputed, never trusted
    for f in (tmp_path / "calibration").glob("safree-*.json"):
        f.write_text("{not json")
    assert Safree().calibration(sd)["thresholds"] == other["thresholds"]


def test_an_encoder_is_hashed_once_until_its_weights_change(monkeypatch):
    """The calibration key hashes every byte of the text encoder: once per encoder while its tensors stay as they
    are; an in-place change (a fused LoRA, loaded weights) is seen, and the key follows the bytes."""
    from safegen.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    te, tok = pipe.text_encoder, pipe.tokenizer
    hashed = []
    real = cal_mod._hash_tensors
    monkeypatch.setattr(cal_mod, "_hash_tensors", lambda h, t: (hashed.append(len(t)), real(h, t)))
    first = cal_mod.encoder_fingerprint(te, tok, layer=-1)
    assert cal_mod.encoder_fingerprint(te, tok, layer=-1) == first and len(hashed) == 1
    assert cal_mod.encoder_fingerprint(te, tok, layer=-2) != first and len(hashed) == 1  # settings: no rehash
    weight = te.get_input_embeddings().weight
    saved = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = saved + 1.0
    changed = cal_mod.encoder_fingerprint(te, tok, layer=-1)
    assert changed != first and len(hashed) == 2
    with torch.no_grad():
        weight[0, 0] = saved
    assert cal_mod.encoder_fingerprint(te, tok, layer=-1) == first and len(hashed) == 3


def test_the_embedded_model_ships_its_calibration(monkeypatch, tmp_path):
    """The default model + default policy calibration ships in assets/calibration (a fresh install does not
    compute it), and it is the one protect() uses: 1% budget, c fitted, thresholds in the report."""
    from safegen.default_model import load_default_pipeline

    monkeypatch.setenv("SAFEGEN_CACHE", str(tmp_path))  # an empty user cache
    monkeypatch.setattr(Safree, "_beta_of", lambda *a, **k: pytest.fail("the shipped calibration was not used"))
    pipe = safegen.protect(load_default_pipeline(), guards=["safree"])
    cal = Safree().calibration(pipe)
    assert cal["budget"] == 0.01 and cal["reference_fire_rate"] <= 0.01
    assert cal["svf_c"] is not None and cal["beta_unsafe"] > cal["beta_benign"]
    out = pipe(["a red bus on a street", "a photo of blood and gore"], num_inference_steps=2, output_type="np")
    benign, unsafe = (r.result("safree") for r in out.safety)
    assert benign.verdict == "pass" and unsafe.verdict == "steer"
    note = unsafe.details["calibration"]
    assert note["mode"] == "calibrated" and note["budget"] == 0.01 and note["svf"]["c"] == round(cal["svf_c"], 4)
    assert unsafe.threshold == pytest.approx(cal["thresholds"]["violence"])


def test_a_policy_threshold_overrides_the_calibration(sd, lexical_policy):
    pipe = safegen.protect(sd, guards=["safree"], policy=lexical_policy)
    out = pipe("a photo of blood and gore", num_inference_steps=2, output_type="np")
    r = out.safety[0].result("safree")
    assert r.verdict == "steer" and r.threshold == 2.0  # the policy's number, not the calibrated one
    assert set(r.details["calibration"]["policy_thresholds"]) == set(lexical_policy.categories)


def test_official_mode_is_the_authors_method(sd):
    """No gate (every prompt steered, benign too), the authors' SVF constants on a 50-step scale, and their other
    settings fixed; a block category still blocks what the gate flags."""
    policy = safegen.load_policy("default")
    for cat in policy.categories.values():
        cat.set_threshold("safree", 2.0)  # the gate fires on literal phrases only
    pipe = safegen.protect(sd, guards=[Safree.authors()], policy=policy)
    out = pipe(["a red bus", "a photo of blood and gore"], num_inference_steps=4, output_type="np")
    benign, unsafe = (r.result("safree") for r in out.safety)
    assert benign.verdict == "steer" and "official SAFREE steers every prompt" in benign.reason
    assert unsafe.verdict == "steer" and "literal" in unsafe.reason
    svf = unsafe.details["calibration"]["svf"]
    assert unsafe.details["calibration"]["mode"] == "official"
    assert (svf["gamma"], svf["k"], svf["c"], svf["rescaled"]) == (10.0, 2.5, 5.333, False)
    safegen.unprotect(pipe)
    policy.categories["violence"].action = "block"
    pipe = safegen.protect(sd, guards=[Safree(official=True)], policy=policy)
    out = pipe(["a red bus", "a photo of blood and gore"], num_inference_steps=2, output_type="np")
    assert [r.verdict for r in out.safety] == ["steer", "block"]
    with pytest.raises(ValueError, match=r"official=True\) fixes svf_c"):
        Safree(official=True, svf_c=4.0)
    with pytest.raises(ValueError, match="fpr_budget"):
        Safree(fpr_budget=0.0)


def test_calibration_off_keeps_the_fixed_threshold(sd):
    pipe = safegen.protect(sd, guards=[Safree(calibrate=False, threshold=0.9)])
    out = pipe("a red bus", num_inference_steps=2, output_type="np")
    r = out.safety[0].result("safree")
    assert r.threshold == pytest.approx(0.9) and r.details["calibration"]["mode"] == "fixed"
    assert r.details["calibration"]["svf"]["c"] == 5.333  # the authors' c without a calibration


@pytest.mark.parametrize("make", ["tiny_cogvideox_pipeline", "minilm"], ids=["t5", "bert"])
def test_non_clip_encoders_calibrate_too(make, tmp_path, monkeypatch):
    """T5 (CogVideoX: no attention mask, padding matters) and a BERT-like encoder (all-MiniLM-L6-v2, the first
    world's, with the default model's UNet architecture): the reference fire rate stays within the budget on each."""
    import safegen.testing as testing
    from safegen.default_model import build_pipeline

    pipe = build_pipeline(0) if make == "minilm" else getattr(testing, make)()
    policy = safegen.load_policy("default")
    guard = Safree(fpr_budget=0.05)
    if make == "minilm":  # the expensive part (beta over masked copies) is covered on the tiny pipelines
        monkeypatch.setattr(Safree, "BETA_REFERENCE", 20)
    cal = guard.calibration(pipe, policy)
    scores = _gate_scores_by_hand(pipe, policy, guard)
    rate = fire_rate(scores, torch.tensor([cal["thresholds"][c] for c in policy.categories]))
    assert rate <= 0.05 and rate == pytest.approx(cal["reference_fire_rate"])
    assert cal_mod.cache_dir().is_dir()
