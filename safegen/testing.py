"""Tiny random diffusers pipelines built offline, for tests, benchmarks and the smoke-run.

Nothing here downloads: the CLIP tokenizer is a small byte-level BPE vocabulary written on the fly (every
string still tokenises; listed words become single tokens), and every module is built from a config with
seeded random weights.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

# Words that get their own token in the tiny vocabulary (the rest falls back to bytes).
_WORDS = (
    "a an the of on in with and at to is photo picture painting portrait image red blue green yellow black white "
    "orange purple pink brown gray cat dog bus car tree house man woman person people child horse bird boat "
    "train street city field beach sky flower table kitchen room plate pizza food water mountain sunset "
    "blood gore violence violent gun guns weapon knife kill killing murder war fight attack corpse dead "
    "nude nudity naked sex sexual porn erotic hate racist slur harassment bully bullying suicide self harm "
    "cutting drugs drug cocaine illegal theft robbery shocking horror disgusting vomit"
).split()


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@lru_cache(maxsize=None)
def tiny_clip_vocab(words: tuple[str, ...] = tuple(_WORDS)) -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` of a small CLIP-style byte-level BPE vocabulary, built in memory (no files).

    Every listed word becomes one token; any other string still tokenises (down to bytes).
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    seen: set[str] = set()

    def add_chain(parts: list[str]) -> None:  # merges that join ``parts`` left to right into one token
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))

    for w in words:
        add_chain(list(w[:-1]) + [w[-1] + "</w>"])
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # BPE applies merges by rank across words, so a word can still end up split; append merges (lowest
    # priority) that join its final pieces until every listed word is one token
    for _ in range(4):
        tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], model_max_length=77)
        split = [p for p in (tok.tokenize(w) for w in words) if len(p) > 1]
        if not split:
            break
        for parts in split:
            add_chain(parts)
    return vocab, merges


def write_tiny_clip_tokenizer_files(folder: str | Path, words=_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of :func:`tiny_clip_vocab` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_clip_vocab(tuple(words))
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer over the tiny vocabulary, ``model_max_length=77``."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], model_max_length=77,
                         pad_token=pad_token)


def _clip_text_model(tokenizer, hidden: int = 32, projection_dim: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=3, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if projection_dim else CLIPTextModel(cfg)
    return model.eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
    ).eval()


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """A tiny random ``StableDiffusionPipeline`` (SD 1.x layout; ``prediction_type="v_prediction"`` for 2.x).

    Images are 32×32 by default (latents 16×16); one 2-step call takes well under a second on a CPU.

    Example:
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> pipe("a red cat", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tok = tiny_clip_tokenizer()
    te = _clip_text_model(tok, 32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionPipeline(vae=_vae(seed), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random ``StableDiffusionXLPipeline`` with both text encoders (32-d each) and a pooled projection."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok = tiny_clip_tokenizer()
    tok2 = tiny_clip_tokenizer(pad_token="!")
    te = _clip_text_model(tok, 32, seed=seed)
    te2 = _clip_text_model(tok2, 32, projection_dim=32, seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionXLPipeline(vae=_vae(seed), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- video pipelines
#: Special pieces of the tiny T5 vocabulary, in T5's order (pad 0, eos 1, unk 2), and its sentinel count.
_T5_SPECIAL = ("<pad>", "</s>", "<unk>")
_T5_SENTINELS = 8


def tiny_t5_tokenizer(max_length: int = 226):
    """A T5 tokenizer (Unigram, ``▁``-prefixed pieces, no BOS, ``</s>`` appended) over the tiny vocabulary.

    Listed words are single pieces; any other text still tokenises (single characters). It has the
    ``<extra_id_*>`` sentinels of a real T5 vocabulary. Built in memory from a pieces list, nothing downloaded.

    Example:
        >>> tok = tiny_t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a red cat")["input_ids"])
        ['▁a', '▁red', '▁cat', '</s>']
    """
    import string

    from transformers import T5Tokenizer

    pieces: dict[str, float] = {p: 0.0 for p in _T5_SPECIAL}
    pieces["▁"] = -2.0
    for w in _WORDS:
        pieces.setdefault("▁" + w, -1.0)
    for c in string.ascii_letters + string.digits + string.punctuation:  # fallback: one piece per character
        pieces.setdefault(c, -5.0)
        pieces.setdefault("▁" + c, -5.5)
    vocab = list(pieces.items()) + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(_T5_SENTINELS))]
    return T5Tokenizer(vocab=vocab, extra_ids=_T5_SENTINELS, model_max_length=max_length)


def _t5_encoder(tokenizer, hidden: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval()


def tiny_animatediff_pipeline(seed: int = 0):
    """A tiny random ``AnimateDiffPipeline``: the tiny SD UNet (32-d CLIP) with a motion adapter.

    Frames are 32×32 (latents 16×16); pass a small ``num_frames`` (the pipeline's default is 16).

    Example:
        >>> pipe = tiny_animatediff_pipeline()
        >>> pipe("a red cat", num_frames=2, num_inference_steps=2, output_type="np").frames.shape
        (1, 2, 32, 32, 3)
    """
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

    tok = tiny_clip_tokenizer()
    te = _clip_text_model(tok, 32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=32,
                            motion_num_attention_heads=4, motion_max_seq_length=32).eval()
    pipe = AnimateDiffPipeline(vae=_vae(seed), text_encoder=te, tokenizer=tok, unet=unet, motion_adapter=adapter,
                               scheduler=_scheduler(), feature_extractor=None, image_encoder=None)
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_text_to_video_pipeline(seed: int = 0):
    """A tiny random ``TextToVideoSDPipeline`` (the ZeroScope / ModelScope layout: a 3-D UNet, CLIP).

    Frames are 32×32 (latents 16×16); pass a small ``num_frames`` (the pipeline's default is 16).

    Example:
        >>> pipe = tiny_text_to_video_pipeline()
        >>> pipe("a red cat", num_frames=2, num_inference_steps=2, output_type="np").frames.shape
        (1, 2, 32, 32, 3)
    """
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    tok = tiny_clip_tokenizer()
    te = _clip_text_model(tok, 32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    ).eval()
    pipe = TextToVideoSDPipeline(vae=_vae(seed), text_encoder=te, tokenizer=tok, unet=unet, scheduler=_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogvideox_pipeline(seed: int = 0, num_layers: int = 1, num_attention_heads: int = 2):
    """A tiny random ``CogVideoXPipeline``: a one-layer 3-D transformer (heads of 8 channels), a T5 encoder (32-d)
    and a CogVideoX VAE. ``num_layers`` and ``num_attention_heads`` make the transformer bigger (benchmarks).

    Defaults: 32×32 px, 9 frames (3 latent frames of 8×8: the VAE compresses space by 4 and time by 4);
    v-prediction DDIM with zero-terminal-SNR betas and trailing timesteps, as CogVideoX ships.

    Example:
        >>> pipe = tiny_cogvideox_pipeline()
        >>> pipe("a red cat", num_inference_steps=2, output_type="np").frames.shape
        (1, 9, 32, 32, 3)
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, \
        CogVideoXTransformer3DModel

    tok = tiny_t5_tokenizer()
    te = _t5_encoder(tok, 32, seed=seed)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=num_attention_heads, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=32, num_layers=num_layers, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=226,
    ).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
    ).eval()
    sched = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                   prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   timestep_spacing="trailing", snr_shift_scale=1.0)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- transformer (DiT / MMDiT) image pipelines
def tiny_sd3_pipeline(seed: int = 0, num_layers: int = 1, t5: bool = True):
    """A tiny random ``StableDiffusion3Pipeline``: CLIP-L and OpenCLIP-bigG stand-ins (32-d each, with projections),
    a T5 encoder (64-d: the two CLIP halves, 64 channels together, are zero-padded to its width and put in front of
    its tokens, as SD3 does), a one-layer MMDiT (heads of 8 channels, patch 1) and a flow-matching Euler scheduler.
    ``t5=False`` leaves the third encoder out (SD3 then conditions on zeros in its place).

    Images are 32×32 (latents 16×16, 4 channels); one 2-step call takes well under a second on a CPU.

    Example:
        >>> pipe = tiny_sd3_pipeline()
        >>> pipe("a red cat", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")
    te = _clip_text_model(tok, 32, projection_dim=32, seed=seed)
    te2 = _clip_text_model(tok2, 32, projection_dim=32, seed=seed + 1)
    tok3 = tiny_t5_tokenizer(max_length=256) if t5 else None
    te3 = _t5_encoder(tok3, 64, seed=seed + 2) if t5 else None
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    ).eval()
    vae = _vae(seed)
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5035)  # SD3's latent normalisation constants
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                                    text_encoder_3=te3, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe



def tiny_flux_pipeline(seed: int = 0, num_layers: int = 1):
    """A tiny random ``FluxPipeline`` (FLUX.1 layout): a CLIP text encoder (32-d) whose pooled output conditions the
    timestep embedding, a T5 encoder (32-d) whose tokens the transformer attends to, a guidance-distilled
    transformer (one double and one single block, heads of 16 channels) over 2×2-packed latents, and a
    flow-matching Euler scheduler. ``default_sample_size`` is set to 16 so that a call without ``height`` and
    ``width`` makes 32×32 images (a real FLUX pipeline defaults to 1024×1024).

    Example:
        >>> pipe = tiny_flux_pipeline()
        >>> pipe("a red cat", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = tiny_clip_tokenizer()
    te = _clip_text_model(tok, 32, seed=seed)
    tok2 = tiny_t5_tokenizer(max_length=512)
    te2 = _t5_encoder(tok2, 32, seed=seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    vae = _vae(seed)
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's latent normalisation constants
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                        tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False):
    """A tiny random ``WanPipeline`` (Wan 2.1 text-to-video layout): a UMT5 encoder (32-d), a one-layer video DiT
    (patches of 1×2×2, heads of 8 channels) and a Wan VAE (space ÷ 8, time ÷ 4, 4 latent channels), flow matching.
    ``two_experts=True`` gives the Wan 2.2 layout: a second transformer (the low-noise expert) that takes over
    below the boundary timestep (``boundary_ratio=0.875``).

    Pass small sizes: ``height=32, width=32, num_frames=5`` (2 latent frames of 4×4) takes well under a second.

    Example:
        >>> pipe = tiny_wan_pipeline()
        >>> pipe("a red cat", height=32, width=32, num_frames=5, num_inference_steps=2, output_type="np").frames.shape
        (1, 5, 32, 32, 3)
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = tiny_t5_tokenizer(max_length=512)
    cfg = UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    te = UMT5EncoderModel(cfg).eval()

    def transformer(s):
        torch.manual_seed(s)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1,
                                     rope_max_seq_len=32).eval()

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer(seed), transformer_2=transformer(seed + 1) if two_experts else None,
                       boundary_ratio=0.875 if two_experts else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------- LLM text encoders (Qwen-Image)
#: Words of the Qwen-Image prompt template, so that its system part is as many tokens as with the real vocabulary.
_TEMPLATE_WORDS = ("system user assistant Describe describe by detailing color shape size texture quantity text "
                   "spatial relationships objects background").split()
_QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
#: A Qwen3-style chat template (written for these tests): each message between ``<|im_start|>`` and
#: ``<|im_end|>``; the generation prompt opens the assistant's turn, with an empty thinking block when
#: ``enable_thinking=False`` (as FLUX.2 [klein] asks for).
_QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif -%}{%- endif -%}")


@lru_cache(maxsize=None)
def _qwen_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """``(vocab, merges)`` of a small Qwen2-style byte-level BPE vocabulary (``Ġ`` marks a leading space)."""
    from transformers import Qwen2Tokenizer

    vocab = {t: i for i, t in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add_chain(parts: list[str]) -> None:
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))

    words = list(_WORDS) + _TEMPLATE_WORDS
    for w in words:
        add_chain(list(w))
        add_chain(["Ġ", *w])
    for special in _QWEN_SPECIAL:
        vocab.setdefault(special, len(vocab))
    for _ in range(6):  # merges apply by rank across words: join what is still split (as for the CLIP vocabulary)
        tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges))
        split = [p for w in words for p in (tok.tokenize(w), tok.tokenize(" " + w)) if len(p) > 1]
        if not split:
            break
        for parts in split:
            add_chain(parts)
    return vocab, tuple(merges)


