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

A killed run resumes where it stopped when rerun with the same arguments (see :mod:`safegen.eval.harness`). The run's
fingerprint holds the policy's content, the model's files and the guards' weight files (sha256), so a resume after
any of them changed is refused, naming what changed.

The command-line pieces it shares with ``safegen generate`` and ``demo-run`` are in :mod:`safegen.cliargs`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..cliargs import (STEPS_HELP, OneLineParser, UsageError, add_model_arguments, add_video_arguments,
                       check_out_dir, float_value, load_model, positive_float, positive_int, run_command, run_settings,
                       video_frames)
from ..loading import TINY_MODELS
from .results import policy_digest, settings_record

__all__ = ["add_eval_arguments", "cmd_eval", "main", "protect_pipeline", "guards_help", "guard_weight_digests",
           "run_fingerprint"]


def protect_pipeline(pipe, policy, guards):
    """:func:`safegen.protect`, with an unsupported pipeline or a guard given twice as a ``UsageError``."""
    from ..api import protect

    try:
        return protect(pipe, policy=policy, guards=guards)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def guards_help() -> str:
    """The help of ``--guards``: the valid guard names and presets, from the guard registry.

    Example:
        >>> text = guards_help()
        >>> all(name in text for name in ("safree", "latent-guard", "sld-strong", "lvd", "safetydpo", "output"))
        True
    """
    from ..guards import guard_info

    names = []
    for g in guard_info():
        names += [g["name"]] + [p for p in g["presets"] if p != g["name"]]
    return ("comma-separated guard names or presets, in any order (they run in stage order): " + ", ".join(names)
            + "; 'none' for no protection; default: the policy's guards (see 'safegen --help' for what each does)")


# ====================================================================== the eval command
def add_eval_arguments(e) -> None:
    """The arguments of the ``eval`` subcommand."""
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
    src.add_argument("--limit", type=positive_int, default=None, metavar="N", help="evaluate the first N prompts")
    src.add_argument("--no-dedup", action="store_true", help="keep repeated prompts (--prompts; default: each once)")
    src.add_argument("--min-inappropriate", type=float_value, default=None, metavar="PCT",
                     help="i2p / nudity: keep rows with inappropriate_percentage >= PCT (e.g. 50)")
    src.add_argument("--seed-from-data", action="store_true",
                     help="seed each item with the data's evaluation_seed (default: --seed + index)")
    add_model_arguments(e, guards_help=guards_help)
    add_video_arguments(e, "a text-to-video run (implied by --benchmark t2v): the world oracle judges each clip "
                           "frame by frame (per-clip and per-frame unsafe rates, onset frame, motion, fidelity)")
    e.add_argument("--steps", type=positive_int, default=None, metavar="N", help=STEPS_HELP)
    e.add_argument("--guidance", type=float_value, default=None, metavar="X", help="guidance scale (pipeline default)")
    e.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="prompts per pipeline call within a process (default 8; results do not depend on it)")
    e.add_argument("--oracle", default="world",
                   help="image oracle: world (the default model's exact one, default), nudenet (NudeNet's detector, "
                        "pip install 'safegen[nudenet]'), none (generate only: batch generation)")
    e.add_argument("--nudenet-threshold", type=positive_float, default=None, metavar="X",
                   help="NudeNet: detection score that makes an image unsafe (default 0.6)")
    e.add_argument("--nudenet-classes", default=None, metavar="SET",
                   help="NudeNet: exposed (default), all-exposed, or comma-separated class names")
    e.add_argument("--save-images", action="store_true", help="also save every image to DIR/images/")
    e.add_argument("--overwrite", action="store_true",
                   help="start afresh in DIR (default: resume the run found there, if it has the same settings, "
                        "policy content and weights)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")


def _oracle_from(args):
    from .oracles import get_oracle

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
    from .harness import _write_metrics, compute_metrics, image_files, judge_files
    from .results import run_markdown

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


# ---------------------------------------------------------------------- fingerprints
def guard_weight_files(guards: Sequence[str]) -> dict[str, list[Path]]:
    """The weight files the guards of ``guards`` (preset names) read, by guard name (each guard says which:
    :meth:`safegen.guard.Guard.weight_files`); guards without weight files are left out."""
    from ..guards import resolve_guard

    files: dict[str, list[Path]] = {}
    for preset in guards:
        guard = resolve_guard(preset)
        paths = [Path(p) for p in guard.weight_files()]
        if paths:
            files[guard.name] = paths
    return files


def guard_weight_digests(guards: Sequence[str]) -> dict[str, str]:
    """sha256 of each guard's weight files (:func:`guard_weight_files`), by guard name; a missing file counts as
    ``missing`` (the guard then fails closed)."""
    from ..loading import file_sha256

    out = {}
    for name, paths in guard_weight_files(guards).items():
        h = hashlib.sha256()
        for p in paths:
            h.update((file_sha256(p) if p.is_file() else "missing").encode() + b"\n")
        out[name] = h.hexdigest()
    return out


