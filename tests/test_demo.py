"""The Gradio demo's logic (safegen/demo.py): input validation, guard availability, the report as HTML, the
placeholder image, the comparison run, and the ``safegen demo`` command's arguments. No browser here (see
test_demo_browser.py)."""

import doctest
import json
import re

import numpy as np
import pytest

import safegen
from safegen import demo as dm
from safegen.report import GuardResult, SafetyReport


def test_docstring_examples():
    result = doctest.testmod(dm, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 10


# ---------------------------------------------------------------------- input validation
def test_prompt_is_normalised_and_limited():
    assert dm.validate_prompt("  a red\n\tbus  ") == "a red bus"
    limit = dm.MAX_PROMPT_CHARS
    assert dm.validate_prompt("x" * limit) == "x" * limit
    with pytest.raises(dm.DemoInputError, match=f"{limit + 1} characters long; the limit is {limit}"):
        dm.validate_prompt("x" * (limit + 1))
    with pytest.raises(dm.DemoInputError, match="limit is 10"):
        dm.validate_prompt("a" * 11, max_chars=10)
    for empty in ("", "   \n ", None):
        with pytest.raises(dm.DemoInputError, match="enter a prompt"):
            dm.validate_prompt(empty)
    with pytest.raises(dm.DemoInputError, match="control characters"):
        dm.validate_prompt("a red\x00bus")
    with pytest.raises(dm.DemoInputError, match="must be text"):
        dm.validate_prompt(42)


@pytest.mark.parametrize("value, expected", [(25, 25), (1, 1), (100, 100), (12.0, 12), ("7", 7)])
def test_steps_accepted(value, expected):
    assert dm.validate_steps(value) == expected


@pytest.mark.parametrize("value", [0, 101, -3, 2.5, float("nan"), float("inf"), None, True, "many"])
def test_steps_refused(value):
    with pytest.raises(dm.DemoInputError, match="steps"):
        dm.validate_steps(value)


def test_seed_and_sensitivity_ranges():
    assert dm.validate_seed(0) == 0 and dm.validate_seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 0.5, None):
        with pytest.raises(dm.DemoInputError, match="seed"):
            dm.validate_seed(bad)
    assert dm.validate_sensitivity(1.5) == 1.5
    for bad in (0, 0.05, 11, float("nan"), "x"):
        with pytest.raises(dm.DemoInputError, match="sensitivity"):
            dm.validate_sensitivity(bad)


def test_sensitivity_range_is_the_policy_range():
    from safegen import policy

    assert (dm.MIN_SENSITIVITY, dm.MAX_SENSITIVITY) == (policy.MIN_SENSITIVITY, policy.MAX_SENSITIVITY)


def test_model_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dm.validate_model("") == dm.validate_model(None) == dm.validate_model(" default ") == "default"
    assert dm.validate_model("tiny-sd") == "tiny-sd"
    with pytest.raises(dm.DemoInputError, match="no model_index.json"):
        dm.validate_model(str(tmp_path))  # a folder that is no pipeline fails at start-up, not on a request
    with pytest.raises(dm.DemoInputError, match="does not exist"):
        dm.validate_model(str(tmp_path / "missing"))
    with pytest.raises(dm.DemoInputError, match="HF_HUB_OFFLINE=1"):
        dm.validate_model("no-such-owner/no-such-model")
    with pytest.raises(dm.DemoInputError, match="folder path or a hub id"):
        dm.validate_model("a\nb")
    with pytest.raises(dm.DemoInputError, match="text-to-video"):
        dm.validate_model("tiny-animatediff")


def test_loopback_and_login():
    for host in ("127.0.0.1", "127.3.4.5", "localhost", "::1", "[::1]"):
        assert dm.is_loopback(host), host
    for host in ("0.0.0.0", "", "::", "192.0.2.7", "10.0.0.1", "example.org", "127.0.0.1.example.org"):
        assert not dm.is_loopback(host), host
    assert dm.parse_auth("ada:pa:ss") == ("ada", "pa:ss")
    for bad in ("ada", "ada:", ":pass", "", None):
        with pytest.raises(dm.DemoInputError, match="USER:PASSWORD") as e:
            dm.parse_auth(bad)
        assert "pass" not in str(e.value).replace("PASSWORD", "")  # the password is never repeated


