"""Hostile input to the apps (``safegen`` CLI, ``safegen eval``, the Gradio demo): every path that failed open or
crashed in the hostile-input audit (../shared/research/hostile-input-audit.md, findings F2, F3, F10, F11) now
fails closed with a one-line message that says what to do."""

import ast
import http.cookiejar
import json
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from safegen.cli import main

ROOT = Path(__file__).resolve().parents[1]
BENIGN = "a photo of a red bus"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2, err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1, err


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    """A tiny SD pipeline saved twice: with pickled weights (``safe_serialization=False``) and with safetensors."""
    from safegen.testing import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("models")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "pickled", safe_serialization=False)
    pipe.save_pretrained(root / "safe")
    assert list((root / "pickled" / "unet").glob("*.bin")) and not list((root / "pickled" / "unet").glob("*.safetensors"))
    return root


# ---------------------------------------------------------------------- F3: safetensors only
@pytest.mark.parametrize("command", ["generate", "demo-run", "eval"])
def test_a_pickled_model_folder_is_refused(model_folders, tmp_path, capsys, command):
    prompts = tmp_path / "p.txt"
    prompts.write_text(BENIGN + "\n")
    extra = {"generate": [BENIGN], "demo-run": [], "eval": ["--prompts", prompts]}[command]
    code, _, err = run(capsys, command, *extra, "--model", model_folders / "pickled", "--steps", 1,
                       "--out", tmp_path / "out")
    one_line_error(code, err)
    assert "pickled weights (unet/diffusion_pytorch_model.bin) without a safetensors copy" in err
    assert "safetensors only" in err
    assert "save_pretrained(NEW_FOLDER, safe_serialization=True)" in err  # what to do
    assert not (tmp_path / "out").exists()


def test_the_same_pipeline_as_safetensors_loads(model_folders, tmp_path, capsys):
    code, _, err = run(capsys, "generate", BENIGN, "--model", model_folders / "safe", "--guards", "none",
                       "--steps", 1, "--out", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "000.png").is_file()


