"""``safegen.protect(pipe)`` / ``safegen.unprotect(pipe)``: one-line, idempotent, reversible.

Protecting swaps the pipeline's class for a generated subclass whose ``__call__`` runs the guards around the
original call (the tomesd pattern); all state lives in one :class:`Protection` object at ``pipe._safegen``.
Unprotecting restores the original class and removes that object: nothing else was touched.

Inside a protected call (the :class:`Call` object):

1. the arguments are bound to the original signature, prompts normalised to lists;
2. guards run their ``prepare`` in stage order (prompt checks, conditioning, loop, weights, output); a guard
   may block items (they get no UNet step) or replace the conditioning, which is then passed to the
   pipeline as ``prompt_embeds``/``negative_prompt_embeds`` computed by the pipeline's own ``encode_prompt``
   (so untouched prompts are bit-identical);
3. one composite ``callback_on_step_end`` runs the guards' step hooks, then the user's callback;
4. the original ``__call__`` runs on the items that are not blocked;
5. blocked items get the policy's placeholder (a clip of flat frames for video pipelines); every item gets a
   :class:`~safegen.report.SafetyReport` (``out.safety``, and ``safegen.last_reports(pipe)`` when
   ``return_dict=False``).

Pipelines are described by their parts (:class:`PipelineSpec`: UNet or transformer, CLIP or T5, latent layout,
callback kind), so every guard serves images and video alike. ``TextToVideoSDPipeline`` only has the legacy
``callback``; :class:`_LegacyCallback` gives the guards the same step hook there.

Any exception raised by a guard fails the call closed: every item is blocked and its report says why.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .errors import GuardError, GuardUnavailable
from .guard import STAGES, Guard
from .hooks import add_hook
from .outputs import _assemble, _decoded_shape
from .specs import PIPELINE_SPECS, SUPPORTED_PIPELINES, PipelineSpec, pipeline_kind, pipeline_spec  # noqa: F401
from .policy import Policy
from .report import GuardResult, SafetyReport

logger = logging.getLogger("safegen")

class _LoopStopped(Exception):
    """Raised inside the pipeline's call when every item of the batch has been stopped and the pipeline cannot be
    interrupted (legacy ``callback``); the protected call catches it and returns the placeholders, no decode."""


# ---------------------------------------------------------------------- state objects
@dataclass
class Protection:
    """Everything ``protect`` set up on one pipeline. Lives at ``pipe._safegen``."""

    pipe: Any
    kind: str
    policy: Policy
    guards: list[Guard]
    base_class: type
    last_reports: list[SafetyReport] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # per-pipeline caches shared by guards (adapters, bases)
    resolve: Any = None  # name -> Guard, for guards that build others (given by safegen.protect)
    #: guards of the policy's list that could not run on this pipeline (``skip_unavailable``): name -> why
    skipped: dict = field(default_factory=dict)
    #: whether the policy's redraws apply (its own stack: :func:`install`)
    redraws: bool = False
    _states: dict = field(default_factory=dict)  # per guard object: what it attached to this pipeline

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Call the pipeline under *this* protection (not necessarily the one installed on it): how the output
        guard regenerates an item with stronger guards. Such a call never redraws (:attr:`Policy.redraws`): it is
        itself a second generation of the caller's items."""
        return _run(self.pipe, self.base_class.__call__, args, kwargs, prot=self, redraw=False)

    def set_state(self, guard: Guard, state: Any) -> None:
        """Keep ``state`` (a guard's own typed object) as what ``guard`` attached to this pipeline."""
        self._states[id(guard)] = state

    def state(self, guard: Guard) -> Any:
        """What ``guard`` attached to this pipeline (:meth:`set_state`); ``None`` if nothing."""
        return self._states.get(id(guard))

    def drop_state(self, guard: Guard) -> Any:
        return self._states.pop(id(guard), None)

    @property
    def spec(self) -> PipelineSpec:
        return PIPELINE_SPECS[self.kind]

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's denoising network (``pipe.unet`` or ``pipe.transformer``)."""
        return getattr(self.pipe, self.spec.denoiser)

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        """Every denoiser the loop may call (Wan 2.2: both experts), the main one first."""
        return [m for m in (getattr(self.pipe, name, None) for name in self.spec.denoisers) if m is not None]