def _policy_file(folder, name="mine", extra=""):
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ncategories: {{violence: {{concepts: [chainsaw]}}}}\n{extra}")
    return path


def test_settings_are_an_allow_list(tmp_path):
    mine = _policy_file(tmp_path)
    s = dm.demo_settings("tiny-sd", ["tiny-sdxl", "default", "tiny-sd"], [str(mine)], unprotected=False)
    assert list(s.models) == ["tiny-sd", "default", "tiny-sdxl"]  # the start model first, each once
    assert s.start_model == "tiny-sd" and not s.unprotected
    assert ("Embedded default model (64×64)", "default") in s.model_choices()
    assert "default" in s.policies and s.policies["mine"] == str(mine)
    assert ("mine (file)", "mine") in s.policy_choices() and ("default", "default") in s.policy_choices()
    assert all(str(tmp_path) not in value for _, value in s.policy_choices())  # values are names, not paths
    with pytest.raises(dm.DemoInputError, match="no-such.yaml"):
        dm.demo_settings(allow_policies=[str(tmp_path / "no-such.yaml")])
    bad = _policy_file(tmp_path, "bad", "api_key: sk-live-SECRET\n")
    with pytest.raises(dm.DemoInputError, match="api_key"):  # the operator sees the detail at start-up
        dm.demo_settings(allow_policies=[str(bad)])
    with pytest.raises(dm.DemoInputError, match="not a policy file"):
        dm.demo_settings(allow_policies=["/etc/passwd"])


def test_choices_outside_the_allow_list_get_one_generic_message(tmp_path):
    s = dm.demo_settings()
    assert dm.choose_model("", s) == dm.choose_model(None, s) == ("default", "default")
    messages = set()
    for value in ("/etc", "/nonexistent/x", str(tmp_path), "tiny-sd", "owner/name", "../assets/default-model"):
        with pytest.raises(dm.DemoInputError) as e:
            dm.choose_model(value, s)
        messages.add(str(e.value))
    assert messages == {"choose a model from the list; this server offers only those"}  # no path is probed
    secret = tmp_path / "secret.yaml"
    secret.write_text("db_password: hunter2\n")
    for value in (str(secret), "/nonexistent.yaml", str(tmp_path / "secret")):
        with pytest.raises(dm.DemoInputError, match="^choose a policy from the list; this server offers only those$"):
            dm.choose_policy(value, 1.0, s)


def test_policy_choice_is_fresh_and_errors_stay_in_the_server_log(tmp_path, caplog):
    mine = _policy_file(tmp_path)
    s = dm.demo_settings(allow_policies=[str(mine)])
    p1 = dm.choose_policy("default", 2.0, s)
    p1.add_concept("violence", "chainsaw massacre")
    p2 = dm.choose_policy("", 1.0, s)
    assert p1.sensitivity == 2.0 and p2.sensitivity == 1.0 and p2.name == "default"
    assert "chainsaw massacre" not in p2.concepts("violence")  # edits never leak into the next request
    assert dm.choose_policy("mine", 1.0, s).concepts() == ["chainsaw"]
    with pytest.raises(dm.DemoInputError, match="sensitivity"):
        dm.choose_policy("default", 0, s)
    # the file changes after start-up: the page gets a generic message, the server log the reason
    for body in ("api_key: sk-live-SECRET\ndb_password: hunter2\n", "sensitivity: 'sk-live-SECRET'\n",
                 "categories: {secret-api-key-ABC123: {concepts: []}}\n", "name: [unclosed\n"):
        mine.write_text(body)
        caplog.clear()
        with caplog.at_level("WARNING", logger="safegen.demo"):
            with pytest.raises(dm.DemoInputError) as e:
                dm.choose_policy("mine", 1.0, s)
        assert str(e.value) == "policy 'mine' is not valid; see the server log"
        assert str(tmp_path) in caplog.text  # the operator can find out why
    mine.unlink()
    with pytest.raises(dm.DemoInputError, match="^policy 'mine' is not valid; see the server log$"):
        dm.choose_policy("mine", 1.0, s)


