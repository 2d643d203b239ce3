"""The ``safegen`` command line, called in process (``safegen.cli.main``) with temporary folders."""

import json
import subprocess
import sys

import pytest

from safegen.cli import DEFAULT_MODEL, main

BENIGN = "a photo of a red bus"
UNSAFE = "a photo of blood and gore"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_and_report(tmp_path, capsys):
    from PIL import Image

    code, out, err = run(capsys, "generate", BENIGN, UNSAFE, "--seed", 3, "--steps", 2, "--out", tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000.png", "001.png", "report.json"]
    assert Image.open(tmp_path / "000.png").size == (32, 32)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [e["prompt"] for e in report] == [BENIGN, UNSAFE]
    assert [e["file"] for e in report] == ["000.png", "001.png"]
    assert all(e["seed"] == 3 and e["model"] == DEFAULT_MODEL and e["protected"] for e in report)
    assert [e["verdict"] for e in report] == ["pass", "steer"]  # literal 'blood'/'gore' on the tiny model
    assert [g["guard"] for g in report[1]["guards"]] == ["safree"]
    assert report[1]["guards"][0]["category"] == "violence"
    assert all(e["unet_steps_run"] == 2 for e in report)
    lines = [ln for ln in out.splitlines() if ln.startswith(("000.png", "001.png"))]
    assert len(lines) == 2 and "PASS" in lines[0] and "STEER" in lines[1] and "violence" in lines[1]
    assert "RANDOM" in err  # the tiny model says it is a stand-in


def test_generate_guards_none_is_unprotected(tmp_path, capsys):
    code, out, err = run(capsys, "generate", UNSAFE, "--guards", "none", "--steps", 2, "--out", tmp_path)
    assert code == 0, err
    (entry,) = json.loads((tmp_path / "report.json").read_text())
    assert entry["guards"] == [] and entry["verdict"] == "pass" and entry["protected"] is False
    assert entry["file"] == "000.png" and (tmp_path / "000.png").is_file()


def test_generate_options_reach_the_pipeline(tmp_path, capsys):
    from PIL import Image

    code, _, err = run(capsys, "generate", BENIGN, "--model", "tiny-sdxl", "--guards", "safree,sld-strong",
                       "--sensitivity", "1.5", "--height", 48, "--width", 64, "--guidance", 4, "--steps", 2,
                       "--out", tmp_path)
    assert code == 0, err
    assert Image.open(tmp_path / "000.png").size == (64, 48)
    (entry,) = json.loads((tmp_path / "report.json").read_text())
    assert sorted(g["guard"] for g in entry["guards"]) == ["safree", "sld"]


def test_generate_same_seed_same_image(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for name in ("a", "b"):
        assert run(capsys, "generate", BENIGN, "--seed", 7, "--steps", 2, "--out", tmp_path / name)[0] == 0
    a, b = (np.asarray(Image.open(tmp_path / n / "000.png")) for n in ("a", "b"))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("args,needle", [
    (["--guards", "no-such-guard"], "unknown guard 'no-such-guard'"),
    (["--guards", "sld,sld-strong"], "'sld' guard twice"),
    (["--policy", "no-such-policy"], "no built-in policy named 'no-such-policy'"),
    (["--policy", "/no/such/policy.yaml"], "policy file not found"),
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--sensitivity", "-1"], "argument --sensitivity"),
    (["--height", "30"], "multiple of 8"),
    (["--model", "/no/such/model-folder"], "model folder /no/such/model-folder does not exist"),
], ids=["guard", "guard-twice", "policy", "policy-file", "steps", "sensitivity", "height", "folder"])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, needle):
    code, out, err = run(capsys, "generate", BENIGN, "--out", tmp_path / "out", *args)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    assert not (tmp_path / "out").exists()  # rejected before anything was written


def test_missing_out_exits_2(capsys):
    code, _, err = run(capsys, "generate", BENIGN)
    assert code == 2 and "--out" in err and "required" in err


def test_model_folder_that_is_not_a_model(tmp_path, capsys):
    code, _, err = run(capsys, "generate", BENIGN, "--model", tmp_path, "--out", tmp_path / "out")
    assert code == 2 and "could not load model" in err and "model_index.json" in err


def test_hub_id_offline_fails_with_instructions(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run(capsys, "generate", BENIGN, "--model", "no-such-owner/no-such-model", "--out", tmp_path)
    assert code == 2
    assert "HF_HUB_OFFLINE" in err and "no-such-owner/no-such-model" in err
    assert "HF_HUB_OFFLINE=0" in err  # what to do
    assert "Traceback" not in err


def test_demo_run(tmp_path, capsys):
    from PIL import Image

    code, out, err = run(capsys, "demo-run", "--out", tmp_path)
    assert code == 0, err
    assert "tiny RANDOM pipeline" in out
    grid = Image.open(tmp_path / "grid.png")
    report = json.loads((tmp_path / "report.json").read_text())
    assert grid.height >= 128 * len(report) and grid.width >= 2 * 128
    benign = [e for e in report if e["expected"] == "benign"]
    unsafe = [e for e in report if e["expected"] == "unsafe"]
    assert len(benign) >= 2 and len(unsafe) >= 2
    assert all(e["verdict"] == "pass" and not e["output_changed"] for e in benign)
    assert all(e["verdict"] == "steer" and e["output_changed"] for e in unsafe)
    assert {e["guards"][0]["category"] for e in unsafe} >= {"violence", "sexual", "hate"}
    assert out.count("STEER") >= len(unsafe)  # str(report) printed


def test_help_is_fast_to_reach_and_exits_0():
    res = subprocess.run([sys.executable, "-m", "safegen.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "generate" in res.stdout and "demo-run" in res.stdout


def test_help_in_process(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--guards" in capsys.readouterr().out