@dataclass
class Call:
    """The state of one protected pipeline call, handed to every guard."""

    protection: Protection
    args: dict[str, Any]  # keyword arguments for the original __call__ (guards may edit)
    prompts: list[str] | None
    negative_prompts: list[str] | None
    num_images_per_prompt: int
    batch_size: int
    do_cfg: bool
    num_steps: int
    reports: list[SafetyReport]
    blocked_prompts: list[bool]
    step: int = 0  # index of the step about to run (updated after every step)
    stopped_items: dict = field(default_factory=dict)  # item -> UNet steps it ran before a guard stopped it
    kept_items: list[int] | None = None  # items of the denoising batch, when some prompts were blocked before it
    steps_run: int | None = None  # denoising steps the loop has run so far (None: it did not start)
    _stopper: Any = None  # the ItemStopper, installed by the first stop_item
    seconds: dict = field(default_factory=dict)
    _conditioning: dict | None = None
    _cond_override: dict | None = None
    _cleanups: list = field(default_factory=list)
    _states: dict = field(default_factory=dict)

    def set_state(self, guard: Guard, state: Any) -> None:
        """Keep ``state`` (a guard's own typed object) as ``guard``'s state for this call."""
        self._states[id(guard)] = state

    def state(self, guard: Guard) -> Any:
        """``guard``'s state for this call (:meth:`set_state`); ``None`` if it set none."""
        return self._states.get(id(guard))

    @property
    def pipe(self):
        return self.protection.pipe

    def arg(self, name: str) -> Any:
        """A call argument as the pipeline will see it: given, else the default of the pipeline's signature."""
        if self.args.get(name) is not None:
            return self.args[name]
        param = inspect.signature(self.protection.base_class.__call__).parameters.get(name)
        return None if param is None or param.default is inspect.Parameter.empty else param.default

    @property
    def policy(self) -> Policy:
        return self.protection.policy

    @property
    def kind(self) -> str:
        return self.protection.kind

    @property
    def spec(self) -> PipelineSpec:
        return self.protection.spec

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.protection.denoiser

    @property
    def denoisers(self) -> list[torch.nn.Module]:
        return self.protection.denoisers

    @property
    def n_items(self) -> int:
        return self.batch_size * self.num_images_per_prompt

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def kept_prompts(self) -> list[int]:
        """Indices of the prompts that are not blocked (the ones the pipeline will run)."""
        return [i for i, b in enumerate(self.blocked_prompts) if not b]

    @property
    def running_items(self) -> list[int]:
        """Item indices of the rows of the denoising batch, in order (the items of the kept prompts)."""
        return [it for p in self.kept_prompts for it in self.items_of(p)]

    def items_of(self, prompt_index: int) -> range:
        n = self.num_images_per_prompt
        return range(prompt_index * n, (prompt_index + 1) * n)

    def result(self, item: int, guard: str) -> GuardResult:
        """The (created on first use) :class:`GuardResult` of ``guard`` on item ``item``."""
        rep = self.reports[item]
        res = rep.result(guard)
        if res is None:
            res = GuardResult(guard)
            rep.guards.append(res)
        return res

    def condition_texts(self) -> list[list[tuple[str, str]]] | None:
        """Every text that conditions the denoiser, per prompt: ``[(argument, text), ...]`` with ``prompt`` first,
        then ``prompt_2`` / ``prompt_3`` where the call gives them (a pipeline with several text encoders feeds
        ``prompt`` to the ones whose own argument is not given, so those need no second check). Negative prompts
        are not included: they steer the image *away* from their content. ``None`` when the call gives only
        embeddings (no text to read).

        Every guard that reads text reads it through this helper, so a new prompt argument is checked everywhere.
        """
        if self.prompts is None:
            return None
        out = [[("prompt", p)] for p in self.prompts]
        for name in _EXTRA_TEXT_ARGS:
            value = self.args.get(name)
            if value is None:
                continue
            texts = _as_list(value, self.batch_size)
            if len(texts) != self.batch_size:
                raise ValueError(f"`{name}` has {len(texts)} entries but `prompt` has {self.batch_size}")
            for b, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"`{name}` must be a string or a list of strings, got {type(t).__name__}")
                if t != out[b][0][1]:
                    out[b].append((name, t))
        return out

    def defer(self, cleanup) -> None:
        """Run ``cleanup()`` when this call ends, whatever happens (per-call hooks and patches register their
        removal here, so a guard whose ``finish`` fails still leaves the pipeline clean)."""
        self._cleanups.append(cleanup)

    def block_prompt(self, prompt_index: int, guard: str, reason: str, *, verdict: str = "block",
                     **fields: Any) -> None:
        """Block every image of a prompt before the loop: it gets no UNet step and the placeholder. ``verdict``
        is ``"error"`` when the guard could not decide (a non-finite score): the item is blocked all the same."""
        self.blocked_prompts[prompt_index] = True
        for item in self.items_of(prompt_index):
            res = self.result(item, guard)
            res.verdict = verdict
            res.reason = reason
            for k, v in fields.items():
                setattr(res, k, v)

    def stop_item(self, item: int, guard: str, reason: str, steps_run: int, *, verdict: str = "block",
                  **fields: Any) -> None:
        """Stop one item inside the loop (from a step hook) after ``steps_run`` UNet steps: its UNet rows stop
        running, its latents are not decoded, it returns the placeholder, and its report says why and how many
        steps were saved. When no item is left, the pipeline's loop is interrupted."""
        from .unet_rows import ItemStopper

        running = self.running_items
        if item not in running:
            raise ValueError(f"item {item} is not in the denoising batch (running items: {running})")
        if item in self.stopped_items:
            return
        if self._stopper is None:
            shape = (lambda z: _decoded_shape(self, z)) if self.spec.video else None
            self._stopper = ItemStopper(self.pipe, len(running), guard=guard, decoded_shape=shape).install()
            self.defer(self._stopper.remove)
        if self._stopper.stop(running.index(item)):
            self.pipe._interrupt = True
        self.stopped_items[item] = int(steps_run)
        res = self.result(item, guard)
        res.verdict = verdict
        res.reason = reason
        res.steps_saved = self.num_steps - int(steps_run)
        for k, v in fields.items():
            setattr(res, k, v)

    def block_item(self, item: int, guard: str, reason: str, *, verdict: str = "block", **fields: Any) -> None:
        """Block one item after the loop (a guard that decides on the finished generation): it returns the
        placeholder instead of what the pipeline made; its UNet steps were all run."""
        if item not in self.stopped_items:
            self.stopped_items[item] = int(self.steps_run if self.steps_run is not None else self.num_steps)
        res = self.result(item, guard)
        res.verdict = verdict
        res.reason = reason
        for k, v in fields.items():
            setattr(res, k, v)

    # ---------------------------------------------------------------- conditioning
    def conditioning(self) -> dict[str, torch.Tensor]:
        """Per-prompt conditioning exactly as the pipeline computes it (one row per prompt).

        Keys: ``prompt_embeds``, ``negative_prompt_embeds`` (``None`` without CFG) and, for SDXL,
        ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``. Computed once per call by the
        pipeline's own ``encode_prompt`` with the call's arguments.
        """
        if self._conditioning is None:
            self._conditioning = _encode(self)
        return self._conditioning

    def override_conditioning(self, **tensors: torch.Tensor) -> None:
        """Replace conditioning tensors (same keys and shapes as :meth:`conditioning`) for this call."""
        base = self.conditioning()
        cur = dict(base) if self._cond_override is None else self._cond_override
        for k, v in tensors.items():
            if k not in base:
                raise KeyError(f"unknown conditioning tensor {k!r}; known: {list(base)}")
            cur[k] = v
        self._cond_override = cur


