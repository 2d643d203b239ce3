"""The guards. Each is a small config dataclass plus the code that hooks it in; presets are named values."""

from __future__ import annotations

from .base import STAGES, Guard, GuardError
from .safree import Safree
from .sld import SLD


def _latent_guard(**kwargs):
    from .latent_guard import LatentGuard

    return LatentGuard(**kwargs)


def _lvd(**kwargs):
    from .lvd import LVD

    return LVD(**kwargs)


def _output(**kwargs):
    from .output import OutputGuard

    return OutputGuard(**kwargs)


def _safetydpo(**kwargs):
    from .safetydpo import SafetyDPO, default_merged_path

    kwargs.setdefault("merged", str(default_merged_path()))
    return SafetyDPO(**kwargs)


#: Names accepted by ``protect(guards=[...])``, the CLI and policies, mapped to guard factories.
GUARD_PRESETS = {
    "safree": Safree,
    "safree-lra": lambda: Safree(reattention=True),
    "sld": SLD.medium,
    "sld-weak": SLD.weak,
    "sld-medium": SLD.medium,
    "sld-strong": SLD.strong,
    "sld-max": SLD.max,
    "latent-guard": _latent_guard,
    "lvd": _lvd,
    "safetydpo": _safetydpo,
    # post-hoc output checks with the default model's world oracle (real models: OutputGuard(oracle="nudenet"))
    "output-check": lambda: _output(action="placeholder"),
    "output-blur": lambda: _output(action="blur"),
    "output-regenerate": lambda: _output(action="regenerate"),
    "output-check-nudenet": lambda: _output(oracle="nudenet", action="placeholder"),
}

__all__ = ["Guard", "GuardError", "STAGES", "Safree", "SLD", "LatentGuard", "LVD", "SafetyDPO", "OutputGuard",
           "GUARD_PRESETS"]


def __getattr__(name: str):
    # imported on first use, so that `python -m safegen.guards.latent_guard` (training) runs without runpy's warning
    if name == "LatentGuard":
        from .latent_guard import LatentGuard

        return LatentGuard
    if name == "LVD":
        from .lvd import LVD

        return LVD
    if name == "OutputGuard":
        from .output import OutputGuard

        return OutputGuard
    if name == "SafetyDPO":
        from .safetydpo import SafetyDPO

        return SafetyDPO
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
