"""safegen community pipeline for ModelScope / ZeroScope text-to-video: a ``TextToVideoSDPipeline`` (a 3-D UNet
with a CLIP text encoder) that is protected by :func:`safegen.protect` as soon as it is built.

Load a checkpoint of that layout (hub ids such as ``cerspense/zeroscope_v2_576w`` or
``damo-vilab/text-to-video-ms-1.7b``, or a local folder) with this file as ``custom_pipeline``. The call is the
plain ``TextToVideoSDPipeline`` call (same arguments, same output: ``out.frames``, numpy by default); the output
gains ``out.safety``, one :class:`safegen.SafetyReport` per video. Diffusers runs code from a local ``.py`` file
only with ``trust_remote_code=True``.

diffusers has deprecated this pipeline: it has only the legacy ``callback(step, timestep, latents)``, no
``callback_on_step_end`` and no interrupt. safegen bridges that (see ``safegen.protection._LegacyCallback``):
SAFREE's switch back to the original conditioning is written into the pipeline's own conditioning tensor, and
when LVD has stopped every video of a call the loop is ended by an exception the protected call catches (no more
UNet steps, no decode, the placeholder clips). Your own ``callback``/``callback_steps`` still run.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_text_to_video_pipeline

    folder = tempfile.mkdtemp()
    tiny_text_to_video_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_text_to_video_sd.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", num_frames=2, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    print(out.frames.shape, len(out.safety))  # (1, 2, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["safree", "sld-strong"], sensitivity=1.5)  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["sld"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import TextToVideoSDPipeline

from safegen.community import SafegenPipelineMixin


class SafegenTextToVideoSDPipeline(SafegenPipelineMixin, TextToVideoSDPipeline):
    """``TextToVideoSDPipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

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
        scheduler,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
