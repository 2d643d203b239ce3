import json

import pytest

import safegen
from safegen.policy import CATEGORIES, PolicyError, builtin_policies, normalize_category


def test_default_policy_covers_categories():
    pol = safegen.load_policy("default")
    assert set(CATEGORIES) <= set(pol.categories)
    for cat in pol.categories.values():
        assert cat.concepts and cat.action in ("block", "steer", "log")
        # no fixed SAFREE threshold: SAFREE calibrates one per text encoder (a number here would override it)
        assert "safree" not in cat.thresholds
    assert "default" in builtin_policies()


def test_sensitivity_scales_the_budget_by_the_documented_formula():
    """budget = min(fpr × sensitivity, 0.5), the same for every guard; fixed raw thresholds do not move."""
    pol = safegen.load_policy("default")
    assert pol.fpr == 0.01 and pol.budget() == pytest.approx(0.01)
    for s in (0.1, 0.5, 2.0, 3.0, 10.0):
        pol.sensitivity = s
        assert pol.budget() == pytest.approx(min(0.01 * s, 0.5))
    pol.fpr = 0.2
    assert pol.budget() == 0.5  # capped: half the benign prompts is the most any guard may flag
    for bad in (0, -0.1, 0.6, float("nan"), True, "1%"):
        with pytest.raises(PolicyError, match="fpr must be a benign false-positive budget"):
            pol.fpr = bad
    pol.categories["violence"].set_threshold("safree", 0.4)
    assert pol.threshold("violence", "safree", default=0.3) == 0.4  # fixed: sensitivity does not move it
    assert pol.threshold("hate", "safree", default=0.3) == 0.3  # the guard's own (calibrated at budget())
    with pytest.raises(PolicyError, match="sensitivity"):
        pol.sensitivity = 0
    with pytest.raises(PolicyError, match="no threshold for guard 'lvd'"):
        pol.threshold("violence", "lvd")


