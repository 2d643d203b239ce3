"""SafetyDPO on the embedded default model: merged LoRAs vs single experts, per category, and the fused step cost.

Reads the LoRA files written by ``python erasure/safetydpo.py erasure/configs/safetydpo-default-model.json`` and
runs ``safegen eval`` on N deduplicated CoProV2 test prompts (a seeded shuffle; unsafe rate, overall and per
category) and the first N held-out COCO captions (fidelity), unprotected and with each LoRA. Then times one UNet call of
the plain and the fused model in one process, interleaved (the fused model has plain layers: the ratio should be
1.00).

    python benchmarks/safetydpo.py --n 300 --write
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._common import machine, median_seconds, publish  # noqa: E402
from benchmarks.default_model import prompt_files  # noqa: E402

BEGIN, END = "<!-- safetydpo:begin -->", "<!-- safetydpo:end -->"


def eval_with(prompts: Path, lora: Path | None, out: Path, steps: int, batch_size: int, reuse: bool) -> list[dict]:
    """Items of ``safegen eval`` on the default model, unprotected (``lora=None``) or with a SafetyDPO LoRA
    fused in. With ``reuse``, the items of an identical earlier run (or, unprotected, the first ones of the
    default-model benchmark's run on the same prompt list) are read back instead."""
    import safegen
    from safegen.default_model import load_default_pipeline
    from safegen.eval.harness import evaluate, write_results
    from safegen.eval.datasets import read_prompts

    wanted = read_prompts(prompts)
    candidates = [out]
    if lora is None:
        candidates.append(ROOT / "outputs" / "bench-default" / f"none-{out.name.split('-')[-1]}")
    for folder in candidates if reuse else []:
        f, it = folder / "metrics.json", folder / "items.jsonl"
        if f.is_file() and it.is_file() and json.loads(f.read_text()).get("config", {}).get("steps") == steps:
            items = [json.loads(line) for line in it.read_text().splitlines()]
            if [x["prompt"] for x in items[:len(wanted)]] == wanted:
                return items[:len(wanted)]
    pipe = load_default_pipeline()
    if lora is not None:
        safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(lora))])
    metrics, items = evaluate(pipe, wanted, steps=steps, batch_size=batch_size)
    write_results(out, metrics, items, {"prompts": str(prompts), "steps": steps, "lora": str(lora) if lora else None})
    return items


def rates(items: list[dict]) -> tuple[float, float | None]:
    """(oracle unsafe rate, fidelity on prompts that name a colour or object)."""
    fid = [it["fidelity"] for it in items if it["fidelity"] is not None]
    return sum(it["unsafe"] for it in items) / len(items), (sum(fid) / len(fid) if fid else None)


def per_category(items: list[dict], cats: dict[str, str]) -> dict[str, float]:
    out: dict[str, list] = {}
    for it in items:
        out.setdefault(cats[it["prompt"]], []).append(it["unsafe"])
    return {c: sum(v) / len(v) for c, v in out.items()}


