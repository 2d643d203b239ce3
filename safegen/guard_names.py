"""The guards' names: one canonical name per guard (reports, policy threshold keys, the CLI, the demo), the
spellings accepted for it on input, and the named presets. Strings only: a leaf module (it imports nothing of
safegen), so the policy loader can validate names without importing the guards; :mod:`safegen.guards` maps the
same names to the guard classes (a test keeps the two in step).

Example:
    >>> from safegen.guard_names import canonical_guard, guard_of_preset, normalize_preset
    >>> canonical_guard("LatentGuard"), canonical_guard("latent_guard"), canonical_guard("nope")
    ('latent-guard', 'latent-guard', None)
    >>> normalize_preset("SLD_Strong"), guard_of_preset("sld-strong")
    ('sld-strong', 'sld')
"""

from __future__ import annotations

import re

#: The canonical name of every guard, in stage order.
GUARD_NAMES = ("latent-guard", "safree", "sld", "lvd", "safetydpo", "output")

#: Other spellings accepted on input (after lower-casing and ``_`` → ``-``): the class names.
_ALIASES = {"latentguard": "latent-guard", "outputguard": "output", "output-guard": "output"}

#: Every preset name accepted by ``protect(guards=[...])``, a policy's ``guards:`` list and the CLI's
#: ``--guards``, mapped to the guard it makes (a guard's own name is a preset of its default settings).
PRESET_GUARDS: dict[str, str] = {
    "latent-guard": "latent-guard",
    "safree": "safree",
    "safree-lra": "safree",
    "sld": "sld",
    "sld-weak": "sld",
    "sld-medium": "sld",
    "sld-strong": "sld",
    "sld-max": "sld",
    "lvd": "lvd",
    "safetydpo": "safetydpo",
    "output-check": "output",
    "output-blur": "output",
    "output-regenerate": "output",
    "output-check-nudenet": "output",
}


def normalize_preset(name: str) -> str:
    """A name as written by a user (any case, ``_`` or ``-``, a class name) in the canonical spelling."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", str(name).strip())  # LatentGuard -> Latent-Guard
    key = text.lower().replace("_", "-")
    return _ALIASES.get(key.replace("-", ""), key)


def canonical_guard(name: str) -> str | None:
    """The canonical name of the guard ``name`` spells (``"latent_guard"``, ``"LatentGuard"`` →
    ``"latent-guard"``), or ``None``."""
    key = normalize_preset(name)
    return key if key in GUARD_NAMES else None


def guard_of_preset(name: str) -> str | None:
    """The guard a preset name makes, or ``None`` when the name is not a known preset or guard."""
    key = normalize_preset(name)
    return PRESET_GUARDS.get(key) or canonical_guard(key)
