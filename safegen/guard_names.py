"""The names of the guards and of their presets, as strings only (a leaf module: it imports nothing of safegen).

The policy loader validates a policy file's ``guards:`` list against these names without importing the guards
themselves; :data:`safegen.guards.GUARD_PRESETS` maps the same names to guard factories (a test keeps the two
in step).

Example:
    >>> from safegen.guard_names import normalize_preset, guard_of_preset
    >>> normalize_preset("SLD_Strong"), guard_of_preset("sld-strong")
    ('sld-strong', 'sld')
"""

from __future__ import annotations

#: Every preset name accepted by ``protect(guards=[...])``, a policy's ``guards:`` list and the CLI's
#: ``--guards``, mapped to the name of the guard it makes (the name its reports carry).
PRESET_GUARDS: dict[str, str] = {
    "safree": "safree",
    "safree-lra": "safree",
    "sld": "sld",
    "sld-weak": "sld",
    "sld-medium": "sld",
    "sld-strong": "sld",
    "sld-max": "sld",
    "latent-guard": "latent_guard",
    "lvd": "lvd",
    "safetydpo": "safetydpo",
    "output-check": "output",
    "output-blur": "output",
    "output-regenerate": "output",
    "output-check-nudenet": "output",
}


def normalize_preset(name: str) -> str:
    """A preset name as written by a user (any case, ``_`` or ``-``) in its canonical spelling."""
    return str(name).strip().lower().replace("_", "-")


def guard_of_preset(name: str) -> str | None:
    """The guard a preset name makes, or ``None`` when the name is not a known preset."""
    return PRESET_GUARDS.get(normalize_preset(name))
