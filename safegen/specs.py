"""Supported pipelines, described by their parts (a leaf of the core: the guards and the protected call read it).

A new pipeline family is one :class:`PipelineSpec` (which denoiser, which text encoders and how ``encode_prompt``
is called, the latent layout, the callback kind) plus, where its text encoder is new, an encoder adapter; no guard
is forked per pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Supported pipeline classes (matched by name through the MRO, so subclasses and community files work).
SUPPORTED_PIPELINES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionPipeline": "sd",
    "AnimateDiffPipeline": "animatediff",
    "CogVideoXPipeline": "cogvideox",
    "TextToVideoSDPipeline": "text-to-video-sd",
}


@dataclass(frozen=True)
class PipelineSpec:
    """What the guards need to know about a supported pipeline class: its *parts*, not its name.

    Attributes:
        kind: the key in :data:`SUPPORTED_PIPELINES`.
        denoiser: attribute of the denoising network (``"unet"`` or ``"transformer"``).
        encode: how the pipeline's ``encode_prompt`` is called: ``"sd"`` (one CLIP encoder), ``"sdxl"`` (two
            CLIP encoders and a pooled vector), ``"sd3"`` (two CLIP encoders side by side, zero-padded to the T5
            width and put in front of T5's tokens; the two pooled vectors joined) or ``"t5"`` (one T5 encoder,
            ``max_sequence_length``).
        per_prompt: the call argument giving outputs per prompt (``None``: always one).
        output: the output field (``"images"`` or ``"frames"``).
        layout: how latents are laid out at the step callback: ``"BCHW"`` (images), ``"BCFHW"`` (UNet video
            models) or ``"BFCHW"`` (CogVideoX).
        legacy_callback: the pipeline only has the old ``callback(step, t, latents)`` (no
            ``callback_on_step_end``, no interrupt); see :func:`_run_arguments`.
        embeds_per_item: given ``prompt_embeds`` are used as they are, not repeated ``num_images_per_prompt`` times
            (SD3 and the other DiT pipelines): conditioning the protected call passes in is repeated per image
            and the call asks for one image per (repeated) row.
    """

    kind: str
    denoiser: str = "unet"
    encode: str = "sd"
    per_prompt: str | None = "num_images_per_prompt"
    output: str = "images"
    layout: str = "BCHW"
    legacy_callback: bool = False
    embeds_per_item: bool = False

    @property
    def video(self) -> bool:
        return self.output == "frames"


PIPELINE_SPECS = {
    "sd": PipelineSpec("sd"),
    "sdxl": PipelineSpec("sdxl", encode="sdxl"),
    # SD3 / SD3.5: an MMDiT with CFG in one batch ([uncond; cond]), flow matching, image latents
    "sd3": PipelineSpec("sd3", denoiser="transformer", encode="sd3", embeds_per_item=True),
    # AnimateDiff and CogVideoX accept num_videos_per_prompt but always make one video per prompt
    "animatediff": PipelineSpec("animatediff", per_prompt=None, output="frames", layout="BCFHW"),
    "cogvideox": PipelineSpec("cogvideox", denoiser="transformer", encode="t5", per_prompt=None, output="frames",
                              layout="BFCHW"),
    "text-to-video-sd": PipelineSpec("text-to-video-sd", per_prompt=None, output="frames", layout="BCFHW",
                                     legacy_callback=True),
}


def pipeline_kind(pipe: Any) -> str:
    """The kind (a key of :data:`PIPELINE_SPECS`) of a supported pipeline; ``TypeError`` naming the supported ones
    otherwise."""
    cls = getattr(pipe, "_safegen_base", type(pipe))
    for klass in cls.__mro__:
        kind = SUPPORTED_PIPELINES.get(klass.__name__)
        if kind:
            return kind
    raise TypeError(
        f"safegen.protect does not support {type(pipe).__name__}; supported pipelines: "
        f"{', '.join(SUPPORTED_PIPELINES)} (and their subclasses)"
    )


def pipeline_spec(pipe: Any) -> PipelineSpec:
    """The :class:`PipelineSpec` of a supported pipeline (``TypeError`` otherwise)."""
    return PIPELINE_SPECS[pipeline_kind(pipe)]
