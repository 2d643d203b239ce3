"""SafetyDPO recipe: preference pairs → one Diffusion-DPO LoRA expert per category → merged LoRAs.

    python erasure/safetydpo.py erasure/configs/safetydpo-default-model.json [--skip-existing]

Steps (each reuses what an earlier run left in the config's ``out`` folder with ``--skip-existing``):

1. ``pairs.safetensors``: for every category, ``pairs_per_category`` CoProV2 training pairs generated with the
   model itself (safe twin's image preferred over the unsafe prompt's, same seed) and verified by the world
   oracle (:func:`safegen.training.safetydpo.make_preference_pairs`);
2. ``experts/<category>.safetensors``: one LoRA expert per category (:func:`safegen.training.safetydpo.train_expert`);
3. ``merged-<method>.safetensors`` for each of ``merges`` (Co-Merge, linear, TIES:
   :func:`safegen.training.safetydpo.merge_experts`).

Then evaluate with ``safegen eval --guards none`` vs a protected run, e.g. ``benchmarks/safetydpo.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="a JSON config (see erasure/configs/)")
    ap.add_argument("--skip-existing", action="store_true", help="reuse pairs/experts/merges already written")
    a = ap.parse_args(argv)
    cfg = json.loads(Path(a.config).read_text())
    import torch

    from safegen.cli import _load_pipeline
    from safegen.eval.oracles import get_oracle
    from safegen.training.safetydpo import PreferencePairs, make_preference_pairs, merge_experts, train_expert
    from safegen.eval.datasets import load_coprov2_pairs

    out = ROOT / cfg["out"]
    out.mkdir(parents=True, exist_ok=True)
    pipe = _load_pipeline(cfg["model"], torch.device("cpu"))
    oracle = get_oracle("world")
    log: dict = {"config": cfg, "steps": {}}
    t0 = time.time()

    pairs_file = out / "pairs.safetensors"
    if a.skip_existing and pairs_file.is_file():
        data = PreferencePairs.load(pairs_file)
    else:
        rng = random.Random(cfg["seed"])
        pool = load_coprov2_pairs()
        chosen = []
        for cat in cfg["categories"]:
            mine = [p for p in pool if p[2] == cat]
            chosen += rng.sample(mine, min(cfg["pairs_per_category"], len(mine)))

        def judge(prompt, image):
            j = oracle.judge(prompt, image)
            return bool(j["unsafe"]), j.get("category")

        data, stats = make_preference_pairs(pipe, chosen, judge=judge, steps=cfg["generation_steps"],
                                            seed=cfg["seed"], batch_size=16)
        data.save(pairs_file)
        log["steps"]["pairs"] = {**stats, "per_category": {c: data.categories.count(c) for c in cfg["categories"]}}
        print(json.dumps(log["steps"]["pairs"]), flush=True)

    experts = []
    for cat in cfg["categories"]:
        f = out / "experts" / f"{cat}.safetensors"
        experts.append(f)
        if a.skip_existing and f.is_file():
            continue
        sub = data.subset(cat)
        if len(sub) == 0:
            raise SystemExit(f"no verified preference pair for category {cat!r}; raise pairs_per_category")
        s = train_expert(pipe, sub, out=f, category=cat, steps=cfg["train_steps"], batch_size=cfg["batch_size"],
                         lr=cfg["lr"], beta=cfg["beta"], rank=cfg["rank"], empty_share=cfg["empty_share"],
                         seed=cfg["seed"], resume=True)
        s.pop("losses")
        log["steps"][f"expert-{cat}"] = s
        print(json.dumps(s), flush=True)

    for method in cfg["merges"]:
        f = out / f"merged-{method}.safetensors"
        if a.skip_existing and f.is_file():
            continue
        s = merge_experts(experts, f, method=method, pipe=pipe, data=data, density=cfg.get("ties_density", 0.5))
        log["steps"][f"merge-{method}"] = s
        print(json.dumps(s), flush=True)
    log["seconds"] = round(time.time() - t0, 1)
    (out / "recipe-log.json").write_text(json.dumps(log, indent=2, default=str) + "\n")
    print(f"done in {log['seconds']} s; files in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
