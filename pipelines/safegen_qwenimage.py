"""safegen community pipeline for Qwen-Image: a ``QwenImagePipeline`` (an MMDiT conditioned on a Qwen2.5-VL
language model's hidden states) that is protected by :func:`safegen.protect` as soon as it is built.

Load a Qwen-Image checkpoint (hub id such as ``Qwen/Qwen-Image``, or a local folder) with this file as
``custom_pipeline``. The call is the plain ``QwenImagePipeline`` call (same arguments, same output); the output
gains ``out.safety``, one :class:`safegen.SafetyReport` per image. SAFREE reads the LLM's hidden states the
pipeline conditions on (after the chat template's system tokens) and filters them for the steps self-validating
filtering picks; its concept keywords join the negative prompt when true CFG is on (``negative_prompt`` with
``true_cfg_scale > 1``). LVD unpacks the 2×2-patch tokens to classify x̂0. SLD needs true CFG; without it the
call fails closed and the report says why. Diffusers runs code from a local ``.py`` file only with
``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_qwenimage_pipeline

    folder = tempfile.mkdtemp()
    tiny_qwenimage_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_qwenimage.py", trust_remote_code=True
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

from diffusers import QwenImagePipeline

from safegen.community import SafegenPipelineMixin


class SafegenQwenImagePipeline(SafegenPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

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
        transformer,
        safegen_policy="default",
        safegen_guards=None,
        safegen_sensitivity=None,
    ):
        super().__init__(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )
        self._init_safegen(policy=safegen_policy, guards=safegen_guards, sensitivity=safegen_sensitivity)
