"""The wheel works outside the checkout.

It is built from a copy of the sources (``pip wheel . --no-deps --no-build-isolation``, nothing downloaded),
checked (the assets it must carry, safetensors only, no pickles, under the package index's size limit), installed
into a bare folder (``pip install --target``), and run from another directory with only that folder (and the venv's
site-packages, for the dependencies) on the path: ``import safegen``, the default policy, and the installed
console script's ``safegen generate`` on the embedded default model, every safegen module imported from the
installed copy.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The package index's default limit per file (PyPI: 100 MB); a wheel over it cannot be uploaded.
SIZE_LIMIT = 100_000_000
#: Pickle-based weight formats: never shipped (weights are safetensors only).
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
#: Files of assets/ that stay out of the wheel by design: pickles and notes for readers of the repo.
NOT_SHIPPED = PICKLES + (".md",)
#: Asset folders the repository has and the wheel leaves out: the embedded default video model (with it the wheel
#: would pass the index's limit; pyproject.toml excludes it).
REPO_ONLY = ("default-video-model/",)
#: What a run needs: the default policy, the embedded default model, and the weights of the shipped guards.
REQUIRED = [
    "safegen/assets/policies/default.yaml",
    "safegen/assets/default-model/model_index.json",
    "safegen/assets/default-model/training_info.json",
    "safegen/assets/default-model/scheduler/scheduler_config.json",
    "safegen/assets/default-model/text_encoder/config.json",
    "safegen/assets/default-model/tokenizer/tokenizer_config.json",
    "safegen/assets/default-model/unet/config.json",
    "safegen/assets/default-model/unet/diffusion_pytorch_model.safetensors",
    "safegen/assets/default-model/vae/config.json",
    "safegen/assets/default-model/vae/diffusion_pytorch_model.safetensors",
    "safegen/assets/latent_guard/minilm.safetensors",  # the Latent Guard head
    "safegen/assets/lvd/default-model.safetensors",  # the LVD classifier
    "safegen/assets/safetydpo/default-model-comerge.safetensors",  # the SafetyDPO Co-Merge LoRA
    "safegen/demos/app.py",  # `safegen demo`
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``(wheel path, install folder)``: the wheel built from a copy of the sources and installed with
    ``pip install --target`` (a copy, so the build never writes ``build/`` into the checkout and never packs
    stale files a previous build left there)."""
    assert int(version("setuptools").split(".")[0]) >= 77, "building the wheel needs setuptools>=77 (the dev extra)"
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("safegen", "assets", "demos"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1"}
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(pip + ["wheel", ".", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist")],
                   cwd=src, env=env, check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("safegen-*.whl")
    site = tmp / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   cwd=tmp, env=env, check=True, capture_output=True)
    return wheel, site


def test_the_wheel_carries_the_assets_and_every_module(built):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert [n for n in REQUIRED if n not in names] == []
    # every asset of the checkout travels, but for what stays out by design
    assets = [p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file()]
    missing = [a for a in assets if f"safegen/assets/{a}" not in names and not a.endswith(NOT_SHIPPED)
               and not a.startswith(REPO_ONLY)]
    assert missing == []
    assert not [n for n in names if n.startswith(tuple(f"safegen/assets/{r}" for r in REPO_ONLY))]
    # every module of safegen/ (the packages are listed by hand in pyproject.toml, so a new subpackage must be)
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "safegen").rglob("*.py")]
    assert [m for m in modules if m not in names] == []
    # nothing that is not needed at run time
    assert [n for n in names if n.endswith(NOT_SHIPPED) or "__pycache__" in n or n.endswith(".pyc")] == []
    assert not any(n.startswith(("tests/", "safegen/tests/", "benchmarks/", "build/")) for n in names)


