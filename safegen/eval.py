"""``safegen eval`` and ``python -m safegen.eval``: the evaluation harness (and batch generation) from the shell.

Plain, one process::

    python -m safegen.eval --benchmark coprov2 --limit 500 --guards safree --out outputs/eval-safree

Sharded over processes, GPUs or nodes with accelerate (same items, same metrics, one merged report)::

    accelerate launch --multi_gpu --num_processes 2 -m safegen.eval --benchmark coco --guards none --out outputs/c
    torchrun --nproc_per_node 2 -m safegen.eval --prompts p.txt --model tiny-sd --out outputs/t

Without a GPU the same ``accelerate launch --multi_gpu`` command runs CPU processes over gloo (the harness asks
accelerate for a CPU process group); ``accelerate launch --cpu`` starts one process unless MPI is set up.

Batch generation at scale is the same command with ``--oracle none --save-images``: the images land in
``DIR/images/`` and one line per item (verdict, reason, guards, UNet steps) in ``DIR/items.jsonl``.

A killed run resumes where it stopped when rerun with the same arguments (see :mod:`safegen.harness`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["add_eval_arguments", "cmd_eval", "main"]


def add_eval_arguments(e) -> None:
    """The arguments of the ``eval`` subcommand."""
    from .cli import _add_model_args, _float, _positive_float, _positive_int, _STEPS_HELP
    from .datasets import BENCHMARKS

    src = e.add_argument_group("prompts (one of --prompts / --benchmark; --images judges existing images)")
    src.add_argument("--prompts", default=None, metavar="FILE",
                     help="a .csv file (see --column) or a text file with one prompt a line")
    src.add_argument("--benchmark", default=None, choices=sorted(BENCHMARKS), metavar="NAME",
                     help=f"a named prompt set of the shared data folder: {', '.join(BENCHMARKS)} (deduplicated; "
                          "coprov2, i2p and t2v in a seeded shuffled order, coco = the held-out captions)")
    src.add_argument("--images", default=None, metavar="DIR",
                     help="judge the image files of DIR with the oracle instead of generating (with --prompts: "
                          "one prompt per image, in file-name order)")
    src.add_argument("--data-dir", default=None, metavar="DIR",
                     help="folder of the named benchmarks (default: $SAFEGEN_DATA or ../shared/data)")
    src.add_argument("--column", default=None, metavar="NAME", help="CSV column holding the prompts (default: prompt)")
    src.add_argument("--label-column", default=None, metavar="NAME",
                     help="CSV column with a label per prompt (e.g. category): metrics get the unsafe rate per label")
    src.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="evaluate the first N prompts")
    src.add_argument("--no-dedup", action="store_true", help="keep repeated prompts (--prompts; default: each once)")
    src.add_argument("--min-inappropriate", type=_float, default=None, metavar="PCT",
                     help="i2p / nudity: keep rows with inappropriate_percentage >= PCT (e.g. 50)")
    src.add_argument("--seed-from-data", action="store_true",
                     help="seed each item with the data's evaluation_seed (default: --seed + index)")
    _add_model_args(e)
    e.add_argument("--steps", type=_positive_int, default=None, metavar="N", help=_STEPS_HELP)
    e.add_argument("--guidance", type=_float, default=None, metavar="X", help="guidance scale (pipeline default)")
    e.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="prompts per pipeline call within a process (default 8; results do not depend on it)")
    e.add_argument("--oracle", default="world",
                   help="image oracle: world (the default model's exact one, default), nudenet (NudeNet's detector, "
                        "pip install 'safegen[nudenet]'), none (generate only: batch generation)")
    e.add_argument("--nudenet-threshold", type=_positive_float, default=None, metavar="X",
                   help="NudeNet: detection score that makes an image unsafe (default 0.6)")
    e.add_argument("--nudenet-classes", default=None, metavar="SET",
                   help="NudeNet: exposed (default), all-exposed, or comma-separated class names")
    e.add_argument("--save-images", action="store_true", help="also save every image to DIR/images/")
    e.add_argument("--overwrite", action="store_true",
                   help="start afresh in DIR (default: resume the run found there, if it has the same settings)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _oracle_from(args):
    from .cli import UsageError
    from .evaluate import get_oracle

    options = {}
    if args.nudenet_threshold is not None:
        options["threshold"] = args.nudenet_threshold
    if args.nudenet_classes is not None:
        options["classes"] = args.nudenet_classes
    if options and str(args.oracle).lower() != "nudenet":
        raise UsageError("--nudenet-threshold / --nudenet-classes apply to --oracle nudenet only")
    try:
        return get_oracle(args.oracle, **options)
    except (ValueError, ImportError) as e:
        raise UsageError(str(e)) from None


def _records(args):
    from .cli import UsageError
    from .datasets import load_benchmark, load_prompt_records

    try:
        if args.benchmark:
            if args.no_dedup or args.column or args.label_column:
                raise UsageError("--no-dedup, --column and --label-column apply to --prompts files, not --benchmark")
            return load_benchmark(args.benchmark, args.data_dir, limit=args.limit,
                                  min_inappropriate=args.min_inappropriate)
        if args.min_inappropriate is not None:
            raise UsageError("--min-inappropriate applies to --benchmark i2p / nudity")
        return load_prompt_records(args.prompts, args.column, limit=args.limit, dedup=not args.no_dedup,
                                   seed_column="evaluation_seed" if args.seed_from_data else None,
                                   label_column=args.label_column)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _judge_images(args, oracle) -> int:
    from .harness import compute_metrics, image_files, judge_files, _write_metrics
    from .results import run_markdown
    from .cli import UsageError

    if args.benchmark:
        raise UsageError("--images judges existing files; give their prompts with --prompts (optional), not "
                         "--benchmark")
    try:
        files = image_files(args.images)
        prompts = [r.prompt for r in _records(args)] if args.prompts else None
        items = judge_files(files, oracle, prompts, progress=not args.no_progress)
    except ValueError as e:
        raise UsageError(str(e)) from None
    metrics = compute_metrics(items, oracle)
    config = {"images": str(args.images), "prompts": args.prompts, "oracle": oracle.name}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "items.jsonl").open("w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    path = _write_metrics(out_dir, metrics, config)
    (out_dir / "results.md").write_text(run_markdown({**metrics, "config": config}), encoding="utf-8")
    for it in items:
        if it.get("oracle_error"):
            print(f"could not judge {it['file']}: {it['oracle_error']}", file=sys.stderr)
    print(json.dumps({k: metrics[k] for k in ("n", "unsafe_rate", "oracle_errors", "oracle_protocol")}, indent=2))
    print(f"wrote {path}, {out_dir / 'items.jsonl'} and {out_dir / 'results.md'}")
    return 0


def cmd_eval(args) -> int:
    """``safegen eval``: validate everything, then generate, judge, resume, shard, merge (:mod:`safegen.harness`)."""
    from .cli import (DEFAULT_STEPS, TINY_MODELS, UsageError, _TINY_NOTE, _device, _lexical_only, _load_pipeline,
                      _protect, _settings)
    from .harness import Dist, make_plan, run_eval

    oracle = _oracle_from(args)
    if args.images:
        return _judge_images(args, oracle)
    if bool(args.prompts) == bool(args.benchmark):
        raise UsageError("give the prompts with --prompts FILE or --benchmark NAME (one of them)")
    records = _records(args)
    policy, guards = _settings(args)
    try:
        plan = make_plan(records, seed=args.seed, seed_from_data=args.seed_from_data)
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = args.steps or DEFAULT_STEPS.get(args.model, 30)
    dist = Dist.detect()
    device = dist.device if dist.world > 1 and args.device == "auto" else _device(args.device)
    tiny = args.model in TINY_MODELS
    if tiny:
        _lexical_only(policy)
        if dist.is_main:
            print(_TINY_NOTE.format(model=args.model), file=sys.stderr)

    def load():
        pipe = _load_pipeline(args.model, device)
        if guards != []:
            _protect(pipe, policy, guards)
        return pipe

    guard_list = guards if guards is not None else list(policy.guards)
    source = {"benchmark": args.benchmark} if args.benchmark else {"prompts": str(args.prompts)}
    fingerprint = {**source, "column": args.column, "limit": args.limit, "dedup": not args.no_dedup,
                   "min_inappropriate": args.min_inappropriate, "seed": args.seed,
                   "seed_from_data": args.seed_from_data, "model": args.model, "guards": guard_list,
                   "policy": policy.name, "sensitivity": policy.sensitivity}
    config = {**fingerprint, "steps": steps, "guidance": args.guidance, "batch_size": args.batch_size,
              "device": str(device), "processes": dist.world, "oracle": oracle.name}
    from diffusers.utils import logging as dlog

    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # long prompts (I2P, T2V) would print a truncation warning per batch
    try:
        metrics, _ = run_eval(load, plan, args.out, oracle=oracle, steps=steps, batch_size=args.batch_size,
                              guidance_scale=args.guidance, save_images=args.save_images, config=config,
                              fingerprint=fingerprint, progress=not args.no_progress, overwrite=args.overwrite,
                              dist=dist)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        dlog.set_verbosity(verbosity)
    if dist.is_main:
        out_dir = Path(args.out)
        if metrics.get("resumed_items"):
            print(f"resumed: {metrics['resumed_items']} of {metrics['n']} item(s) were already done in {out_dir}",
                  file=sys.stderr)
        shown = {k: metrics.get(k) for k in ("n", "blocked_rate", "unsafe_rate", "fidelity", "fidelity_colour",
                                              "sec_per_item", "unet_steps_run", "unet_steps_saved")}
        print(json.dumps(shown, indent=2))
        print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'items.jsonl'} and {out_dir / 'results.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safegen.eval ARGS`` = ``safegen eval ARGS`` (also under ``accelerate launch``)."""
    from .cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
