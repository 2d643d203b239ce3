"""diffusers' own fast tests for ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``, plain and protected.

Is a protected pipeline a true drop-in? diffusers' fast test classes build tiny pipelines from dummy components and
exercise the whole call surface (callbacks, ``prompt_embeds``, batching, offloading, save/load, IP-Adapter...).
This script runs those classes once unprotected and once per guard setting with *every* pipeline the tests
build protected, and writes the per-test comparison to ``docs/diffusers-fast-tests.md``.

How the protected runs work: the script is also a pytest plugin (loaded with ``-p diffusers_fast_tests``, the
``benchmarks/`` folder on ``PYTHONPATH``). For a protected setting it wraps ``StableDiffusionPipeline.__init__``
and ``StableDiffusionXLPipeline.__init__`` so that each instance of exactly those classes (built from components
or by ``from_pretrained``) ends its construction with ``safegen.protect(pipe, policy=..., guards=[...])``, the
earliest point a user could protect it. It also wraps ``safegen.protection._run`` to record, per test, how many
protected calls ran and what every guard decided (``pass``/``steer``/``block``/``error``), so a failure can be
told apart: a test that fails while every guard said ``pass`` is a drop-in bug (a protected pipeline whose
guards do not fire must behave exactly as the plain one); one that fails where a guard acted is a behaviour
change whose cause is that guard's decision.

Guard settings (``--settings``; the default runs them all):

* ``safree``: the default policy's guards (SAFREE) at the policy's sensitivity. SAFREE's similarity thresholds
  are calibrated for real CLIP; diffusers' dummy text encoders are random, so on them the similarity gate fires
  on arbitrary prompts (a calibration artefact, reported but not an incompatibility by itself).
* ``safree-s0.1``: the same at ``sensitivity=0.1``: every threshold / 0.1 is above 1, so only literal concept
  phrases fire (the setting ``safegen.protect``'s own docstring uses on random tiny models). This is the fair
  drop-in run: guards are attached and run their checks on every call, and should not change benign output.
* ``latent-guard+safree``, ``latent-guard+safree-s0.1``: Latent Guard (MiniLM head, real sentence encoder, so
  its scores mean something even on dummy pipelines) in front of SAFREE, at both sensitivities.

Offline fixture: diffusers' dummy components load the tokenizer ``hf-internal-testing/tiny-random-clip`` from the
Hub. Offline, transformers builds an empty tokenizer whose ``model_max_length`` is 1e30 and every call fails in
every setting. The plugin substitutes a local CLIP BPE tokenizer (``safegen.testing``'s tiny vocabulary, ids <
1000, ``model_max_length=77``) for that id in every run, plain included. Tests that compare against hard-coded
image slices of the real fixture then fail plain too; their failure line carries the measured difference, so
"same failure as plain" means the protected output is the plain one. Tests that need other Hub files fail with
an offline error in every run.

Usage::

    python benchmarks/diffusers_fast_tests.py /tmp/diffusers-src                # all settings, writes the doc
    python benchmarks/diffusers_fast_tests.py /tmp/diffusers-src --settings plain,safree-s0.1 -k callback
    python benchmarks/diffusers_fast_tests.py /tmp/diffusers-src --safegen-src /tmp/safegen-snapshot

The checkout is any copy of the diffusers repository (its ``tests/`` folder is what is used; the installed
diffusers is what is tested). Get one without vendoring it, e.g. from a git mirror::

    git --git-dir=/path/to/diffusers.git archive <ref> tests pyproject.toml | tar -x -C /tmp/diffusers-src

The tests need ``parameterized`` and ``requests-mock`` (pure-python, test-only). Run it under ``nice``: the runs
take a few minutes each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import collections
import datetime as _dt
import functools
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "diffusers-fast-tests.md"

#: Guard settings: label -> (guards, sensitivity); ``None``: unprotected.
SETTINGS: dict[str, tuple[list[str], float | None] | None] = {
    "plain": None,
    "safree": (["safree"], None),
    "safree-s0.1": (["safree"], 0.1),
    "latent-guard+safree": (["latent-guard", "safree"], None),
    "latent-guard+safree-s0.1": (["latent-guard", "safree"], 0.1),
}

#: (test file, candidate fast-test classes): the first layout found in the checkout is used. Older diffusers has
#: one unittest class per pipeline; from mid-2026 the SD tests are pytest classes split by concern.
TEST_CLASSES = {
    "StableDiffusionPipeline": ("tests/pipelines/stable_diffusion/test_stable_diffusion.py",
                                [["StableDiffusionPipelineFastTests"],
                                 ["TestStableDiffusionPipeline", "TestStableDiffusionPipelineMemory",
                                  "TestStableDiffusionPipelineIPAdapter"]]),
    "StableDiffusionXLPipeline": ("tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py",
                                  [["StableDiffusionXLPipelineFastTests"]]),
}

TINY_CLIP_ID = "hf-internal-testing/tiny-random-clip"
ENV_SETTING = "SAFEGEN_DFT_SETTING"
ENV_LOG = "SAFEGEN_DFT_LOG"


# =============================================================================== the pytest plugin
class _Recorder:
    """Per-test record of what the protected pipelines did."""

    def __init__(self, path: str | None):
        self.path = path
        self.nodeid: str | None = None
        self.reset()

    def reset(self) -> None:
        self.protected = 0
        self.calls = 0
        self.raised: list[str] = []
        self.verdicts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.reasons: list[str] = []

    def flush(self) -> None:
        if self.path is None or self.nodeid is None:
            return
        rec = {"nodeid": self.nodeid, "protected_pipes": self.protected, "calls": self.calls,
               "raised": self.raised[:5], "verdicts": {g: dict(c) for g, c in self.verdicts.items()},
               "reasons": self.reasons[:5]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


_REC: _Recorder | None = None


def _install_tokenizer_shim(tmp: Path) -> None:
    """``CLIPTokenizer.from_pretrained("hf-internal-testing/tiny-random-clip")`` -> a local tiny CLIP tokenizer."""
    from transformers import CLIPTokenizer

    from safegen.testing import write_tiny_clip_tokenizer_files

    folder = write_tiny_clip_tokenizer_files(tmp / "tiny-random-clip")
    orig = CLIPTokenizer.from_pretrained.__func__

    @functools.wraps(orig)
    def from_pretrained(cls, name, *args, **kwargs):
        if str(name) == TINY_CLIP_ID:
            name = str(folder)
            kwargs.setdefault("model_max_length", 77)
        return orig(cls, name, *args, **kwargs)

    CLIPTokenizer.from_pretrained = classmethod(from_pretrained)


def _install_protection(guards: list[str], sensitivity: float | None, policy: str) -> None:
    import diffusers

    import safegen
    import safegen.protection as protection

    def wrap_init(base):
        orig_init = base.__init__

        @functools.wraps(orig_init)
        def __init__(self, *args, **kwargs):
            orig_init(self, *args, **kwargs)
            if type(self) is base:  # exactly the pipeline class under test (not a subclass, not a protected class)
                safegen.protect(self, policy=policy, guards=list(guards), sensitivity=sensitivity)
                if _REC is not None:
                    _REC.protected += 1

        return __init__

    for base in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
        base.__init__ = wrap_init(base)

    orig_run = protection._run

    def _run(pipe, base_call, args, kwargs):
        rec = _REC
        if rec is not None:
            rec.calls += 1
        try:
            out = orig_run(pipe, base_call, args, kwargs)
        except BaseException as e:
            if rec is not None:
                rec.raised.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            raise
        if rec is not None:
            for rep in pipe.__dict__["_safegen"].last_reports:
                for res in rep.guards:
                    rec.verdicts[res.guard][res.verdict] += 1
                    if res.verdict != "pass" and res.reason:
                        why = f"{res.guard}: {res.verdict}: {res.reason}"[:300]
                        if why not in rec.reasons:
                            rec.reasons.append(why)
        return out

    protection._run = _run


def pytest_configure(config):
    global _REC
    raw = os.environ.get(ENV_SETTING)
    if raw is None:
        return
    setting = json.loads(raw)
    _REC = _Recorder(os.environ.get(ENV_LOG))
    tmp = Path(tempfile.mkdtemp(prefix="safegen-dft-"))
    _install_tokenizer_shim(tmp)
    if setting.get("guards"):
        _install_protection(setting["guards"], setting.get("sensitivity"), setting.get("policy", "default"))


def pytest_runtest_logstart(nodeid, location):
    if _REC is not None:
        _REC.nodeid = nodeid
        _REC.reset()


def pytest_runtest_logfinish(nodeid, location):
    if _REC is not None and _REC.nodeid == nodeid:
        _REC.flush()
        _REC.nodeid = None


# =============================================================================== the runner
def _test_ids(checkout: Path) -> dict[str, list[str]]:
    """pipeline -> pytest ids of its fast-test classes present in the checkout."""
    out = {}
    for pipeline, (path, layouts) in TEST_CLASSES.items():
        text = (checkout / path).read_text(encoding="utf-8")
        for classes in layouts:
            present = [c for c in classes if re.search(rf"^class {c}\b", text, re.M)]
            if present:
                out[pipeline] = [f"{path}::{c}" for c in present]
                break
        else:
            raise SystemExit(f"{path}: none of the fast-test classes {layouts} found")
    return out


def _one_line(text: str | None, limit: int = 220) -> str:
    if not text:
        return ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # the first lines carry the cause: "AssertionError: msg", pytest's "assert x < y", diffusers'
    # "Tensors not close! ... Max diff ... Actual ... Expected"
    keep = []
    for ln in lines[:6]:
        if ln.startswith(("Use -v", "Left contains", "Right contains", "where ", "+ where", "+")):
            break
        keep.append(ln)
        if len(" | ".join(keep)) > limit:
            break
    line = re.sub(r"\s+", " ", " | ".join(keep)).replace("AssertionError: |", "AssertionError:")
    line = re.sub(r" at 0x[0-9a-f]+", "", line)  # object addresses differ from run to run
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _parse_junit(path: Path) -> dict[str, dict]:
    """nodeid-like key 'Class::test' -> {'outcome', 'cause'}."""
    results = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        cls = case.get("classname", "").rsplit(".", 1)[-1]
        key = f"{cls}::{case.get('name')}"
        outcome, cause = "pass", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "fail", "error": "error", "skipped": "skip"}[tag]
                msg = el.get("message") or (el.text or "")
                if tag == "skipped" and el.get("type") == "pytest.xfail":
                    outcome = "xfail"
                cause = _one_line(msg)
                break
        results[key] = {"outcome": outcome, "cause": cause, "time": float(case.get("time") or 0)}
    return results


def _run_setting(label: str, checkout: Path, ids: list[str], workdir: Path, args) -> dict:
    setting = SETTINGS[label]
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([p for p in (args.safegen_src, str(Path(__file__).resolve().parent),
                                                       env.get("PYTHONPATH")) if p]))
    env[ENV_SETTING] = json.dumps({"guards": setting[0], "sensitivity": setting[1], "policy": args.policy}
                                  if setting else {"guards": None})
    log = workdir / f"{label}.guards.jsonl"
    log.unlink(missing_ok=True)
    env[ENV_LOG] = str(log)
    junit = workdir / f"{label}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "diffusers_fast_tests",
           f"--junitxml={junit}", "-o", "junit_family=xunit1", *ids]
    if args.k:
        cmd += ["-k", args.k]
    t0 = time.time()
    with open(workdir / f"{label}.log", "w", encoding="utf-8") as out:
        proc = subprocess.run(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
                              preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None)
    seconds = time.time() - t0
    if not junit.exists():
        raise SystemExit(f"{label}: pytest wrote no report (exit {proc.returncode}); see {workdir / (label + '.log')}")
    guards = {}
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            guards[rec["nodeid"].split("::", 1)[1]] = rec
    return {"results": _parse_junit(junit), "guards": guards, "seconds": seconds, "rc": proc.returncode}


def _versions(checkout: Path, label: str | None, safegen_src: str | None) -> dict[str, str]:
    code = ("import sys, torch, diffusers, transformers, safegen, os;"
            "print(sys.version.split()[0], torch.__version__, diffusers.__version__, transformers.__version__,"
            " os.path.dirname(safegen.__file__))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (safegen_src, os.environ.get("PYTHONPATH")) if p))
    py, torch_v, diff_v, tf_v, sg_path = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                        env=env, check=True).stdout.split()

    def git(*a, cwd):
        r = subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    sg_commit = git("rev-parse", "--short", "HEAD", cwd=ROOT)
    dirty = git("status", "--porcelain", "--", "safegen", cwd=ROOT)
    if safegen_src:
        sg = f"{sg_path} (snapshot given with --safegen-src; project HEAD {sg_commit})"
    else:
        sg = f"{sg_path} at {sg_commit}{' + uncommitted changes in safegen/' if dirty else ''}"
    if label:
        src = label
    else:
        src = git("describe", "--tags", "--always", cwd=checkout) or "(not a git checkout)"
    return {"python": py, "torch": torch_v, "diffusers (installed, tested)": diff_v, "transformers": tf_v,
            "safegen": sg, "diffusers tests from": f"{checkout} — {src}", "platform": platform.platform()}


_SHORT = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "skip": "skip", "xfail": "xfail", None: "—"}


def _acted(rec: dict | None) -> str:
    """'safree: steer 3, pass 1; latent_guard: block 2' (only guards that did something other than pass)."""
    if not rec or not rec.get("verdicts"):
        return ""
    bits = []
    for g, counts in rec["verdicts"].items():
        non_pass = {v: n for v, n in counts.items() if v != "pass"}
        if non_pass:
            bits.append(f"{g}: " + ", ".join(f"{v} {n}" for v, n in sorted(non_pass.items())))
    return "; ".join(bits)


def _write_doc(out: Path, runs: dict[str, dict], ids: dict[str, list[str]], versions: dict, command: str,
               args) -> None:
    labels = list(runs)
    protected = [lb for lb in labels if lb != "plain"]
    lines = ["# diffusers' own fast tests against protected pipelines", "",
             "Generated by `benchmarks/diffusers_fast_tests.py` (issue 17, point 11): diffusers' fast test classes for "
             "`StableDiffusionPipeline` and `StableDiffusionXLPipeline`, run unprotected (`plain`) and with every "
             "pipeline those tests build passed through `safegen.protect(pipe, policy=\"default\", guards=[...])` "
             "at the end of its construction. See the script's docstring for how, and for the offline tokenizer "
             "fixture.", "",
             f"- command: `{command}`",
             f"- date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"]
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += ["", "Settings:", "",
              "| setting | guards | sensitivity | note |", "|---|---|---|---|"]
    notes = {"plain": "unprotected reference",
             "safree": "the default policy's guards; similarity gate calibrated for real CLIP, random here",
             "safree-s0.1": "fair drop-in run: only literal concept phrases fire",
             "latent-guard+safree": "Latent Guard (MiniLM, real scores) + SAFREE",
             "latent-guard+safree-s0.1": "fair drop-in run with both guards attached"}
    for lb in labels:
        s = SETTINGS[lb]
        lines.append(f"| `{lb}` | {', '.join(s[0]) if s else '—'} | {s[1] if s and s[1] is not None else ('policy (1.0)' if s else '—')} "
                     f"| {notes.get(lb, '')} |")

    # ---------------------------------------------------------------- summary
    lines += ["", "## Summary", "",
              "Counts per test class and setting. *regressions*: tests that pass plain and do not pass protected "
              "(skips excluded); *guards silent*: those of them in which no guard acted (every verdict `pass`) — "
              "pure drop-in bugs.", "",
              "| class | setting | passed | failed | errors | skipped | regressions | guards silent | minutes |",
              "|---|---|---|---|---|---|---|---|---|"]
    by_class: dict[str, list[str]] = collections.OrderedDict()
    for pipeline, class_ids in ids.items():
        for cid in class_ids:
            by_class[cid.split("::")[1]] = []
    for lb in labels:
        for key in runs[lb]["results"]:
            cls = key.split("::")[0]
            if cls in by_class and key not in by_class[cls]:
                by_class[cls].append(key)
    for cls, keys in by_class.items():
        for lb in labels:
            res = runs[lb]["results"]
            c = collections.Counter(res[k]["outcome"] for k in keys if k in res)
            if lb == "plain":
                reg = silent = "—"
            else:
                regs = [k for k in keys if runs["plain"]["results"].get(k, {}).get("outcome") == "pass"
                        and res.get(k, {}).get("outcome") in ("fail", "error")] if "plain" in runs else []
                reg = str(len(regs))
                silent = str(sum(1 for k in regs if not _acted(runs[lb]["guards"].get(k))))
            secs = sum(res[k]["time"] for k in keys if k in res) / 60
            lines.append(f"| `{cls}` | `{lb}` | {c['pass']} | {c['fail']} | {c['error']} | {c['skip']} | {reg} | "
                         f"{silent} | {secs:.1f} |")

    # ---------------------------------------------------------------- per test
    lines += ["", "## Per test", "",
              "`pass`, `FAIL`, `ERROR`, `skip`. A protected cell is marked `=` when it fails with exactly the plain "
              "failure line (same output, same numbers), `≠` when it fails differently; `*` when a guard acted in "
              "that test (not only `pass`).", ""]
    for cls, keys in by_class.items():
        lines += [f"### `{cls}`", "", "| test | " + " | ".join(f"`{lb}`" for lb in labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for key in sorted(keys, key=lambda k: k.split("::")[1]):
            cells = []
            plain = runs.get("plain", {}).get("results", {}).get(key)
            for lb in labels:
                r = runs[lb]["results"].get(key)
                cell = _SHORT[r["outcome"] if r else None]
                if lb != "plain" and r and r["outcome"] in ("fail", "error") and plain and \
                        plain["outcome"] in ("fail", "error"):
                    cell += " =" if r["cause"] == plain["cause"] else " ≠"
                if lb != "plain" and _acted(runs[lb]["guards"].get(key)):
                    cell += " *"
                cells.append(cell)
            lines.append(f"| `{key.split('::')[1]}` | " + " | ".join(cells) + " |")
        lines.append("")

    # ---------------------------------------------------------------- causes
    lines += ["## Failure causes", "",
              "One line per failing (test, setting): the failure's first line. Protected failures identical to the "
              "plain one are not repeated. *guards*: what the guards decided during that test.", ""]
    for cls, keys in by_class.items():
        block = []
        for key in sorted(keys, key=lambda k: k.split("::")[1]):
            plain = runs.get("plain", {}).get("results", {}).get(key)
            entries = []
            for lb in labels:
                r = runs[lb]["results"].get(key)
                if not r:
                    continue
                if r["outcome"] == "skip" and lb == "plain":
                    entries.append(f"  - skip (all settings alike): {r['cause']}")
                    continue
                if r["outcome"] not in ("fail", "error"):
                    continue
                if lb != "plain" and plain and plain["outcome"] in ("fail", "error") and r["cause"] == plain["cause"]:
                    continue
                acted = _acted(runs[lb]["guards"].get(key)) if lb != "plain" else ""
                raised = (runs[lb]["guards"].get(key) or {}).get("raised") if lb != "plain" else None
                extra = (f" — guards: {acted}" if acted else (" — guards: all pass" if lb != "plain" else ""))
                if raised:
                    extra += f" — raised in a protected call: {raised[0]}"
                entries.append(f"  - `{lb}` {_SHORT[r['outcome']]}: {r['cause']}{extra}")
            if entries:
                block.append(f"- `{key.split('::')[1]}`")
                block += entries
        if block:
            lines += [f"### `{cls}`", ""] + block + [""]

    # ---------------------------------------------------------------- reasons guards gave
    lines += ["## What the guards decided", "",
              "Per protected setting, the tests in which a guard did something other than `pass`, with the first "
              "reasons it gave.", ""]
    for lb in protected:
        acted = [(k, rec) for k, rec in sorted(runs[lb]["guards"].items()) if _acted(rec)]
        lines += [f"### `{lb}` ({len(acted)} tests)", ""]
        for k, rec in acted:
            reasons = "; ".join(r.replace("\n", " ")[:160] for r in rec["reasons"][:2])
            lines.append(f"- `{k}`: {_acted(rec)} — {reasons}")
        lines.append("")
    # the hand-written analysis between the markers survives a re-run; --analysis FILE replaces it
    analysis = None
    if args.analysis:
        analysis = Path(args.analysis).read_text(encoding="utf-8").strip()
    elif out.exists():
        m = re.search(r"<!-- analysis:begin -->\n(.*?)\n<!-- analysis:end -->", out.read_text(encoding="utf-8"), re.S)
        analysis = m.group(1).strip() if m else None
    if analysis:
        lines[lines.index("## Summary"):lines.index("## Summary")] = [
            "<!-- analysis:begin -->", analysis, "<!-- analysis:end -->", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkout", type=Path, help="a copy of the diffusers repository (its tests/ folder is used)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, from {list(SETTINGS)} (plain is always run first when listed)")
    p.add_argument("--policy", default="default", help="policy for the protected runs (default: %(default)s)")
    p.add_argument("--safegen-src", default=None,
                   help="a folder holding a safegen package to test instead of the installed one (prepended to "
                        "PYTHONPATH), e.g. a `git archive HEAD safegen assets` snapshot")
    p.add_argument("--source-label", default=None, help="what to say the checkout is (default: git describe)")
    p.add_argument("-k", default=None, help="pytest -k expression (a subset; the doc then covers only it)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=None, help="where junit XML, logs and guard records go")
    p.add_argument("--analysis", default=None,
                   help="a markdown file put before the summary (the hand-written analysis of the regressions); "
                        "without it, the analysis block already in --out is kept")
    p.add_argument("--nice", type=int, default=10, help="niceness of the pytest runs (0: none)")
    p.add_argument("--reuse", action="store_true", help="re-write the doc from the workdir's results, run nothing")
    args = p.parse_args(argv)

    checkout = args.checkout.resolve()
    labels = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in labels if s not in SETTINGS]
    if bad:
        p.error(f"unknown setting(s) {bad}; known: {list(SETTINGS)}")
    if "plain" in labels:
        labels.remove("plain")
        labels.insert(0, "plain")
    ids = _test_ids(checkout)
    all_ids = [i for v in ids.values() for i in v]
    workdir = args.workdir or Path(tempfile.gettempdir()) / "safegen-diffusers-fast-tests"
    workdir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/diffusers_fast_tests.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    runs = {}
    for lb in labels:
        if args.reuse:
            state = json.loads((workdir / f"{lb}.json").read_text(encoding="utf-8"))
            if (workdir / f"{lb}.xml").exists():  # re-read: the cause lines follow the current parser
                state["results"] = _parse_junit(workdir / f"{lb}.xml")
        else:
            print(f"[{lb}] running {len(all_ids)} test classes ...", flush=True)
            state = _run_setting(lb, checkout, all_ids, workdir, args)
            (workdir / f"{lb}.json").write_text(json.dumps(state), encoding="utf-8")
        c = collections.Counter(r["outcome"] for r in state["results"].values())
        print(f"[{lb}] {dict(c)} in {state['seconds'] / 60:.1f} min (pytest exit {state['rc']})", flush=True)
        runs[lb] = state
    versions = _versions(checkout, args.source_label, args.safegen_src)
    _write_doc(args.out, runs, ids, versions, command, args)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
