"""Command-line pieces the generating commands share (``safegen generate``, ``demo-run``, ``eval``, also run as
``python -m safegen.eval``): argument types with one-line errors, the model options, the validated policy and
guard list, the output folder check, model loading on the right number of threads, and :func:`run_command`, which
turns bad input into one line on stderr and exit code 2, never a traceback.

A leaf module: it imports only other leaves (policy, loading, hub, guard names), so every layer's command can use
it without importing :mod:`safegen.cli`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from .loading import DEFAULT_MODEL, TINY_MODELS, TINY_VIDEO_MODELS

__all__ = ["UsageError", "OneLineParser", "int_at_least", "positive_int", "nonnegative_int", "positive_float",
           "float_value", "sensitivity_value", "STEPS_HELP", "add_model_arguments", "parse_guards", "run_settings",
           "check_out_dir", "load_model", "run_command"]


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors on one line (and argparse's exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def int_at_least(minimum: int):
    """An argparse type: an integer ≥ ``minimum``, with a message naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}" if minimum
                                             else f"must be 0 or more, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def float_value(text: str) -> float:
    """An argparse type: any number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def sensitivity_value(text: str) -> float:
    """An argparse type: a sensitivity in the policy's range."""
    from .policy import MAX_SENSITIVITY, MIN_SENSITIVITY

    value = positive_float(text)
    if not MIN_SENSITIVITY <= value <= MAX_SENSITIVITY:
        raise argparse.ArgumentTypeError(f"must be from {MIN_SENSITIVITY:g} to {MAX_SENSITIVITY:g}, got {text}")
    return value


STEPS_HELP = "denoising steps (default: 25 on the default model, 4 on the tiny ones, else 30)"


def add_model_arguments(p: argparse.ArgumentParser, *, out_help: str | None = None) -> None:
    """``--model --guards --policy --sensitivity --seed --device --out`` of the generating commands (``--out``
    is required unless ``out_help`` describes its default)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local model folder (safetensors weights), a hub id (owner/name), 'default' (the embedded "
                        f"default model) or one of {sorted(TINY_MODELS)} (random test pipelines; text-to-video: "
                        f"{sorted(TINY_VIDEO_MODELS)}) (default: {DEFAULT_MODEL})")
    p.add_argument("--guards", default=None, metavar="LIST",
                   help="comma-separated guard names (e.g. safree,sld-strong); 'none' for no protection; "
                        "default: the policy's guards")
    p.add_argument("--policy", default="default", metavar="NAME_OR_PATH",
                   help="a built-in policy name or a .yaml/.json policy file (default: default)")
    p.add_argument("--sensitivity", type=sensitivity_value, default=None, metavar="X",
                   help="overrides the policy's sensitivity, 0.1 to 10 (2.0 flags more, 0.5 flags less)")
    p.add_argument("--seed", type=int, default=0, help="random seed; every prompt uses it (default: 0)")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda, ...")
    if out_help is None:
        p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    else:
        p.add_argument("--out", default=None, metavar="DIR", help=out_help)


def parse_guards(spec: str | None) -> list[str] | None:
    """``None`` (the policy's guards), ``[]`` for ``none``, else validated guard names; ``UsageError`` otherwise."""
    if spec is None:
        return None
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if [n.lower() for n in names] == ["none"]:
        return []
    if not names:
        raise UsageError("--guards is empty; give guard names such as safree,sld-strong, or 'none'")
    from .guard_names import PRESET_GUARDS, guard_of_preset, normalize_preset

    seen: dict[str, str] = {}
    for n in names:
        if normalize_preset(n) == "none":
            raise UsageError("--guards none cannot be combined with guard names")
        guard_name = guard_of_preset(n)  # presets of one guard (sld, sld-strong) share its name
        if guard_name is None:
            raise UsageError(f"unknown guard {n!r} in --guards; known: {', '.join(sorted(PRESET_GUARDS))} "
                             "(or 'none')")
        if guard_name in seen:
            raise UsageError(f"--guards lists the {guard_name!r} guard twice ({seen[guard_name]!r} and {n!r}); "
                             "give each guard once")
        seen[guard_name] = n
    return names


def run_settings(args) -> tuple[Any, list[str] | None]:
    """The validated policy and guard list of a generating command, and a checked ``--model``, before any model
    loads (``PolicyError``, ``UsageError``, ``ModelLoadError`` and ``OfflineModelError`` name the problem)."""
    from .loading import check_model, lexical_only
    from .policy import load_policy

    guards = parse_guards(args.guards)
    policy = load_policy(args.policy)
    if args.sensitivity is not None:
        policy.sensitivity = args.sensitivity
    check_model(args.model)
    if args.model in TINY_VIDEO_MODELS:  # random text encoders (the image tiny models: see TINY_NOTE)
        lexical_only(policy)
    return policy, guards


def check_out_dir(path: "str | Path", what: str = "--out") -> Path:
    """``path`` as an output folder that exists or can be made: not a file, nor inside one (``UsageError``)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{what} {out} is a file, not a folder; give a folder (it is created if missing)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {out} cannot be created: {parent} is a file, not a folder")
            break
    return out


_RESTORE: dict[str, Any] = {}  # process-wide settings a command changed, restored by run_command


def load_model(model: str, device) -> Any:
    """:func:`safegen.loading.load_pipeline` for a command: on the CPU a tiny model runs on one thread (extra
    threads only add synchronisation on tiny ops, and spin badly on a shared CPU); :func:`run_command` restores the
    thread count when the command ends."""
    from .loading import is_builtin, load_pipeline, resolve_device

    device = resolve_device(device)
    if is_builtin(model) and device.type == "cpu":
        import torch

        if torch.get_num_threads() > 1:
            _RESTORE.setdefault("threads", torch.get_num_threads())
            torch.set_num_threads(1)
    return load_pipeline(model, device)


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run ``args.func(args)``: the exit code, with bad input as one line on stderr and exit
    code 2 (never a traceback), 130 on Ctrl+C."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, argparse errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    command = getattr(args, "command", None)
    prog = f"{parser.prog} {command}" if command else parser.prog
    from .hub import OfflineModelError
    from .loading import ModelLoadError
    from .policy import PolicyError

    try:
        return int(args.func(args) or 0)
    except OfflineModelError as e:
        print(f"{prog}: error: {e} (the safegen CLI runs offline unless you export HF_HUB_OFFLINE=0)",
              file=sys.stderr)
        return 2
    except (UsageError, PolicyError, ModelLoadError, FileNotFoundError, PermissionError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        threads = _RESTORE.pop("threads", None)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
