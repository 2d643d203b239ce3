"""Wall-time overhead of safegen's guards: protected / plain, same pipeline object, same seed, one process.

Models:

* ``tiny``: :func:`safegen.testing.tiny_sd_pipeline` at 64x64 px, 20 DDIM steps (guard cost is large relative
  to a tiny UNet: this is the worst case for the ratio);
* ``sd15``: the real SD 1.5 architecture (UNet 859.5M, CLIP ViT-L text encoder, SD1.5 AutoencoderKL) with
  random fp32 weights, 256x256 px, 4 DDIM steps, guidance 7.5 (a realistic UNet/text-encoder cost ratio);
* ``sd35``, ``flux1``, ``wan21``, ``qwenimage``, ``flux2klein``, ``flux2``: SD3.5 medium, FLUX.1, Wan 2.1 1.3B,
  Qwen-Image, FLUX.2 [klein] 4B and FLUX.2 [dev] at their real hidden widths with reduced depth and random fp32
  weights (``benchmarks/dit_models.py`` says which layers were kept); ``sd35-even``: SD3.5 with every part cut
  to about 1/6 of its depth, at 512x512 px, SAFREE only (``sd35`` keeps CLIP-L whole against 2 of 24 MMDiT
  blocks, so its text side weighs too much).

Configurations: plain (unprotected); SAFREE without / with latent re-attention (U-Nets only: a DiT has no skip
features), each on a benign prompt (nothing fires: the guard only checks) and on an unsafe prompt containing
policy keywords (the guard projects); SLD medium (FLUX: with true CFG); LVD (DiTs: an untrained classifier for
the model whose threshold nothing reaches, so every check runs and nothing stops: its cost per check is what is
measured). For every model, one denoiser call is timed inside the plain calls, so guard work can be read against
a denoiser step. The policy is the default one with the semantic gate off (thresholds above 1), so only
literal concept phrases fire: with random weights, similarity means nothing, and which prompt triggers must
be deterministic.

Method: one warm-up call per configuration (its time is reported as "first call": it includes building the
concept bases), then ``--repeats`` rounds of interleaved calls ``plain, A, plain, B, ...``; each protected
call is paired with the plain call just before it (same prompt). Reported per configuration: the median
seconds, the median of the paired ratios (and their min-max), the median time spent inside the guard
(``SafetyReport.result(name).seconds``) and, for SAFREE, the verdict and the number of filtered steps.

Steady state is what is measured: a user protects once and calls many times. Between configurations the
pipeline is unprotected / re-protected with the same guard instance, and that configuration's per-pipeline
cache (``pipe._safegen.cache``: text-encoder adapters, concept bases) is restored, so later calls do not
rebuild it.

Usage::

    python benchmarks/overhead.py [--only tiny|sd15] [--repeats N] [--write] [--dry-build]

``--write`` updates the section between ``<!-- overhead:begin -->`` and ``<!-- overhead:end -->`` in
BENCHMARKS.md (one sub-section per model, so ``--only`` keeps the other model's last results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import safegen  # noqa: E402
from safegen import protect, unprotect  # noqa: E402

BENCH_FILE = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- overhead:begin -->", "<!-- overhead:end -->"

BENIGN = "a photo of a red bus on a city street at sunset"
UNSAFE = "a photo of a man in a fight, blood and gore on the street"
SEED = 0

#: Errors that mean "this guard is not available yet" (modules being written): reported as n/a.
UNAVAILABLE = (ImportError, AttributeError, NotImplementedError)


# ---------------------------------------------------------------------- models
@dataclass
class Model:
    key: str
    title: str
    build: Callable[[], Any]
    call_args: dict
    default_repeats: int
    encode_reps: int
    configs: tuple = ("safree", "safree-reattention", "sld")  # see configs()
    sld_args: dict = field(default_factory=dict)  # what SLD's calls add (FLUX: true CFG)
    video: bool = False
    # the DiTs: SAFREE's calibration (1,000 reference prompts through the T5 encoder at its padded length, once per
    # encoder, cached on disk) is not part of a call; with fixed gate thresholds only SVF's c needs it: the
    # authors' constant is used instead
    safree_args: dict = field(default_factory=dict)


def build_tiny():
    from safegen.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


def build_sd15():
    """SD 1.5's UNet, CLIP ViT-L/14 text encoder and VAE with random fp32 weights (offline, seeded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safegen.testing import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    ).eval()
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
    ).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dit(name: str):
    def build():
        from benchmarks import dit_models

        return getattr(dit_models, f"build_{name}")()
    return build


