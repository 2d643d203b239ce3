"""What a protected call returns: the geometry of its items (image size, latent and decoded frames), the policy's
placeholder for blocked items (never a black square) and the assembly of the pipeline's output with them, in the
pipeline's own output class and type (``pil``, ``np``, ``pt``, ``latent``; clips for video pipelines).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .specs import PIPELINE_SPECS  # noqa: F401  (the call's spec lives on it)

if TYPE_CHECKING:  # pragma: no cover
    from .protection import Call

def _image_size(call: Call) -> tuple[int, int]:
    """(height, width) in pixels of the call's images or frames."""
    pipe, a = call.pipe, call.args
    if call.spec.layout == "BFCHW":  # CogVideoX: sizes in latent pixels on the transformer's config
        cfg, f = call.denoiser.config, pipe.vae_scale_factor_spatial
        return int(a.get("height") or cfg.sample_height * f), int(a.get("width") or cfg.sample_width * f)
    h, w = call.arg("height"), call.arg("width")  # given, else the call's own default (Wan: 480×832)
    if h is None or w is None:
        default = (getattr(pipe, "default_sample_size", None) or call.denoiser.config.sample_size) * _spatial(pipe)
        h, w = h or default, w or default
    return int(h), int(w)


def _spatial(pipe: Any) -> int:
    """How much the pipeline's VAE shrinks height and width."""
    return int(getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor)


def latent_unpacker(pipe: Any, layout: str, height: int | None = None, width: int | None = None):
    """For a pipeline whose scheduler steps on packed latents (``layout="packed"``: FLUX's, Qwen-Image's and
    FLUX.2's 2×2 patches as tokens), the function that turns them into (B, C, H, W) latent images with the
    pipeline's own ``_unpack_latents`` (FLUX.2: its ``_unpatchify_latents`` of the row-major token grid), for a
    call of ``height`` × ``width`` pixels (default: the pipeline's default size); ``None`` for any other layout.

    Example:
        >>> import torch
        >>> from safegen.testing import tiny_flux_pipeline
        >>> pipe = tiny_flux_pipeline()
        >>> unpack = latent_unpacker(pipe, "packed", 32, 32)
        >>> unpack(torch.zeros(2, 64, 16)).shape  # 8×8 tokens of 2×2 patches of 4 channels
        torch.Size([2, 4, 16, 16])
    """
    if layout != "packed":
        return None
    f = pipe.vae_scale_factor
    h = int(height or pipe.default_sample_size * f)
    w = int(width or pipe.default_sample_size * f)

    if hasattr(pipe, "_unpatchify_latents"):  # FLUX.2: row-major tokens of 2×2-patchified latents
        gh, gw = h // (2 * f), w // (2 * f)
        return lambda x: pipe._unpatchify_latents(x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw))

    def unpack(x):
        out = pipe._unpack_latents(x, h, w, f)
        return out[:, :, 0] if out.ndim == 5 else out  # Qwen-Image's video VAE: one frame (B, C, 1, H, W)

    return unpack