def _encode(call: Call) -> dict[str, torch.Tensor]:
    a = call.args
    return encode_with_pipeline(call, a.get("prompt"), negative_prompt=a.get("negative_prompt"), do_cfg=call.do_cfg,
                                prompt_2=a.get("prompt_2"), negative_prompt_2=a.get("negative_prompt_2"),
                                prompt_3=a.get("prompt_3"), negative_prompt_3=a.get("negative_prompt_3"),
                                prompt_embeds=a.get("prompt_embeds"),
                                negative_prompt_embeds=a.get("negative_prompt_embeds"),
                                pooled_prompt_embeds=a.get("pooled_prompt_embeds"),
                                negative_pooled_prompt_embeds=a.get("negative_pooled_prompt_embeds"),
                                prompt_embeds_mask=a.get("prompt_embeds_mask"),
                                negative_prompt_embeds_mask=a.get("negative_prompt_embeds_mask"))


def call_default(call: Call, name: str) -> Any:
    """A call argument as the pipeline will see it: given, else the default of the pipeline's signature."""
    return call.arg(name)


def encode_setting(call: Call) -> tuple:
    """What decides :func:`encode_with_pipeline`'s conditioning of a text besides the text: ``clip_skip``, the text
    encoders' LoRA scale, ``max_sequence_length``, FLUX.2's ``text_encoder_out_layers``, device and dtype. The key
    of every per-protection cache of encoded texts (SLD's concept, SAFREE's keyword negative prompts)."""
    a = call.args
    kwargs = a.get("cross_attention_kwargs") or a.get("joint_attention_kwargs") or a.get("attention_kwargs") or {}
    te = getattr(call.pipe, "text_encoder", None) or getattr(call.pipe, "text_encoder_2", None)
    layers = call.arg("text_encoder_out_layers")
    return (a.get("clip_skip"), kwargs.get("scale"), call.arg("max_sequence_length"),
            None if layers is None else tuple(layers), str(call.device), str(getattr(te, "dtype", None)))


def encode_with_pipeline(call: Call, prompt, *, negative_prompt=None, do_cfg: bool = False, prompt_2=None,
                         negative_prompt_2=None, prompt_3=None, negative_prompt_3=None, prompt_embeds=None,
                         negative_prompt_embeds=None, pooled_prompt_embeds=None,
                         negative_pooled_prompt_embeds=None, prompt_embeds_mask=None,
                         negative_prompt_embeds_mask=None) -> dict[str, torch.Tensor]:
    """Conditioning (one row per prompt) through the pipeline's own ``encode_prompt``, with the call's LoRA scale,
    ``clip_skip`` and ``max_sequence_length``: keys ``prompt_embeds``, ``negative_prompt_embeds`` (``None``
    without CFG), for SDXL, SD3 and FLUX the pooled pair, and for an LLM encoder (Qwen-Image) the pair of masks
    ``prompt_embeds_mask`` / ``negative_prompt_embeds_mask`` (always a tensor here: the pipeline itself drops a
    mask that is all ones)."""
    pipe, a = call.pipe, call.args
    how = call.spec.encode
    if how == "llm":  # no negative branch in encode_prompt: true CFG encodes the negative prompt the same way
        msl = call_default(call, "max_sequence_length")

        def enc(text, embeds, mask):
            e, m = pipe.encode_prompt(prompt=text, prompt_embeds=embeds, prompt_embeds_mask=mask,
                                      device=call.device, num_images_per_prompt=1, max_sequence_length=msl)
            return e, (torch.ones(e.shape[:2], dtype=torch.long, device=e.device) if m is None else m)

        pe, pm = enc(prompt, prompt_embeds, prompt_embeds_mask)
        npe = npm = None
        if isinstance(negative_prompt, str) and pe.shape[0] > 1:  # one negative prompt for every prompt
            negative_prompt = [negative_prompt] * pe.shape[0]
        if do_cfg:
            npe, npm = enc(negative_prompt, negative_prompt_embeds, negative_prompt_embeds_mask)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "prompt_embeds_mask": pm,
                "negative_prompt_embeds_mask": npm}
    if how == "flux2":  # the unconditional branch is always the empty prompt, unless its embeddings are given
        common = dict(device=call.device, num_images_per_prompt=1,
                      max_sequence_length=call_default(call, "max_sequence_length"),
                      text_encoder_out_layers=call_default(call, "text_encoder_out_layers"))
        pe = pipe.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds, **common)[0]
        npe = None
        if do_cfg:
            empty = negative_prompt if negative_prompt is not None else [""] * pe.shape[0]
            npe = pipe.encode_prompt(prompt=empty, prompt_embeds=negative_prompt_embeds, **common)[0]
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe}
    if how == "t5":
        pe, npe = pipe.encode_prompt(prompt, negative_prompt, do_cfg, num_videos_per_prompt=1,
                                     prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                     max_sequence_length=call_default(call, "max_sequence_length"),
                                     device=call.device)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe}
    if how == "flux":  # no negative branch in encode_prompt: true CFG encodes the negative prompt the same way
        jak = a.get("joint_attention_kwargs") or {}
        common = dict(device=call.device, num_images_per_prompt=1, lora_scale=jak.get("scale"),
                      max_sequence_length=call_default(call, "max_sequence_length"))
        pe, ppe, _ = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds,
                                        pooled_prompt_embeds=pooled_prompt_embeds, **common)
        npe = nppe = None
        if do_cfg:  # (true CFG is on only with a negative prompt or negative embeddings given)
            npe, nppe, _ = pipe.encode_prompt(prompt=negative_prompt, prompt_2=negative_prompt_2,
                                              prompt_embeds=negative_prompt_embeds,
                                              pooled_prompt_embeds=negative_pooled_prompt_embeds, **common)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                "negative_pooled_prompt_embeds": nppe}
    if how == "sd3":
        jak = a.get("joint_attention_kwargs") or {}
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=call.device,
            num_images_per_prompt=1, do_classifier_free_guidance=do_cfg, clip_skip=a.get("clip_skip"),
            max_sequence_length=call_default(call, "max_sequence_length"), lora_scale=jak.get("scale"))
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                "negative_pooled_prompt_embeds": nppe}
    cak = a.get("cross_attention_kwargs") or {}
    common = dict(device=call.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                  lora_scale=cak.get("scale"), clip_skip=a.get("clip_skip"))
    if how == "sdxl":
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            **common)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                "negative_pooled_prompt_embeds": nppe}
    pe, npe = pipe.encode_prompt(prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                                 negative_prompt_embeds=negative_prompt_embeds, **common)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe}


