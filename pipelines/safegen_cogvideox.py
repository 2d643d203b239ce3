"""safegen community pipeline for CogVideoX: a ``CogVideoXPipeline`` (a 3-D DiT with a T5 text encoder) that is
protected by :func:`safegen.protect` as soon as it is built.

Load a CogVideoX text-to-video checkpoint (hub id such as ``THUDM/CogVideoX-2b``, or a local folder) with this
file as ``custom_pipeline``. The call is the plain ``CogVideoXPipeline`` call (same arguments, same output:
``out.frames``); the output gains ``out.safety``, one :class:`safegen.SafetyReport` per video. SAFREE works in
the T5 space the transformer is conditioned on (no BOS offset, content-token mean as the summary vector); its
latent re-attention does not apply to a DiT (no U-Net skip features), which the report says. Diffusers runs code
from a local ``.py`` file only with ``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_cogvideox_pipeline

    folder = tempfile.mkdtemp()
    tiny_cogvideox_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_cogvideox.py", trust_remote_code=True
    )
    out = pipe("a photo of a red bus", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print(out.frames.shape, len(out.safety))  # (1, 9, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["safree", "lvd"])  # re-protect (LVD needs a classifier file)

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["sld"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import CogVideoXPipeline

from safegen.community import SafegenPipelineMixin


class SafegenCogVideoXPipeline(SafegenPipelineMixin, CogVideoXPipeline):
    """``CogVideoXPipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

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
        transformer,
        scheduler,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