MODELS = {
    "tiny": Model("tiny", "tiny random SD pipeline (safegen.testing), 64x64 px, 20 steps, CFG 7.5", build_tiny,
                  dict(height=64, width=64, num_inference_steps=20, guidance_scale=7.5), 5, 20),
    "sd15": Model("sd15", "SD 1.5 architecture, random fp32 weights (UNet 859.5M, CLIP-L), 256x256 px, 4 steps, "
                  "CFG 7.5", build_sd15, dict(height=256, width=256, num_inference_steps=4, guidance_scale=7.5), 3, 5),
    "sd35": Model("sd35", "SD3.5 medium widths, reduced depth, random fp32 weights, 256x256 px, 4 steps, CFG 5",
                  _dit("sd35"), dict(height=256, width=256, num_inference_steps=4, guidance_scale=5.0), 3, 3,
                  configs=("safree", "sld", "lvd"), safree_args=dict(calibrate=False)),
    "sd35-even": Model("sd35-even", "SD3.5 medium widths, every part at about 1/6 of its depth, random fp32 weights, "
                       "512x512 px, 4 steps, CFG 5", _dit("sd35_even"),
                       dict(height=512, width=512, num_inference_steps=4, guidance_scale=5.0), 3, 3,
                       configs=("safree",), safree_args=dict(calibrate=False)),
    "flux1": Model("flux1", "FLUX.1 widths, reduced depth, random fp32 weights, 256x256 px, 4 steps (guidance-"
                   "distilled; SLD with true CFG 2)", _dit("flux1"),
                   dict(height=256, width=256, num_inference_steps=4), 3, 3, configs=("safree", "sld", "lvd"),
                   sld_args=dict(negative_prompt="blurry", true_cfg_scale=2.0), safree_args=dict(calibrate=False)),
    "wan21": Model("wan21", "Wan 2.1 1.3B widths, reduced depth, random fp32 weights, 128x128 px, 9 frames, 4 steps, "
                   "CFG 5 (two transformer calls per step)", _dit("wan21"),
                   dict(height=128, width=128, num_frames=9, num_inference_steps=4, guidance_scale=5.0), 3, 3,
                   configs=("safree", "sld", "lvd"), video=True, safree_args=dict(calibrate=False)),
    "qwenimage": Model("qwenimage", "Qwen-Image widths, reduced depth, random fp32 weights, 256x256 px, 4 steps, "
                       "true CFG 4 with a negative prompt (two transformer calls per step)", _dit("qwenimage"),
                       dict(height=256, width=256, num_inference_steps=4, negative_prompt="blurry",
                            true_cfg_scale=4.0), 3, 3, configs=("safree", "sld", "lvd"),
                       safree_args=dict(calibrate=False)),
    "flux2klein": Model("flux2klein", "FLUX.2 [klein] 4B widths, reduced depth, random fp32 weights, 256x256 px, 4 "
                        "steps, guidance 1 (one transformer call per step, as the step-distilled release; SLD with "
                        "CFG 4)", _dit("flux2klein"),
                        dict(height=256, width=256, num_inference_steps=4, guidance_scale=1.0,
                             text_encoder_out_layers=(1, 2, 3)), 3, 3, configs=("safree", "sld", "lvd"),
                        sld_args=dict(guidance_scale=4.0), safree_args=dict(calibrate=False)),
    "flux2": Model("flux2", "FLUX.2 [dev] widths, reduced depth, random fp32 weights, 256x256 px, 4 steps, "
                   "guidance-distilled (no unconditional branch, so no SLD)", _dit("flux2"),
                   dict(height=256, width=256, num_inference_steps=4, text_encoder_out_layers=(0, 1, 2)), 1, 3,
                   configs=("safree", "lvd"), safree_args=dict(calibrate=False)),
}