# ---------------------------------------------------------------------- guards
def test_guard_options_follow_the_shipped_weights(monkeypatch, tmp_path):
    from safegen.guards import latent_guard

    default = {o.key: o for o in dm.guard_options("default")}
    assert list(default) == ["latent-guard", "safree", "sld", "lvd", "safetydpo", "output"]
    assert default["output"].available  # the embedded model's trained output classifier ships
    assert default["safree"].available and default["sld"].available
    assert latent_guard.default_weights_path().is_file() and default["latent-guard"].available  # shipped head
    # without a head at the default path (a user deleted it) the toggle is off and says why
    monkeypatch.setattr(latent_guard, "default_weights_path", lambda: tmp_path / "missing.safetensors")
    gone = {o.key: o for o in dm.guard_options()}["latent-guard"]
    assert not gone.available and "unavailable" in gone.reason and "train-prompt-guard" in gone.reason
    monkeypatch.undo()
    other = {o.key: o for o in dm.guard_options(str(tmp_path))}
    assert not other["lvd"].available and "embedded default model" in other["lvd"].reason
    assert not other["safetydpo"].available and other["safree"].available
    assert not other["output"].available and "train-output-classifier" in other["output"].reason
    # a head at the default path makes Latent Guard available
    head = tmp_path / "minilm.safetensors"
    head.write_bytes(b"x")
    monkeypatch.setattr(latent_guard, "default_weights_path", lambda: head)
    assert {o.key: o for o in dm.guard_options()}["latent-guard"].available
    assert dm.default_guard_keys(dm.guard_options()) == ["latent-guard", "safree", "lvd", "output"]
    assert dm.default_guard_keys(dm.guard_options(str(tmp_path)), str(tmp_path)) == ["safree"]


def test_validate_guards():
    options = [dm.GuardOption("safree", "SAFREE", ""), dm.GuardOption("sld", "SLD", ""),
               dm.GuardOption("latent-guard", "Latent Guard", "", False, "unavailable: no head")]
    assert dm.validate_guards(["safree", "sld"], options, "strong") == ["safree", "sld-strong"]
    assert dm.validate_guards(["safree", "safree"], options) == ["safree"]
    with pytest.raises(dm.DemoInputError, match="at least one guard"):
        dm.validate_guards([], options)
    with pytest.raises(dm.DemoInputError, match="Latent Guard is unavailable: no head"):
        dm.validate_guards(["latent-guard"], options)
    with pytest.raises(dm.DemoInputError, match="unknown guard 'lvd'"):
        dm.validate_guards(["lvd"], options)
    with pytest.raises(dm.DemoInputError, match="SLD strength"):
        dm.validate_guards(["sld"], options, "extreme")
    from safegen.guards import GUARD_PRESETS

    assert all(f"sld-{p}" in GUARD_PRESETS for p in dm.SLD_PRESETS)  # every strength is a real preset


# ---------------------------------------------------------------------- highlighting
def test_highlight_follows_token_order_and_word_boundaries():
    prompt = "The man and another: the blood-stained knife"
    spans = dm.highlight_spans(prompt, ["man", "the", "blood", "stained"])
    # "the" comes after "man": the whole word at 21, not the "The" before it nor the "the" inside "another"
    assert [prompt[a:b] for a, b in spans] == ["man", "the", "blood", "stained"]
    assert spans[1] == (21, 24)
    # WordPiece continuation, CLIP end-of-word marks, case, and tokens that are not text
    assert dm.highlight_spans("Decapitated heads", ["deca", "##pit", "##ated", "[UNK]", "#3"]) == [(0, 11)]
    assert dm.highlight_spans("a photo of BLOOD", ["blood</w>"]) == [(11, 16)]
    assert dm.highlight_spans("a red bus", []) == []
    assert dm.highlight_spans("a red bus", ["zebra"]) == []


def test_highlight_html_escapes_and_marks():
    out = dm.highlight_prompt_html('<b>"gore"</b> & blood', ["gore", "blood"], concepts=["blood"])
    assert "<b>" not in out and "&lt;b&gt;" in out and "&amp;" in out
    assert re.findall(r'<mark class="sg-trigger"[^>]*>([^<]*)</mark>', out) == ["gore", "blood"]
    segs = dm.highlight_segments("a nude woman on the beach", [], concepts=["nude", "beach party"])
    assert segs == [("a ", None), ("nude", "concept"), (" woman on the beach", None)]


