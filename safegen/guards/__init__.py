"""The guards, one file each. Adding a guard is one file in this package (a :class:`safegen.guard.Guard`
subclass) plus one line in the registry, :data:`safegen.guard_names.GUARDS` (a leaf module: the policy loader and
the CLI read names without importing a guard); presets are named settings in
:data:`safegen.guard_names.PRESETS`.

Example:
    >>> from safegen.guards import resolve_guard, guard_info
    >>> resolve_guard("sld-strong")
    SLD.strong()
    >>> [(g["name"], g["stage"]) for g in guard_info()][:2]
    [('latent-guard', 'prompt'), ('safree', 'conditioning')]
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from ..guard import STAGES, Guard, GuardError
from ..guard_names import GUARD_NAMES, GUARDS, PRESET_GUARDS, PRESETS, canonical_guard, normalize_preset

def guard_class(name: str) -> type[Guard]:
    """The class of the guard ``name`` (any accepted spelling); ``ValueError`` naming the guards otherwise."""
    key = canonical_guard(name)
    if key is None or key not in GUARDS:
        raise ValueError(f"unknown guard {name!r}; known: {', '.join(GUARD_NAMES)}")
    module, cls = GUARDS[key]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def resolve_guard(spec: "str | Guard") -> Guard:
    """A guard instance from a guard name or a preset (``"safree"``, ``"sld"``, ``"sld-strong"``) or an instance.

    Example:
        >>> resolve_guard("SAFREE").name, resolve_guard("latent_guard").name
        ('safree', 'latent-guard')
    """
    if isinstance(spec, Guard):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a guard is a safegen Guard instance or a name, got {type(spec).__name__}")
    key = normalize_preset(spec)
    if key in PRESETS:
        name, settings = PRESETS[key]
        cls = guard_class(name)
        return getattr(cls, settings)() if isinstance(settings, str) else cls(**settings)
    if canonical_guard(key) is not None:
        return guard_class(key)()
    raise ValueError(f"unknown guard {spec!r}; known: {', '.join(sorted(PRESET_GUARDS))}")


def guard_from_dict(data: Mapping[str, Any]) -> Guard:
    """The guard of a settings dict written by :meth:`Guard.to_dict` (``{"guard": name, **settings}``)."""
    if "guard" not in data:
        raise ValueError("guard settings need a 'guard' key naming the guard")
    return guard_class(data["guard"]).from_dict({**data, "guard": canonical_guard(data["guard"])})


def guard_info() -> list[dict[str, Any]]:
    """Every guard's metadata, in stage order: ``name``, ``class``, ``stage``, ``summary``, ``weights`` (what weight
    files it needs, or None), ``pipelines``, ``presets``."""
    out = []
    for name in GUARD_NAMES:
        cls = guard_class(name)
        out.append({"name": name, "class": cls.__name__, "stage": cls.stage, "summary": cls.summary,
                    "weights": cls.weights_needed, "pipelines": cls.pipelines,
                    "presets": [p for p, g in PRESET_GUARDS.items() if g == name]})
    return sorted(out, key=lambda g: STAGES.index(g["stage"]))


#: Presets as zero-argument factories (``GUARD_PRESETS["sld-strong"]()``), for every name ``resolve_guard`` takes.
GUARD_PRESETS = {name: (lambda name=name: resolve_guard(name)) for name in PRESET_GUARDS}

__all__ = ["Guard", "GuardError", "STAGES", "GUARDS", "PRESETS", "GUARD_PRESETS", "guard_class", "resolve_guard",
           "guard_from_dict", "guard_info", "Safree", "SLD", "LatentGuard", "LVD", "SafetyDPO", "OutputGuard"]

_CLASSES = {cls: name for name, (_, cls) in GUARDS.items()}


def __getattr__(name: str):
    # the classes load on first use, so `import safegen.guards` stays light
    if name in _CLASSES:
        return guard_class(_CLASSES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