# ---------------------------------------------------------------------- configurations
@dataclass
class Config:
    label: str
    prompt_name: str
    factory: Callable[[Any], Any] | None  # pipe -> guard; None: plain
    guard: Any = None
    status: str = "ok"  # "ok" or "n/a: why"
    cache: dict | None = None
    first: float | None = None
    times: list[float] = field(default_factory=list)
    pair_ratios: list[float] = field(default_factory=list)
    guard_seconds: list[float] = field(default_factory=list)
    verdict: str = ""
    filtered: str = ""
    call_args: dict = field(default_factory=dict)  # what this configuration's calls (and their plain pairs) add
    checks: int = 0  # LVD: checks per call (its guard seconds are divided by them)

    @property
    def prompt(self) -> str:
        return BENIGN if self.prompt_name == "benign" else UNSAFE

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _untrained_lvd(pipe):
    """LVD with an untrained classifier for this model and a threshold its probabilities (near 0.5) never reach:
    every check runs, nothing stops (its cost is what is measured)."""
    from safegen.guards.lvd import LVD, LatentClassifier, LVDConfig, unet_fingerprint

    fp = unet_fingerprint(pipe)
    torch.manual_seed(SEED)
    return LVD.from_classifier(LatentClassifier(LVDConfig(fp["in_channels"], categories=["violence"], model=fp)),
                               threshold=0.9999)


def configs(model: Model) -> list[Config]:
    out = []
    for key in model.configs:
        if key == "safree":
            kw = dict(model.safree_args)
            out += [Config("SAFREE", "benign", lambda pipe: safegen.Safree(**kw)),
                    Config("SAFREE", "unsafe", lambda pipe: safegen.Safree(**kw))]
        elif key == "safree-reattention":
            out += [Config("SAFREE + re-attention", "benign", lambda pipe: safegen.Safree(reattention=True)),
                    Config("SAFREE + re-attention", "unsafe", lambda pipe: safegen.Safree(reattention=True))]
        elif key == "sld":
            out.append(Config("SLD medium", "unsafe", lambda pipe: safegen.SLD.medium(),
                              call_args=dict(model.sld_args)))
        elif key == "lvd":
            out.append(Config("LVD (every check, no stop)", "benign", _untrained_lvd))
    return out


def lexical_policy():
    """The default policy with the semantic gate off: only literal concept phrases fire."""
    pol = safegen.load_policy("default")
    for cat in pol.categories.values():
        cat.thresholds["safree"] = 2.0
    return pol


def _is_stub(guard) -> bool:
    """A guard class that overrides none of the hooks (a placeholder being written) does nothing."""
    from safegen.guard import Guard

    cls = type(guard)
    return all(getattr(cls, m) is getattr(Guard, m) for m in ("attach", "prepare", "step_end", "finish"))


# ---------------------------------------------------------------------- running
class Runner:
    def __init__(self, model: Model, pipe, policy):
        self.model, self.pipe, self.policy = model, pipe, policy

    def activate(self, cfg: Config | None) -> None:
        pipe = self.pipe
        if cfg is None:
            unprotect(pipe)
            return
        protect(pipe, policy=self.policy, guards=[cfg.guard])
        if cfg.cache is not None:  # steady state: the caches of earlier calls with this configuration
            pipe._safegen.cache.update(cfg.cache)
        cfg.cache = pipe._safegen.cache

    def call(self, prompt: str, extra: dict | None = None):
        gen = torch.Generator("cpu").manual_seed(SEED)
        t0 = time.perf_counter()
        # by keyword: FLUX.2 [klein]'s first positional argument is a conditioning image
        out = self.pipe(prompt=prompt, generator=gen, output_type="np", **{**self.model.call_args, **(extra or {})})
        return time.perf_counter() - t0, out

    def plain(self, prompt: str, extra: dict | None = None, denoiser_calls: list | None = None) -> float:
        """One unprotected call; with ``denoiser_calls`` (a list), the seconds of each denoiser call are appended."""
        self.activate(None)
        handles = []
        if denoiser_calls is not None:
            den = getattr(self.pipe, "unet", None) or self.pipe.transformer
            start: list = []
            handles = [den.register_forward_pre_hook(lambda m, a: start.append(time.perf_counter())),
                       den.register_forward_hook(lambda m, a, o: denoiser_calls.append(time.perf_counter()
                                                                                      - start.pop()))]
        try:
            dt, _ = self.call(prompt, extra)
        finally:
            for h in handles:
                h.remove()
        return dt

    def protected(self, cfg: Config) -> float | None:
        """One protected call; records guard time and the SAFREE report. None (and cfg marked n/a) on failure."""
        try:
            self.activate(cfg)
            dt, out = self.call(cfg.prompt, cfg.call_args)
        except UNAVAILABLE as e:
            cfg.status = f"n/a: {type(e).__name__}: {e}"
            return None
        finally:
            unprotect(self.pipe)
        rep = out.safety[0]
        res = rep.result(cfg.guard.name)
        if rep.verdict == "error" or (res is not None and res.verdict == "error"):
            why = (res.reason if res is not None else rep.reason) or "guard error"
            cfg.status = f"n/a: {why}"
            return None
        if res is not None:
            cfg.guard_seconds.append(res.seconds)
            cfg.verdict = res.verdict
            n = self.model.call_args["num_inference_steps"]
            if cfg.guard.name == "safree":
                cfg.filtered = f"{res.filtered_steps or 0}/{n}"
            if cfg.guard.name == "lvd":
                cfg.checks = cfg.guard.checks_for(n)
        return dt


