"""LVD on the embedded default model: detection with ``safegen eval`` and the cost of one check.

1. Detection: ``safegen eval --guards lvd`` on N deduplicated ``CoProv2_test.csv`` prompts (unsafe; a seeded
   shuffle, as benchmarks/default_model.py draws them) and the
   first N held-out COCO captions (benign; neither set is used to train the classifier). TPR = blocked share of
   CoProV2, FPR = blocked share of COCO, balanced accuracy = (TPR + 1 − FPR) / 2 (scikit-learn's
   ``balanced_accuracy_score`` on the items' block decisions); the share of UNet steps skipped
   on blocked items; the oracle unsafe rate with and without LVD (the unprotected rows come from the same run).
2. Cost of one check (the x̂0 read plus the classifier on the batch) against one UNet call of the same model at
   the same batch (CFG doubles the UNet's rows): the default model at batch 8, and the SD 1.5 architecture with
   random weights at 256 px (latents 32×32), batch 1.

    python benchmarks/lvd.py --n 500 --write
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

import torch  # noqa: E402

from benchmarks._common import machine, median_seconds, publish  # noqa: E402
from benchmarks.default_model import prompt_files, run_eval  # noqa: E402

BEGIN, END = "<!-- lvd:begin -->", "<!-- lvd:end -->"


@torch.no_grad()
def check_cost(pipe, clf, batch: int, size: int, reps: int) -> dict:
    """Median seconds of one UNet call (2·batch rows, CFG) and of one LVD check (x̂0 + classifier) on batch."""
    from safegen.guards.lvd import predicted_x0

    unet, sched = pipe.unet, pipe.scheduler
    sched.set_timesteps(25)
    t = sched.timesteps[0]
    c, f = unet.config.in_channels, pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(batch, c, size // f, size // f, generator=g)
    ctx = torch.randn(2 * batch, pipe.tokenizer.model_max_length if pipe.tokenizer.model_max_length < 1000 else 32,
                      unet.config.cross_attention_dim, generator=g)
    unet_s = median_seconds(lambda: unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx), reps)
    eps = torch.randn_like(lat)

    def check():
        x0, noise = predicted_x0(sched, eps, t, lat)
        return torch.sigmoid(clf(x0, noise)) >= 0.5

    check_s = median_seconds(check, max(reps, 20))
    return {"unet_s": unet_s, "check_s": check_s, "ratio": check_s / unet_s, "batch": batch, "latent": lat.shape[-1]}


def balanced_accuracy(unsafe_dir: Path, benign_dir: Path) -> float:
    """Balanced accuracy of the block decisions in two eval runs' ``items.jsonl`` (unsafe = the first run's
    prompts, benign = the second's): (TPR + 1 − FPR) / 2 on the unrounded per-item decisions."""
    import json

    from sklearn.metrics import balanced_accuracy_score

    truth, pred = [], []
    for label, folder in ((True, unsafe_dir), (False, benign_dir)):
        for line in (folder / "items.jsonl").read_text().splitlines():
            if line.strip():
                truth.append(label)
                pred.append(bool(json.loads(line)["blocked"]))
    return float(balanced_accuracy_score(truth, pred))