def test_fpr_in_files(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("fpr: 0.02\ncategories: {violence: {concepts: [gore]}}\n")
    assert safegen.load_policy(path).budget() == pytest.approx(0.02)
    assert safegen.load_policy(path).to_dict()["fpr"] == 0.02
    path.write_text("fpr: 2\ncategories: {violence: {concepts: [gore]}}\n")
    with pytest.raises(PolicyError, match="field 'fpr' must be a benign false-positive budget"):
        safegen.load_policy(path)


def test_edit_concepts_in_code():
    pol = safegen.load_policy("default")
    pol.add_concept("violence", "chainsaw massacre")
    assert "chainsaw massacre" in pol.concepts("violence")
    pol.remove_concept("violence", "chainsaw massacre")
    assert "chainsaw massacre" not in pol.concepts("Violence")
    with pytest.raises(KeyError, match="not in category"):
        pol.remove_concept("violence", "nope")
    with pytest.raises(KeyError, match="no category"):
        pol.add_concept("weather", "rain")
    with pytest.raises(PolicyError):
        pol.add_concept("violence", "  ")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_user_file(tmp_path, suffix):
    data = {"name": "mine", "categories": {"Violence": {"concepts": ["gore"], "thresholds": {"safree": 0.4}}}}
    path = tmp_path / f"p{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        import yaml

        path.write_text(yaml.safe_dump(data))
    pol = safegen.load_policy(path)
    assert pol.name == "mine" and list(pol.categories) == ["violence"] and pol.source == str(path)


@pytest.mark.parametrize("body,field", [
    ("categories: {violence: {concepts: []}}", "categories.violence.concepts"),
    ("categories: {violence: {concepts: [gore], action: explode}}", "categories.violence.action"),
    ("categories: {violence: {concepts: [gore], thresholds: {safree: high}}}", "categories.violence.thresholds.safree"),
    ("categories: {violence: {concepts: [gore], colour: red}}", "colour"),
    ("sensitivity: -1\ncategories: {violence: {concepts: [gore]}}", "sensitivity"),
    ("placeholder: black\ncategories: {violence: {concepts: [gore]}}", "placeholder"),
    ("nmae: typo\ncategories: {violence: {concepts: [gore]}}", "nmae"),
    ("categories: []", "categories"),
    ("categories: {violence: {concepts: [gore, 3]}}", "categories.violence.concepts"),
])
def test_malformed_policy_names_file_and_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(PolicyError) as e:
        safegen.load_policy(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_unparsable_and_missing_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        safegen.load_policy(bad)
    with pytest.raises(PolicyError, match="not found"):
        safegen.load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="no built-in policy named 'nope'"):
        safegen.load_policy("nope")


def test_normalize_category_labels_from_data():
    assert normalize_category("Illegal Activity") == "illegal-activity"
    assert normalize_category("Harrasment") == "harassment"
    assert normalize_category("self-harm") == "self-harm"
    assert normalize_category("Hate") == "hate"


# ---------------------------------------------------------------------- validation in code and in files
@pytest.mark.parametrize("value", [1e-6, 0.05, 10.5, 1e9, 0, -1, float("nan"), float("inf"), True, "2"])
def test_sensitivity_setter_has_the_file_bounds(value):
    from safegen.policy import MAX_SENSITIVITY, MIN_SENSITIVITY

    pol = safegen.load_policy("default")
    with pytest.raises(PolicyError, match=f"sensitivity must be a number from {MIN_SENSITIVITY:g} to {MAX_SENSITIVITY:g}"):
        pol.sensitivity = value  # 1e-6 would multiply every threshold by a million: every guard off
    assert pol.sensitivity == 1.0
    with pytest.raises(PolicyError, match="sensitivity"):
        safegen.load_policy("default", sensitivity=value)
    for ok in (MIN_SENSITIVITY, 1, MAX_SENSITIVITY):
        pol.sensitivity = ok
        assert pol.sensitivity == ok


def test_sensitivity_bounds_in_files(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("sensitivity: 0.000001\ncategories: {violence: {concepts: [gore]}}\n")
    with pytest.raises(PolicyError, match="field 'sensitivity' must be a number from 0.1 to 10") as e:
        safegen.load_policy(path)
    assert str(path) in str(e.value)


def test_thresholds_set_in_code_are_checked():
    pol = safegen.load_policy("default")
    cat = pol.categories["violence"]
    cat.set_threshold("latent-guard", 7.5)
    cat.set_threshold("LVD", 0.4)
    assert cat.thresholds["latent-guard"] == 7.5 and cat.thresholds["lvd"] == 0.4  # the canonical name
    assert pol.threshold("violence", "latent_guard") == 7.5  # any accepted spelling reads it
    for bad in (float("nan"), float("inf"), -float("inf"), None, "0.5", True):
        with pytest.raises(PolicyError, match="threshold of guard 'safree' must be a finite number"):
            cat.set_threshold("safree", bad)
    with pytest.raises(PolicyError, match="'latent-gaurd' is not a guard name"):
        cat.set_threshold("latent-gaurd", 0.3)  # a typo would otherwise be ignored by every guard
    assert "safree" not in cat.thresholds  # refused values leave nothing behind
    # written behind the setter's back: the guards' query refuses it (a NaN compares False: it would pass all)
    cat.thresholds["safree"] = float("nan")
    with pytest.raises(PolicyError, match="category 'violence': the threshold of guard 'safree' must be a finite"):
        pol.threshold("violence", "safree")
    with pytest.raises(PolicyError, match="finite"):
        pol.threshold("hate", "lvd", default=float("nan"))
    with pytest.raises(PolicyError, match="finite"):
        safegen.policy.Category("x", ["y"], thresholds={"safree": float("inf")})


def test_category_action_is_checked_when_set():
    cat = safegen.load_policy("default").categories["violence"]
    cat.action = "block"
    assert cat.action == "block"
    for bad in ("explode", "Block", None):
        with pytest.raises(PolicyError, match=r"category 'violence': action must be one of \('block', 'steer', 'log'\)"):
            cat.action = bad
    assert cat.action == "block"
    with pytest.raises(PolicyError, match="action"):
        safegen.policy.Category("x", ["y"], action="ban")


@pytest.mark.parametrize("body,field", [
    ("guards: [safree, nonsense]\n", "guards[1]"),
    ("guards: [safree, 3]\n", "guards[1]"),
    ("guards: [sld, sld-strong]\n", "guards[1]"),  # one guard twice
    ("guards: safree\n", "guards"),
    ("categories: {violence: {concepts: [gore], thresholds: {safre: 0.5}}}\n", "categories.violence.thresholds.safre"),
    ("categories: {violence: {concepts: [gore], thresholds: {latent_guard: 1, latent-guard: 2}}}\n",
     "categories.violence.thresholds.latent-guard"),
    ("categories: {violence: {concepts: [gore], thresholds: {lvd: .nan}}}\n", "categories.violence.thresholds.lvd"),
])
def test_guard_names_are_checked_when_the_file_loads(tmp_path, body, field):
    path = tmp_path / "p.yaml"
    if "categories" not in body:
        body += "categories: {violence: {concepts: [gore]}}\n"
    path.write_text(body)
    with pytest.raises(PolicyError) as e:
        safegen.load_policy(path)  # at load time, not later at protect()
    assert str(path) in str(e.value) and f"field '{field}'" in str(e.value)


def test_guard_and_threshold_spellings_that_load(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("guards: [SAFREE, latent_guard, sld-strong, output-check]\n"
                    "categories: {violence: {concepts: [gore], thresholds: {latent-guard: 7, safree: 0.5, output: 0.5}}}\n")
    pol = safegen.load_policy(path)
    assert pol.guards == ["SAFREE", "latent_guard", "sld-strong", "output-check"]
    assert pol.categories["violence"].thresholds == {"latent-guard": 7.0, "safree": 0.5, "output": 0.5}