def latent_frames(call: Call) -> int:
    """Frames of a video item's latents (the denoiser's time axis; for CogVideoX without the padding frames a
    temporal patch size adds, which are dropped before decoding)."""
    if call.spec.time == "cogvideox":
        n = call.args.get("num_frames") or call.denoiser.config.sample_frames
        return (int(n) - 1) // call.pipe.vae_scale_factor_temporal + 1
    if call.spec.time == "causal":  # Wan rounds num_frames to r·k + 1 first, as the pipeline does
        n, r = int(call.arg("num_frames")), call.pipe.vae_scale_factor_temporal
        n = max(n // r * r + 1 if n % r != 1 else n, 1)
        return (n - 1) // r + 1
    return int(call.arg("num_frames"))


def decoded_frames(call: Call, n_latent: int | None = None) -> int:
    """Frames the pipeline's decoder makes of ``n_latent`` latent frames (default: the call's).

    UNet video pipelines decode frame by frame. CogVideoX's causal 3-D VAE decodes latent frames in chunks of two
    (the odd one out joins the first chunk); each chunk is upsampled in time by 4, except the first frame of an
    odd-length chunk: so L latent frames give 4L frames when L is even and 4(L − 1) + 1 when it is odd (13 → 49).
    Wan's causal VAE makes one frame of the first latent frame and 4 of every later one: 4(L − 1) + 1 (21 → 81).
    """
    n = latent_frames(call) if n_latent is None else int(n_latent)
    if call.spec.time == "cogvideox":
        r = call.pipe.vae_scale_factor_temporal
        return n * r if n % 2 == 0 else (n - 1) * r + 1
    if call.spec.time == "causal":
        return (n - 1) * call.pipe.vae_scale_factor_temporal + 1
    return n


def _decoded_shape(call: Call, latents: torch.Tensor) -> tuple[int, ...]:
    """Shape of what the video pipeline's decoder returns for ``latents``: (B, 3, F, H, W)."""
    if call.spec.layout == "BFCHW":
        b, f, _, h, w = latents.shape
    else:
        b, _, f, h, w = latents.shape
    s = _spatial(call.pipe)
    return (b, call.pipe.vae.config.out_channels, decoded_frames(call, f), h * s, w * s)


def _latent_shape(call: Call) -> tuple[int, ...]:
    h, w = _image_size(call)
    if call.spec.layout == "BFCHW":
        f = call.pipe.vae_scale_factor_spatial
        return (latent_frames(call), call.denoiser.config.in_channels, h // f, w // f)
    c, f = call.denoiser.config.in_channels, _spatial(call.pipe)
    if call.spec.layout == "packed" and not call.spec.packed_output:  # FLUX.2: latent images
        return (c // 4, h // f, w // f)
    if call.spec.layout == "packed":  # FLUX returns its latents packed: one token per 2×2 patch
        return ((h // (2 * f)) * (w // (2 * f)), c)
    if call.spec.video:
        return (c, latent_frames(call), h // f, w // f)
    return (c, h // f, w // f)


def _placeholder(call: Call, output_type: str, like: Any) -> Any:
    """The policy's placeholder for a blocked item, in the output's type (never a black square).

    ``like`` is an item the pipeline produced in this call (its shape is copied), or ``None``. A video item is a
    clip of flat frames: ``np`` (F, H, W, 3), ``pt`` (F, 3, H, W), ``pil`` a list of F images."""
    style = call.policy.placeholder
    gray = 0.5
    if output_type == "latent":
        return torch.zeros(_latent_shape(call)) if like is None else torch.zeros_like(like)
    h, w = _image_size(call)
    video = call.spec.video
    frames = decoded_frames(call) if video else 1
    if output_type == "pil":
        if style == "none":
            return None
        from PIL import Image

        if isinstance(like, list) and like:  # a clip the pipeline made: same frame count and size
            frames, (w, h) = len(like), like[0].size
        elif like is not None and hasattr(like, "size") and not video:
            w, h = like.size
        if video:
            return [Image.new("RGB", (w, h), (128, 128, 128)) for _ in range(frames)]
        return Image.new("RGB", (w, h), (128, 128, 128))
    if output_type == "pt":
        if torch.is_tensor(like):
            return torch.full_like(like, gray)
        return torch.full((frames, 3, h, w) if video else (3, h, w), gray)
    if isinstance(like, np.ndarray):
        return np.full_like(like, gray)
    return np.full((frames, h, w, 3) if video else (h, w, 3), gray, dtype=np.float32)


_OUTPUT_CLASSES = {
    "sd": ("diffusers.pipelines.stable_diffusion.pipeline_output", "StableDiffusionPipelineOutput"),
    "sdxl": ("diffusers.pipelines.stable_diffusion_xl.pipeline_output", "StableDiffusionXLPipelineOutput"),
    "sd3": ("diffusers.pipelines.stable_diffusion_3.pipeline_output", "StableDiffusion3PipelineOutput"),
    "flux": ("diffusers.pipelines.flux.pipeline_output", "FluxPipelineOutput"),
    "qwenimage": ("diffusers.pipelines.qwenimage.pipeline_output", "QwenImagePipelineOutput"),
    "flux2klein": ("diffusers.pipelines.flux2.pipeline_output", "Flux2PipelineOutput"),
    "flux2": ("diffusers.pipelines.flux2.pipeline_output", "Flux2PipelineOutput"),
    "animatediff": ("diffusers.pipelines.animatediff.pipeline_output", "AnimateDiffPipelineOutput"),
    "cogvideox": ("diffusers.pipelines.cogvideo.pipeline_output", "CogVideoXPipelineOutput"),
    "wan": ("diffusers.pipelines.wan.pipeline_output", "WanPipelineOutput"),
    "text-to-video-sd": ("diffusers.pipelines.deprecated.text_to_video_synthesis|"
                         "diffusers.pipelines.text_to_video_synthesis", "TextToVideoSDPipelineOutput"),
}


def _output_class(call: Call):
    import importlib

    modules, name = _OUTPUT_CLASSES[call.kind]
    for module in modules.split("|"):  # where diffusers keeps it depends on its version
        try:
            cls = getattr(importlib.import_module(module), name)
            break
        except (ImportError, AttributeError):
            continue
    else:
        raise ImportError(f"diffusers has no {name} in {modules}")
    return cls, ({"nsfw_content_detected": None} if call.kind == "sd" else {})


def _assemble(call: Call, out: Any, keep: list[int], output_type: str) -> Any:
    n_items = call.n_items
    field_name = call.spec.output
    kept_items = [it for p in keep for it in call.items_of(p)]
    if out is not None and len(kept_items) == n_items and not call.stopped_items:
        return out
    produced = getattr(out, field_name) if out is not None else []
    like = produced[0] if len(produced) else None
    slots: list[Any] = [None] * n_items
    if out is not None:  # (None: the call ended early, every kept item was stopped)
        for j, item in enumerate(kept_items):
            slots[item] = produced[j]
    for item in range(n_items):
        if item not in kept_items or item in call.stopped_items:
            slots[item] = _placeholder(call, output_type, like)
    if output_type in ("np", None) or isinstance(produced, np.ndarray):
        images: Any = np.stack(slots)
    elif output_type in ("pt", "latent") or torch.is_tensor(produced):
        images = torch.stack(slots)
    else:
        images = slots
    if out is None:
        cls, extra = _output_class(call)
        return cls(**{field_name: images}, **extra)
    setattr(out, field_name, images)
    nsfw = getattr(out, "nsfw_content_detected", None)
    if isinstance(nsfw, list):
        full = [None] * n_items
        for j, item in enumerate(kept_items):
            full[item] = nsfw[j]
        out.nsfw_content_detected = full
    return out


def put_item(out: Any, field_name: str, i: int, value: Any) -> None:
    """Replace item ``i`` of ``out.<field_name>`` (an array, a tensor or a list) by ``value``, in place."""
    images = getattr(out, field_name)
    if isinstance(images, np.ndarray):
        images[i] = np.asarray(value, dtype=images.dtype)
    elif torch.is_tensor(images):
        images[i] = value.to(images.dtype) if torch.is_tensor(value) else torch.as_tensor(value, dtype=images.dtype)
    else:
        images = list(images)
        images[i] = value
        setattr(out, field_name, images)