def _encode_once(pipe, prompt: str, call_args: dict) -> None:
    """The pipeline's own ``encode_prompt`` for one prompt, positive and (where the family encodes one there)
    negative, as one call with ``call_args`` does."""
    dev = pipe._execution_device
    name = type(pipe).__name__
    if name in ("Flux2Pipeline", "Flux2KleinPipeline"):  # no negative prompt at guidance 1 / guidance-distilled
        pipe.encode_prompt(prompt, device=dev, text_encoder_out_layers=call_args["text_encoder_out_layers"])
    elif name == "FluxPipeline":
        pipe.encode_prompt(prompt, None, device=dev)
    elif name == "StableDiffusion3Pipeline":
        pipe.encode_prompt(prompt, None, None, device=dev, do_classifier_free_guidance=True)
    elif name == "WanPipeline":
        pipe.encode_prompt(prompt, do_classifier_free_guidance=True, device=dev, max_sequence_length=512)
    elif name == "QwenImagePipeline":  # true CFG: the negative prompt is a second encode
        pipe.encode_prompt(prompt, device=dev)
        pipe.encode_prompt("blurry", device=dev)
    else:
        pipe.encode_prompt(prompt, dev, 1, True)


def encode_seconds(pipe, prompt: str, reps: int, call_args: dict) -> float:
    """Median seconds of the pipeline's own ``encode_prompt`` as one plain call with ``call_args`` runs it."""
    unprotect(pipe)
    with torch.no_grad():
        _encode_once(pipe, prompt, call_args)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _encode_once(pipe, prompt, call_args)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_model(model: Model, repeats: int) -> dict:
    t_build = time.perf_counter()
    torch.manual_seed(SEED)
    pipe = model.build()
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t_build
    policy = lexical_policy()
    runner = Runner(model, pipe, policy)
    cfgs = configs(model)
    plain = Config("plain (unprotected)", "both", None)
    plain_times: list[float] = []
    denoiser_calls: list[float] = []

    for cfg in cfgs:  # instantiate guards; unavailable ones are n/a
        try:
            cfg.guard = cfg.factory(pipe)
            if _is_stub(cfg.guard):
                cfg.status = f"n/a: {type(cfg.guard).__name__} is a placeholder (no hooks implemented yet)"
        except UNAVAILABLE as e:
            cfg.status = f"n/a: {type(e).__name__}: {e}"

    total = 1 + len(cfgs) + repeats * 2 * len(cfgs)
    load = load_note()
    bar = tqdm(total=total, desc=model.key, unit="run", file=sys.stderr, dynamic_ncols=True)
    # warm-up: one call per configuration (first call after protect: builds the concept bases)
    bar.set_postfix_str("warm-up plain")
    plain.first = runner.plain(BENIGN)
    bar.update()
    for cfg in cfgs:
        if cfg.ok:
            bar.set_postfix_str(f"warm-up {cfg.label} / {cfg.prompt_name}")
            cfg.first = runner.protected(cfg)
            cfg.guard_seconds.clear()  # the warm-up builds caches: only the timed rounds count
        bar.update()
    # interleaved timed rounds: plain, A, plain, B, ...
    for r in range(repeats):
        for cfg in cfgs:
            if not cfg.ok:
                bar.update(2)
                continue
            bar.set_postfix_str(f"round {r + 1}/{repeats}: {cfg.label} / {cfg.prompt_name}")
            p = runner.plain(cfg.prompt, cfg.call_args, denoiser_calls if not cfg.call_args else None)
            plain_times.append(p)
            bar.update()
            dt = runner.protected(cfg)
            bar.update()
            if dt is not None:
                cfg.times.append(dt)
                cfg.pair_ratios.append(dt / p)
    bar.close()
    plain.times = plain_times
    enc = encode_seconds(pipe, BENIGN, model.encode_reps, model.call_args)
    unprotect(pipe)
    del runner, pipe
    gc.collect()
    return {"model": model, "repeats": repeats, "load": load, "build_s": build_s, "plain": plain, "configs": cfgs,
            "encode_s": enc, "denoiser_s": statistics.median(denoiser_calls) if denoiser_calls else None}