# ---------------------------------------------------------------------- report formatting
def _lvd_blocked():
    return SafetyReport(index=0, prompt="A crowd watches as a man is beaten in an alleyway assault.", guards=[
        GuardResult("lvd", "block", category="violence", score=0.99, threshold=0.05, stopped_at_step=3,
                    steps_saved=21, seconds=0.008, reason="latents looked unsafe ('violence'); stopped after step 3"),
        GuardResult("safree", "steer", category="violence", concept="assault", score=0.56, threshold=0.55,
                    trigger_tokens=["beaten", "assault"], filtered_steps=1, seconds=0.2,
                    reason="category 'violence' (literal 'assault')")], unet_steps_run=4, unet_steps_saved=21)


def test_report_html_blocked_by_lvd():
    out = dm.report_html(_lvd_blocked(), steps=25, seconds_per_step=0.04, seconds=0.3,
                         concepts=["assault", "murder"])
    assert 'data-verdict="block"' in out
    assert re.search(r'class="sg-verdict"[^>]*>BLOCKED by lvd · category violence<', out)
    assert "latents looked unsafe" in out and "literal" in out  # the reasons of both guards
    assert "stopped at step 3 of 25" in out
    assert re.findall(r'<mark class="sg-trigger"[^>]*>([^<]*)</mark>', out) == ["beaten", "assault"]
    assert "4 of 25 run, 21 saved (84%)" in out and "about 0.84 s saved at 0.040 s per step" in out
    assert "0.986" not in out and "0.990 / 0.050" in out and "0.560 / 0.550" in out
    assert out.count('class="sg-guard"') == 2 and "200.0 ms" in out
    assert "Protected call: 0.30 s" in out


def test_report_html_other_verdicts():
    passed = SafetyReport(0, "a red bus", [GuardResult("safree", reason="")], unet_steps_run=25)
    out = dm.report_html(passed, steps=25)
    assert ">PASSED<" in out and "sg-reason" not in out and "none saved" in out and "<mark" not in out
    steered = SafetyReport(0, "blood", [GuardResult("safree", "steer", category="violence", concept="blood",
                                                    trigger_tokens=["blood"], reason="literal 'blood'")], 25)
    assert "STEERED by safree · category violence · concept “blood”" in dm.report_html(steered, steps=25)
    failed = SafetyReport(0, "x", [GuardResult("lvd", "error", reason="guard failed, item blocked (fail closed)")])
    out = dm.report_html(failed, steps=25)
    assert ">BLOCKED by lvd<" in out and "fail closed" in out
    nothing = SafetyReport(0, "<script>", [], unet_steps_run=25)
    out = dm.report_html(nothing, steps=25)
    assert "No guard ran" in out and "<script>" not in out
    assert dm.verdict_label(steered) == "STEERED" and dm.verdict_label(failed) == "BLOCKED"
    assert dm.protected_caption(steered, 1.234) == "Protected · STEERED · 25 steps run · 1.23 s"
    assert dm.unprotected_caption(25, 0.5) == "Unprotected · 25 steps · 0.50 s"


def test_placeholder_is_neutral_never_black():
    img = dm.placeholder_image(_lvd_blocked(), size=128)
    arr = np.asarray(img).astype(int)
    assert img.size == (128, 128) and img.mode == "RGB"
    gray = (np.abs(arr - 150).max(axis=2) == 0).mean()
    assert gray > 0.6  # mostly the neutral gray card
    assert (arr.sum(axis=2) == 0).mean() < 0.05  # not a black square
    assert (arr.max(axis=2) == 255).any()  # the white BLOCKED heading is drawn
    assert not np.array_equal(arr, np.asarray(dm.placeholder_image(SafetyReport(0), size=128)))  # the reason shows


def test_display_image_upscales_small_images():
    from PIL import Image

    small = Image.new("RGB", (64, 64), (10, 20, 30))
    big = dm.display_image(small, 256)
    assert big.size == (256, 256) and big.getpixel((255, 255)) == (10, 20, 30)
    assert dm.display_image(Image.new("RGB", (512, 512)), 256).size == (512, 512)
    assert dm.display_image(np.full((8, 8, 3), 0.5, dtype=np.float32), 16).getpixel((0, 0)) == (128, 128, 128)


