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
    "FluxPipeline": "flux",
    "QwenImagePipeline": "qwenimage",
    "Flux2KleinPipeline": "flux2klein",
    "Flux2Pipeline": "flux2",
    "StableDiffusionPipeline": "sd",
    "AnimateDiffPipeline": "animatediff",
    "CogVideoXPipeline": "cogvideox",
    "WanPipeline": "wan",
    "TextToVideoSDPipeline": "text-to-video-sd",
}


@dataclass(frozen=True)
class PipelineSpec:
    """What the guards need to know about a supported pipeline class: its *parts*, not its name.

    Attributes:
        kind: the key in :data:`SUPPORTED_PIPELINES`.
        denoiser: attribute of the denoising network (``"unet"`` or ``"transformer"``).
        extra_denoisers: attributes of further denoisers the loop may call instead (Wan 2.2's low-noise expert
            ``transformer_2``); hooks go on every one the pipeline has.
        encode: how the pipeline's ``encode_prompt`` is called: ``"sd"`` (one CLIP encoder), ``"sdxl"`` (two
            CLIP encoders and a pooled vector), ``"sd3"`` (two CLIP encoders side by side, zero-padded to the T5
            width and put in front of T5's tokens; the two pooled vectors joined), ``"flux"`` (T5 tokens and a CLIP
            pooled vector, ``prompt_2`` for T5), ``"t5"`` (one T5 encoder, ``max_sequence_length``), ``"llm"`` (a
            decoder-only language model read through the pipeline's chat template: the last hidden states after
            the template's system tokens, as long as the longest prompt of the call, with
            ``prompt_embeds_mask``: Qwen-Image) or ``"flux2"`` (a decoder-only language model's hidden states of
            several layers side by side, padded to ``max_sequence_length``, no mask: FLUX.2 [klein] on the right,
            FLUX.2 [dev]'s Mistral on the left, system prompt kept).
        per_prompt: the call argument giving outputs per prompt (``None``: always one).
        output: the output field (``"images"`` or ``"frames"``).
        layout: how latents are laid out at the step callback: ``"BCHW"`` (images), ``"BCFHW"`` (UNet video
            models), ``"BFCHW"`` (CogVideoX) or ``"packed"`` (FLUX, Qwen-Image, FLUX.2: 2×2 patches as tokens,
            (B, H/2·W/2, 4C); :func:`safegen.outputs.latent_unpacker` turns them back into images).
        packed_output: with ``output_type="latent"`` the pipeline returns its latents packed as it stepped them
            (FLUX.1, Qwen-Image, FLUX.2 [dev]); ``False``: as latent images (FLUX.2 [klein] unpacks and
            unpatchifies them).
        cfg: how the call guides: ``"batch"`` (``guidance_scale`` > 1: ``[uncond; cond]`` in one denoiser call),
            ``"separate"`` (``guidance_scale`` > 1: the conditional call, then the unconditional one, each step:
            Wan) or ``"true"`` (a guidance-distilled model: ``true_cfg_scale`` > 1 with a negative prompt runs a
            second, separate call per step; otherwise there is no unconditional branch: FLUX) or ``"none"``
            (guidance-distilled with no negative branch at all: FLUX.2 [dev]).
        time: how a video pipeline's decoder turns latent frames into frames: ``"frame"`` (one each: UNet video
            models), ``"cogvideox"`` (CogVideoX's causal VAE, chunks of two latent frames) or ``"causal"`` (the
            first latent frame gives one frame, every later one ``vae_scale_factor_temporal``: Wan).
        text_mask: the pipeline runs its text encoder with the attention mask (Wan's UMT5, Qwen-Image's LLM;
            CogVideoX, SD3 and FLUX run T5 without one).
        legacy_callback: the pipeline only has the old ``callback(step, t, latents)`` (no
            ``callback_on_step_end``, no interrupt); see :func:`_run_arguments`.
        removes: strings the pipeline deletes from every prompt before encoding it (FLUX.2 [dev]: ``[IMG]``); the
            protected call deletes them first, so that guards read the text the model reads.
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
    cfg: str = "batch"
    extra_denoisers: tuple = ()
    time: str = "frame"
    text_mask: bool = False
    packed_output: bool = True
    removes: tuple = ()

    @property
    def cfg_in_batch(self) -> bool:
        """Whether a guided call runs ``[uncond; cond]`` as one batch of the denoiser (so guards that add rows or
        read the halves work on one call)."""
        return self.cfg == "batch"

    @property
    def denoisers(self) -> tuple:
        """Attributes of every denoiser the loop may call."""
        return (self.denoiser, *self.extra_denoisers)

    @property
    def video(self) -> bool:
        return self.output == "frames"


PIPELINE_SPECS = {
    "sd": PipelineSpec("sd"),
    "sdxl": PipelineSpec("sdxl", encode="sdxl"),
    # SD3 / SD3.5: an MMDiT with CFG in one batch ([uncond; cond]), flow matching, image latents
    "sd3": PipelineSpec("sd3", denoiser="transformer", encode="sd3", embeds_per_item=True),
    # FLUX.1: guidance-distilled (guidance_scale is an input of the transformer, not CFG), packed latents
    "flux": PipelineSpec("flux", denoiser="transformer", encode="flux", layout="packed", embeds_per_item=True,
                         cfg="true"),
    # Qwen-Image: an LLM's hidden states (with their mask), true CFG as a separate call, packed latents
    "qwenimage": PipelineSpec("qwenimage", denoiser="transformer", encode="llm", layout="packed",
                              embeds_per_item=True, cfg="true", text_mask=True),
    # FLUX.2 [klein]: a Qwen3 LLM's layers 9/18/27 side by side, CFG as separate calls (none when step-distilled),
    # packed 2×2-patchified latents that the pipeline unpacks itself before returning them
    "flux2klein": PipelineSpec("flux2klein", denoiser="transformer", encode="flux2", layout="packed",
                               embeds_per_item=True, cfg="separate", packed_output=False),
    # FLUX.2 [dev]: a Mistral 3 LLM's layers 10/20/30 side by side (its system prompt included, padded on the left
    # to max_sequence_length), guidance-distilled with no unconditional branch, packed latents (returned packed)
    "flux2": PipelineSpec("flux2", denoiser="transformer", encode="flux2", layout="packed", embeds_per_item=True,
                          cfg="none", removes=("[IMG]",)),
    # AnimateDiff and CogVideoX accept num_videos_per_prompt but always make one video per prompt
    "animatediff": PipelineSpec("animatediff", per_prompt=None, output="frames", layout="BCFHW"),
    "cogvideox": PipelineSpec("cogvideox", denoiser="transformer", encode="t5", per_prompt=None, output="frames",
                              layout="BFCHW", time="cogvideox"),
    # Wan 2.1 / 2.2: UMT5 (with its mask), cond and uncond in separate calls, two experts in 2.2, causal video VAE
    "wan": PipelineSpec("wan", denoiser="transformer", encode="t5", per_prompt="num_videos_per_prompt",
                        output="frames", layout="BCFHW", embeds_per_item=True, cfg="separate",
                        extra_denoisers=("transformer_2",), time="causal", text_mask=True),
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
