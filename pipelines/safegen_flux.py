"""safegen community pipeline for FLUX.1: a ``FluxPipeline`` (a guidance-distilled transformer conditioned on T5
tokens and a CLIP pooled vector) that is protected by :func:`safegen.protect` as soon as it is built.

Load a FLUX.1 checkpoint (hub id such as ``black-forest-labs/FLUX.1-schnell``, or a local folder) with this file
as ``custom_pipeline``. The call is the plain ``FluxPipeline`` call (same arguments, same output); the output
gains ``out.safety``, one :class:`safegen.SafetyReport` per image. Every text guard reads ``prompt`` (CLIP) and
``prompt_2`` (T5); SAFREE filters the T5 token states for the steps self-validating filtering picks and the
pooled vector for the whole call (FLUX's step callback cannot take it back: the report says so); LVD unpacks the
2×2-patch tokens to classify x̂0; SLD needs true CFG (``negative_prompt`` and ``true_cfg_scale > 1``), without it
the call fails closed and the report says why. Diffusers runs code from a local ``.py`` file only with
``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_flux_pipeline

    folder = tempfile.mkdtemp()
    tiny_flux_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_flux.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print(out.images.shape, len(out.safety))  # (1, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["latent-guard", "safree"])  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["safree"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import FluxPipeline

from safegen.community import SafegenPipelineMixin


class SafegenFluxPipeline(SafegenPipelineMixin, FluxPipeline):
    """``FluxPipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

    Extra constructor arguments (also accepted by ``from_pretrained``): ``safegen_policy`` (a built-in policy
    name, a ``.yaml``/``.json`` path, a mapping or a ``safegen.Policy``), ``safegen_guards`` (guard names or
    instances; ``None`` uses the policy's list) and ``safegen_sensitivity``.
    """

    # No annotations on purpose: diffusers reads the component names from this signature, which must match
    # the parent's (plus the optional safegen_* settings, which are not saved in model_index.json).
    def __init__(
        self,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer,
        image_encoder=None,
        feature_extractor=None,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
