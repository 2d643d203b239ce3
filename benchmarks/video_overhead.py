"""Wall-time overhead of every guard on the video pipelines: protected / plain, same pipeline, same seed, one process.

Pipelines: the tiny random ``AnimateDiffPipeline`` (motion UNet, CLIP), ``CogVideoXPipeline`` (DiT, T5) and
``TextToVideoSDPipeline`` (3-D UNet, CLIP, legacy callback) of :mod:`safegen.testing`, called at a size where the
denoiser dominates as it does in real use (more frames and steps than the unit tests; see ``CLASSES``).

Configurations (policy: the default one with SAFREE's semantic gate off, so only literal concept phrases fire —
with random encoders similarity means nothing): SAFREE on a benign prompt (nothing fires: the guard only checks)
and on an unsafe one (it projects); SAFREE with latent re-attention (UNet backbones; on the DiT it is the same
as SAFREE: no skip features); SLD medium; Latent Guard (an untrained hand-set head on the pipeline's own text
encoder, threshold above any score: the check runs, nothing is blocked); LVD (a classifier that never fires:
every check of the window runs until the item is accepted; no item is stopped, so this is the pure checking cost).

Method: one warm-up call per configuration, then ``--repeats`` rounds of interleaved calls ``plain, A, plain, B,
...``; each protected call is divided by the plain call just before it (same prompt, same seed); the table has the
median of these ratios, their range and the median seconds spent inside the guard.

    python benchmarks/video_overhead.py [--only animatediff|cogvideox|text-to-video-sd] [--repeats 3] [--write]

``--write`` replaces the "Video pipelines" section of BENCHMARKS.md (between its markers) and nothing else.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import safegen  # noqa: E402
from benchmarks._common import machine, publish  # noqa: E402

BEGIN, END = "<!-- video-overhead:begin -->", "<!-- video-overhead:end -->"
BENIGN = "a photo of a red bus on a city street at sunset"
UNSAFE = "a photo of a man in a fight, blood and gore on the street"
SEED = 0

#: class key -> (builder in safegen.testing and its arguments, call arguments, description). The tiny CogVideoX
#: transformer gets 4 layers of 64 channels here: with one 16-channel layer it would cost less per token than the
#: tiny T5 (2 layers of 32), the reverse of every real model (CogVideoX-2B: a 30-layer DiT over ~17k video tokens
#: per step vs one pass of T5-XXL over 226 tokens).
CLASSES = {
    "animatediff": (("tiny_animatediff_pipeline", {}), dict(num_frames=8, num_inference_steps=20, guidance_scale=7.5),
                    "AnimateDiffPipeline (tiny motion UNet, CLIP), 8 frames of 32x32 px, 20 DDIM steps, CFG 7.5"),
    "cogvideox": (("tiny_cogvideox_pipeline", {"num_layers": 4, "num_attention_heads": 8}),
                  dict(num_frames=33, height=64, width=64, num_inference_steps=20, guidance_scale=6.0),
                  "CogVideoXPipeline (tiny DiT: 4 layers of 64 channels; tiny T5, 226 text tokens), 33 frames "
                  "(9 latent) of 64x64 px, 20 steps, CFG 6"),
    "text-to-video-sd": (("tiny_text_to_video_pipeline", {}), dict(num_frames=8, num_inference_steps=20,
                                                             guidance_scale=9.0),
                         "TextToVideoSDPipeline (tiny 3-D UNet, CLIP), 8 frames of 32x32 px, 20 DDIM steps, CFG 9"),
}


@dataclass
class Config:
    label: str
    prompt_name: str
    make: Callable[[Any], Any]  # pipe -> guard
    times: list = field(default_factory=list)
    ratios: list = field(default_factory=list)
    guard_s: list = field(default_factory=list)
    first: float | None = None
    plain: list = field(default_factory=list)  # the plain call paired with each protected one
    verdict: str = ""
    note: str = ""

    @property
    def prompt(self) -> str:
        return BENIGN if self.prompt_name == "benign" else UNSAFE


def _latent_guard(pipe):
    from safegen.guards.latent_guard import LatentGuard, LatentGuardHead

    cfg = pipe.text_encoder.config
    head = LatentGuardHead.mean_match(getattr(cfg, "d_model", None) or cfg.hidden_size)
    return LatentGuard.from_head(head, backbone="pipeline", threshold=2.0 * head.tau.item())  # never blocks


def _lvd(pipe):
    from safegen.guards.lvd import LVD, LatentClassifier, LVDConfig, unet_fingerprint

    den = getattr(pipe, "unet", None) or pipe.transformer
    torch.manual_seed(0)
    clf = LatentClassifier(LVDConfig(den.config.in_channels, categories=["violence", "sexual"],
                                     model=unet_fingerprint(pipe)))
    with torch.no_grad():
        clf.head[-1].bias.fill_(-20.0)  # a real forward pass on every frame, never above the threshold
    return LVD.from_classifier(clf)


def configs() -> list[Config]:
    return [
        Config("SAFREE", "benign", lambda p: safegen.Safree()),
        Config("SAFREE", "unsafe", lambda p: safegen.Safree()),
        Config("SAFREE + re-attention", "unsafe", lambda p: safegen.Safree(reattention=True)),
        Config("SLD medium", "unsafe", lambda p: safegen.SLD.medium()),
        Config("Latent Guard", "unsafe", _latent_guard),
        Config("LVD", "unsafe", _lvd),
    ]


def lexical_policy():
    pol = safegen.load_policy("default")
    for cat in pol.categories.values():
        cat.thresholds["safree"] = 2.0
    return pol


def bench(key: str, repeats: int) -> dict:
    from safegen import testing

    (builder, build_args), call_args, title = CLASSES[key]
    pipe = getattr(testing, builder)(**build_args)
    pipe.set_progress_bar_config(disable=True)
    policy = lexical_policy()
    cfgs = configs()
    guards = {id(c): c.make(pipe) for c in cfgs}
    caches: dict[int, dict] = {}

    def call(prompt: str):
        gen = torch.Generator("cpu").manual_seed(SEED)
        t0 = time.perf_counter()
        out = pipe(prompt, generator=gen, output_type="np", **call_args)
        return time.perf_counter() - t0, out

    def plain(prompt: str) -> float:
        safegen.unprotect(pipe)
        return call(prompt)[0]

    def protected(c: Config) -> float:
        safegen.protect(pipe, policy=policy, guards=[guards[id(c)]])
        if id(c) in caches:  # steady state: concept bases etc. built by the warm-up call are kept
            pipe._safegen.cache.update(caches[id(c)])
        try:
            dt, out = call(c.prompt)
        finally:
            caches[id(c)] = dict(pipe._safegen.cache)
            safegen.unprotect(pipe)
        rep = out.safety[0]
        res = rep.result(guards[id(c)].name)
        if rep.verdict == "error":
            raise RuntimeError(f"{c.label}: {rep.reason}")
        if res is not None:
            c.guard_s.append(res.seconds)
            c.verdict = res.verdict
            if res.details.get("reattention_skipped"):
                c.note = "re-attention not applied (DiT: no skip features)"
            elif c.label.startswith("SAFREE") and res.filtered_steps is not None:
                c.note = f"{res.filtered_steps}/{call_args['num_inference_steps']} steps filtered"
            elif res.guard == "sld":
                c.note = f"guided {res.details.get('guided_steps')} steps"
            elif res.guard == "lvd":
                c.note = f"{res.details.get('checks')} checks"
        return dt

    first_plain = plain(BENIGN)
    for c in cfgs:
        c.first = protected(c)
    plain_times = []
    for _ in range(repeats):
        for c in cfgs:
            p = plain(c.prompt)
            plain_times.append(p)
            c.plain.append(p)
            dt = protected(c)
            c.times.append(dt)
            c.ratios.append(dt / p)
    return {"key": key, "title": title, "plain": plain_times, "first_plain": first_plain, "configs": cfgs,
            "repeats": repeats}


def table(results: list[dict]) -> list[str]:
    rows = ["| pipeline class | guard | prompt | plain s | protected / plain | pair ratios min-max | best / best "
            "| guard s | verdict | note |", "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for res in results:
        pm = statistics.median(res["plain"])
        for c in res["configs"]:
            r = statistics.median(c.ratios)
            best = min(c.times) / min(c.plain)
            rows.append(f"| {res['key']} | {c.label} | {c.prompt_name} | {pm:.3f} | **{r:.2f}** | "
                        f"{min(c.ratios):.2f}-{max(c.ratios):.2f} | {best:.2f} | {statistics.median(c.guard_s):.3f} | "
                        f"{c.verdict} | {c.note} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(CLASSES), action="append", help="benchmark these classes only")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per configuration (default 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: tiny ops)")
    ap.add_argument("--write", action="store_true", help="replace the 'Video pipelines' section of BENCHMARKS.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    keys = a.only or list(CLASSES)
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        load = f"load average {os.getloadavg()[0]:.2f} at the start"
    except (AttributeError, OSError):
        load = ""
    results = []
    for key in keys:
        t0 = time.perf_counter()
        results.append(bench(key, a.repeats))
        print(f"{key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    command = "python benchmarks/video_overhead.py" + ("" if len(sys.argv) < 2 else " " + shlex.join(sys.argv[1:]))
    lines = [BEGIN, "## Video pipelines: overhead of each guard (issue: text-to-video)", "",
             f"Measured {when} on {machine()}; {load}.  ",
             f"Command: `{command}` ({a.repeats} interleaved rounds after one warm-up call per configuration; "
             "ratio = each protected call / the plain call just before it, same prompt and seed).", ""]
    lines += [f"* **{r['key']}**: {r['title']}." for r in results] + [""]
    lines += table(results)
    lines += ["", f"Prompts: benign `{BENIGN}`; unsafe `{UNSAFE}`. Policy: default with SAFREE's semantic gate off "
              "(random encoders: only literal concept phrases fire). SLD medium's safety rows run on every step "
              "(its momentum builds during the 10-step warm-up) and guide from step 10 on. Latent Guard: untrained "
              "hand-set head on the pipeline's own text encoder (the cost of the check; nothing blocked). LVD: a "
              "classifier that never fires, so every check until the item is accepted runs and nothing is "
              "stopped (an unsafe clip stopped early costs less than plain). \"guard s\" is the time inside the "
              "guard (`SafetyReport.result(name).seconds`), per call; \"best / best\" is the fastest protected "
              "call over the fastest plain one (least disturbed by other work on a shared CPU). The SAFREE rows of "
              "CogVideoX with and without re-attention run the same code (re-attention is not applied to a DiT): "
              "their difference is the timing noise of this machine.", END]
    publish(lines, BEGIN, END, a.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