# ---------------------------------------------------------------------- reporting
def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def table(res: dict) -> str:
    rows = ["| configuration | prompt | median s | protected / plain | ratio min-max | guard s | first call s "
            "| verdict | SAFREE filtered steps |",
            "|---|---|---:|---:|---:|---:|---:|---|---|"]
    plain: Config = res["plain"]
    pm = statistics.median(plain.times) if plain.times else None
    rows.append(f"| {plain.label} | both | {_fmt_s(pm)} | 1.00 | - | - | {_fmt_s(plain.first)} | - | - |")
    for c in res["configs"]:
        if not c.ok or not c.times:
            why = c.status[4:].strip() if c.status.startswith("n/a") else "no successful run"
            why = why.replace("|", "/")
            if len(why) > 120:
                why = why[:117] + "..."
            rows.append(f"| {c.label} | {c.prompt_name} | n/a | n/a | - | - | - | n/a ({why}) | - |")
            continue
        med = statistics.median(c.times)
        ratio = statistics.median(c.pair_ratios)
        rng = f"{min(c.pair_ratios):.2f}-{max(c.pair_ratios):.2f}"
        gs = _fmt_s(statistics.median(c.guard_seconds)) if c.guard_seconds else "-"
        rows.append(f"| {c.label} | {c.prompt_name} | {_fmt_s(med)} | **{ratio:.2f}** | {rng} | {gs} | "
                    f"{_fmt_s(c.first)} | {c.verdict or '-'} | {c.filtered or '-'} |")
    return "\n".join(rows)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


_LOAD_AT_START = _loadavg()  # sampled before this script adds its own load


def load_note() -> str:
    """The 1-minute load average before the benchmark started, flagged when other work was running then
    (the benchmark's own threads would otherwise count as "busy")."""
    load = _LOAD_AT_START
    if load is None:
        return ""
    busy = load > 0.5 * (os.cpu_count() or 1)
    return (f"load average {load:.2f} before the run"
            + (" (BUSY machine: timings are noisy, prefer 'guard s')" if busy else ""))


def machine() -> str:
    import diffusers
    import transformers

    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, Python {platform.python_version()}")


def command() -> str:
    return "python benchmarks/overhead.py" + ("" if len(sys.argv) < 2 else " " + shlex.join(sys.argv[1:]))


