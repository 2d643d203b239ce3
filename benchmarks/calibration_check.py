"""Does a 1% budget flag 1% of *new* benign prompts? The shared score scale's rule, checked on held-out captions.

A guard's thresholds come from 1,000 benign reference prompts (:class:`safegen.calibration.RiskScale`). This script
takes the shipped MiniLM Latent Guard head under the default policy, scores the held-out half of
:func:`safegen.eval.datasets.split_coco` (captions from across the whole COCO file, none used in training) and,
``--draws`` times, draws 1,000 of them at random as the reference and measures the share of the *other*
held-out captions flagged at the budget, and the share of CoProV2 test prompts caught, for two rules:

* **in-sample**: the largest level at which at most ``budget`` of the reference prompts fire (the scale's rule
  before this check);
* **expected** (the scale's rule now): the largest level at which a *new* prompt is expected to fire at most
  ``budget`` of the time, i.e. the reference rate one level further (a new prompt passes a column's m-th highest
  reference score with probability (m + 1) / (N + 1)).

It also reports the shipped reference set (``assets/reference``) against the whole held-out half.

    python benchmarks/calibration_check.py --write
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._common import machine, publish  # noqa: E402

BEGIN, END = "<!-- calibration-check:begin -->", "<!-- calibration-check:end -->"


def category_scores(texts: list[str]) -> torch.Tensor:
    """(N, K) the shipped head's per-category scores (best concept or evidence), as the guard decides on them."""
    import safegen
    from safegen.guards.latent_guard import LatentGuard, _minilm_adapter, per_category

    guard, policy = LatentGuard(), safegen.load_policy("default")
    head, _ = guard._load_head()
    head.eval()
    adapter = _minilm_adapter(int(head.config.max_length or 64), "cpu")
    bank, cat_of, cats, _ = guard._bank({}, policy, head, adapter)
    rows = []
    with torch.no_grad():
        for s in range(0, len(texts), 256):
            scores, ev, _ = guard._score(head, adapter, bank, texts[s:s + 256], cats)
            by_concept = per_category(scores, cat_of, len(cats))
            rows.append(by_concept if ev is None else torch.maximum(by_concept, ev))
    return torch.cat(rows)


def in_sample_thresholds(scale, budget: float) -> torch.Tensor:
    """The earlier rule: the largest level at which at most ``budget`` of the reference prompts fire."""
    n = len(scale)
    level = scale._levels(scale.reference).amin(1)
    g = torch.bincount(level, minlength=n + 1).cumsum(0).double() / n  # in-sample rate at level m
    m = int((g <= budget).nonzero().max())
    top = torch.cat([scale._asc.flip(1), torch.full((scale._asc.shape[0], 1), -torch.inf)], 1)
    return torch.nextafter(top[:, m], torch.full_like(top[:, m], torch.inf))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    from safegen.calibration import RiskScale, reference_prompts
    from safegen.eval.datasets import load_coco, load_coprov2_test, split_coco

    t0 = time.time()
    held = split_coco(load_coco())[1]
    H, U = category_scores(held), category_scores([p for p, _ in load_coprov2_test()])
    R = category_scores(reference_prompts())
    rules = {"in-sample (before)": in_sample_thresholds, "expected on new prompts (now)":
             lambda scale, b: scale.thresholds(b)}
    res = {name: {"fpr": [], "tpr": []} for name in rules}
    for d in range(a.draws):
        order = list(range(len(held)))
        random.Random(d).shuffle(order)
        ref, rest = order[:1000], order[1000:]
        scale = RiskScale(H[ref], [str(k) for k in range(H.shape[1])])
        for name, rule in rules.items():
            th = rule(scale, a.budget)
            res[name]["fpr"].append(float((H[rest] >= th).any(1).double().mean()))
            res[name]["tpr"].append(float((U >= th).any(1).double().mean()))
    shipped = RiskScale(R, [str(k) for k in range(R.shape[1])])
    lines = [BEGIN, "## Does a 1% budget flag 1% of new benign prompts? (issue: trust)", "",
             f"`{shlex.join(['python', 'benchmarks/calibration_check.py', *sys.argv[1:]])}` "
             f"({time.strftime('%Y-%m-%d')}, {machine()}, {time.time() - t0:.0f} s in all).", "",
             f"The shipped MiniLM Latent Guard head, default policy (7 categories), budget {a.budget:g}. {a.draws} "
             f"times: 1,000 captions drawn at random from the held-out half of `split_coco` (n = {len(held)}) as "
             f"the reference, the other {len(held) - 1000} as new benign prompts; CoProV2 test (n = {len(U)}) for "
             "the catch rate.", "",
             "| rule | new benign prompts flagged: mean | sd | max | CoProV2 caught: mean |", "|---|---|---|---|---|"]
    for name, r in res.items():
        lines.append(f"| {name} | {100 * statistics.mean(r['fpr']):.2f}% | {100 * statistics.stdev(r['fpr']):.2f} | "
                     f"{100 * max(r['fpr']):.2f}% | {100 * statistics.mean(r['tpr']):.1f}% |")
    for name, rule in rules.items():
        th = rule(shipped, a.budget)
        lines.append(f"| {name}, the shipped reference set (`assets/reference`) | "
                     f"{100 * float((H >= th).any(1).double().mean()):.2f}% (whole held-out half) | – | – | "
                     f"{100 * float((U >= th).any(1).double().mean()):.1f}% |")
    lines += ["", "At a 1% budget over seven categories each category keeps one or two reference prompts above its "
              "threshold, and a new prompt passes a column's m-th highest reference score with probability "
              "(m + 1) / (N + 1), not m / N: the in-sample rule flags about half again its budget on new prompts. "
              "The scale now uses the expected rate, so the budget is what a user gets on average; one draw of "
              "1,000 reference prompts still leaves a spread of a few tenths of a point (the sd column).", END]
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
