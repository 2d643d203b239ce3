"""One score scale for every guard: a policy budget means the same benign rate whichever guard applies it.

Each guard calibrates its raw score (Latent Guard's logit, SAFREE's cosine, SLD's alignment, LVD's probability) on
the benign reference prompts; at a budget ``b`` the guard, run as it runs in a pipeline, flags at most ``b`` of the
prompts it was calibrated on, and close to ``b`` (the loosest level within it). Reports carry the raw score, the
calibrated risk and the budget.
"""

import pytest
import torch

import safegen
from safegen.calibration import RiskScale, reference_prompts
from safegen.guards.latent_guard import LatentGuard, LatentGuardHead
from safegen.guards.lvd import LVD, LVDConfig, LatentClassifier, unet_fingerprint


def _flag_share(reports, guard: str) -> float:
    """Share of items whose result from ``guard`` names a category that reached its threshold."""
    hits = [r.result(guard) for r in reports]
    return sum(h is not None and h.category is not None for h in hits) / len(reports)


def _run(pipe, prompts, batch: int, steps: int, **kw):
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        out += pipe(chunk, num_inference_steps=steps, generator=gens, output_type="latent", **kw).safety
    return out


def _log_policy(fpr: float):
    policy = safegen.load_policy("default")
    policy.fpr = fpr
    for cat in policy.categories.values():
        cat.action = "log"  # report only: every item is generated and scored
    return policy


@pytest.mark.parametrize("budget", [0.03])
def test_latent_guard_and_safree_flag_the_budget_on_the_reference(sd, budget):
    """Text guards on all 1,000 reference prompts: at most the budget, and within two levels of it (the budget is
    the expected rate of a *new* prompt, the reference rate one level further)."""
    prompts = reference_prompts()
    policy = _log_policy(budget)
    k = len(policy.categories)
    head = LatentGuardHead.mean_match(sd.text_encoder.config.hidden_size)
    rows = LatentGuard.from_head(head, backbone="pipeline").check(prompts, policy, pipe=sd)
    literal = sum(r["decided_by"] == "literal" for r in rows)  # a written concept phrase fires whatever its risk
    share = sum(r["unsafe"] for r in rows) / len(rows)
    assert budget - 2 * k / len(prompts) < share - literal / len(prompts) <= budget
    assert {r["budget"] for r in rows} == {budget}
    # the risk is what the decision is: flagged exactly when risk >= 1 - budget
    assert all(r["unsafe"] == (r["risk"] >= 1 - budget - 1e-9) for r in rows if r["decided_by"] != "literal")

    pipe = safegen.protect(sd, policy=policy, guards=["safree"])
    reports = _run(pipe, prompts, 250, 1)
    safegen.unprotect(pipe)
    lexical = sum(r.result("safree").details.get("lexical_match") is not None for r in reports
                  if r.result("safree").verdict != "pass")
    share = _flag_share(reports, "safree")
    assert share - lexical / len(prompts) <= budget  # a literal concept phrase fires whatever its risk
    assert share > budget - 2 * k / len(prompts)


def test_generation_guards_flag_the_budget_on_their_calibration_prompts(sd):
    """LVD and SLD calibrate on generations: re-running the same prompts and seeds flags at most the budget."""
    n, budget = 40, 0.05
    policy = _log_policy(budget)
    clf = LatentClassifier(LVDConfig(4, categories=list(policy.categories), model=unet_fingerprint(sd)))
    lvd = LVD.from_classifier(clf, window=3, ratio=0.6)
    lvd.calibrate(sd, steps=4, batch_size=20, limit=n, progress=False)
    sld = safegen.SLD.max()
    sld.calibrate(sd, policy, steps=4, batch_size=20, limit=n, progress=False)
    prompts = reference_prompts()[:n]
    for guard in (lvd, sld):
        pipe = safegen.protect(sd, policy=policy, guards=[guard])
        reports = _run(pipe, prompts, 20, 4)
        safegen.unprotect(pipe)
        share = _flag_share(reports, guard.name)
        assert share <= budget, guard.name
        results = [r.result(guard.name) for r in reports]
        assert all(0.0 <= r.risk <= 1.0 for r in results), guard.name
        # flagged (a category named) exactly when the risk reaches 1 - budget
        assert all((r.category is not None) == (r.risk >= 1 - budget - 1e-9) for r in results), guard.name


