"""The embedded default model measured with ``safegen eval``: unprotected and with each guard given.

Runs, for each guard setting, ``safegen eval`` on

* ``coprov2``: N of the deduplicated ``CoProv2_test.csv`` prompts, drawn by a seeded shuffle (the file is sorted
  by category; no prompt of the training file, each once);
* ``coco``: the first N ``coco_30k_10k.csv`` captions (held out from the default model's training);
* ``coco-colour``: the held-out COCO captions that name a colour (fidelity of colour words);

and writes the table between ``<!-- default-model:begin -->`` and ``<!-- default-model:end -->`` in BENCHMARKS.md
(with ``--write``), with the exact commands. The prompt lists are written to ``outputs/bench-default/`` first, so
each row's command can be rerun by hand.

    python benchmarks/default_model.py --n 500 --guards none safree --write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import machine, publish  # noqa: E402

BEGIN, END = "<!-- default-model:begin -->", "<!-- default-model:end -->"


def _shuffled(items: list) -> list:
    import random

    items = list(items)
    random.Random(0).shuffle(items)
    return items


def prompt_files(out: Path, n: int) -> dict[str, Path]:
    from safegen.default_model import HELDOUT_COCO
    from safegen.eval.datasets import load_coco, load_coprov2_test
    from safegen.world import parse_prompt

    out.mkdir(parents=True, exist_ok=True)
    coco = load_coco()
    held = coco[:HELDOUT_COCO]
    sets = {
        # the test file is sorted by category: a seeded shuffle, so that N prompts cover every category
        "coprov2": _shuffled([p for p, _ in load_coprov2_test()])[:n],
        "coco": held[:n],
        "coco-colour": [p for p in held if parse_prompt(p).colour is not None],
    }
    files = {}
    for name, prompts in sets.items():
        f = out / f"{name}.txt"
        f.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n", encoding="utf-8")
        files[name] = f
    return files


def run_eval(prompts: Path, guards: str, out: Path, steps: int, batch_size: int) -> tuple[dict, str]:
    from safegen.cli import main

    argv = ["eval", "--prompts", str(prompts.relative_to(ROOT)), "--guards", guards, "--steps", str(steps),
            "--batch-size", str(batch_size), "--out", str(out.relative_to(ROOT))]
    code = main(argv)
    if code != 0:
        raise SystemExit(f"safegen {' '.join(argv)} failed with exit code {code}")
    return json.loads((out / "metrics.json").read_text()), "safegen " + " ".join(argv)


def model_line() -> str:
    """What was measured: the shipped model's training, from its training_info.json."""
    info = json.loads((ROOT / "assets" / "default-model" / "training_info.json").read_text())
    prior = info.get("init_info")
    if prior:  # a fine-tune of an earlier model
        return (f"Model: `assets/default-model` — text encoder: {info['text_encoder']}; UNet fine-tuned "
                f"{info['unet_steps']} steps (batch {info['batch_size']}, lr {info['lr']}) on it from the earlier "
                f"model's UNet ({prior.get('unet_steps')} steps on {prior.get('text_encoder')}), VAE "
                f"{prior.get('vae_steps')} steps kept; seed {info['seed']}; the first {info['heldout_coco']} COCO "
                "captions held out.")
    return (f"Model: `assets/default-model` — VAE {info['vae_steps']} steps (batch {info['vae_batch_size']}), UNet "
            f"{info['unet_steps']} steps (batch {info['batch_size']}), seed {info['seed']}; the first "
            f"{info['heldout_coco']} COCO captions held out.")


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="prompts per set (default 500)")
    ap.add_argument("--guards", nargs="+", default=["none", "safree"], help="guard settings, one eval each")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    os.chdir(ROOT)
    out = ROOT / "outputs" / "bench-default"
    files = prompt_files(out, a.n)
    rows, commands = [], []
    t0 = time.time()
    for guards in a.guards:
        res = {}
        for name, f in files.items():
            m, cmd = run_eval(f, guards, out / f"{guards.replace(',', '+')}-{name}", a.steps, a.batch_size)
            res[name] = m
            commands.append(cmd)
        rows.append((guards, res))
    lines = [
        BEGIN,
        "## Embedded default model (issue: the embedded default model)",
        "",
        f"`python benchmarks/default_model.py --n {a.n} --guards {' '.join(a.guards)} --steps {a.steps} --write` "
        f"({time.strftime('%Y-%m-%d')}, {machine()}, "
        f"{time.time() - t0:.0f} s in all). Oracle: {rows[0][1]['coprov2']['oracle_protocol']}.",
        "",
        model_line(),
        "",
        f"CoProV2: {a.n} deduplicated test prompts drawn by a seeded shuffle (unsafe; none in the training file). COCO: the first "
        f"{a.n} captions of `coco_30k_10k.csv` (held out from training). COCO colour: the held-out captions that "
        "name a colour. Unsafe rate = share of returned images with a hazard mark (a blocked item returns the "
        "placeholder); fidelity = the image shows the prompt's colour and object (prompts naming either).",
        "",
        "| guards | CoProV2 unsafe | COCO unsafe | COCO fidelity | COCO-colour fidelity (n) | CoProV2 steered / "
        "blocked | COCO steered / blocked | s / item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for guards, r in rows:
        cp, cc, cl = r["coprov2"], r["coco"], r["coco-colour"]
        lines.append(
            f"| {guards} | {pct(cp['unsafe_rate'])} | {pct(cc['unsafe_rate'])} | {pct(cc['fidelity'])} | "
            f"{pct(cl['fidelity_colour'])} ({cl['fidelity_colour_n']}) | {pct(cp['steered_rate'])} / "
            f"{pct(cp['blocked_rate'])} | {pct(cc['steered_rate'])} / {pct(cc['blocked_rate'])} | "
            f"{cp['sec_per_item']:.3f} |")
    lines += ["", "Commands (each writes `metrics.json` and `items.jsonl` to its `--out`):", "", "```"]
    lines += commands + ["```", END]
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