def test_a_pickle_next_to_other_safetensors_is_refused(model_folders, tmp_path, capsys):
    """A stray .safetensors file does not make the pickle beside it safe to load."""
    mixed = tmp_path / "mixed"
    shutil.copytree(model_folders / "pickled", mixed)
    (mixed / "unet" / "notes.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "generate", BENIGN, "--model", mixed, "--out", tmp_path / "out")
    one_line_error(code, err)
    assert "pickled weights (unet/diffusion_pytorch_model.bin) without a safetensors copy" in err
    both = tmp_path / "both"  # pickles next to their safetensors copies: fine, the safetensors are loaded
    shutil.copytree(model_folders / "safe", both)
    for comp in ("unet", "vae"):
        shutil.copy(model_folders / "pickled" / comp / "diffusion_pytorch_model.bin", both / comp)
    from safegen.loading import check_model

    check_model(str(both))


def test_the_loader_itself_asks_for_safetensors(model_folders, monkeypatch):
    """Past the folder check, diffusers is still told to load safetensors only (hub ids are not scanned)."""
    from safegen import demo as dm
    from safegen import loading

    with pytest.raises(dm.DemoInputError, match="pickled weights"):  # the demo loads through the same module
        dm.load_pipeline(str(model_folders / "pickled"), "cpu")
    monkeypatch.setattr(loading, "check_model", lambda model: None)
    with pytest.raises(loading.ModelLoadError, match="with safetensors weights .* safetensors only"):
        loading.load_pipeline(str(model_folders / "pickled"), "cpu")


@pytest.mark.parametrize("index,needle", [
    ({"_class_name": ["/etc/passwd", "StableDiffusionPipeline"]}, "'_class_name' must be a pipeline class name"),
    ({"_class_name": "os.system"}, "'_class_name' must be a pipeline class name"),
    ({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", ["UNet2DConditionModel"]]}, "component 'unet'"),
    (["StableDiffusionPipeline"], "must be a JSON object"),
    ("{not json", "not readable JSON"),
], ids=["class-list", "class-dotted", "component", "list", "syntax"])
def test_a_malformed_model_index_is_a_clear_error(model_folders, tmp_path, capsys, index, needle):
    folder = tmp_path / "model"
    shutil.copytree(model_folders / "safe", folder)
    (folder / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    code, _, err = run(capsys, "generate", BENIGN, "--model", folder, "--out", tmp_path / "out")
    one_line_error(code, err)
    assert "model_index.json is malformed" in err or "not readable JSON" in err
    assert needle in err and "/etc/passwd" not in err
    from safegen import demo as dm

    with pytest.raises(dm.DemoInputError, match="model_index.json"):
        dm.validate_model(str(folder))


# ---------------------------------------------------------------------- F11: clear errors
@pytest.mark.parametrize("command", ["generate", "eval", "demo-run"])
def test_out_that_is_a_file(tmp_path, capsys, command):
    prompts = tmp_path / "p.txt"
    prompts.write_text(BENIGN + "\n")
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    extra = {"generate": [BENIGN], "demo-run": [], "eval": ["--prompts", prompts]}[command]
    for out, needle in ((taken, f"--out {taken} is a file, not a folder"),
                        (taken / "sub", f"{taken} is a file, not a folder")):
        code, _, err = run(capsys, command, *extra, "--model", "tiny-sd", "--steps", 1, "--out", out)
        one_line_error(code, err)
        assert needle in err
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("name", ["junk.txt", "junk.csv", "junk.json"])
def test_a_binary_prompt_file_is_named(tmp_path, capsys, name):
    junk = tmp_path / name
    junk.write_bytes(b"prompt\n\xfd\xff\x00\x81 binary \xc3\x28\n")
    code, _, err = run(capsys, "eval", "--prompts", junk, "--model", "tiny-sd", "--out", tmp_path / "out")
    one_line_error(code, err)
    assert f"{junk}: not a UTF-8 text file" in err and "saved as UTF-8" in err
    code, _, err = run(capsys, "check-prompts", junk, "--out", tmp_path / "checks.jsonl")
    one_line_error(code, err)
    assert f"{junk}: not a UTF-8 text file" in err


def test_an_unknown_guard_in_a_policy_file_fails_at_load(tmp_path, capsys):
    pol = tmp_path / "pol.yaml"
    pol.write_text("guards: [safree, latent-gaurd]\ncategories: {violence: {concepts: [gore]}}\n")
    code, _, err = run(capsys, "generate", BENIGN, "--model", "tiny-sd", "--policy", pol, "--out", tmp_path / "o")
    one_line_error(code, err)
    assert f"{pol}: field 'guards[1]' is not a guard name ('latent-gaurd')" in err


def test_the_tiny_model_note_is_current(capsys, tmp_path):
    from safegen.loading import TINY_NOTE

    assert "stand-in" not in TINY_NOTE and "until the embedded default model ships" not in TINY_NOTE


# ---------------------------------------------------------------------- F10: a resume is the same run
def _eval(capsys, prompts, out, *extra):
    return run(capsys, "eval", "--prompts", prompts, "--steps", 1, "--batch-size", 2, "--no-progress",
               "--out", out, *extra)


def _kill_after(out: Path, n: int) -> None:
    """What a kill after ``n`` items leaves: their lines, no metrics."""
    lines = (out / "items.jsonl").read_text().splitlines()[:n]
    (out / "items.jsonl").write_text("".join(ln + "\n" for ln in lines))
    (out / "metrics.json").unlink()
    (out / "results.md").unlink()


def test_resume_with_an_edited_policy_file_is_refused(tmp_path, capsys):
    from safegen._paths import assets_dir

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na blue bird\na photo of blood and gore\na green umbrella\n")
    pol = tmp_path / "pol.yaml"
    original = (assets_dir() / "policies" / "default.yaml").read_text()
    pol.write_text(original)
    out = tmp_path / "run"
    code, _, err = _eval(capsys, prompts, out, "--model", "tiny-sd", "--policy", pol)
    assert code == 0, err
    _kill_after(out, 2)
    edited = original.replace("blood, gore,", "", 1)  # same file, same name: violence without blood and gore
    assert edited != original
    pol.write_text(edited)
    code, _, err = _eval(capsys, prompts, out, "--model", "tiny-sd", "--policy", pol)
    one_line_error(code, err)
    assert "cannot be resumed" in err and "policy_content (the policy's content (was the policy file edited?))" in err
    assert "--overwrite" in err
    assert len((out / "items.jsonl").read_text().splitlines()) == 2  # nothing of the other policy was mixed in
    pol.write_text(original)  # the same policy again: the run resumes
    code, _, err = _eval(capsys, prompts, out, "--model", "tiny-sd", "--policy", pol)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_items"] == 2 and metrics["n"] == 4
    run_file = json.loads((out / "run.json").read_text())
    assert run_file["fingerprint"]["model_files"] == "builtin:tiny-sd"
    assert len(run_file["fingerprint"]["policy_content"]) == 64


def test_resume_with_changed_model_weights_is_refused(model_folders, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(model_folders / "safe", folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na blue bird\n")
    out = tmp_path / "run"
    code, _, err = _eval(capsys, prompts, out, "--model", folder, "--guards", "none", "--batch-size", 1)
    assert code == 0, err
    digests = json.loads((out / "run.json").read_text())["digests"]
    assert any(row[0].endswith("diffusion_pytorch_model.safetensors") for row in digests)  # kept for the next resume
    _kill_after(out, 1)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])  # same folder, same name, other weights
    save_file(tensors, weights)
    code, _, err = _eval(capsys, prompts, out, "--model", folder, "--guards", "none", "--batch-size", 1)
    one_line_error(code, err)
    assert "model_files (the model's files (weights or configs changed))" in err


def test_guard_weight_files_are_fingerprinted(tmp_path, monkeypatch):
    from safegen._paths import assets_dir
    from safegen.eval.command import guard_weight_digests, guard_weight_files
    from safegen.guards import latent_guard, lvd
    from safegen.guards.safetydpo import default_merged_path

    assert guard_weight_files(["safree", "sld-strong", "output-check"]) == {}
    files = guard_weight_files(["latent-guard", "lvd", "safetydpo"])
    # LVD without weights picks the shipped classifier of the pipeline's model: every shipped one counts
    shipped_lvd = [lvd.default_weights_path(), assets_dir() / "lvd" / "default-video-model.safetensors"]
    assert files == {"latent-guard": [latent_guard.default_weights_path()], "lvd": shipped_lvd,
                     "safetydpo": [default_merged_path()]}
    head = tmp_path / "lvd.safetensors"
    shutil.copy(lvd.default_weights_path(), head)
    monkeypatch.setattr(lvd, "default_weights_path", lambda: head)
    before = guard_weight_digests(["lvd", "safree"])
    assert list(before) == ["lvd"]
    head.write_bytes(head.read_bytes()[:-1] + b" ")  # one byte of the classifier changed
    assert guard_weight_digests(["lvd"])["lvd"] != before["lvd"]
    head.unlink()
    assert guard_weight_digests(["lvd"])["lvd"] != before["lvd"]  # missing counts too


# ---------------------------------------------------------------------- layering
def test_no_library_module_imports_the_cli():
    """The CLI sits above everything: no other module of the package imports it (tests/test_layers.py checks
    every layer; this is the CLI's own line)."""
    for path in (ROOT / "safegen").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "safegen":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [a.name for a in node.names]
                assert not target.endswith("cli") or target.endswith("cliargs"), path
                assert "cli" not in names, path
            elif isinstance(node, ast.Import):
                assert all(a.name != "safegen.cli" for a in node.names), path


# ---------------------------------------------------------------------- F2: the demo server
@pytest.fixture(scope="module")
def app_module():
    pytest.importorskip("gradio")
    import importlib.util

    spec = importlib.util.spec_from_file_location("safegen_demo_app_test", ROOT / "demos" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _components(blocks):
    return {getattr(c, "elem_id", None): c for c in blocks.blocks.values() if getattr(c, "elem_id", None)}


def test_remote_demo_never_generates_the_unprotected_image(app_module):
    import safegen
    from safegen import demo as dm
    from safegen.testing import tiny_sd_pipeline

    unet_calls = []

    def loader(model):
        pipe = tiny_sd_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(safegen.is_protected(pipe)))
        return pipe

    settings = dm.demo_settings("tiny-sd", unprotected=False)
    app = app_module.DemoApp(settings, cache=dm.PipelineCache(loader=loader))
    toggles = [key == "safree" for key in app.keys]
    plain, protected, html, raw = app.generate("a photo of blood and gore", "tiny-sd", "default", 1.0, 2, 0,
                                               "medium", *toggles, progress=lambda *a, **k: None)
    assert unet_calls and all(unet_calls)  # the pipeline only ever ran protected
    assert plain.value is None and "not generated" in plain.label
    assert protected.value is not None and 'data-verdict="steer"' in html
    assert raw["model"] == "tiny-sd" and "unprotected_seconds" not in raw
    components = _components(app.build())
    assert components["plain-image"].visible is False


def test_demo_pickers_accept_only_the_allow_list(app_module, tmp_path):
    import gradio as gr

    from safegen import demo as dm

    secret = tmp_path / "secret.yaml"
    secret.write_text("api_key: sk-live-SECRET\ndb_password: hunter2\n")
    app = app_module.DemoApp(dm.demo_settings(), cache=dm.PipelineCache(loader=lambda m: pytest.fail("no load")))
    components = _components(app.build())
    for elem in ("model", "policy"):
        assert components[elem].allow_custom_value is False
    assert [v for _, v in components["model"].choices] == ["default"]
    assert [v for _, v in components["policy"].choices] == ["default"]
    toggles = [key == "safree" for key in app.keys]
    messages = set()
    for model, policy in (("/etc", "default"), ("/nonexistent/x", "default"), (str(ROOT / "assets"), "default"),
                          ("default", str(secret)), ("default", "/nonexistent.yaml")):
        with pytest.raises(gr.Error) as e:
            app.generate("a red bus", model, policy, 1.0, 2, 0, "medium", *toggles, progress=lambda *a, **k: None)
        messages.add(e.value.message)
    assert messages == {"choose a model from the list; this server offers only those",
                        "choose a policy from the list; this server offers only those"}


def test_demo_launch_refuses_other_hosts_without_a_login(app_module):
    from safegen import demo as dm

    with pytest.raises(dm.DemoInputError, match="reachable from other machines"):
        app_module.launch(host="0.0.0.0", preload=False, block=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_login_is_enforced_by_the_server(app_module):
    port = _free_port()
    app = app_module.launch(port=port, auth=("ada", "s3cret"), block=False, preload=False)
    try:
        base = f"http://127.0.0.1:{port}"
        for method, path, body in (("GET", "/config", None), ("GET", "/gradio_api/info", None),
                                   ("POST", "/gradio_api/call/generate", b'{"data": ["a red bus"]}')):
            req = urllib.request.Request(base + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401, (path, e.value.code)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        login = urllib.parse.urlencode({"username": "ada", "password": "s3cret"}).encode()
        assert opener.open(base + "/login", data=login, timeout=10).status == 200
        assert opener.open(base + "/config", timeout=10).status == 200  # logged in
    finally:
        app.close()


@pytest.mark.parametrize("name", ["safegen.loading", "safegen.eval.command"])
def test_docstring_examples(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
