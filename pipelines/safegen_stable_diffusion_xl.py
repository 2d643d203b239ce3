"""safegen community pipeline for Stable Diffusion XL: a ``StableDiffusionXLPipeline`` that is protected by
:func:`safegen.protect` as soon as it is built.

Load any SDXL base checkpoint (hub id or local folder) with this file as ``custom_pipeline``. The call is the
plain ``StableDiffusionXLPipeline`` call (same arguments, same output); the output gains ``out.safety``, one
:class:`safegen.SafetyReport` per image. Diffusers runs code from a local ``.py`` file only with
``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real checkpoint's
folder or hub id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_sdxl_pipeline

    folder = tempfile.mkdtemp()
    tiny_sdxl_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_stable_diffusion_xl.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print(out.images.shape, len(out.safety))  # (1, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["safree", "sld-strong"], sensitivity=1.5)  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["sld"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import StableDiffusionXLPipeline

from safegen.community import SafegenPipelineMixin


class SafegenStableDiffusionXLPipeline(SafegenPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

    Extra constructor arguments (also accepted by ``from_pretrained``): ``safegen_policy`` (a built-in policy
    name, a ``.yaml``/``.json`` path, a mapping or a ``safegen.Policy``), ``safegen_guards`` (guard names or
    instances; ``None`` uses the policy's list) and ``safegen_sensitivity``.
    """

    # No annotations on purpose: diffusers reads the component names from this signature, which must match
    # the parent's (plus the optional safegen_* settings, which are not saved in model_index.json).
    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=None,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
