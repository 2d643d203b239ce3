"""Shared part of the diffusers community-pipeline files in ``pipelines/``: protect at construction time and
re-protect with :meth:`SafegenPipelineMixin.set_safety`."""

from __future__ import annotations

from .api import protect


class SafegenPipelineMixin:
    """Mix into a diffusers pipeline class (before it in the bases) to make every instance protected.

    Example:
        >>> from diffusers import StableDiffusionPipeline
        >>> from safegen.community import SafegenPipelineMixin
        >>> class SafeSD(SafegenPipelineMixin, StableDiffusionPipeline):
        ...     def __init__(self, *args, **kwargs):
        ...         super().__init__(*args, **kwargs)
        ...         self._init_safegen()
    """

    def _init_safegen(self, policy="default", guards=None, sensitivity=None) -> None:
        self._safegen_settings = {"policy": "default", "guards": None, "sensitivity": None}
        self.set_safety(policy=policy, guards=guards, sensitivity=sensitivity)

    def set_safety(self, policy=None, guards=None, sensitivity=None):
        """(Re-)protect the pipeline; an argument left at ``None`` keeps its current setting.

        Args:
            policy: a built-in policy name, a ``.yaml``/``.json`` path, a mapping or a ``safegen.Policy``.
            guards: guard names or instances (``["safree", "sld-strong"]`` or ``"safree,sld-strong"``); ``[]``
                means no guard (reports only). Not set: the policy's ``guards`` list.
            sensitivity: overrides the policy's sensitivity (2.0 flags more, 0.5 less).

        Returns the pipeline. Also turns protection back on after ``safegen.unprotect(pipe)``. A rejected
        setting raises and leaves the previous protection in place.
        """
        settings = dict(self._safegen_settings)
        for key, value in (("policy", policy), ("guards", guards), ("sensitivity", sensitivity)):
            if value is not None:
                settings[key] = value
        if isinstance(settings["guards"], str):
            settings["guards"] = [g.strip() for g in settings["guards"].split(",") if g.strip()]
        # protect() validates everything before it touches the current protection
        protect(self, policy=settings["policy"], guards=settings["guards"], sensitivity=settings["sensitivity"])
        self._safegen_settings = settings
        return self