# ---------------------------------------------------------------------- the comparison run
def test_run_comparison_on_a_tiny_pipeline(sd, lexical_policy):
    seen = []
    comp = dm.run_comparison(sd, "a photo of blood and gore", guards=["safree"], policy=lexical_policy, steps=3,
                             seed=5, progress=lambda frac, desc: seen.append((round(frac, 3), desc)))
    assert comp.report.verdict == "steer" and comp.report.result("safree").category == "violence"
    assert comp.report.unet_steps_run == 3 and comp.steps == 3 and comp.seed == 5
    assert comp.plain_seconds > 0 and comp.protected_seconds > 0 and comp.seconds_per_step > 0
    assert not safegen.is_protected(sd)  # the shared pipeline is left unprotected
    assert not np.array_equal(np.asarray(comp.plain_image), np.asarray(comp.protected_image))
    # the bar is fed from the step callbacks of both runs, in order, and ends at 1
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [f for f, d in seen if d == "unprotected"] == [0.0, 0.167, 0.333, 0.5]
    assert [f for f, d in seen if d == "protected"] == [0.5, 0.667, 0.833, 1.0]
    # a benign prompt: the protected image is the unprotected one, bit for bit
    benign = dm.run_comparison(sd, "a photo of a red bus", guards=["safree"], policy=lexical_policy, steps=2)
    assert benign.report.verdict == "pass"
    assert np.array_equal(np.asarray(benign.plain_image), np.asarray(benign.protected_image))


def test_run_comparison_without_the_unprotected_image(sd, lexical_policy):
    seen, unet_calls = [], []
    hook = sd.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(safegen.is_protected(sd)))
    try:
        comp = dm.run_comparison(sd, "a photo of blood and gore", guards=["safree"], policy=lexical_policy, steps=2,
                                 progress=lambda frac, desc: seen.append((round(frac, 3), desc)), unprotected=False)
    finally:
        hook.remove()
    assert unet_calls and all(unet_calls)  # every UNet step ran protected: the unguarded image is never made
    assert comp.plain_image is None and comp.plain_seconds is None
    assert comp.report.verdict == "steer" and comp.protected_image is not None
    assert comp.seconds_per_step == pytest.approx(comp.protected_seconds / 2)
    assert [f for f, d in seen if d == "protected"] == [0.0, 0.5, 1.0] and "unprotected" not in {d for _, d in seen}
    assert not safegen.is_protected(sd)


def test_run_comparison_unprotects_after_an_error(sd, lexical_policy):
    def boom(frac, desc):
        if desc == "protected" and frac > 0.5:
            raise RuntimeError("progress failed")

    with pytest.raises(RuntimeError, match="progress failed"):
        dm.run_comparison(sd, "a red bus", guards=["safree"], policy=lexical_policy, steps=2, progress=boom)
    assert not safegen.is_protected(sd)


def test_pipeline_cache_keeps_the_most_recent():
    loads = []
    cache = dm.PipelineCache(loader=lambda m: loads.append(m) or object(), size=2)
    a = cache.get("a")
    cache.get("b")
    assert cache.get("a") is a  # a hit moves it to the end
    cache.get("c")  # drops "b", the least recently used
    assert cache.loaded() == ["a", "c"] and loads == ["a", "b", "c"]


def test_load_pipeline_errors_are_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dm.DemoInputError, match="HF_HUB_OFFLINE"):
        dm.load_pipeline("no-such-owner/no-such-model")
    with pytest.raises(dm.DemoInputError, match="could not load model"):
        dm.load_pipeline(str(tmp_path))  # an empty folder is no pipeline


