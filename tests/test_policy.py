import json

import pytest

import safegen
from safegen.policy import CATEGORIES, PolicyError, builtin_policies, normalize_category


def test_default_policy_covers_categories():
    pol = safegen.load_policy("default")
    assert set(CATEGORIES) <= set(pol.categories)
    for cat in pol.categories.values():
        assert cat.concepts and cat.action in ("block", "steer", "log") and "safree" in cat.thresholds
    assert "default" in builtin_policies()


def test_sensitivity_scales_every_threshold():
    pol = safegen.load_policy("default")
    base = pol.threshold("violence", "safree")
    pol.sensitivity = 2.0
    assert pol.threshold("violence", "safree") == pytest.approx(base / 2)
    assert safegen.load_policy("default", sensitivity=0.5).threshold("hate", "safree") == pytest.approx(
        pol.categories["hate"].thresholds["safree"] * 2)
    with pytest.raises(PolicyError, match="sensitivity"):
        pol.sensitivity = 0
    with pytest.raises(PolicyError, match="no threshold for guard 'lvd'"):
        pol.threshold("violence", "lvd")
    assert pol.threshold("violence", "lvd", default=0.5) == pytest.approx(0.25)


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
