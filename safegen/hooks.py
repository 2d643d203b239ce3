"""Named, removable seams on a pipeline's parts: the one mechanism every guard uses to reach inside a pipeline.

* **Module hooks** go through diffusers' own hooks registry (:class:`diffusers.hooks.HookRegistry`, the mechanism
  behind its caches and group offloading), each named ``safegen.<guard>.<what>``, so they compose with the
  user's own diffusers hooks, accelerate's offload hooks and ``torch.compile``, and a user can list them
  (:func:`safegen_hooks`). :func:`add_hook` returns a handle whose ``remove()`` takes the hook off again and,
  when the registry was made for it and is now empty, leaves the module exactly as it found it (no registry
  attribute, no instance ``forward``).
* **Named patches** (:func:`patch`) replace a plain attribute that hooks cannot reach (``scheduler.step``,
  ``vae.decode``, a video pipeline's ``decode_latents``) by an instance attribute, and restore the previous one.

:func:`safegen_hooks` lists every safegen hook, patch and LoRA adapter left on a pipeline;
:func:`safegen.unprotect` uses it to check that nothing stays behind.

Example:
    >>> import torch
    >>> from safegen.hooks import add_hook, safegen_hooks
    >>> lin = torch.nn.Linear(2, 2)
    >>> h = add_hook(lin, "safegen.demo.double", post=lambda module, out: out * 2)
    >>> x = torch.ones(1, 2)
    >>> torch.equal(lin(x), 2 * torch.nn.functional.linear(x, lin.weight, lin.bias))
    True
    >>> safegen_hooks(lin)
    ['safegen.demo.double']
    >>> h.remove()
    >>> safegen_hooks(lin), "forward" in lin.__dict__, hasattr(lin, "_diffusers_hook")
    ([], False, False)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import guarded

PREFIX = "safegen."
#: LoRA adapters that safegen loads are named with this prefix (SafetyDPO: ``safegen_dpo_0``...).
ADAPTER_PREFIX = "safegen_"

# modules whose hooks registry safegen created: what their instance ``forward`` was before
_CREATED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, Any]]" = weakref.WeakKeyDictionary()
# objects safegen patched: [(name, attribute, had an instance attribute, previous instance attribute, patch)]
_PATCHES: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()


def _model_hook_class():
    from diffusers.hooks import ModelHook

    class FunctionHook(ModelHook):
        """A diffusers ``ModelHook`` calling ``pre(module, args, kwargs)`` → ``(args, kwargs)`` or ``None`` and
        ``post(module, output)`` → new output or ``None``."""

        def __init__(self, pre, post):
            super().__init__()
            self._pre, self._post = pre, post

        def pre_forward(self, module, *args, **kwargs):
            if self._pre is not None:
                changed = self._pre(module, args, kwargs)
                if changed is not None:
                    args, kwargs = changed
            return tuple(args), kwargs

        def post_forward(self, module, output):
            if self._post is not None:
                changed = self._post(module, output)
                if changed is not None:
                    return changed
            return output

    return FunctionHook


_HOOK_CLASS = None


@dataclass
class HookHandle:
    """A registered module hook; :meth:`remove` is idempotent."""

    module: torch.nn.Module
    name: str
    _live: bool = True

    def remove(self) -> None:
        if not self._live:
            return
        self._live = False
        registry = self.module.__dict__.get("_diffusers_hook")
        if registry is not None:
            registry.remove_hook(self.name, recurse=False)
            _tidy(self.module)


def _tidy(module: torch.nn.Module) -> None:
    """Drop a hooks registry that safegen created once it is empty, restoring the module's ``forward``."""
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None or registry.hooks or module not in _CREATED:
        return
    had_forward, previous = _CREATED.pop(module)
    del module.__dict__["_diffusers_hook"]
    if had_forward:
        module.__dict__["forward"] = previous
    else:
        module.__dict__.pop("forward", None)


def add_hook(module: torch.nn.Module, name: str, *, pre: Callable | None = None, post: Callable | None = None,
             guard: str | None = None) -> HookHandle:
    """Register a hook named ``name`` (it must start with ``safegen.``) on ``module`` through diffusers' hooks
    registry. The hook registered last runs outermost (its ``pre`` first, its ``post`` last). With ``guard``,
    errors raised by ``pre``/``post`` become :class:`~safegen.errors.GuardError` (the call fails closed).
    A name already on the module gets ``#2``, ``#3``... appended."""
    global _HOOK_CLASS
    from diffusers.hooks import HookRegistry

    if not name.startswith(PREFIX):
        raise ValueError(f"safegen hook names start with {PREFIX!r}, got {name!r}")
    if _HOOK_CLASS is None:
        _HOOK_CLASS = _model_hook_class()
    registry = module.__dict__.get("_diffusers_hook")
    if registry is None:
        _CREATED[module] = ("forward" in module.__dict__, module.__dict__.get("forward"))
        # in the module's own __dict__, not through setattr / HookRegistry.check_if_exists_or_initialize: a
        # torch.compile'd module (OptimizedModule) forwards attribute reads and writes to the module it wraps,
        # which would leave there a registry whose hooks wrap the wrapper's forward (never removed, and reused by
        # the next hook added to the unwrapped module, which would then not run)
        registry = module.__dict__["_diffusers_hook"] = HookRegistry(module)
    unique, n = name, 1
    while unique in registry.hooks:
        n += 1
        unique = f"{name}#{n}"
    if guard is not None:
        pre = guarded(guard, pre) if pre is not None else None
        post = guarded(guard, post) if post is not None else None
    registry.register_hook(_HOOK_CLASS(pre, post), unique)
    return HookHandle(module, unique)