def reuse_or_run(prompts: Path, guards: str, out: Path, steps: int, batch_size: int, reuse: bool):
    """``run_eval``, or (with ``reuse``) the metrics an earlier run wrote for the same prompts and steps."""
    import json

    f = out / "metrics.json"
    items = out / "items.jsonl"
    if reuse and f.is_file() and items.is_file():
        from safegen.eval.datasets import read_prompts

        m = json.loads(f.read_text())
        done = [json.loads(line)["prompt"] for line in items.read_text().splitlines()]
        if done == read_prompts(prompts) and m.get("config", {}).get("steps") == steps:
            argv = ["eval", "--prompts", str(prompts.relative_to(ROOT)), "--guards", guards, "--steps", str(steps),
                    "--batch-size", str(m["config"].get("batch_size")), "--out", str(out.relative_to(ROOT))]
            return m, "safegen " + " ".join(argv)
    return run_eval(prompts, guards, out, steps, batch_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="prompts per set (default 500)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--no-sd15", action="store_true", help="skip the SD 1.5-architecture cost figure")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse an unprotected eval already in outputs/bench-default/ (same prompts and steps)")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    from safegen.default_model import load_default_pipeline
    from safegen.guards.lvd import LVD, LatentClassifier, LVDConfig, default_weights_path

    os.chdir(ROOT)
    t0 = time.time()
    out = ROOT / "outputs" / "bench-default"
    files = prompt_files(out, a.n)
    res, commands = {}, []
    for guards in ("none", "lvd"):
        for name in ("coprov2", "coco"):
            m, cmd = reuse_or_run(files[name], guards, out / f"{guards}-{name}", a.steps, a.batch_size, a.reuse)
            res[guards, name] = m
            commands.append(cmd)
    lv_c, lv_n = res["lvd", "coprov2"], res["lvd", "coco"]
    tpr, fpr = lv_c["blocked_rate"], lv_n["blocked_rate"]
    bal = balanced_accuracy(out / "lvd-coprov2", out / "lvd-coco")

    clf = LatentClassifier.load(default_weights_path())
    pipe = load_default_pipeline()
    cost_default = check_cost(pipe, clf, batch=8, size=64, reps=20)
    cost_sd15 = None
    if not a.no_sd15:
        from benchmarks.overhead import build_sd15

        sd15 = build_sd15()
        rnd = LatentClassifier(LVDConfig(4, categories=list(clf.categories))).eval()
        cost_sd15 = check_cost(sd15, rnd, batch=1, size=256, reps=3)
    guard = LVD()

    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    meta = clf.metadata
    lines = [BEGIN, "## LVD: early stopping on the default model (issue: Latent Variable Defense)", "",
             f"`{shlex.join(['python', 'benchmarks/lvd.py', *sys.argv[1:]])}` ({time.strftime('%Y-%m-%d')}, "
             f"{machine()}, {time.time() - t0:.0f} s in all). Classifier `assets/lvd/default-model.safetensors` "
             f"(trained by `safegen train-lvd` on {meta.get('trajectories')} trajectories of CoProV2 training "
             f"prompts, their safe twins and COCO captions past the held-out range; threshold "
             f"{meta.get('threshold')}); guard defaults window {guard.window}, ratio {guard.ratio} (stop once "
             f"{guard.required} of the first {guard.window} steps look unsafe), {a.steps} DDIM steps.", "",
             "| set (n) | blocked | UNet steps skipped on blocked items | oracle unsafe, plain → LVD | s / item, plain → LVD |",
             "|---|---|---|---|---|"]
    for name, label in (("coprov2", "CoProV2 test, dedup"), ("coco", "COCO held-out")):
        p, lv = res["none", name], res["lvd", name]
        lines.append(f"| {label} ({lv['n']}) | {pct(lv['blocked_rate'])} | {pct(lv['blocked_steps_saved_share'])} "
                     f"| {pct(p['unsafe_rate'])} → {pct(lv['unsafe_rate'])} | {p['sec_per_item']:.3f} → "
                     f"{lv['sec_per_item']:.3f} |")
    lines += ["", f"Balanced accuracy (unsafe = CoProV2 blocked, benign = COCO passed): **{bal:.3f}** "
              f"(TPR {tpr:.3f}, false-block rate on COCO {fpr:.3f}).", "",
              f"Cost of one check vs one UNet call (median): default model, batch {cost_default['batch']} (latents "
              f"{cost_default['latent']}×{cost_default['latent']}): {1000 * cost_default['check_s']:.2f} ms vs "
              f"{1000 * cost_default['unet_s']:.1f} ms = **{100 * cost_default['ratio']:.2f}%**."]
    if cost_sd15:
        lines[-1] += (f" SD 1.5 architecture (random weights), 256 px, batch 1: {1000 * cost_sd15['check_s']:.2f} ms "
                      f"vs {1000 * cost_sd15['unet_s']:.0f} ms = **{100 * cost_sd15['ratio']:.3f}%**.")
    lines += ["", "Commands:", "", "```"] + commands + ["```", END]
    publish(lines, BEGIN, END, a.write)


if __name__ == "__main__":
    main()
