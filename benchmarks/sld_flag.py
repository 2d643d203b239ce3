"""SLD's flag threshold on the embedded default model: where 1% of benign prompts sits, and what it catches.

SLD flags an item when the cosine between its guidance direction (ε_p − ε_u) and the safety concept's (ε_S − ε_u),
averaged over the steps with safety rows, reaches ``flag_threshold`` (:class:`safegen.guards.sld.SLD`). This runs
SLD's medium preset (25 DDIM steps, every policy category on ``log`` so nothing is blocked and the score of every
item is reported) on

* the benign reference prompts shipped in ``assets/reference`` (COCO captions outside the evaluation rows; the same
  set SAFREE calibrates on), and sets the threshold at the budget: the loosest value that at most ``--budget`` of
  them reach (:func:`safegen.calibration.budget_thresholds`);
* the first N held-out COCO captions (the evaluation rows: a benign set the threshold was not fitted on) and N
  CoProV2 test prompts (seeded shuffle), to report the false-flag rate and the flag's recall at that threshold.

With ``--write`` the section goes into BENCHMARKS.md between ``<!-- sld-flag:begin -->`` and ``<!-- sld-flag:end -->``.
The reference scores are measured by :meth:`safegen.guards.sld.SLD.calibrate` (kept in the calibration cache);
``--ship`` also copies that calibration into ``assets/calibration`` (the embedded model's, shipped with the package),
and :data:`safegen.guards.sld.DEFAULT_FLAG_THRESHOLD` is the 1% value this prints for the shipped model.

    python benchmarks/sld_flag.py --n 300 --write --ship
    python benchmarks/sld_flag.py --n 8 --reference 16 --steps 2      # a smoke run
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

BEGIN, END = "<!-- sld-flag:begin -->", "<!-- sld-flag:end -->"


def scores(pipe, prompts: list[str], steps: int, batch_size: int, desc: str):
    """SLD medium's flag score of every prompt (item i seeded with i), as a float tensor."""
    import torch
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        res = pipe(chunk, num_inference_steps=steps, generator=gens, output_type="latent")
        out += [r.result("sld").score for r in res.safety]
    if any(s is None for s in out):
        raise SystemExit("SLD reported no flag score (no safety rows ran): is --steps past the medium warm-up?")
    return torch.tensor(out, dtype=torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="held-out COCO captions and CoProV2 test prompts (default 300)")
    ap.add_argument("--reference", type=int, default=1000, help="reference prompts to fit on (default: all 1,000)")
    ap.add_argument("--budget", type=float, default=0.01, help="benign share allowed to reach it (default 0.01)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--ship", action="store_true", help="copy the calibration into assets/calibration")
    a = ap.parse_args()
    import safegen
    from safegen.calibration import budget_thresholds, reference_prompts
    from safegen.default_model import HELDOUT_COCO, load_default_pipeline
    from safegen.eval.datasets import load_coco, load_coprov2_test
    from safegen.guards.sld import SLD

    from benchmarks.default_model import _shuffled

    t0 = time.time()
    policy = safegen.load_policy("default")
    for cat in policy.categories.values():
        cat.action = "log"  # measure only: every item is generated and scored
    pipe = load_default_pipeline()
    guard = SLD.medium()
    cal = guard.calibrate(pipe, steps=a.steps, batch_size=a.batch_size, limit=a.reference)
    if a.ship:
        import shutil

        from safegen.calibration import cache_dir, shipped_path

        shipped_path("sld", cal["key"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cache_dir() / "calibration" / f"sld-{cal['key']}.json", shipped_path("sld", cal["key"]))
    safegen.protect(pipe, policy=policy, guards=[guard])
    sets = {"reference": reference_prompts()[:a.reference], "coco": load_coco()[:HELDOUT_COCO][:a.n],
            "coprov2": _shuffled([p for p, _ in load_coprov2_test()])[:a.n]}
    got = {"reference": cal["scale"].reference[:, 0]}
    got.update({k: scores(pipe, v, a.steps, a.batch_size, k) for k, v in sets.items() if k != "reference"})
    thr = float(cal["scale"].thresholds(a.budget)[0])
    assert float(budget_thresholds(got["reference"].view(-1, 1), a.budget)[0]) == thr

    def rate(name: str) -> float:
        return float((got[name] >= thr).float().mean())

    def q(name: str, p: float) -> str:
        return f"{float(got[name].quantile(p)):.3f}"

    lines = [BEGIN, "## SLD's flag threshold on the default model (issue: the CLIP world)", "",
             f"`python benchmarks/sld_flag.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}, {machine()}, "
             f"{time.time() - t0:.0f} s in all). SLD medium preset, {a.steps} DDIM steps, every category on `log`; "
             f"item i seeded with i.", "",
             f"Threshold at a {100 * a.budget:g}% budget on {len(sets['reference'])} reference prompts "
             f"(`assets/reference`): **{thr:.3f}** (the calibrated threshold at the default policy's budget; "
             "`DEFAULT_FLAG_THRESHOLD` where a model has no calibration).", "",
             "| set (n) | median score | 99th percentile | flagged at the threshold |", "|---|---|---|---|"]
    for name, label in (("reference", "benign reference (fit)"), ("coco", "COCO held-out, evaluation rows"),
                        ("coprov2", "CoProV2 test")):
        lines.append(f"| {label} ({len(sets[name])}) | {q(name, 0.5)} | {q(name, 0.99)} | {100 * rate(name):.1f}% |")
    lines += ["", "The flag reads the guidance direction, not the image: its recall on CoProV2 is what this model's "
              "noise predictions say about the safety concept, not an oracle judgement.", END]
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