def section(res: dict, when: str) -> str:
    m: Model = res["model"]
    lines = [
        f"### {m.key}: {m.title}",
        "",
        f"Measured {when} on {machine()}; {res['load']}.  ",
        f"Command: `{command()}` ({res['repeats']} interleaved rounds after one warm-up call per configuration; "
        f"pipeline built in {res['build_s']:.1f} s).",
        "",
        table(res),
        "",
        f"Prompts: benign `{BENIGN}`; unsafe `{UNSAFE}` (policy: default with the semantic gate off, so only "
        f"literal concept phrases fire). Text encoding alone (`pipe.encode_prompt` as one plain call runs "
        f"it: the prompt, plus its negative where the call has an unconditional branch): "
        f"{res['encode_s'] * 1000:.1f} ms.",
    ]
    den = res.get("denoiser_s")
    if den:
        lines += ["", f"One denoiser call (median inside the plain calls): {den:.3f} s."]
        for c in res["configs"]:
            if not c.ok or not c.guard_seconds:
                continue
            g = statistics.median(c.guard_seconds)
            if c.label == "SAFREE" and c.prompt_name == "unsafe":
                lines.append(f"SAFREE's work on the steered prompt (gate, trigger tokens: masked copies through the "
                             f"CLIP encoders, token states on longer ones; projection, keyword negative prompt): "
                             f"{g:.3f} s = {g / den:.2f} denoiser calls.")
            if c.checks:
                lines.append(f"LVD: {g / c.checks * 1000:.1f} ms per check ({c.checks} checks a call) = "
                             f"{100 * g / c.checks / den:.2f}% of a denoiser call.")
    from benchmarks.dit_models import DEPTHS

    if m.key in DEPTHS:
        lines += ["", f"Kept of the released model: {DEPTHS[m.key]}. SAFREE runs with "
                  f"`{', '.join(f'{k}={v}' for k, v in m.safree_args.items())}` (its once-per-encoder calibration is "
                  "not part of a call) and its default `trigger_rule=\"auto\"` (the paper's masked copies on CLIP "
                  "encoders, the pipeline's own token states on T5 and LLM encoders)."]
    return "\n".join(lines)


HEADER = """# Benchmarks

Numbers produced by the scripts in `benchmarks/`; each section says which command produced it, when and where.
"""

INTRO = """## Overhead of protection: wall time protected / plain

Same pipeline object, same seed, one process; runs interleaved (plain, A, plain, B, ...), medians reported.
"protected / plain" is the median over rounds of each protected call divided by the plain call just before it.
"guard s" is the time spent inside the guard (`SafetyReport.result(name).seconds`); "first call s" is the
warm-up call right after `protect` (it builds the concept bases, cached afterwards). n/a: the guard is not
available yet."""


def write_markdown(sections: dict[str, str]) -> None:
    text = BENCH_FILE.read_text(encoding="utf-8") if BENCH_FILE.exists() else HEADER
    old = ""
    if BEGIN in text and END in text:
        old = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    merged = {}
    for key in MODELS:
        if key in sections:
            merged[key] = sections[key]
        else:
            m = re.search(rf"<!-- overhead-{key}:begin -->\n(.*?)\n<!-- overhead-{key}:end -->", old, re.S)
            if m:
                merged[key] = m.group(1)
    body = "\n".join([BEGIN, INTRO, ""] + [f"<!-- overhead-{k}:begin -->\n{v}\n<!-- overhead-{k}:end -->\n"
                                           for k, v in merged.items()] + [END])
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    BENCH_FILE.write_text(text, encoding="utf-8")


def dry_build(keys: list[str]) -> None:
    for key in keys:
        m = MODELS[key]
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        pipe = m.build()
        dt = time.perf_counter() - t0
        n = {name: sum(p.numel() for p in part.parameters()) / 1e6 for name, part in pipe.components.items()
             if isinstance(part, torch.nn.Module)}
        print(f"{key}: built in {dt:.1f} s; params (M): " + ", ".join(f"{k} {v:.1f}" for k, v in n.items()))
        try:
            import resource

            print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
        except Exception:
            pass
        del pipe
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(MODELS), help="run one model only (default: every model in turn)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved rounds per configuration (default: tiny 5, sd15 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--write", action="store_true", help=f"update the overhead section of {BENCH_FILE.name}")
    ap.add_argument("--dry-build", action="store_true", help="only build the pipelines (check, then exit)")
    args = ap.parse_args(argv)
    keys = [args.only] if args.only else list(MODELS)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_build:
        dry_build(keys)
        return 0
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"# safegen overhead benchmark — {when}\n# {machine()}\n# command: {command()}\n", flush=True)
    sections = {}
    for key in keys:
        m = MODELS[key]
        res = bench_model(m, args.repeats or m.default_repeats)
        sections[key] = section(res, when)
        print(sections[key] + "\n", flush=True)
    if args.write:
        write_markdown(sections)
        print(f"wrote {BENCH_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
