"""safegen community pipeline for AnimateDiff: an ``AnimateDiffPipeline`` (an SD 1.x UNet with a motion adapter)
that is protected by :func:`safegen.protect` as soon as it is built.

Load an AnimateDiff folder (hub id or local folder saved by ``AnimateDiffPipeline.save_pretrained``) with this
file as ``custom_pipeline``. The call is the plain ``AnimateDiffPipeline`` call (same arguments, same output:
``out.frames``); the output gains ``out.safety``, one :class:`safegen.SafetyReport` per video. Diffusers runs
code from a local ``.py`` file only with ``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_animatediff_pipeline

    folder = tempfile.mkdtemp()
    tiny_animatediff_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_animatediff.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", num_frames=2, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print(out.frames.shape, len(out.safety))  # (1, 2, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["safree", "sld-strong"], sensitivity=1.5)  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["sld"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import AnimateDiffPipeline

from safegen.community import SafegenPipelineMixin


class SafegenAnimateDiffPipeline(SafegenPipelineMixin, AnimateDiffPipeline):
    """``AnimateDiffPipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

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
        tokenizer,
        unet,
        motion_adapter,
        scheduler,
        feature_extractor=None,
        image_encoder=None,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            motion_adapter=motion_adapter,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
