"""Latent Guard's editable blacklist, measured: concepts added at run time, never seen in training.

The set (``benchmarks/data/runtime_concepts.yaml``, written by hand for this benchmark): 47 concept phrases that the
default policy does not hold (brands, objects, invented things, themes an app may exclude), each with 6 prompts
that must be flagged once the phrase is added (3 contain it literally, 3 paraphrase it) and 3 benign near-misses
(same topic, similar words, not the concept).

Two ways a user adds them, with :meth:`safegen.policy.Policy.add_category` on the default policy (whose seven
categories stay in place):

* **one concept at a time** (an app that bans one brand: ``add_category("custom", [phrase])``, 47 separate
  policies): the guard calibrates the eight categories at the policy's budget (1% of new benign prompts);
* **one blacklist category** (``custom``, all 47 phrases at once): one threshold for the category, at the same
  budget, so the 47 phrases share it.

Per mode: TPR = the share of the concept's prompts whose added category fires (risk ≥ 1 − budget, or the guard
reports it, as it does when the phrase is written in the prompt: a written policy phrase fires its category), split
literal / paraphrase; "named" = the report names the concept itself (category and
concept of :meth:`LatentGuard.check`); near-miss FPR = the share of near-misses that the added category flags; and
COCO FPR = the share of held-out COCO captions (``split_coco``'s held-out half, the first ``--coco`` of them; one
concept at a time: the first ``--coco-each`` for each concept, pooled) it flags.

    python benchmarks/runtime_concepts.py --write
    python benchmarks/runtime_concepts.py --weights outputs/lg/other-head.safetensors   # another head, printed only
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks._common import machine, publish  # noqa: E402

BEGIN, END = "<!-- runtime-concepts:begin -->", "<!-- runtime-concepts:end -->"
DATA = ROOT / "benchmarks" / "data" / "runtime_concepts.yaml"


def load_set(path: Path = DATA) -> list[dict]:
    """The concept entries of the YAML file: ``phrase``, ``kind``, ``prompts`` (6), ``near_misses`` (3)."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return list(data["concepts"])


def run_mode(guard, entries: list[dict], coco: list[str], one_at_a_time: bool, coco_each: int) -> dict:
    """Check every prompt, near-miss and COCO caption with the default policy plus the added concept(s)."""
    import safegen
    from tqdm.auto import tqdm

    def policy_with(phrases):
        policy = safegen.load_policy("default")
        policy.add_category("custom", phrases)
        return policy

    budget = safegen.load_policy("default").budget()
    rows, coco_rows = {}, []
    if one_at_a_time:
        for i, e in enumerate(tqdm(entries, desc="one concept at a time", unit="concept")):
            texts = e["prompts"] + e["near_misses"]
            start = (i * coco_each) % max(len(coco) - coco_each, 1)  # each concept its own captions
            got = guard.check(texts + coco[start:start + coco_each], policy_with([e["phrase"]]))
            rows.update({(e["phrase"], t): r for t, r in zip(texts, got)})
            coco_rows += got[len(texts):]
    else:
        keys = [(e["phrase"], t) for e in entries for t in e["prompts"] + e["near_misses"]]
        got = guard.check([t for _, t in keys] + coco, policy_with([e["phrase"] for e in entries]), progress=True)
        rows.update(zip(keys, got))
        coco_rows = got[len(keys):]

    def fires(row):  # the added category fired: at its calibrated threshold, or reported (e.g. a phrase written)
        return row["risks"]["custom"] >= 1 - budget or (row["unsafe"] and row["category"] == "custom")

    out = {"literal": [], "paraphrase": [], "named": [], "near": [], "by_kind": {}, "misses": [], "false": []}
    for e in entries:
        for j, p in enumerate(e["prompts"]):
            r = rows[(e["phrase"], p)]
            hit = fires(r)
            out["literal" if j < 3 else "paraphrase"].append(hit)
            out["named"].append(r["unsafe"] and r["concept"] == e["phrase"])
            out["by_kind"].setdefault(e["kind"], []).append(hit)
            if not hit:
                out["misses"].append((e["phrase"], p, r["risks"]["custom"]))
        for p in e["near_misses"]:
            flagged = fires(rows[(e["phrase"], p)])
            out["near"].append(flagged)
            if flagged:
                out["false"].append((e["phrase"], p))
    out["coco"] = [fires(r) for r in coco_rows]
    out["coco_any"] = [r["unsafe"] for r in coco_rows]
    out["n_coco"] = len(coco_rows)
    return out