# ---------------------------------------------------------------------- install / unprotect
_CLASS_CACHE: dict[type, type] = {}


def _protected_class(base: type) -> type:
    if base in _CLASS_CACHE:
        return _CLASS_CACHE[base]
    base_call = base.__call__

    @functools.wraps(base_call)
    def __call__(self, *args, **kwargs):
        return _run(self, base_call, args, kwargs)

    cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                         "__doc__": base.__doc__, "_safegen_base": base,
                                         "__qualname__": base.__qualname__})
    _CLASS_CACHE[base] = cls
    return cls


def install(pipe: Any, policy: Policy, guards: Sequence[Guard],
            resolve: "Callable[[str | Guard], Guard] | None" = None, *, skip_unavailable: bool = False,
            redraws: bool = False) -> Any:
    """Protect ``pipe`` with guard *instances* under ``policy`` (:func:`safegen.protect` resolves names and loads
    the policy, then calls this). ``resolve`` turns guard names into guards for guards that build others
    (the output guard's ``stronger`` guards). With ``skip_unavailable``, a guard that raises
    :class:`~safegen.errors.GuardUnavailable` when attached (no weights for this model, a package missing) is left
    out, and every report of the pipeline says so. With ``redraws`` the policy's :attr:`~Policy.redraws` and
    ``redraw_guards`` apply (``safegen.protect`` asks for them with the policy's own stack only). Everything that
    can be rejected is checked before the current protection is touched."""
    kind = pipeline_kind(pipe)
    guard_list = list(guards)
    bad = [g for g in guard_list if not isinstance(g, Guard)]
    if bad:
        raise TypeError(f"guards must be safegen Guard instances here, got {type(bad[0]).__name__}")
    names = [g.name for g in guard_list]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"guard(s) {sorted(dup)} given more than once; pass each guard once")
    guard_list.sort(key=lambda g: STAGES.index(g.stage))
    if is_protected(pipe):
        unprotect(pipe)
    base = type(pipe)
    prot = Protection(pipe=pipe, kind=kind, policy=policy, guards=guard_list, base_class=base, resolve=resolve,
                      redraws=redraws)
    attach_all(prot, skip_unavailable=skip_unavailable)
    if redraws and policy.redraws and policy.redraw_guards:
        try:  # a redraw guard that cannot run here fails protect(), not a call
            _redraw_protection(prot, policy)
        except Exception:
            _detach_all(prot)
            raise
    for name, why in prot.skipped.items():
        logger.warning("safegen: the policy's %s guard is skipped on %s: %s", name, type(pipe).__name__, why)
    pipe.__class__ = _protected_class(base)
    object.__setattr__(pipe, "_safegen", prot)
    return pipe


def attach_all(prot: Protection, skip_unavailable: bool = False, guards: Sequence[Guard] | None = None,
               note: str = "") -> list[Guard]:
    """Attach ``guards`` (default: ``prot.guards``) to ``prot`` in order and return them; if one fails, detach
    those already attached (newest first) and re-raise. With ``skip_unavailable`` a guard that raises
    :class:`GuardUnavailable` is dropped from ``prot.guards`` and recorded in ``prot.skipped`` (its reason after
    ``note``)."""
    attached: list[Guard] = []
    try:
        for g in list(prot.guards if guards is None else guards):
            try:
                g.attach(prot)
            except GuardUnavailable as e:
                if not skip_unavailable:
                    raise
                prot.drop_state(g)
                prot.guards.remove(g)
                prot.skipped[g.name] = note + str(e)
                continue
            attached.append(g)
    except Exception:
        for g in reversed(attached):
            g.detach(prot)
        raise
    return attached


def unprotect(pipe: Any) -> Any:
    """Remove everything :func:`protect` added; the pipeline is then exactly as before. No-op if unprotected.

    Example:
        >>> import safegen
        >>> from safegen.testing import tiny_sd_pipeline
        >>> pipe = safegen.protect(tiny_sd_pipeline())
        >>> safegen.unprotect(pipe) is pipe, safegen.is_protected(pipe)
        (True, False)
    """
    prot: Protection | None = pipe.__dict__.get("_safegen")
    if prot is None:
        return pipe
    try:
        _detach_all(prot)
    finally:
        pipe.__class__ = prot.base_class
        del pipe.__dict__["_safegen"]
        _verify_clean(pipe)
    return pipe


def _detach_all(prot: Protection) -> None:
    """Detach the guards added for redraws (:func:`_redraw_protection`), then the protection's own, newest first."""
    for key in [k for k in prot.cache if isinstance(k, tuple) and k and k[0] == "redraw"]:
        built, extra = prot.cache.pop(key)
        for g in reversed(extra):
            g.detach(built)
    for g in reversed(prot.guards):
        g.detach(prot)


def _verify_clean(pipe: Any) -> None:
    """After unprotect: no safegen hook, patch or adapter may stay on the pipeline. Hooks and patches left by a
    guard that failed to clean up are removed (with a warning); anything that cannot be removed is an error."""
    from .hooks import remove_safegen_hooks, safegen_hooks

    left = safegen_hooks(pipe)
    if not left:
        return
    removed = remove_safegen_hooks(pipe)
    logger.warning("safegen.unprotect: removed what a guard left behind: %s", removed)
    still = safegen_hooks(pipe)
    if still:
        raise RuntimeError(f"safegen.unprotect could not remove {still} from the pipeline; reload it to be sure it "
                           "is unmodified")


def is_protected(pipe: Any) -> bool:
    return "_safegen" in getattr(pipe, "__dict__", {})


def last_reports(pipe: Any) -> list[SafetyReport]:
    """The safety reports of the pipeline's last protected call (useful with ``return_dict=False``)."""
    prot = pipe.__dict__.get("_safegen")
    if prot is None:
        raise ValueError("this pipeline is not protected; call safegen.protect(pipe) first")
    return prot.last_reports


