"""The public entry points: :func:`protect`, :func:`unprotect`, :func:`is_protected`, :func:`last_reports`.

:func:`protect` loads the policy and turns guard names into guards (the registry in :mod:`safegen.guards`), then
installs them through the core (:func:`safegen.protection.install`), which never imports a guard.
"""

from __future__ import annotations

from typing import Any, Sequence

from .guard import Guard
from .guards import resolve_guard
from .policy import Policy, load_policy
from .protection import install, is_protected, last_reports, unprotect

__all__ = ["protect", "unprotect", "is_protected", "last_reports", "resolve_guard"]


def protect(pipe: Any, policy: "str | Policy | dict" = "default", guards: "Sequence[str | Guard] | None" = None,
            *, sensitivity: float | None = None) -> Any:
    """Make a diffusers pipeline safe in place; returns the same pipeline.

    Args:
        pipe: a ``StableDiffusionPipeline`` (SD 1.x/2.x, epsilon or v-prediction), ``StableDiffusionXLPipeline``,
            or a text-to-video ``AnimateDiffPipeline``, ``CogVideoXPipeline`` or ``TextToVideoSDPipeline``
            (one report per video; see :class:`PipelineSpec` for what guards read of each).
        policy: a built-in policy name, a path to a ``.yaml``/``.json`` policy, a mapping or a
            :class:`~safegen.Policy` (shared, not copied: edits in code apply to the next call).
        guards: guard instances or names (``"safree"``, ``"sld"``, ``"sld-max"``...); defaults to the
            policy's ``guards`` list, from which a guard that cannot run on this pipeline (no weights for the
            model, a package missing) is skipped with a note in every report when the policy's
            ``skip_unavailable`` is true (the default policy's stack). The policy's ``redraws`` also belong to
            its own stack: guards named here act on the caller's draw alone, nothing more runs.
        sensitivity: overrides the policy's sensitivity: every guard's benign false-positive budget becomes
            ``min(fpr × sensitivity, 0.5)`` (:meth:`~safegen.Policy.budget`).

    Calling it again replaces the previous protection (idempotent); :func:`unprotect` restores the pipeline
    exactly. Outputs gain ``out.safety``: one :class:`~safegen.SafetyReport` per image or video.

    Example:
        >>> import safegen
        >>> from safegen.testing import tiny_sd_pipeline
        >>> # sensitivity 0.1: SAFREE's gate may fire on 0.1% of benign reference prompts (on this *random* tiny
        >>> # model, literal concept phrases are what really counts)
        >>> pipe = safegen.protect(tiny_sd_pipeline(), guards=["safree"], sensitivity=0.1)
        >>> out = pipe(["a photo of a red bus", "a photo of blood and gore"], num_inference_steps=2,
        ...            output_type="np")
        >>> [r.verdict for r in out.safety], out.safety[1].result("safree").category
        (['pass', 'steer'], 'violence')
        >>> _ = safegen.unprotect(pipe)
    """
    pol = load_policy(policy)  # everything that can be rejected is checked before the pipeline is touched
    if sensitivity is not None:
        pol = pol.copy()  # the caller's policy object keeps its own sensitivity
        pol.sensitivity = sensitivity
    guard_list = [resolve_guard(g) for g in (pol.guards if guards is None else guards)]
    return install(pipe, pol, guard_list, resolve=resolve_guard,
                   skip_unavailable=guards is None and pol.skip_unavailable, redraws=guards is None)
