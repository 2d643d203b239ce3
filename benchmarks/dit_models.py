"""The transformer families at their real hidden widths with reduced depth and random fp32 weights, built offline
(safegen's tiny tokenizers, seeded weights), for ``benchmarks/overhead.py``.

Depths are cut so that a pipeline fits this machine's memory in fp32 and a step takes seconds; every width (the
text encoders', the denoiser's, the latent channels) is the released model's, so the cost *ratios* that the
overhead benchmark reports (guard work against one denoiser call) are those of the real shapes per layer. What
each builder keeps and cuts is in its docstring and in ``DEPTHS`` (shown in BENCHMARKS.md).
"""

from __future__ import annotations

import torch

#: per family: what was kept of the released model's depth (layers used / layers released)
DEPTHS = {
    "sd35": "MMDiT 2/24 joint blocks (SD3.5 medium widths: 24 heads × 64, caption 1536), CLIP-L 12/12, "
            "CLIP-bigG 4/32, T5-XXL 2/24 layers",
    "sd35-even": "MMDiT 4/24 joint blocks (SD3.5 medium widths, as sd35), CLIP-L 2/12, CLIP-bigG 5/32, T5-XXL 4/24 "
                 "layers: every part at about 1/6 of its released depth, so the text side weighs against the "
                 "denoiser as in the released model",
    "flux1": "FLUX.1 1/19 double + 2/38 single blocks (24 heads × 128), CLIP-L 12/12, T5-XXL 2/24 layers",
    "wan21": "Wan 2.1 1.3B 2/30 blocks (12 heads × 128, FFN 8960), UMT5-XXL 2/24 layers",
    "qwenimage": "Qwen-Image MMDiT 2/60 blocks (24 heads × 128, caption 3584), Qwen2.5-VL-7B language model 2/28 "
                 "layers (3584 wide, FFN 18944, 28 query / 4 key-value heads; vision tower not used by text-to-image: "
                 "1 small block), the 16-channel Qwen-Image VAE",
    "flux2klein": "FLUX.2 [klein] 4B 1/5 double + 2/20 single blocks (24 heads × 128, 128 packed latent channels), "
                  "Qwen3-4B language model 3/36 layers (2560 wide, FFN 9728, 32 query / 8 key-value heads of 128), "
                  "read at its layers 1/2/3 in place of 9/18/27 (`text_encoder_out_layers`: the conditioning keeps "
                  "its 3 × 2560 width), a 32-channel FLUX.2 VAE",
    "flux2": "FLUX.2 [dev] 1/8 double + 2/48 single blocks (48 heads × 128, 128 packed latent channels), "
             "Mistral-Small-3.1 language model 2/40 layers (5120 wide, FFN 32768, 32 query / 8 key-value heads of "
             "128), read at its states 0/1/2 in place of 10/20/30 (`text_encoder_out_layers`: the conditioning "
             "keeps its 3 × 5120 width; the vision tower, unused by text-to-image, is 1 small block), a 32-channel "
             "FLUX.2 VAE",
}