def tiny_qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE, ``<|im_start|>`` / ``<|im_end|>`` chat tokens, ``<think>``, a Qwen3-style
    chat template, pads on the right with ``<|endoftext|>``) over the tiny vocabulary, built in memory. Qwen-Image's
    prompt template tokenises to the same 34 system tokens and 5 closing tokens as with the real vocabulary, so
    the pipeline's ``prompt_template_encode_start_idx`` holds as it is.

    Example:
        >>> tok = tiny_qwen_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a red cat<|im_end|>")["input_ids"])
        ['a', 'Ġred', 'Ġcat', '<|im_end|>']
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=32768)
    tok.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL[1:])})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def qwen_vl_text_encoder(tok, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                         mrope: tuple[int, int, int], seed: int = 0):
    """A ``Qwen2_5_VLForConditionalGeneration`` with seeded random weights over ``tok``'s vocabulary: the language
    model at the given shape (``mrope``: the rotary sections, summing to half a head), and a one-block vision tower
    (text-to-image pipelines never run it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tok)
    ids = {"bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
           "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": tok.pad_token_id}
    cfg = Qwen2_5_VLConfig(
        text_config={**ids, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": n,
                     "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                     "rope_scaling": {"mrope_section": list(mrope), "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        hidden_size=hidden, vocab_size=n, vision_start_token_id=n + 1, vision_end_token_id=n + 2,
        vision_token_id=n + 3, image_token_id=n + 4, video_token_id=n + 5, **ids)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwenimage_pipeline(seed: int = 0, num_layers: int = 1):
    """A tiny random ``QwenImagePipeline``: a Qwen2.5-VL text encoder (16-d, two layers; its last hidden states,
    after the prompt template's system tokens, are the conditioning), a one-block MMDiT over 2×2-packed latents
    and a Qwen-Image VAE (4 latent channels, space ÷ 4). Classifier-free guidance is "true" CFG, as in the real
    model: a separate negative branch when ``negative_prompt`` is given with ``true_cfg_scale`` > 1.
    ``default_sample_size`` is set to 8 so that a call without ``height`` and ``width`` makes 32×32 images.

    Example:
        >>> pipe = tiny_qwenimage_pipeline()
        >>> pipe("a red cat", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    tok = tiny_qwen_tokenizer()
    te = qwen_vl_text_encoder(tok, hidden=16, intermediate=16, layers=2, heads=2, kv_heads=2, mrope=(1, 1, 2),
                              seed=seed)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                             transformer=transformer)
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Mistral's instruction-format chat template, as FLUX.2 [dev]'s processor renders it for one system and one user
#: message (content as a string or as ``[{"type": "text", "text": ...}]``), in Jinja of our own.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ '<s>' }}{%- for m in messages -%}"
    "{%- set t = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') -%}"
    "{%- if m['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' + t + '[/SYSTEM_PROMPT]' }}"
    "{%- elif m['role'] == 'user' -%}{{ '[INST]' + t + '[/INST]' }}{%- else -%}{{ t + '</s>' }}{%- endif -%}"
    "{%- endfor -%}")


