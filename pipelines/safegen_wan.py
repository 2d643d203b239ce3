"""safegen community pipeline for Wan 2.1 / 2.2 text-to-video: a ``WanPipeline`` (a video DiT on UMT5 token states;
Wan 2.2 adds a low-noise expert, ``transformer_2``) that is protected by :func:`safegen.protect` as soon as it is
built.

Load a Wan text-to-video checkpoint in diffusers format (hub id such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, or
a local folder) with this file as ``custom_pipeline``. The call is the plain ``WanPipeline`` call (same
arguments, same output: ``out.frames``); the output gains ``out.safety``, one :class:`safegen.SafetyReport` per
video. Wan runs the conditional and the unconditional branch as two transformer calls: LVD drops a stopped
video's rows from both (and from both experts), SLD guides through the unconditional call with each expert's own
guidance scale, SAFREE filters the UMT5 states and the concept keywords join the negative prompt. Diffusers runs
code from a local ``.py`` file only with ``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_wan_pipeline

    folder = tempfile.mkdtemp()
    tiny_wan_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_wan.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", height=32, width=32, num_frames=5, num_inference_steps=2,
               output_type="np", generator=torch.Generator().manual_seed(0))
    print(out.frames.shape, len(out.safety))  # (1, 5, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["latent-guard", "safree", "sld"])  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["sld"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import WanPipeline

from safegen.community import SafegenPipelineMixin


class SafegenWanPipeline(SafegenPipelineMixin, WanPipeline):
    """``WanPipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

    Extra constructor arguments (also accepted by ``from_pretrained``): ``safegen_policy`` (a built-in policy
    name, a ``.yaml``/``.json`` path, a mapping or a ``safegen.Policy``), ``safegen_guards`` (guard names or
    instances; ``None`` uses the policy's list) and ``safegen_sensitivity``.
    """

    # No annotations on purpose: diffusers reads the component names from this signature, which must match
    # the parent's (plus the optional safegen_* settings, which are not saved in model_index.json).
    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer=None,
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=False,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            transformer_2=transformer_2,
            boundary_ratio=boundary_ratio,
            expand_timesteps=expand_timesteps,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
