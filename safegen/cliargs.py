"""Command-line pieces the generating commands share (``safegen generate``, ``demo-run``, ``eval``, also run as
``python -m safegen.eval``): argument types with one-line errors, the model options, the validated policy and
guard list, the output folder check, model loading on the right number of threads, and :func:`run_command`, which
turns bad input into one line on stderr and exit code 2, never a traceback.

A leaf module: it imports only other leaves (policy, loading, hub, guard names), so every layer's command can use
it without importing :mod:`safegen.cli`. Help texts that need more (the guard list reads the guard registry) are
passed in as functions and computed only when help is printed (:meth:`OneLineParser.defer_help`).

While a command runs, :func:`quiet_libraries` hides the library notices that are known to be harmless (and the
model-loading bars); :func:`run_command` restores the libraries' settings when the command ends, so a program
that calls :func:`safegen.cli.main` keeps its own logging.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .loading import DEFAULT_MODEL, TINY_MODELS, TINY_VIDEO_MODELS

__all__ = ["UsageError", "OneLineParser", "int_at_least", "positive_int", "nonnegative_int", "positive_float",
           "nonnegative_float", "float_value", "sensitivity_value", "STEPS_HELP", "add_model_arguments",
           "add_video_arguments", "video_frames",
           "parse_guards", "run_settings", "check_out_dir", "load_model", "quiet_libraries", "run_command"]


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors on one line (and argparse's exit code 2), and help texts computed when help is printed
    (:meth:`defer_help`), so parsing a command line stays fast."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def defer_help(self, action: "argparse.Action | None", make: Callable[[], str]) -> None:
        """Set ``action``'s help (``None``: the parser's epilog) to ``make()`` when this parser's help is first
        printed; until then the help it was given stands."""
        self.__dict__.setdefault("_deferred_help", []).append((action, make))

    def format_help(self) -> str:
        for action, make in self.__dict__.pop("_deferred_help", []):
            if action is None:
                self.epilog = make()
            else:
                action.help = make().replace("%", "%%")  # argparse expands %(...)s in argument help
        return super().format_help()


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


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number ≥ 0 (a weight)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
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


def add_model_arguments(p: argparse.ArgumentParser, *, out_help: str | None = None,
                        guards_help: Callable[[], str] | None = None) -> None:
    """``--model --guards --policy --sensitivity --seed --device --out`` of the generating commands (``--out``
    is required unless ``out_help`` describes its default). ``guards_help()`` makes the help of ``--guards`` (the
    valid names, from the guard registry) when help is printed."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a local model folder (safetensors weights), a hub id (owner/name), 'default' (the embedded "
                        f"default model) or one of {sorted(TINY_MODELS)} (random test pipelines; text-to-video: "
                        f"{sorted(TINY_VIDEO_MODELS)}) (default: {DEFAULT_MODEL})")
    guards = p.add_argument("--guards", default=None, metavar="LIST",
                            help="comma-separated guard names or presets (e.g. safree,sld-strong); 'none' for no "
                                 "protection; default: the policy's guards")
    if guards_help is not None and isinstance(p, OneLineParser):
        p.defer_help(guards, guards_help)
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


def add_video_arguments(p, video_help: str) -> None:
    """``--video`` (``video_help`` says what it does in this command) and ``--frames``."""
    p.add_argument("--video", action="store_true",
                   help=f"{video_help}; --model default means the embedded default video model")
    p.add_argument("--frames", type=positive_int, default=None, metavar="N",
                   help="frames per video (num_frames; default: 8 on the default video model, else the pipeline's)")


def video_frames(args, video: bool | None = None) -> int | None:
    """For a video run (``video``, default ``args.video``): ``--model default`` becomes the embedded default video
    model and the frames per clip are resolved (``--frames``, else 8 there, else ``None``: the pipeline's default).
    For an image run ``--frames`` is a ``UsageError``; returns ``None``."""
    from .loading import DEFAULT_VIDEO_MODEL

    if not (args.video if video is None else video):
        if args.frames is not None:
            raise UsageError("--frames applies to videos; add --video")
        return None
    if args.model == DEFAULT_MODEL:
        args.model = DEFAULT_VIDEO_MODEL
    if args.frames is None and args.model == DEFAULT_VIDEO_MODEL:
        from .default_video_model import VIDEO_FRAMES

        return VIDEO_FRAMES
    return args.frames


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

#: Library notices a command hides (:func:`quiet_libraries`): known to be harmless for what safegen loads.
KNOWN_NOISE = (
    # transformers without torchvision: image processors fall back to their PIL versions, which safegen uses
    re.compile(r"requires torchvision \(not installed\); falling back to `\w+Pil`"),
    # the embedded default model's text encoder is a BertModel where a StableDiffusionPipeline names CLIPTextModel
    re.compile(r"^Expected types for text_encoder(_\d)?: .*, got .*BertModel"),
)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.search(text) for p in KNOWN_NOISE)


def quiet_libraries() -> None:
    """For the rest of the running command: hide the :data:`KNOWN_NOISE` notices of transformers and diffusers and
    their model-loading bars ("Loading weights", "Loading pipeline components"); other warnings still show.
    :func:`run_command` restores everything when the command ends, so library users are never affected. Imports
    torch (through diffusers): call it where a command is about to load models."""
    if "quiet" in _RESTORE:
        return
    from diffusers.utils import logging as dlog
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tlog

    noise = _DropKnownNoise()
    filtered: list[logging.Handler] = []
    for lib in (tlog, dlog):
        lib.get_verbosity()  # configures the library's handler if nothing has yet
        root = logging.getLogger(lib.__name__.split(".")[0])
        handlers = list(root.handlers) + (logging.getLogger().handlers if root.propagate else [])
        for handler in handlers:
            handler.addFilter(noise)
            filtered.append(handler)
    bars = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    tlog.disable_progress_bar()  # also huggingface_hub's bars
    dlog.disable_progress_bar()

    def restore() -> None:
        for handler in filtered:
            handler.removeFilter(noise)
        transformers_bars, diffusers_bars, hub_off = bars
        if transformers_bars:
            tlog.enable_progress_bar()
        if diffusers_bars:
            dlog.enable_progress_bar()
        if hub_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()

    _RESTORE["quiet"] = restore


def load_model(model: str, device) -> Any:
    """:func:`safegen.loading.load_pipeline` for a command, with the known harmless library notices hidden
    (:func:`quiet_libraries`): on the CPU a tiny model runs on one thread (extra threads only add synchronisation
    on tiny ops, and spin badly on a shared CPU); :func:`run_command` restores the thread count when the command
    ends."""
    from .loading import is_builtin, load_pipeline, resolve_device

    quiet_libraries()
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
    from .errors import TrainingDivergedError
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
    except TrainingDivergedError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        threads = _RESTORE.pop("threads", None)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        restore = _RESTORE.pop("quiet", None)
        if restore is not None:
            restore()