@torch.no_grad()
def step_ratio(lora: Path, reps: int = 60) -> dict:
    """Median time of one UNet call (CFG batch of 16), plain vs fused, interleaved in one process."""
    import safegen
    from safegen.default_model import load_default_pipeline

    plain, fused = load_default_pipeline(), load_default_pipeline()
    safegen.protect(fused, guards=[safegen.SafetyDPO(merged=str(lora))])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 16, 16, generator=g)
    ctx = torch.randn(16, 32, plain.unet.config.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    times = {"plain": [], "fused": []}
    for _ in range(reps):
        for name, pipe in (("plain", plain), ("fused", fused)):
            times[name].append(median_seconds(lambda: pipe.unet(x, t, encoder_hidden_states=ctx), 1))
    import statistics

    # the structural reason the ratio is 1: after fuse + unload the UNet has the plain model's modules and
    # parameter shapes (no LoRA wrappers left), so a step runs the same kernels on the same shapes
    def layout(unet):
        return ([(n, type(m).__name__) for n, m in unet.named_modules()],
                [(n, tuple(q.shape)) for n, q in unet.named_parameters()])

    same = layout(plain.unet) == layout(fused.unet)
    changed = sum(not torch.equal(a, b) for a, b in zip(plain.unet.parameters(), fused.unet.parameters()))
    p, f = statistics.median(times["plain"]), statistics.median(times["fused"])
    lo_p, lo_f = min(times["plain"]), min(times["fused"])
    return {"plain_ms": 1000 * p, "fused_ms": 1000 * f, "ratio": f / p, "min_ratio": lo_f / lo_p, "same_layout": same,
            "changed_tensors": changed, "reps": reps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--loras", default="erasure/out/default-model", help="folder the recipe wrote")
    ap.add_argument("--reuse", action="store_true", help="reuse evals already in outputs/bench-safetydpo/")
    ap.add_argument("--no-experts", action="store_true", help="evaluate the merged LoRAs only")
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    from safegen.eval.datasets import load_coprov2_test

    os.chdir(ROOT)
    t0 = time.time()
    files = prompt_files(ROOT / "outputs" / "bench-safetydpo", a.n)  # not bench-default: its 500-prompt lists stay
    cats = dict(load_coprov2_test())
    folder = ROOT / a.loras
    variants = [("none", None)] + [(f"merged: {m}", folder / f"merged-{m}.safetensors")
                                   for m in ("comerge", "linear", "ties")]
    if not a.no_experts:
        variants += [(f"expert: {p.stem}", p) for p in sorted((folder / "experts").glob("*.safetensors"))]
    variants = [(k, v) for k, v in variants if v is None or v.is_file()]
    out = ROOT / "outputs" / "bench-safetydpo"
    rows = []
    for label, lora in variants:
        key = label.replace(": ", "-")
        c = eval_with(files["coprov2"], lora, out / f"{key}-coprov2", a.steps, a.batch_size, a.reuse)
        n = eval_with(files["coco"], lora, out / f"{key}-coco", a.steps, a.batch_size, a.reuse) \
            if label == "none" or label.startswith("merged") else None
        rows.append((label, rates(c)[0], rates(n)[1] if n else None, per_category(c, cats)))
    base = rows[0][1]
    ratio = step_ratio(folder / "merged-comerge.safetensors") if (folder / "merged-comerge.safetensors").is_file() else None
    cat_names = sorted(rows[0][3])
    lines = [BEGIN, "## SafetyDPO on the default model (issue: SafetyDPO)", "",
             f"`{shlex.join(['python', 'benchmarks/safetydpo.py', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}, "
             f"{machine()}, {time.time() - t0:.0f} s in all). LoRAs in `{a.loras}`, from `python erasure/safetydpo.py "
             f"erasure/configs/safetydpo-default-model.json`; each fused into the UNet"
             f"{' (merged LoRAs only)' if a.no_experts else ''}. CoProV2: {a.n} "
             f"deduplicated test prompts (seeded shuffle); COCO: first {a.n} held-out captions; {a.steps} steps.", "",
             "| LoRA | CoProV2 unsafe | relative drop | COCO fidelity | " + " | ".join(cat_names) + " |",
             "|---|---|---|---|" + "---|" * len(cat_names)]
    for label, unsafe, fid, pc in rows:
        drop = "–" if label == "none" or not base else f"{100 * (1 - unsafe / base):.0f}%"
        fid_s = "–" if fid is None else f"{100 * fid:.1f}%"
        lines.append(f"| {label} | {100 * unsafe:.1f}% | {drop} | {fid_s} | "
                     + " | ".join(f"{100 * pc.get(k, float('nan')):.0f}%" for k in cat_names) + " |")
    lines += ["", "Per-category columns: oracle unsafe rate on the CoProV2 prompts of that category."]
    if ratio:
        lines += ["", f"Per-step cost of the fused Co-Merge model (one UNet call, CFG batch 16, median of "
                  f"{ratio['reps']} interleaved): plain {ratio['plain_ms']:.2f} ms, fused {ratio['fused_ms']:.2f} ms "
                  f"= **{ratio['ratio']:.2f}×** (fastest of each: {ratio['min_ratio']:.2f}×). The fused UNet has "
                  f"{'the same' if ratio['same_layout'] else 'NOT the same'} modules and parameter shapes as the plain "
                  f"one (LoRA layers unloaded after fusing; {ratio['changed_tensors']} weight tensors carry the fused "
                  f"update){', so any difference is timing noise' if ratio['same_layout'] else ''}."]
    lines.append(END)
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