def tiny_mistral_tokenizer():
    """A tokenizer standing in for FLUX.2 [dev]'s Mistral 3 one: the tiny byte-level BPE vocabulary of
    :func:`tiny_qwen_tokenizer` plus Mistral's ``<s>``, ``[SYSTEM_PROMPT]``, ``[/SYSTEM_PROMPT]``, ``[INST]`` and
    ``[/INST]`` special tokens and its instruction-format chat template, padding on the *left* as Mistral's does.

    Example:
        >>> tok = tiny_mistral_tokenizer()
        >>> tok.apply_chat_template([{"role": "user", "content": "a red cat"}], tokenize=False)
        '<s>[INST]a red cat[/INST]'
        >>> tok.padding_side
        'left'
    """
    tok = tiny_qwen_tokenizer()
    tok.add_tokens(["<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]"], special_tokens=True)
    tok.chat_template = _MISTRAL_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def _flux2_pipeline(cls, text_encoder, tokenizer, *, seed: int, num_layers: int, guidance_embeds: bool):
    """A FLUX.2 pipeline of class ``cls`` around a tiny text encoder: a FLUX.2 transformer (``num_layers`` double
    and single blocks, 48-wide text input: three 16-d layers side by side) and a FLUX.2 VAE (4 latent channels),
    seeded; 32×32 images by default."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=num_layers,
                                          num_single_layers=num_layers, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=48, timestep_guidance_channels=256,
                                          axes_dims_rope=[4, 4, 4, 4], guidance_embeds=guidance_embeds).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                             layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
               transformer=transformer)
    pipe.default_sample_size = 16
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux2_pipeline(seed: int = 0, num_layers: int = 1):
    """A tiny random ``Flux2Pipeline`` (FLUX.2 [dev] layout): a ``Mistral3ForConditionalGeneration`` (a 16-d,
    30-layer language model, so that the pipeline's default ``text_encoder_out_layers=(10, 20, 30)`` exist, and a
    one-layer Pixtral vision tower text-to-image never runs) reads the prompt in Mistral's chat template with the
    pipeline's system message, padded on the left to ``max_sequence_length``; its three layers' hidden states, side
    by side, condition a guidance-distilled FLUX.2 transformer (one double and one single block) over packed latents
    of a FLUX.2 VAE. There is no unconditional branch: ``guidance_scale`` is an input of the transformer.
    ``default_sample_size`` is set to 16 so that a call without ``height`` and ``width`` makes 32×32 images.

    Example:
        >>> pipe = tiny_flux2_pipeline()
        >>> pipe(prompt="a red cat", num_inference_steps=2, max_sequence_length=128, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = tiny_mistral_tokenizer()
    cfg = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 16,
                     "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 8,
                     "max_position_embeddings": 2048, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.convert_tokens_to_ids("<s>"), "sliding_window": None},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16},
        image_token_index=len(tok) + 1)
    torch.manual_seed(seed)
    te = Mistral3ForConditionalGeneration(cfg).eval()
    return _flux2_pipeline(Flux2Pipeline, te, tok, seed=seed, num_layers=num_layers, guidance_embeds=True)


def tiny_flux2_klein_pipeline(seed: int = 0, num_layers: int = 1):
    """A tiny random ``Flux2KleinPipeline`` (FLUX.2 [klein] layout): a Qwen3 language model (16-d, 27 layers, so that
    the pipeline's default ``text_encoder_out_layers=(9, 18, 27)`` exist) whose three layers' hidden states,
    side by side, condition a FLUX.2 transformer (one double and one single block) over 2×2-patchified, packed
    latents of a FLUX.2 VAE (4 latent channels, batch-norm statistics). Not step-distilled: ``guidance_scale`` > 1
    runs the empty negative prompt as a second, separate transformer call. ``default_sample_size`` is set to 16 so
    that a call without ``height`` and ``width`` makes 32×32 images.

    Example:
        >>> pipe = tiny_flux2_klein_pipeline()
        >>> pipe(prompt="a red cat", num_inference_steps=2, output_type="np").images.shape
        (1, 32, 32, 3)
    """
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tiny_qwen_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=27,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(seed)
    te = Qwen3ForCausalLM(cfg).eval()
    return _flux2_pipeline(Flux2KleinPipeline, te, tok, seed=seed, num_layers=num_layers, guidance_embeds=False)