def test_examples_come_from_the_shared_data():
    from safegen.eval.datasets import default_data_dir

    data = default_data_dir()
    if not (data / "coco_30k_10k.csv").is_file() or not (data / "CoProv2_test.csv").is_file():
        pytest.skip(f"shared prompt data not found in {data}")
    import csv

    def prompts(name):
        with (data / name).open(encoding="utf-8-sig", newline="") as fh:
            return {(row["prompt"] or "").strip() for row in csv.DictReader(fh)}

    assert set(dm.examples("benign")) <= prompts("coco_30k_10k.csv")
    assert set(dm.examples("unsafe")) <= prompts("CoProv2_test.csv")
    assert dm.examples() == dm.examples("benign") + dm.examples("unsafe")
    assert all(len(p) <= dm.MAX_PROMPT_CHARS for p in dm.examples())


# ---------------------------------------------------------------------- the command
def test_demo_command_arguments(monkeypatch, capsys):
    from safegen import cli

    args = cli.build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.model, args.device) == ("127.0.0.1", 7860, "default", "auto")
    args = cli.build_parser().parse_args(["demo", "--host", "0.0.0.0", "--port", "8123"])
    assert (args.host, args.port, args.func) == ("0.0.0.0", 8123, cli.cmd_demo)
    for bad in ("0", "70000", "http"):
        assert cli.main(["demo", "--port", bad]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli._demo_app_path().is_file()


def test_demo_command_refuses_a_bad_model_before_starting(monkeypatch, capsys, tmp_path):
    from safegen import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = tmp_path / "app.py"  # stands in for demos/app.py: starting it fails the test
    fake.write_text("def launch(**kw):\n    raise AssertionError('the demo must not start')\n")
    monkeypatch.setattr(cli, "_demo_app_path", lambda: fake)
    assert cli.main(["demo", "--model", "no-such-owner/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "HF_HUB_OFFLINE=1" in err
    fake.unlink()
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "the demo app" in err and "is missing" in err


FAKE_APP = """
import json
def launch(**kw):
    s = kw["settings"]
    with open({out!r}, "w") as f:
        json.dump({{"host": kw["host"], "auth": kw["auth"], "unprotected": s.unprotected, "models": list(s.models),
                   "policies": list(s.policies)}}, f)
"""


@pytest.fixture
def fake_app(monkeypatch, tmp_path):
    """Stands in for demos/app.py: ``launch`` writes what it was given to a JSON file (read with ``seen()``)."""
    from safegen import cli

    out = tmp_path / "launched.json"
    app = tmp_path / "app.py"
    app.write_text(FAKE_APP.format(out=str(out)))
    monkeypatch.setattr(cli, "_demo_app_path", lambda: app)
    monkeypatch.delenv("SAFEGEN_DEMO_AUTH", raising=False)

    def seen():
        if not out.is_file():
            return None
        data = json.loads(out.read_text())
        out.unlink()
        return data

    return seen


def test_demo_off_loopback_needs_a_login(fake_app, capsys, monkeypatch):
    from safegen import cli

    assert cli.main(["demo", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--auth USER:PASSWORD" in err and "SAFEGEN_DEMO_AUTH" in err and "Traceback" not in err
    assert fake_app() is None  # refused before anything was served
    assert cli.main(["demo", "--host", "192.0.2.7", "--auth", "ada"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err

    assert cli.main(["demo", "--host", "0.0.0.0", "--auth", "ada:s3cret"]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "reachable from other machines" in err and "unprotected panel is off" in err
    assert "s3cret" not in err
    assert fake_app() == {"host": "0.0.0.0", "auth": ["ada", "s3cret"], "unprotected": False,
                          "models": ["default"], "policies": ["default"]}

    monkeypatch.setenv("SAFEGEN_DEMO_AUTH", "bob:pw")  # the login from the environment (not visible in ps)
    assert cli.main(["demo", "--host", "0.0.0.0"]) == 0
    assert fake_app()["auth"] == ["bob", "pw"]


def test_demo_on_loopback_and_its_allow_list(fake_app, capsys, tmp_path):
    from safegen import cli

    assert cli.main(["demo"]) == 0
    assert fake_app() == {"host": "127.0.0.1", "auth": None, "unprotected": True, "models": ["default"],
                          "policies": ["default"]}
    assert cli.main(["demo", "--no-unprotected"]) == 0
    assert fake_app()["unprotected"] is False
    mine = _policy_file(tmp_path)
    assert cli.main(["demo", "--model", "tiny-sd", "--allow-model", "tiny-sdxl", "--allow-policy", str(mine)]) == 0
    launched = fake_app()
    assert launched["models"] == ["tiny-sd", "default", "tiny-sdxl"] and launched["policies"] == ["default", "mine"]
    for args, needle in ((["--allow-model", str(tmp_path / "nope")], "--allow-model: model"),
                         (["--allow-policy", str(tmp_path / "nope.yaml")], "--allow-policy: "),
                         (["--allow-policy", "/etc/passwd"], "not a policy file")):
        assert cli.main(["demo", *args]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert fake_app() is None


def test_demo_command_without_gradio_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from safegen import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert cli.main(["demo"]) == 1
    assert "pip install 'safegen[demo]'" in capsys.readouterr().err


# ---------------------------------------------------------------------- the page's API
def test_the_page_has_one_generate_endpoint_with_named_parameters():
    """The Gradio API: /generate once (Enter in the prompt box adds no /generate_1), every input named, the guard
    toggles after the guards the registry lists (no param_7..)."""
    pytest.importorskip("gradio")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "demos" / "app.py"
    spec = importlib.util.spec_from_file_location("safegen_demo_app_api", path)
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)
    app = app_module.DemoApp()
    info = app.build().get_api_info()
    # the video tab (and its endpoint) exists where the default video model does: tests/test_video_world.py
    assert list(info["named_endpoints"]) == ["/generate"] + (["/generate_video"] if app_module._video_model_shipped()
                                                              else [])
    assert not info.get("unnamed_endpoints")
    names = [p["parameter_name"] for p in info["named_endpoints"]["/generate"]["parameters"]]
    toggles = [f"guard_{o.key.replace('-', '_')}" for o in dm.guard_options()]
    assert names == ["prompt", "model", "policy", "sensitivity", "steps", "seed", "sld_preset", *toggles]
    assert toggles == ["guard_latent_guard", "guard_safree", "guard_sld", "guard_lvd", "guard_safetydpo",
                       "guard_output"]


def test_guard_options_describe_guards_as_the_registry_does():
    from safegen.guards import guard_info

    summaries = {g["name"]: g["summary"] for g in guard_info()}
    for o in dm.guard_options():
        assert o.description == summaries[o.key]


def test_demo_and_demo_run_start_with_the_default_policy_stack():
    """The demo's toggles on the embedded model, `safegen demo-run` and the README show one default: the policy's."""
    import safegen
    from safegen.cli import _demo_guards
    from safegen.guard_names import guard_of_preset

    stack = safegen.load_policy("default").guards
    assert list(dm.DEMO_GUARDS) == stack
    keys = dm.default_guard_keys(dm.guard_options(dm.DEFAULT_MODEL), dm.DEFAULT_MODEL)
    assert keys == [guard_of_preset(g) for g in stack]
    assert _demo_guards() == stack


# ---------------------------------------------------------------------- the video tab
def test_video_comparison_flags_frames_in_the_strip(lexical_policy):
    """On a video pipeline the comparison gives lists of frames; the frames LVD flagged are read from its report
    and framed in red in the strip."""
    import torch

    from safegen.guards.lvd import LVD, LatentClassifier
    from safegen.testing import tiny_animatediff_pipeline

    pipe = tiny_animatediff_pipeline()

    def flag(x0):  # frames 2 and 3 of the clip
        rows = torch.zeros(x0.shape[0], dtype=torch.bool)
        rows[2:4] = True
        return rows

    lvd = LVD.from_classifier(LatentClassifier.scripted(pipe, flag), window=2, ratio=0.5)
    comp = dm.run_comparison(pipe, "a red car", guards=[lvd], policy=lexical_policy, steps=3, num_frames=4)
    assert len(comp.plain_image) == 4 and comp.report.verdict == "block"
    assert dm.flagged_frames(comp.report) == [2, 3]
    strip = dm.frame_strip(comp.plain_image, dm.flagged_frames(comp.report), size=32)
    cell = strip.size[0] // 4
    assert strip.size == (4 * cell, cell)
    assert [strip.getpixel((i * cell + 1, 1)) for i in range(4)] == [(200, 200, 200)] * 2 + [(220, 30, 30)] * 2
    assert dm.flagged_frames(comp.report.__class__(index=0)) == []  # no LVD result: no flagged frame
