"""Every public entry point's docstring example runs and shows what it says."""

import doctest
import importlib

import pytest

MODULES = ["safegen", "safegen.policy", "safegen.report", "safegen.protection", "safegen.encoders", "safegen.hub",
           "safegen.community", "safegen.testing", "safegen.guards.safree", "safegen.guards.sld",
           "safegen.eval.harness", "safegen.default_model", "safegen.default_video_model", "safegen.hooks",
           "safegen.guard_names", "safegen.calibration"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "safegen.community":
        assert result.attempted > 0
