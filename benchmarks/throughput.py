"""Generation throughput of the embedded default model: items per second at batch 1 vs batch 8 (and any others).

Runs the evaluation harness's generation loop (:func:`safegen.eval.harness.run_items`, world oracle) on the first N
held-out COCO captions once per batch size, after one warm-up call, in one process, and checks that the oracle's
results do not depend on the batch size (every item has its own seeded generator). With ``--write`` the table goes
into BENCHMARKS.md between ``<!-- throughput:begin -->`` and ``<!-- throughput:end -->``.

    python benchmarks/throughput.py --n 64 --write
    python benchmarks/throughput.py --n 64 --guards policy --write       # protected by the default policy's guards
    python benchmarks/throughput.py --n 8 --steps 2                      # a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import machine, publish  # noqa: E402

BEGIN, END = "<!-- throughput:begin -->", "<!-- throughput:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="prompts (held-out COCO captions; default 64)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guards", default="none", help="'none', 'policy' (the default policy's guards) or a list a,b")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()

    import safegen
    from diffusers.utils import logging as dlog

    from safegen.eval.datasets import load_benchmark
    from safegen.default_model import load_default_pipeline
    from safegen.eval.oracles import WorldOracle
    from safegen.eval.harness import make_plan, run_items

    dlog.set_verbosity_error()
    pipe = load_default_pipeline().to(a.device)
    pipe.set_progress_bar_config(disable=True)
    guards = None if a.guards == "policy" else ([] if a.guards == "none" else a.guards.split(","))
    if guards != []:
        safegen.protect(pipe, policy="default", guards=guards)
    shown_guards = "+".join(safegen.load_policy("default").guards) if guards is None else (a.guards or "none")
    plan = make_plan(load_benchmark("coco", limit=a.n))
    oracle = WorldOracle()
    rows, outcomes = [], {}
    for bs in a.batch_sizes:
        warm = [dict(it, index=i) for i, it in enumerate(plan[:bs])]
        run_items(pipe, warm, oracle=oracle, steps=a.steps, batch_size=bs, progress=False)  # warm-up call
        t0 = time.perf_counter()
        items = run_items(pipe, plan, oracle=oracle, steps=a.steps, batch_size=bs, progress=False)
        wall = time.perf_counter() - t0
        rows.append((bs, len(items) / wall, wall / len(items)))
        outcomes[bs] = [(it["unsafe"], it["colour"], it["object"], it["verdict"]) for it in items]
        print(f"batch {bs}: {len(items) / wall:.2f} items/s", file=sys.stderr)
    same = all(o == outcomes[a.batch_sizes[0]] for o in outcomes.values())
    base = rows[0][1]
    lines = [
        BEGIN,
        "## Throughput: items per second by batch size (issue: evaluation harness)",
        "",
        f"`python benchmarks/throughput.py --n {a.n} --steps {a.steps} --batch-sizes "
        f"{' '.join(map(str, a.batch_sizes))} --guards {a.guards} --write` ({time.strftime('%Y-%m-%d')}, "
        f"{machine()}). Embedded default model, guards: {shown_guards}, {a.n} held-out COCO captions, "
        f"{a.steps} steps, one process; each batch size after one warm-up call; generation plus the world "
        "oracle's judgement, model loading excluded.",
        "",
        "| batch size | items / s | s / item | vs batch " + str(a.batch_sizes[0]) + " |",
        "|---:|---:|---:|---:|",
        *[f"| {bs} | {ips:.2f} | {spi:.3f} | {ips / base:.2f}x |" for bs, ips, spi in rows],
        "",
        "Oracle results identical across batch sizes: " + ("yes" if same else "NO") + " (each item has its own "
        "seeded generator). Across processes: `accelerate launch --multi_gpu --num_processes N -m safegen.eval ...` "
        "shards the batches and merges one report.",
        END,
    ]
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