@dataclass
class PatchHandle:
    """A named patch of one attribute; :meth:`remove` restores what was there (idempotent)."""

    obj: Any
    attribute: str
    name: str
    replacement: Any
    _live: bool = True

    def remove(self) -> None:
        if not self._live:
            return
        self._live = False
        entries = _PATCHES.get(self.obj, [])
        mine = next((e for e in entries if e[4] is self.replacement), None)
        if mine is None:
            return
        entries.remove(mine)
        _, attr, had, previous, replacement = mine
        current = self.obj.__dict__.get(attr)
        if current is replacement:
            if had:
                self.obj.__dict__[attr] = previous
            else:
                self.obj.__dict__.pop(attr, None)
        else:  # patched again on top since: the newer patch now falls through to what this one wrapped
            for e in entries:
                if e[1] == attr and e[3] is replacement:
                    entries[entries.index(e)] = (e[0], e[1], had, previous, e[4])
        if not entries:
            _PATCHES.pop(self.obj, None)


def patch(obj: Any, attribute: str, make: Callable[[Any], Any], name: str) -> PatchHandle:
    """Replace ``obj.<attribute>`` by ``make(current)`` as an instance attribute, under ``name`` (``safegen.``...).

    ``current`` is what ``obj.<attribute>`` gives now (a bound method, or an earlier patch): the replacement
    usually calls it."""
    if not name.startswith(PREFIX):
        raise ValueError(f"safegen patch names start with {PREFIX!r}, got {name!r}")
    current = getattr(obj, attribute)
    had, previous = attribute in obj.__dict__, obj.__dict__.get(attribute)
    replacement = make(current)
    obj.__dict__[attribute] = replacement
    _PATCHES.setdefault(obj, []).append((name, attribute, had, previous, replacement))
    return PatchHandle(obj, attribute, name, replacement)


def _parts(pipe: Any) -> list[Any]:
    """The pipeline (if it is one) and its components."""
    comps = getattr(pipe, "components", None)
    if isinstance(pipe, torch.nn.Module) or not isinstance(comps, dict):
        return [pipe]
    return [pipe, *[c for c in comps.values() if c is not None]]


def safegen_hooks(pipe: Any) -> list[str]:
    """Every safegen hook (``safegen.*`` in a module's diffusers hooks registry), patch and LoRA adapter
    (``safegen_*``) on a pipeline's components, or on one module. Empty on a pipeline safegen never touched
    or has fully unprotected.

    Example:
        >>> import safegen
        >>> from safegen.hooks import safegen_hooks
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> _ = safegen.unprotect(safegen.protect(pipe, guards=["sld"]))
        >>> safegen_hooks(pipe)
        []
    """
    found: list[str] = []
    for part in _parts(pipe):
        for name, _, _, _, _ in _PATCHES.get(part, []):
            found.append(name)
        if isinstance(part, torch.nn.Module):
            for _, module in part.named_modules():
                registry = module.__dict__.get("_diffusers_hook")
                if registry is not None:
                    found.extend(n for n in registry.hooks if n.startswith(PREFIX))
            peft = getattr(part, "peft_config", None)
            if isinstance(peft, dict):
                found.extend(f"adapter {n}" for n in peft if str(n).startswith(ADAPTER_PREFIX))
    merged = getattr(pipe, "_merged_adapters", None)
    if merged:
        found.extend(f"merged adapter {n}" for n in merged if str(n).startswith(ADAPTER_PREFIX))
    return found


def remove_safegen_hooks(pipe: Any) -> list[str]:
    """Remove every safegen hook and patch left on a pipeline's components (not LoRA adapters: their weights
    need their guard's own undo); returns what was removed."""
    removed: list[str] = []
    for part in _parts(pipe):
        for name, attr, _, _, replacement in list(_PATCHES.get(part, [])):
            PatchHandle(part, attr, name, replacement).remove()
            removed.append(name)
        if isinstance(part, torch.nn.Module):
            for _, module in part.named_modules():
                registry = module.__dict__.get("_diffusers_hook")
                if registry is None:
                    continue
                for n in [n for n in registry.hooks if n.startswith(PREFIX)]:
                    HookHandle(module, n).remove()
                    removed.append(n)
    return removed