def test_the_wheel_weights_are_safetensors_and_it_fits_the_index(built):
    wheel, _ = built
    assert wheel.stat().st_size < SIZE_LIMIT, f"{wheel.stat().st_size / 1e6:.1f} MB"
    with zipfile.ZipFile(wheel) as z:
        weights = [n for n in z.namelist() if n.endswith(".safetensors")]
        assert len(weights) >= 5
        for name in weights:  # a real safetensors file (not a Git LFS pointer): its JSON header parses
            with z.open(name) as f:
                (n,) = struct.unpack("<Q", f.read(8))
                assert 0 < n < 10_000_000, name
                header = json.loads(f.read(n))
            assert any(isinstance(v, dict) and "dtype" in v for v in header.values()), name
        (meta_name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = z.read(meta_name).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    for dep in ("scikit-learn", "huggingface_hub", "diffusers", "safetensors"):
        assert any(r.startswith(dep) and "extra ==" not in r for r in requires), dep
    assert not any("xformers" in r for r in requires)


def _outside_env(site: Path) -> dict[str, str]:
    """The environment of a run outside the checkout: on the path only the install folder, then this venv's
    site-packages for the dependencies. The interpreter runs with ``-S`` (no ``site`` module), so the venv's
    ``.pth`` files are not read: among them the editable install's finder, which maps ``safegen`` to this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "SAFEGEN_ASSETS")}
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env.update(PYTHONPATH=os.pathsep.join([str(site), *deps]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


#: Run with ``python -S -c PROBE SCRIPT REPORT ARGS...``: runs SCRIPT (the console script) with ARGS and writes to
#: REPORT the file of every safegen module that was imported, whatever the exit status.
PROBE = """\
import json, runpy, sys
script, report = sys.argv[1], sys.argv[2]
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    files = [getattr(m, "__file__", None) for n, m in list(sys.modules.items()) if n.split(".")[0] == "safegen"]
    with open(report, "w") as f:
        json.dump(files, f)
"""


def test_the_installed_wheel_runs_outside_the_checkout(built, tmp_path):
    _, site = built
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _outside_env(site)
    python = [sys.executable, "-S"]

    # import safegen; safegen.load_policy('default'): the installed copy, its assets and its demo app
    code = ("import json, sys, safegen; from safegen._paths import assets_dir, demo_app_path; "
            "p = safegen.load_policy('default'); "
            "print(json.dumps([safegen.__file__, str(assets_dir()), str(demo_app_path()), sorted(p.categories), "
            "sys.path]))")
    res = subprocess.run(python + ["-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    init, assets, app, categories, path = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(init) == site / "safegen" / "__init__.py"  # the installed copy, not the checkout
    assert Path(assets) == site / "safegen" / "assets" and Path(app) == site / "safegen" / "demos" / "app.py"
    assert "violence" in categories and "sexual" in categories
    # the checkout is not on the path: only the install folder, the dependencies and the standard library
    assert not any(p and Path(p).resolve() in (ROOT, ROOT / "safegen") for p in path), path

    # safegen generate "a red bus" --out X --steps 2, through the console script the wheel installed
    script = site / "bin" / "safegen"
    assert script.is_file(), sorted(p.name for p in site.iterdir())
    out, report = elsewhere / "X", tmp_path / "modules.json"
    # (the prompt check and SAFREE: LVD's last-step rule flags this benign prompt in a 2-step call, a known limit
    # kept as a strict xfail in tests/test_default_model.py)
    res = subprocess.run(python + ["-c", PROBE, str(script), str(report), "generate", "a red bus", "--out", "X",
                                   "--steps", "2", "--guards", "latent-guard,safree"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = json.loads(report.read_text())
    assert len(loaded) > 10 and str(site / "safegen" / "cli.py") in loaded
    # every safegen module the command imported is the installed copy's
    assert [f for f in loaded if f is not None and not Path(f).is_relative_to(site / "safegen")] == []
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "report.json"]
    (entry,) = json.loads((out / "report.json").read_text())
    assert entry["file"] == "000.png" and entry["prompt"] == "a red bus"
    assert entry["unet_steps_run"] == 2 and entry["blocked"] is False
    from PIL import Image

    with Image.open(out / "000.png") as im:
        assert im.size == (64, 64)
