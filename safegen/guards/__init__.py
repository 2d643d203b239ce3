"""The guards. Each is a small config dataclass plus the code that hooks it in; presets are named values."""

from __future__ import annotations

from .base import STAGES, Guard, GuardError
from .safree import Safree
from .sld import SLD

#: Names accepted by ``protect(guards=[...])``, the CLI and policies, mapped to guard factories.
GUARD_PRESETS = {
    "safree": Safree,
    "safree-lra": lambda: Safree(reattention=True),
    "sld": SLD.medium,
    "sld-weak": SLD.weak,
    "sld-medium": SLD.medium,
    "sld-strong": SLD.strong,
    "sld-max": SLD.max,
}

__all__ = ["Guard", "GuardError", "STAGES", "Safree", "SLD", "GUARD_PRESETS"]
