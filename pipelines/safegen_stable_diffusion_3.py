"""safegen community pipeline for Stable Diffusion 3 / 3.5: a ``StableDiffusion3Pipeline`` (an MMDiT conditioned on
two CLIP encoders and T5) that is protected by :func:`safegen.protect` as soon as it is built.

Load an SD3 or SD3.5 checkpoint (hub id such as ``stabilityai/stable-diffusion-3.5-medium``, or a local folder)
with this file as ``custom_pipeline``. The call is the plain ``StableDiffusion3Pipeline`` call (same arguments,
same output); the output gains ``out.safety``, one :class:`safegen.SafetyReport` per image. Every text guard
reads ``prompt``, ``prompt_2`` and ``prompt_3``; SAFREE filters each encoder's part of the joint sequence and the
pooled vector; latent re-attention does not apply to a DiT (no U-Net skip features), which the report says.
Diffusers runs code from a local ``.py`` file only with ``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_sd3_pipeline

    folder = tempfile.mkdtemp()
    tiny_sd3_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_stable_diffusion_3.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print(out.images.shape, len(out.safety))  # (1, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["latent-guard", "safree", "sld"])  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["sld"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import StableDiffusion3Pipeline

from safegen.community import SafegenPipelineMixin


class SafegenStableDiffusion3Pipeline(SafegenPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

    Extra constructor arguments (also accepted by ``from_pretrained``): ``safegen_policy`` (a built-in policy
    name, a ``.yaml``/``.json`` path, a mapping or a ``safegen.Policy``), ``safegen_guards`` (guard names or
    instances; ``None`` uses the policy's list) and ``safegen_sensitivity``.
    """

    # No annotations on purpose: diffusers reads the component names from this signature, which must match
    # the parent's (plus the optional safegen_* settings, which are not saved in model_index.json).
    def __init__(
        self,
        transformer,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