# ---------------------------------------------------------------------- the protected call
#: Text arguments that condition the model besides ``prompt`` (each encoder of a multi-encoder pipeline).
_EXTRA_TEXT_ARGS = ("prompt_2", "prompt_3")
_PROMPT_KEYS = ("prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
                "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                "prompt_embeds_mask", "negative_prompt_embeds_mask")


def _as_list(x: Any, n: int | None = None) -> list | None:
    if x is None:
        return None
    if isinstance(x, str):
        return [x] * (n or 1)
    return list(x)


def _removed(prompt, removes: Sequence[str]):
    """``prompt`` (a string or a list of them) without any of ``removes``, deleted until none is left (so that the
    pipeline's own deletion finds nothing more to change)."""
    def clean(text):
        while isinstance(text, str) and any(r in text for r in removes):
            for r in removes:
                text = text.replace(r, "")
        return text

    return clean(prompt) if isinstance(prompt, str) else [clean(t) for t in prompt]


def _rewrite_prompts(pipe, a: dict[str, Any]) -> list[str] | None:
    """FLUX.2 [dev]'s caption upsampling (``caption_upsample_temperature``) has its LLM rewrite the prompts inside
    the call, after every guard has read them, and the model is conditioned on the rewrite. Run it here instead,
    as the pipeline would (``upsample_prompt`` with the call's images and temperature), and call the pipeline with
    the rewritten prompts and no upsampling, so that the guards judge the text the model reads. Returns the
    caller's prompts (``None`` when nothing was rewritten)."""
    temperature = a.get("caption_upsample_temperature")
    if not temperature or not isinstance(a.get("prompt"), (str, list, tuple)) or not hasattr(pipe, "upsample_prompt"):
        return None
    originals = _as_list(a["prompt"])
    rewritten = pipe.upsample_prompt(originals, images=a.get("image"), temperature=temperature,
                                     device=pipe._execution_device)
    if len(rewritten) != len(originals) or not all(isinstance(t, str) for t in rewritten):
        raise RuntimeError(f"caption upsampling returned {len(rewritten)} texts for {len(originals)} prompts")
    a["prompt"], a["caption_upsample_temperature"] = list(rewritten), None
    return originals


def _bind(base_call, pipe, args, kwargs) -> dict[str, Any]:
    sig = inspect.signature(base_call)
    bound = sig.bind(pipe, *args, **kwargs)  # raises TypeError for bad arguments, as the original would
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _new_call(prot: Protection, a: dict[str, Any]) -> Call:
    pipe = prot.pipe
    prompt = a.get("prompt")
    if prompt is not None and not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if prompt is None and a.get("prompt_embeds") is None:
        raise ValueError("provide either `prompt` or `prompt_embeds`")
    batch = 1 if isinstance(prompt, str) else (len(prompt) if prompt is not None else a["prompt_embeds"].shape[0])
    prompts = _as_list(prompt)
    negatives = _as_list(a.get("negative_prompt"), batch)
    spec = prot.spec
    nipp = (a.get(spec.per_prompt) or 1) if spec.per_prompt else 1
    params = inspect.signature(prot.base_class.__call__).parameters
    if spec.cfg == "true":  # FLUX: a second, negative branch only when asked for (as the pipeline decides)
        # (FLUX wants negative embeddings with their pooled vector; Qwen-Image has no pooled vector)
        has_negative = a.get("negative_prompt") is not None or (
            a.get("negative_prompt_embeds") is not None and (
                "negative_pooled_prompt_embeds" not in params or a.get("negative_pooled_prompt_embeds") is not None))
        do_cfg = a.get("true_cfg_scale", params["true_cfg_scale"].default) > 1 and has_negative
    elif spec.cfg == "none":  # FLUX.2 [dev]: guidance is an input of the transformer, never a second branch
        do_cfg = False
    else:  # "batch" and "separate": the pipeline's own rule
        gs = a.get("guidance_scale", params["guidance_scale"].default)
        do_cfg = (gs is not None and gs > 1 and getattr(prot.denoiser.config, "time_cond_proj_dim", None) is None
                  and not getattr(pipe.config, "is_distilled", False))  # (FLUX.2 [klein]'s step-distilled models)
    steps = a.get("num_inference_steps")
    if steps is None:
        steps = inspect.signature(prot.base_class.__call__).parameters["num_inference_steps"].default
    if a.get("timesteps") is not None:
        steps = len(a["timesteps"])
    elif a.get("sigmas") is not None:
        steps = len(a["sigmas"])
    asked = a.get("callback_on_step_end_tensor_inputs")
    allowed = getattr(pipe, "_callback_tensor_inputs", None)
    if asked is not None and allowed is not None and any(k not in allowed for k in asked):
        # what the pipeline's own check_inputs says (the guards add their tensors to the list it checks)
        raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {allowed}, but found "
                         f"{[k for k in asked if k not in allowed]}")
    reports = [SafetyReport(index=i, prompt=prompts[i // nipp] if prompts else None) for i in range(batch * nipp)]
    return Call(protection=prot, args=a, prompts=prompts, negative_prompts=negatives, num_images_per_prompt=nipp,
                batch_size=batch, do_cfg=do_cfg, num_steps=int(steps), reports=reports,
                blocked_prompts=[False] * batch)


def _timed(call: Call, guard: Guard, fn, *args):
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except GuardError:
        raise
    except Exception as e:  # fail closed
        raise GuardError(guard.name, e) from e
    finally:
        call.seconds[guard.name] = call.seconds.get(guard.name, 0.0) + time.perf_counter() - t0


@torch.no_grad()
def _run(pipe, base_call, args, kwargs, prot: Protection | None = None, redraw: bool = True):
    if prot is None:
        prot = pipe.__dict__["_safegen"]
    a = _bind(base_call, pipe, args, kwargs)
    if prot.spec.removes and isinstance(a.get("prompt"), (str, list, tuple)):  # deleted before any guard reads it
        a["prompt"] = _removed(a["prompt"], prot.spec.removes)
    given = dict(a)  # the caller's arguments, before any guard or rewrite edits them: what a redraw starts from
    originals = _rewrite_prompts(pipe, a)
    call = _new_call(prot, a)
    if originals is not None:
        for rep in call.reports:
            rep.original_prompt = originals[rep.index // call.num_images_per_prompt]
    want_dict = a.pop("return_dict", True)
    output_type = call_default(call, "output_type") or "pil"
    out = None
    if any(g.needs_conditioning for g in prot.guards):
        call.conditioning()  # outside the guards: a bad argument raises as it would unprotected
    try:
        for g in prot.guards:
            _timed(call, g, g.prepare, call)
        keep = call.kept_prompts
        if keep:
            run_args = _run_arguments(call, keep)
            try:
                out = base_call(pipe, **run_args, return_dict=True)
            except _LoopStopped:  # every item stopped in a pipeline that cannot interrupt: nothing to decode
                out = None
                if hasattr(pipe, "maybe_free_model_hooks"):
                    pipe.maybe_free_model_hooks()  # what the pipeline's own return path would have done
            steps_run = call.steps_run if call.steps_run is not None else call.num_steps
        else:
            steps_run = 0
            _set_call_state(call)  # the pipeline never ran: leave it as a call would have
        for g in prot.guards:
            _timed(call, g, g.finish, call)
    except GuardError as err:
        _cleanup(call)
        _fail_closed(call, err)
        _set_call_state(call)
        out, keep, steps_run = None, [], 0
    except BaseException:
        _cleanup(call)
        raise
    finally:
        _run_deferred(call)  # per-call hooks and patches go, whatever finish did
    pipe._interrupt = False  # a guard may have stopped the whole loop; the next call starts clean
    _fill_step_counts(call, keep, steps_run)
    _settle(call.reports, call.seconds)
    out = _assemble(call, out, keep, output_type)
    _after_decode(call, out, output_type)
    for rep in call.reports:  # what the policy asked for and this pipeline cannot run, said on every item
        rep.guards += [GuardResult(name, "pass", reason=f"skipped: {why}", details={"skipped": True})
                       for name, why in prot.skipped.items()]
    if redraw and prot.redraws and call.policy.redraws:
        _redraw(call, out, given, output_type)
    prot.last_reports = call.reports
    out.safety = call.reports
    if want_dict:
        return out
    return tuple(getattr(out, f.name) for f in dataclasses.fields(out))  # as the pipeline does, Nones kept


def _drifted(report: SafetyReport, stages: dict[str, str]) -> bool:
    """Whether an item was blocked only by guards that judge the generation (stage ``"loop"`` or ``"output"``:
    LVD, the output check) while every prompt and conditioning check passed its prompt: a benign prompt whose
    draw went wrong, which :attr:`Policy.redraws` draws again. A guard error (verdict ``"error"``) never counts:
    it fails closed."""
    acted = [r for r in report.guards if r.verdict in ("block", "error")]
    return bool(acted) and all(r.verdict == "block" and stages.get(r.guard) in ("loop", "output") for r in acted)


def item_arguments(call: Call, args: dict[str, Any], items: Sequence[int]) -> dict[str, Any]:
    """``args`` (a call's keyword arguments) cut to ``items``, one output per prompt: each text argument and each
    per-prompt tensor (embeddings, their masks) gives the row of the item's prompt, given latents the item's own;
    the caller's step callbacks are dropped (they saw the first generation). The generator is left as it is."""
    a = dict(args)
    n = call.num_images_per_prompt
    rows = [i // n for i in items]
    for key, v in args.items():
        if key.startswith(("prompt", "negative_prompt")) and "embeds" not in key:
            if isinstance(v, str):
                a[key] = [v] * len(items)
            elif isinstance(v, (list, tuple)) and len(v) == call.batch_size:
                a[key] = [v[r] for r in rows]
        if "prompt" in key and torch.is_tensor(v) and v.ndim:
            if v.shape[0] == call.batch_size and v.shape[0] > 1:
                a[key] = v[torch.tensor(rows, device=v.device)]
            elif v.shape[0] == call.n_items and v.shape[0] > 1:
                a[key] = v[torch.tensor(list(items), device=v.device)]
    per_prompt = call.spec.per_prompt
    if per_prompt is not None and per_prompt in a:
        a[per_prompt] = 1
    if torch.is_tensor(a.get("latents")):
        a["latents"] = a["latents"][torch.tensor(list(items), device=a["latents"].device)]
    for key in ("callback_on_step_end", "callback_on_step_end_tensor_inputs", "callback", "callback_steps"):
        a.pop(key, None)
    return a


def _caller_generator(gen: Any, item: int, n_items: int) -> torch.Generator | None:
    """The caller's generator for ``item`` (one per item, or one for all), else ``None``."""
    if isinstance(gen, (list, tuple)):
        gen = gen[item] if len(gen) == n_items else (gen[0] if gen else None)
    return gen if isinstance(gen, torch.Generator) else None


def _draw_seed(gen: torch.Generator | None, item: int, attempt: int) -> tuple[torch.Generator | None, int | None]:
    """A fresh generator for redraw ``attempt`` of ``item``, derived from the caller's generator for it (``gen``,
    by its initial seed), so that a seeded call redraws the same way every time; ``(None, None)`` without one."""
    import hashlib

    if gen is None:
        return None, None
    key = f"safegen-redraw:{gen.initial_seed()}:{item}:{attempt}".encode()
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2 ** 63 - 1)
    return torch.Generator(device=gen.device).manual_seed(seed), seed


def _redraw_protection(prot: Protection, policy: Policy) -> Protection:
    """What a redraw runs under: ``prot`` itself, or with the policy's ``redraw_guards`` added (resolved and
    attached once per guard list, sharing ``prot``'s caches and guard states; unprotect detaches them)."""
    names = tuple(policy.redraw_guards)
    if not names:
        return prot
    key = ("redraw", names)
    if key not in prot.cache:
        if prot.resolve is None:
            raise ValueError("a policy's redraw_guards need safegen.protect to resolve the names")
        have = {g.name for g in prot.guards}
        extra = [g for g in (prot.resolve(n) for n in names) if g.name not in have]
        bad = [g.name for g in extra if g.stage in ("weights", "output")]
        if bad:
            raise ValueError(f"the policy's redraw_guards cannot use {bad}: a weight guard would change every "
                             "generation and an output guard judges rather than steers; use loop or conditioning "
                             "guards (e.g. sld-max)")
        # (``built`` shares ``prot``'s caches, guard states and skipped list: only ``extra`` is attached to it; one
        # that cannot run here, e.g. SLD on a guidance-distilled model, is skipped as the policy allows)
        built = dataclasses.replace(prot, guards=sorted(prot.guards + extra, key=lambda g: STAGES.index(g.stage)))
        attached = attach_all(built, skip_unavailable=policy.skip_unavailable, guards=extra, note="(for redraws) ")
        prot.cache[key] = (built, attached)
    return prot.cache[key][0]


def _redraw(call: Call, out: Any, given: dict[str, Any], output_type: str) -> None:
    """Draw again, from fresh noise, under the same protection plus the policy's ``redraw_guards``
    (:func:`_redraw_protection`), the items that :func:`_drifted`, up to :attr:`Policy.redraws` times. A redraw that
    passes replaces the item and its report (which keeps the earlier draws in ``redraws``); one that is blocked
    again keeps the placeholder."""
    from .outputs import put_item

    prot = call.protection
    under = _redraw_protection(prot, call.policy)
    stages = {g.name: g.stage for g in under.guards}
    field_name = call.spec.output
    gens = [_caller_generator(given.get("generator"), i, call.n_items) for i in range(call.n_items)]
    seeds = {i: g.initial_seed() if g is not None else None for i, g in enumerate(gens)}
    items = [i for i, rep in enumerate(call.reports) if _drifted(rep, stages)]
    for attempt in range(1, call.policy.redraws + 1):
        if not items:
            return
        a = item_arguments(call, given, items)
        a.pop("latents", None)  # fresh noise is the point of a redraw
        drawn = [_draw_seed(gens[i], i, attempt) for i in items]
        a.pop("generator", None)
        if all(g is not None for g, _ in drawn):
            a["generator"] = [g for g, _ in drawn]
        a.update(output_type=output_type, return_dict=True)
        again = _run(prot.pipe, prot.base_class.__call__, (), a, prot=under, redraw=False)
        fresh = getattr(again, field_name)
        left = []
        for k, i in enumerate(items):
            before, rep = call.reports[i], again.safety[k]
            own = before.unet_steps_run - sum(d["unet_steps_run"] for d in before.redraws)
            rep.redraws = before.redraws + [{"seed": seeds[i], "verdict": before.verdict, "reason": before.reason,
                                             "unet_steps_run": own, "next_seed": drawn[k][1]}]
            rep.index, rep.prompt, rep.original_prompt = before.index, before.prompt, before.original_prompt
            rep.unet_steps_run += before.unet_steps_run  # every draw's steps: what the item cost
            rep.unet_steps_saved = max(call.num_steps - rep.unet_steps_run, 0)
            call.reports[i] = rep
            seeds[i] = drawn[k][1]
            if not rep.blocked:
                put_item(out, field_name, i, fresh[k])
            elif _drifted(rep, stages):
                left.append(i)
        items = left


def _after_decode(call: Call, out: Any, output_type: str) -> None:
    """Stage ``"output"``: each output guard judges the assembled items in place; one that fails blocks every
    item of the call (fail closed), whatever the others decided."""
    from .outputs import _placeholder, put_item

    field_name = call.spec.output
    for g in call.protection.guards:
        if g.stage != "output":
            continue
        t0 = time.perf_counter()
        try:
            g.after_decode(call, out, output_type)
        except Exception as e:
            items = getattr(out, field_name)
            for i in range(call.n_items):
                put_item(out, field_name, i, _placeholder(call, output_type, items[i]))
                res = call.result(i, g.name)
                res.verdict = "error"
                res.reason = f"guard failed, item blocked (fail closed): {type(e).__name__}: {e}"
        _settle(call.reports, {g.name: time.perf_counter() - t0}, only=g.name)


def _settle(reports: list[SafetyReport], seconds: dict[str, float], only: str | None = None) -> None:
    """Each guard result's per-item share of its guard's time in the call (divided over the items that carry a
    result of it: the ones it worked on) and a pass without category or concept (:meth:`GuardResult.settle`)."""
    worked: dict[str, int] = {}
    for rep in reports:
        for res in rep.guards:
            worked[res.guard] = worked.get(res.guard, 0) + 1
    for rep in reports:
        for res in rep.guards:
            if only is None or res.guard == only:
                res.settle(seconds.get(res.guard, 0.0), worked[res.guard])


def _run_deferred(call: Call) -> None:
    """Run every cleanup registered with :meth:`Call.defer` (newest first); one failing does not stop the rest."""
    while call._cleanups:
        fn = call._cleanups.pop()
        try:
            fn()
        except Exception as e:  # pragma: no cover - a remove() that fails is a bug; say so, keep cleaning
            logger.warning("safegen: a per-call cleanup failed: %s: %s", type(e).__name__, e)


def _set_call_state(call: Call) -> None:
    """Set what the pipeline's ``__call__`` sets on the pipeline (``_guidance_scale``, ``_clip_skip``,
    ``_num_timesteps``...) when it did not run (every item blocked before the loop), so reading
    ``pipe.guidance_scale`` after a protected call works as after a plain one: each read-only property of the
    pipeline class that is named like a call argument gets that argument's value."""
    pipe, base = call.pipe, call.protection.base_class
    params = inspect.signature(base.__call__).parameters
    for name in params:
        if isinstance(inspect.getattr_static(base, name, None), property):
            setattr(pipe, f"_{name}", call_default(call, name))
    if isinstance(inspect.getattr_static(base, "num_timesteps", None), property):
        pipe._num_timesteps = call.num_steps
    pipe._interrupt = False


def _cleanup(call: Call) -> None:
    """Remove per-call hooks of every guard after an error (finish may not have run)."""
    for g in call.protection.guards:
        try:
            g.finish(call)
        except Exception as e:  # already failing closed; say so rather than hide it
            logger.warning("safegen: guard %r also failed while cleaning up: %s: %s", g.name, type(e).__name__, e)
    call.pipe._interrupt = False


def _fail_closed(call: Call, err: GuardError) -> None:
    call.blocked_prompts = [True] * call.batch_size
    for i in range(call.n_items):
        # what other guards planned never ran: the report holds only the failure
        call.reports[i].guards = [g for g in call.reports[i].guards if g.guard == err.guard]
        res = call.result(i, err.guard)
        res.verdict = "error"
        res.reason = f"guard failed, item blocked (fail closed): {type(err.error).__name__}: {err.error}"


def _fill_step_counts(call: Call, keep: list[int], steps_run: int) -> None:
    kept_items = {it for p in keep for it in call.items_of(p)}
    per_item = call.stopped_items
    for rep in call.reports:
        if rep.index in kept_items:
            rep.unet_steps_run = per_item.get(rep.index, steps_run)
        else:
            rep.unet_steps_run = 0
        rep.unet_steps_saved = call.num_steps - rep.unet_steps_run


def _run_arguments(call: Call, keep: list[int]) -> dict[str, Any]:
    """Arguments for the original call: subset to the kept prompts, conditioning, composite callback."""
    a = dict(call.args)
    n = call.num_images_per_prompt
    subset = len(keep) < call.batch_size
    cond = call._cond_override
    if cond is None and (subset or call._conditioning is not None):
        # the conditioning a guard already computed is handed in: the pipeline does not encode the prompts twice
        # (on a T5 pipeline that second pass cost a tenth of a call); same encoder, same tensors, same output
        cond = call.conditioning()
    if cond is not None:
        for k in _PROMPT_KEYS:
            a.pop(k, None)
        idx = torch.tensor(keep)
        per_item = call.spec.embeds_per_item and n > 1
        for k, v in cond.items():
            if v is not None:
                v = v.index_select(0, idx.to(v.device)) if subset else v
                a[k] = v.repeat_interleave(n, 0) if per_item else v  # the rows the pipeline's own encode makes
        if per_item:
            a[call.spec.per_prompt] = 1
    if subset:
        items = [it for p in keep for it in call.items_of(p)]
        gen = a.get("generator")
        if isinstance(gen, list):
            a["generator"] = [gen[i] for i in items]
        if a.get("latents") is not None:
            a["latents"] = a["latents"][torch.tensor(items)]
        call.kept_items = items
    # composite step callback: guards first (in stage order), then the user's
    legacy = call.spec.legacy_callback
    user_cb = None if legacy else a.pop("callback_on_step_end", None)
    user_inputs = [] if legacy else list(a.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
    if user_cb is not None and hasattr(user_cb, "tensor_inputs"):
        user_inputs = list(user_cb.tensor_inputs)
    stepping = [g for g in call.protection.guards if g.tensor_inputs is not None]
    inputs = list(dict.fromkeys(user_inputs + [t for g in stepping for t in g.tensor_inputs]))
    allowed = getattr(call.pipe, "_callback_tensor_inputs", inputs)
    inputs = [t for t in inputs if t in allowed]

    def on_step_end(pipe, i, t, tensors):
        call.step = i + 1
        call.steps_run = i + 1
        for g in stepping:
            changed = _timed(call, g, g.step_end, call, i, t, tensors)
            if changed:
                tensors.update(changed)
        if user_cb is not None:  # the user's callback sees the tensors it asked for, as unprotected
            changed = user_cb(pipe, i, t, {k: tensors[k] for k in user_inputs if k in tensors})
            if changed:
                tensors.update(changed)
        return tensors

    if legacy:
        bridge = _LegacyCallback(call, on_step_end, a.pop("callback", None), a.pop("callback_steps", None) or 1)
        call.defer(bridge.remove)
        a["callback"], a["callback_steps"] = bridge, 1
    else:
        a["callback_on_step_end"] = on_step_end
        a["callback_on_step_end_tensor_inputs"] = inputs
    return a


class _LegacyCallback:
    """``callback_on_step_end`` emulated on a pipeline that only calls ``callback(step, t, latents)`` (diffusers'
    deprecated ``TextToVideoSDPipeline``), which can neither hand tensors back nor interrupt the loop.

    * ``prompt_embeds``: a forward pre-hook on the denoiser keeps the ``encoder_hidden_states`` tensor of the
      first call, which is the pipeline's own ``[negative; prompt]`` tensor (made inside its ``__call__``, reused
      unchanged on every step). Guards get it as ``tensors["prompt_embeds"]``; when one returns a new value, it
      is copied into that tensor in place, so the pipeline's next denoiser call reads it (SAFREE's switch back to
      the original conditioning after its filtered steps).
    * Stopping: items are stopped row by row as on any pipeline (:class:`~safegen.unet_rows.ItemStopper`); when
      no item is left, the pipeline cannot be interrupted, so :class:`_LoopStopped` is raised here and caught by
      the protected call, which returns the placeholders: no more denoiser steps and no decode.
    * The user's own ``callback`` runs after the guards, every ``callback_steps`` steps, as it would unprotected.
    """

    def __init__(self, call: Call, on_step_end, user_cb, user_steps: int):
        self.call, self.on_step_end = call, on_step_end
        self.user_cb, self.user_steps = user_cb, int(user_steps)
        self.embeds: torch.Tensor | None = None
        self._handle = add_hook(call.denoiser, "safegen.core.legacy-callback", pre=self._capture)

    def _capture(self, module, args, kwargs):
        if self.embeds is None:
            ehs = kwargs.get("encoder_hidden_states")
            self.embeds = ehs if torch.is_tensor(ehs) else None
        return None

    def remove(self) -> None:
        self._handle.remove()
        self.embeds = None

    def __call__(self, i: int, t, latents: torch.Tensor) -> None:
        call = self.call
        tensors: dict[str, Any] = {"latents": latents}
        if self.embeds is not None:
            tensors["prompt_embeds"] = self.embeds
        out = self.on_step_end(call.pipe, i, t, tensors)
        new = out.get("prompt_embeds")
        if new is not None and self.embeds is not None and new is not self.embeds:
            self.embeds.copy_(new.to(self.embeds.dtype))
        if self.user_cb is not None and i % self.user_steps == 0:
            self.user_cb(i, t, latents)
        if call._stopper is not None and not any(call._stopper.active):
            raise _LoopStopped()