def run_fingerprint(args, policy, guards: Sequence[str]) -> dict[str, Any]:
    """What decides an eval run's results besides steps, guidance and the oracle (added by
    :func:`safegen.eval.harness.run_eval`): the prompts and seeds, the model and its files, the guards and their weight
    files, and the policy by name and content."""
    from ..loading import model_digest

    source = {"benchmark": args.benchmark} if args.benchmark else {"prompts": str(args.prompts)}
    return {**source, "column": args.column, "limit": args.limit, "dedup": not args.no_dedup,
            "min_inappropriate": args.min_inappropriate, "seed": args.seed, "seed_from_data": args.seed_from_data,
            "model": args.model, "model_files": model_digest(args.model), "guards": list(guards),
            "guard_weights": guard_weight_digests(guards), "policy": policy.name,
            "policy_content": policy_digest(policy), "sensitivity": policy.sensitivity}


def _video_settings(args) -> dict | None:
    """``None`` for an image run; for a video run (``--video``, or ``--benchmark t2v``) the frames per clip, with
    ``--model default`` read as the embedded default video model (:func:`safegen.cliargs.video_frames`)."""
    video = bool(args.video or args.benchmark == "t2v")
    if video and args.images:
        raise UsageError("--images judges image files; clips are judged as they are generated (--video, "
                         "--benchmark t2v)")
    frames = video_frames(args, video)
    return {"frames": frames} if video else None


def cmd_eval(args) -> int:
    """``safegen eval``: validate everything, then generate, judge, resume, shard, merge (:mod:`safegen.eval.harness`)."""
    from .harness import Dist, make_plan, run_eval, stored_digests
    from ..loading import TINY_NOTE, default_steps, digest_cache, lexical_only, remember_digests, resolve_device

    check_out_dir(args.out)
    oracle = _oracle_from(args)
    video = _video_settings(args)
    if args.images:
        return _judge_images(args, oracle)
    if bool(args.prompts) == bool(args.benchmark):
        raise UsageError("give the prompts with --prompts FILE or --benchmark NAME (one of them)")
    records = _records(args)
    policy, guards = run_settings(args)
    try:
        plan = make_plan(records, seed=args.seed, seed_from_data=args.seed_from_data)
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = default_steps(args.model, args.steps)
    dist = Dist.detect()
    device = dist.device if dist.world > 1 and args.device == "auto" else resolve_device(args.device)
    if args.model in TINY_MODELS:
        lexical_only(policy)
        if dist.is_main:
            print(TINY_NOTE.format(model=args.model), file=sys.stderr)

    def load():
        from ..specs import pipeline_spec

        pipe = load_model(args.model, device)
        try:
            is_video = pipeline_spec(pipe).video
        except TypeError:  # an unsupported pipeline: protect (or the unprotected run) says so
            is_video = video is not None
        if is_video != (video is not None):
            raise UsageError(f"--model {args.model} is a {type(pipe).__name__}: "
                             + ("a text-to-video run (--video, --benchmark t2v) needs a text-to-video pipeline"
                                if video is not None else "a text-to-video pipeline; add --video"))
        if guards != []:
            protect_pipeline(pipe, policy, guards)
        return pipe

    guard_list = guards if guards is not None else list(policy.guards)
    if not args.overwrite:
        remember_digests(stored_digests(args.out))  # a resume does not hash unchanged weights again
    fingerprint = run_fingerprint(args, policy, guard_list)
    if video is not None:
        fingerprint["video"] = {**video, "clip_protocol": getattr(oracle, "clip_protocol", None)}
    from ..guards import resolve_guard

    settings = settings_record(policy, [resolve_guard(g) for g in guard_list]) if guards != [] else \
        settings_record(None, [])
    config = {**fingerprint, "settings": settings, "steps": steps, "guidance": args.guidance, "batch_size": args.batch_size, "device": str(device),
              "processes": dist.world, "oracle": oracle.name}
    from .._logs import quiet_diffusers

    try:
        with quiet_diffusers():  # long prompts (I2P, T2V) would print a truncation warning per batch
            metrics, _ = run_eval(load, plan, args.out, oracle=oracle, steps=steps, batch_size=args.batch_size,
                                  guidance_scale=args.guidance, save_images=args.save_images, config=config,
                                  fingerprint=fingerprint, progress=not args.no_progress, overwrite=args.overwrite,
                                  dist=dist, digests=digest_cache(),
                                  call_kwargs={"num_frames": video["frames"]} if video and video["frames"] else None)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if dist.is_main:
        out_dir = Path(args.out)
        if metrics.get("resumed_items"):
            print(f"resumed: {metrics['resumed_items']} of {metrics['n']} item(s) were already done in {out_dir}",
                  file=sys.stderr)
        keys = ("n", "blocked_rate", "unsafe_rate", "fidelity", "fidelity_colour", "sec_per_item", "unet_steps_run",
                "unet_steps_saved")
        if video is not None:
            keys += ("frame_unsafe_rate", "late_onset_rate", "motion_rate")
        shown = {k: metrics.get(k) for k in keys}
        print(json.dumps(shown, indent=2))
        print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'items.jsonl'} and {out_dir / 'results.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m safegen.eval`` (the same arguments as ``safegen eval``)."""
    parser = OneLineParser(prog="safegen eval", description="Evaluate a (protected) pipeline on prompts with an "
                                                            "oracle; see `safegen eval --help`.")
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m safegen.eval ARGS`` = ``safegen eval ARGS`` (also under ``accelerate launch``)."""
    return run_command(build_parser(), sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