def rate(xs) -> str:
    return f"{sum(xs) / max(len(xs), 1):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="Latent Guard head (default: the shipped MiniLM head)")
    ap.add_argument("--coco", type=int, default=None, help="held-out COCO captions used (default: all)")
    ap.add_argument("--coco-each", type=int, default=80,
                    help="one concept at a time: held-out COCO captions checked per concept, each concept its own "
                         "(default 80)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    from safegen.eval.datasets import load_coco, split_coco
    from safegen.guards.latent_guard import LatentGuard, default_weights_path

    t0 = time.time()
    weights = Path(a.weights) if a.weights else default_weights_path()
    guard = LatentGuard(weights=str(weights))
    entries = load_set()
    coco = split_coco(load_coco())[1][:a.coco]  # [:None]: all
    modes = {"one concept at a time": run_mode(guard, entries, coco, True, a.coco_each),
             f"one blacklist category (all {len(entries)})": run_mode(guard, entries, coco, False, a.coco_each)}
    n_p = sum(len(e["prompts"]) for e in entries)
    lines = [BEGIN, "## Concepts added at run time (issue: trust)", "",
             f"`{shlex.join(['python', 'benchmarks/runtime_concepts.py', *sys.argv[1:]])}` "
             f"({time.strftime('%Y-%m-%d')}, {machine()}, {time.time() - t0:.0f} s in all).", "",
             f"Head: `{os.path.relpath(weights, ROOT)}`. Set: `benchmarks/data/runtime_concepts.yaml`, {len(entries)} "
             f"concepts that no policy of safegen holds and the head never trained on, {n_p} prompts (half literal, "
             f"half paraphrase), {sum(len(e['near_misses']) for e in entries)} near-misses; COCO: `split_coco`'s "
             "held-out half. Rule: the added category's calibrated risk ≥ 1 − budget (budget 1%, calibrated by the "
             "guard on its benign reference set when the concept is added), or the phrase written in the prompt "
             "(the guard fires a written policy phrase's category).", "",
             "| added as | TPR | literal | paraphrase | report names the concept | near-misses flagged | "
             "COCO flagged by the added category | COCO flagged at all | COCO n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in modes.items():
        lines.append(f"| {name} | {rate(m['literal'] + m['paraphrase'])} | {rate(m['literal'])} | "
                     f"{rate(m['paraphrase'])} | {rate(m['named'])} | {rate(m['near'])} | {rate(m['coco'])} | "
                     f"{rate(m['coco_any'])} | {m['n_coco']} |")
    first = modes["one concept at a time"]
    lines += ["", "TPR by kind (one concept at a time): " + ", ".join(
        f"{k} {rate(v)} (n = {len(v)})" for k, v in first["by_kind"].items()) + ".", "",
        f"Missed prompts (one concept at a time; {len(first['misses'])}), lowest risk first:", ""]
    lines += [f"- {phrase!r}: {prompt!r} (risk {risk:.3f})"
              for phrase, prompt, risk in sorted(first["misses"], key=lambda x: x[2])[:12]]
    lines += ["", f"Near-misses flagged (one concept at a time; {len(first['false'])}):", ""]
    lines += [f"- {phrase!r}: {prompt!r}" for phrase, prompt in first["false"][:12]]
    lines.append(END)
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
