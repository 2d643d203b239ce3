"""safegen: drop-in safety guards for Hugging Face diffusers text-to-image and text-to-video pipelines.

>>> import safegen
>>> from safegen.testing import tiny_sd_pipeline
>>> pipe = safegen.protect(tiny_sd_pipeline(), policy="default")  # the default stack; what a model lacks is skipped
>>> out = pipe("a photo of blood and gore", num_inference_steps=2, output_type="np")
>>> r = out.safety[0]
>>> r.blocked, r.result("latent-guard").category, r.unet_steps_run  # blocked before any denoiser step
(True, 'violence', 0)
>>> r.result("lvd").reason.startswith("skipped: ")  # no LVD classifier for this random tiny model
True
>>> _ = safegen.unprotect(pipe)

Importing the package is cheap: torch and diffusers load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "protect": ".api",
    "unprotect": ".api",
    "is_protected": ".api",
    "last_reports": ".api",
    "SUPPORTED_PIPELINES": ".specs",
    "Policy": ".policy",
    "Category": ".policy",
    "PolicyError": ".policy",
    "load_policy": ".policy",
    "normalize_category": ".policy",
    "SafetyReport": ".report",
    "GuardResult": ".report",
    "Guard": ".guards",
    "Safree": ".guards",
    "SLD": ".guards",
    "LatentGuard": ".guards",
    "LVD": ".guards",
    "SafetyDPO": ".guards",
    "OutputGuard": ".guards",
    "TextEncoderAdapter": ".encoders",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'safegen' has no attribute {name!r}")
    module = importlib.import_module(mod, __name__)
    # bind every public name of that module at once (one import, later lookups are plain attributes)
    for other, where in _LAZY.items():
        if where == mod:
            globals()[other] = getattr(module, other)
    return globals()[name]


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .encoders import TextEncoderAdapter
    from .guards import LVD, SLD, Guard, LatentGuard, OutputGuard, Safree, SafetyDPO
    from .policy import Category, Policy, PolicyError, load_policy, normalize_category
    from .api import is_protected, last_reports, protect, unprotect
    from .specs import SUPPORTED_PIPELINES
    from .report import GuardResult, SafetyReport