def test_sensitivity_moves_every_guard_by_the_same_budget(sd):
    """budget = fpr × sensitivity: a guard's threshold at sensitivity s is its calibrated one at fpr × s."""
    policy = safegen.load_policy("default")
    head = LatentGuardHead.mean_match(sd.text_encoder.config.hidden_size)
    guard = LatentGuard.from_head(head, backbone="pipeline")
    rows1 = guard.check(["a red bus"], policy, pipe=sd)
    policy.sensitivity = 3.0
    rows3 = guard.check(["a red bus"], policy, pipe=sd)
    assert rows1[0]["budget"] == pytest.approx(0.01) and rows3[0]["budget"] == pytest.approx(0.03)
    assert rows3[0]["threshold"] < rows1[0]["threshold"]  # a larger budget: a lower raw threshold
    cal = safegen.Safree().calibration(sd, policy)
    assert cal["budget"] == pytest.approx(0.03)
    assert cal["thresholds"] == dict(zip(cal["scale"].categories, cal["scale"].thresholds(0.03).tolist()))
    # a fixed raw threshold in the policy is not moved by sensitivity, and the report says it is fixed (no budget)
    for cat in policy.categories.values():
        cat.set_threshold("latent-guard", 5.0)
    row = guard.check(["a red bus"], policy, pipe=sd)[0]
    assert row["threshold"] == 5.0 and row["budget"] is None


def test_risk_scale_matches_budget_thresholds_and_fails_closed_on_nan():
    from safegen.calibration import budget_thresholds, fire_rate

    ref = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    scale = RiskScale(ref, list("abcd"))
    for b in (0.01, 0.03, 0.2):
        th = scale.thresholds(b)
        assert torch.equal(th, budget_thresholds(ref, b)) and fire_rate(ref, th) <= b
        fresh = torch.randn(300, 4, generator=torch.Generator().manual_seed(2))
        assert torch.equal(fresh >= th, scale.risk(fresh) >= 1 - b)
    risk = scale.risk(torch.tensor([[float("nan"), 0.0, float("inf"), 100.0]]))
    assert torch.isnan(risk[0, 0]) and torch.isnan(risk[0, 2]) and risk[0, 3] == 1.0
    with pytest.raises(ValueError, match="not all finite"):
        RiskScale(torch.tensor([[float("nan")]]), ["a"])
    assert torch.equal(RiskScale.from_dict(scale.to_dict()).reference, scale.reference)


def test_reports_carry_raw_score_risk_and_budget(sd):
    policy = safegen.load_policy("default")
    policy.add_concept("violence", "a purple giraffe")
    head = LatentGuardHead.mean_match(sd.text_encoder.config.hidden_size)
    pipe = safegen.protect(sd, policy=policy, guards=[LatentGuard.from_head(head, backbone="pipeline")])
    out = pipe(["a photo of a dog on a sofa", "a purple giraffe"], num_inference_steps=2, output_type="np")
    safegen.unprotect(pipe)
    benign, flagged = (r.result("latent-guard") for r in out.safety)
    # a concept added at run time is calibrated and honoured, and named
    assert flagged.verdict == "block" and flagged.concept == "a purple giraffe" and flagged.category == "violence"
    assert flagged.budget == 0.01 and flagged.risk >= 0.99 and flagged.score >= flagged.threshold
    assert set(flagged.risks) == set(policy.categories)
    # (on this random tiny encoder, short prompts like "a red bus" score as high as a concept: not this one)
    assert benign.verdict == "pass" and benign.risk < 0.99 and benign.budget == 0.01
    d = out.safety[1].to_dict()["guards"][0]
    assert {"score", "threshold", "risk", "budget", "risks"} <= set(d)
    assert "risk=" in str(out.safety[1]) and "budget 0.01" in str(out.safety[1])
