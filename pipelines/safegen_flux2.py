"""safegen community pipeline for FLUX.2 [dev]: a ``Flux2Pipeline`` (a FLUX.2 transformer conditioned on three
hidden layers of a Mistral 3 language model) that is protected by :func:`safegen.protect` as soon as it is built.

Load a FLUX.2 [dev] checkpoint (hub id such as ``black-forest-labs/FLUX.2-dev``, or a local folder) with this file
as ``custom_pipeline``. The call is the plain ``Flux2Pipeline`` call (same arguments, same output; pass the prompt
as ``prompt=``: the first positional argument is a conditioning image); the output gains ``out.safety``, one
:class:`safegen.SafetyReport` per image. SAFREE reads the three layers' states the pipeline conditions on (the
system prompt and the left padding included) and filters the prompt's positions for the steps self-validating
filtering picks. The model is guidance-distilled, with no unconditional branch: SAFREE adds no keyword negative
prompt, and SLD cannot run (asking for it raises ``GuardUnavailable``). LVD unpacks the patch tokens to classify
x̂0. With ``caption_upsample_temperature`` the protected call has the LLM rewrite the prompts first and the guards
judge the rewrite (the report keeps the caller's text in ``original_prompt``). Diffusers runs code from a local
``.py`` file only with ``trust_remote_code=True``.

Runnable example from the repository root (offline, on safegen's tiny random pipeline; use a real folder or hub
id instead of ``folder``)::

    import tempfile, torch
    from diffusers import DiffusionPipeline
    from safegen.testing import tiny_flux2_pipeline

    folder = tempfile.mkdtemp()
    tiny_flux2_pipeline().save_pretrained(folder)
    pipe = DiffusionPipeline.from_pretrained(
        folder, custom_pipeline="pipelines/safegen_flux2.py", trust_remote_code=True
    )
    out = pipe(prompt="a photo of a red bus", height=32, width=32, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    print(out.images.shape, len(out.safety))  # (1, 32, 32, 3) 1
    print(out.safety[0])  # verdict, guards, scores (a random encoder's scores mean nothing)
    pipe.set_safety(policy="default", guards=["latent-guard", "safree"])  # re-protect

The policy and guards can also be chosen at load time:
``from_pretrained(..., safegen_policy="path/to/policy.yaml", safegen_guards=["safree"])``.
``safegen.unprotect(pipe)`` turns the guards off; ``pipe.set_safety()`` turns them back on.
"""

from diffusers import Flux2Pipeline

from safegen.community import SafegenPipelineMixin


class SafegenFlux2Pipeline(SafegenPipelineMixin, Flux2Pipeline):
    """``Flux2Pipeline`` protected by safegen (policy ``"default"`` unless told otherwise).

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