def _clip(tok, hidden: int, layers: int, heads: int, inter: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=projection or hidden, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def _t5_xxl(tok, layers: int, seed: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(vocab_size=len(tok), d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return (UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))).eval()


def _vae16(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                         block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=1.5305,
                         shift_factor=0.0609).eval()


def build_sd35(seed: int = 0, depths: tuple[int, int, int, int] = (2, 12, 4, 2)):
    """``StableDiffusion3Pipeline`` at SD3.5-medium widths (MMDiT-X: 24 heads of 64, joint attention over T5's
    4096-wide states, pooled 768 + 1280), CLIP-L, CLIP-bigG and T5-XXL, a 16-channel VAE; ``depths``: the layers
    of the MMDiT, CLIP-L, CLIP-bigG and T5 (``DEPTHS``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from safegen.testing import tiny_clip_tokenizer, tiny_t5_tokenizer

    mmdit, clip_l, clip_g, t5 = depths
    tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer(max_length=256)
    te = _clip(tok, 768, clip_l, 12, 3072, 768, seed)
    te2 = _clip(tok2, 1280, clip_g, 20, 5120, 1280, seed + 1)
    te3 = _t5_xxl(tok3, t5, seed + 2)
    torch.manual_seed(seed)
    # SD3.5 medium's first 13 blocks have the second (dual) attention
    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=mmdit, attention_head_dim=64, num_attention_heads=24,
                                        joint_attention_dim=4096, caption_projection_dim=1536,
                                        pooled_projection_dim=2048, pos_embed_max_size=384,
                                        dual_attention_layers=tuple(range(min(mmdit, 13))),
                                        qk_norm="rms_norm").eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae16(seed), text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                                    tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd35_even(seed: int = 0):
    """:func:`build_sd35` with every part at about 1/6 of its released depth (``DEPTHS["sd35-even"]``)."""
    return build_sd35(seed, depths=(4, 2, 5, 4))


def build_flux1(seed: int = 0):
    """``FluxPipeline`` at FLUX.1 widths (24 heads of 128 = 3072, T5-XXL 4096, CLIP-L pooled 768, guidance
    embedding), a 16-channel VAE; depth in ``DEPTHS``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from safegen.testing import tiny_clip_tokenizer, tiny_t5_tokenizer

    tok, tok2 = tiny_clip_tokenizer(), tiny_t5_tokenizer(max_length=512)
    te = _clip(tok, 768, 12, 12, 3072, None, seed)
    te2 = _t5_xxl(tok2, 2, seed + 1)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True,
                                         axes_dims_rope=(16, 56, 56)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae16(seed), text_encoder=te,
                        tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan21(seed: int = 0):
    """``WanPipeline`` at Wan 2.1 1.3B widths (12 heads of 128, FFN 8960, UMT5-XXL 4096) and the Wan VAE
    (16 latent channels, space ÷ 8, time ÷ 4); depth in ``DEPTHS``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from safegen.testing import tiny_t5_tokenizer

    tok = tiny_t5_tokenizer(max_length=512)
    te = _t5_xxl(tok, 2, seed, umt5=True)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                        in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=1024).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_qwenimage(seed: int = 0):
    """``QwenImagePipeline`` at Qwen-Image widths: the MMDiT (24 heads of 128 = 3072, joint attention over the
    3584-wide LLM states, 64 packed latent channels), the Qwen2.5-VL-7B language model's layer shape, and the
    Qwen-Image VAE (16 latent channels, space ÷ 8); depth in ``DEPTHS``. safegen's tiny Qwen2 tokenizer (its
    template tokenises to the real 34 system tokens; words outside its small vocabulary fall back to bytes, so a
    prompt is more tokens than with the real vocabulary: the text-side cost is, if anything, overstated)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    from safegen.testing import qwen_vl_text_encoder, tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    te = qwen_vl_text_encoder(tok, hidden=3584, intermediate=18944, layers=2, heads=28, kv_heads=4,
                              mrope=(16, 24, 24), seed=seed)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=128, num_attention_heads=24,
                                              joint_attention_dim=3584, guidance_embeds=False,
                                              axes_dims_rope=(16, 56, 56)).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 16,
                                 latents_std=[1.0] * 16).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                             tokenizer=tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux2_pipeline(cls, text_encoder, tokenizer, seed: int, heads: int, joint: int, guidance_embeds: bool):
    """A FLUX.2 pipeline of class ``cls`` around ``text_encoder``: a FLUX.2 transformer at ``heads`` × 128 (1 double
    + 2 single blocks, SwiGLU ratio 3, 128 packed latent channels: the 32-channel VAE's latents in 2×2 patches) and
    the FLUX.2 VAE at its released widths."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2,
                                          attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=joint,
                                          guidance_embeds=guidance_embeds).eval()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(latent_channels=32, block_out_channels=(128, 256, 512, 512)).eval()
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux2klein(seed: int = 0):
    """``Flux2KleinPipeline`` (not step-distilled, so ``guidance_scale`` > 1 runs CFG as a second call) at FLUX.2
    [klein] 4B widths: the Qwen3-4B layer shape, a 3072-wide FLUX.2 transformer over 3 × 2560-wide conditioning;
    depth in ``DEPTHS``. safegen's tiny Qwen2 tokenizer (byte fallback: a prompt is, if anything, more tokens than
    with the real vocabulary). Call it with ``text_encoder_out_layers=(1, 2, 3)``."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from safegen.testing import tiny_qwen_tokenizer

    tok = tiny_qwen_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=2560, intermediate_size=9728, num_hidden_layers=3,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), tie_word_embeddings=True)
    torch.manual_seed(seed)
    te = Qwen3ForCausalLM(cfg).eval()
    return _flux2_pipeline(Flux2KleinPipeline, te, tok, seed, 24, 3 * 2560, guidance_embeds=False)


def build_flux2(seed: int = 0):
    """``Flux2Pipeline`` (guidance-distilled: no unconditional branch) at FLUX.2 [dev] widths: the
    Mistral-Small-3.1 language model's layer shape in a ``Mistral3ForConditionalGeneration``, a 6144-wide FLUX.2
    transformer over 3 × 5120-wide conditioning; depth in ``DEPTHS``. safegen's tiny Mistral tokenizer and chat
    template (with the pipeline's system message). Call it with ``text_encoder_out_layers=(0, 1, 2)``."""
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from safegen.testing import tiny_mistral_tokenizer

    tok = tiny_mistral_tokenizer()
    cfg = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tok), "hidden_size": 5120, "intermediate_size": 32768,
                     "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 131072, "rope_theta": 1e9, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.convert_tokens_to_ids("<s>"), "sliding_window": None},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16},
        image_token_index=len(tok) + 1)
    torch.manual_seed(seed)
    te = Mistral3ForConditionalGeneration(cfg).eval()
    return _flux2_pipeline(Flux2Pipeline, te, tok, seed, 48, 3 * 5120, guidance_embeds=True)
