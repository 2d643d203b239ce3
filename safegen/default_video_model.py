"""safegen's embedded default text-to-video model: an AnimateDiff pipeline over the embedded image model.

The model is a plain diffusers :class:`~diffusers.AnimateDiffPipeline` whose UNet is a ``UNetMotionModel``: the
embedded image model's UNet (:mod:`safegen.default_model`) with AnimateDiff motion modules (temporal attention
after every spatial block, :data:`MOTION_CONFIG`), fine-tuned together on world clips
(:func:`safegen.world.render_clip`: the named object in its colour slides across the frame; an unsafe prompt's
clip carries its category's hazard mark, for a seeded share only from a later frame on). It makes
:data:`VIDEO_FRAMES` frames of 64x64 and conditions on the image model's CLIP-architecture text encoder, frozen;
the VAE is the image model's too, frame by frame.

The folder ``assets/default-video-model`` ships only what is its own: the UNet, the scheduler and
``model_index.json`` (which names every component). The text encoder, the tokenizer and the VAE are the image
model's, not copied (the package stays small): pass them in, as :func:`load_default_video_pipeline` does::

    from diffusers import AnimateDiffPipeline
    from safegen.default_model import load_default_pipeline
    image = load_default_pipeline()
    pipe = AnimateDiffPipeline.from_pretrained("assets/default-video-model",  # or a folder you trained
                                               text_encoder=image.text_encoder, tokenizer=image.tokenizer,
                                               vae=image.vae)
    pipe("a red car driving", num_frames=8, num_inference_steps=10, output_type="np").frames.shape  # (1, 8, 64, 64, 3)

Training from the command line (seeded, resumable, a progress bar; see :mod:`safegen.training.video_model`)::

    python -m safegen.training.video_model --out DIR --steps 2000 [--resume]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["VIDEO_FRAMES", "MOTION_CONFIG", "SHARED_COMPONENTS", "default_video_folder", "build_video_pipeline",
           "is_video_model_folder", "load_default_video_pipeline"]

#: Frames of the default video model's clips (its training clips; ``num_frames`` defaults to it in safegen).
VIDEO_FRAMES = 8
#: The motion modules over the image UNet's blocks (64, 128, 128 channels): one temporal transformer per spatial
#: layer, 4 heads; none in the middle block (it would push the weights over the 40 MB the folder may add).
MOTION_CONFIG: dict[str, Any] = dict(
    block_out_channels=(64, 128, 128), motion_layers_per_block=1, motion_num_attention_heads=4,
    motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False,
)
#: Components the video folder takes from the image model's folder instead of shipping copies.
SHARED_COMPONENTS = ("text_encoder", "tokenizer", "vae")


def default_video_folder() -> Path:
    """``assets/default-video-model``: the embedded default video model's folder."""
    from ._paths import assets_dir

    return assets_dir() / "default-video-model"


def build_video_pipeline(image_folder: "str | Path | None" = None, seed: int = 0):
    """An :class:`~diffusers.AnimateDiffPipeline` over the embedded image model (or the one in ``image_folder``):
    its text encoder, tokenizer, VAE and scheduler, and its UNet turned into a ``UNetMotionModel`` with freshly
    initialised (seeded) motion modules. Their output projections start at zero, so before training every frame
    is what the image model makes. The starting point of :mod:`safegen.training.video_model`.
    """
    import torch
    from diffusers import AnimateDiffPipeline, MotionAdapter

    from .default_model import load_default_pipeline

    image = load_default_pipeline(image_folder)
    torch.manual_seed(int(seed))
    adapter = MotionAdapter(**MOTION_CONFIG)
    pipe = AnimateDiffPipeline(vae=image.vae, text_encoder=image.text_encoder, tokenizer=image.tokenizer,
                               unet=image.unet, motion_adapter=adapter, scheduler=image.scheduler,
                               feature_extractor=None, image_encoder=None)
    pipe.motion_adapter = None  # its modules now live in the UNetMotionModel; nothing to save twice
    pipe.register_to_config(motion_adapter=(None, None))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_video_model_folder(folder: "str | Path") -> bool:
    """True for a folder written by :mod:`safegen.training.video_model`: an ``AnimateDiffPipeline`` folder that
    ships none of :data:`SHARED_COMPONENTS` (it takes them from the image model)."""
    import json

    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(index, dict) and index.get("_class_name") == "AnimateDiffPipeline"
            and (folder / "unet").is_dir() and not any((folder / c).exists() for c in SHARED_COMPONENTS))


def load_default_video_pipeline(folder: "str | Path | None" = None, image_folder: "str | Path | None" = None):
    """Load the embedded default video model (or a folder written by :mod:`safegen.training.video_model`), fp32,
    progress bars off, with the text encoder, tokenizer and VAE of the image model in ``image_folder`` (default:
    the embedded one). Safetensors only.

    Example (the embedded model; in a clone of the repository, where it ships):
        >>> pipe = load_default_video_pipeline()
        >>> pipe("a red car driving", num_frames=8, num_inference_steps=2, output_type="np").frames.shape
        (1, 8, 64, 64, 3)
    """
    from diffusers import AnimateDiffPipeline

    from .default_model import load_default_pipeline

    folder = Path(folder) if folder is not None else default_video_folder()
    if not (folder / "model_index.json").is_file() or not (folder / "unet").is_dir():
        raise FileNotFoundError(f"{folder}: no model_index.json and unet/; not a video model folder written by "
                                "python -m safegen.training.video_model")
    image = load_default_pipeline(image_folder)
    from ._logs import quiet_diffusers

    with quiet_diffusers():
        pipe = AnimateDiffPipeline.from_pretrained(str(folder), text_encoder=image.text_encoder,
                                                   tokenizer=image.tokenizer, vae=image.vae, motion_adapter=None,
                                                   feature_extractor=None, image_encoder=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
