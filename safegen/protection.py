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
5. blocked items get the policy's placeholder; every item gets a :class:`~safegen.report.SafetyReport`
   (``out.safety``, and ``safegen.last_reports(pipe)`` when ``return_dict=False``).

Any exception raised by a guard fails the call closed: every item is blocked and its report says why.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .guards.base import STAGES, Guard, GuardError
from .policy import Policy, load_policy
from .report import GuardResult, SafetyReport

logger = logging.getLogger("safegen")

# ---------------------------------------------------------------------- pipeline kinds
#: Supported pipeline classes (matched by name through the MRO, so subclasses and community files work).
SUPPORTED_PIPELINES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd",
}


def pipeline_kind(pipe: Any) -> str:
    """``"sd"`` or ``"sdxl"`` for a supported pipeline; ``TypeError`` naming the supported ones otherwise."""
    cls = getattr(pipe, "_safegen_base", type(pipe))
    for klass in cls.__mro__:
        kind = SUPPORTED_PIPELINES.get(klass.__name__)
        if kind:
            return kind
    raise TypeError(
        f"safegen.protect does not support {type(pipe).__name__}; supported pipelines: "
        f"{', '.join(SUPPORTED_PIPELINES)} (and their subclasses)"
    )


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
    scratch: dict = field(default_factory=dict)
    _stopper: Any = None  # the ItemStopper, installed by the first stop_item
    seconds: dict = field(default_factory=dict)
    _conditioning: dict | None = None
    _cond_override: dict | None = None

    @property
    def pipe(self):
        return self.protection.pipe

    @property
    def policy(self) -> Policy:
        return self.protection.policy

    @property
    def kind(self) -> str:
        return self.protection.kind

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

    def block_prompt(self, prompt_index: int, guard: str, reason: str, **fields: Any) -> None:
        """Block every image of a prompt before the loop: it gets no UNet step and the placeholder."""
        self.blocked_prompts[prompt_index] = True
        for item in self.items_of(prompt_index):
            res = self.result(item, guard)
            res.verdict = "block"
            res.reason = reason
            for k, v in fields.items():
                setattr(res, k, v)

    def stop_item(self, item: int, guard: str, reason: str, steps_run: int, **fields: Any) -> None:
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
            self._stopper = ItemStopper(self.pipe, len(running), guard=guard).install()
        if self._stopper.stop(running.index(item)):
            self.pipe._interrupt = True
        self.stopped_items[item] = int(steps_run)
        res = self.result(item, guard)
        res.verdict = "block"
        res.reason = reason
        res.steps_saved = self.num_steps - int(steps_run)
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
    pipe, a = call.pipe, call.args
    cak = a.get("cross_attention_kwargs") or {}
    common = dict(device=call.device, num_images_per_prompt=1, do_classifier_free_guidance=call.do_cfg,
                  lora_scale=cak.get("scale"), clip_skip=a.get("clip_skip"))
    if call.kind == "sdxl":
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=a.get("prompt"), prompt_2=a.get("prompt_2"), negative_prompt=a.get("negative_prompt"),
            negative_prompt_2=a.get("negative_prompt_2"), prompt_embeds=a.get("prompt_embeds"),
            negative_prompt_embeds=a.get("negative_prompt_embeds"), pooled_prompt_embeds=a.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=a.get("negative_pooled_prompt_embeds"), **common)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled_prompt_embeds": ppe,
                "negative_pooled_prompt_embeds": nppe}
    pe, npe = pipe.encode_prompt(a.get("prompt"), negative_prompt=a.get("negative_prompt"),
                                 prompt_embeds=a.get("prompt_embeds"),
                                 negative_prompt_embeds=a.get("negative_prompt_embeds"), **common)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe}


# ---------------------------------------------------------------------- guard resolution
def resolve_guard(spec: "str | Guard") -> Guard:
    """A guard instance from a name or preset (``"safree"``, ``"sld"``, ``"sld-strong"``) or an instance."""
    if isinstance(spec, Guard):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a guard is a safegen Guard instance or a name, got {type(spec).__name__}")
    from . import guards as g

    name = spec.strip().lower().replace("_", "-")
    if name in g.GUARD_PRESETS:
        return g.GUARD_PRESETS[name]()
    raise ValueError(f"unknown guard {spec!r}; known: {sorted(g.GUARD_PRESETS)}")


# ---------------------------------------------------------------------- protect / unprotect
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


def protect(pipe: Any, policy: "str | Policy | dict" = "default", guards: "Sequence[str | Guard] | None" = None,
            *, sensitivity: float | None = None) -> Any:
    """Make a diffusers pipeline safe in place; returns the same pipeline.

    Args:
        pipe: a ``StableDiffusionPipeline`` (SD 1.x/2.x, epsilon or v-prediction) or ``StableDiffusionXLPipeline``.
        policy: a built-in policy name, a path to a ``.yaml``/``.json`` policy, a mapping or a
            :class:`~safegen.Policy` (shared, not copied: edits in code apply to the next call).
        guards: guard instances or names (``"safree"``, ``"sld"``, ``"sld-max"``...); defaults to the
            policy's ``guards`` list.
        sensitivity: overrides the policy's sensitivity (scales every guard's thresholds).

    Calling it again replaces the previous protection (idempotent); :func:`unprotect` restores the pipeline
    exactly. Outputs gain ``out.safety``: one :class:`~safegen.SafetyReport` per image.

    Example:
        >>> import safegen
        >>> from safegen.testing import tiny_sd_pipeline
        >>> # sensitivity 0.1 raises the similarity thresholds above 1: on this *random* tiny model only
        >>> # literal concept phrases should count
        >>> pipe = safegen.protect(tiny_sd_pipeline(), guards=["safree"], sensitivity=0.1)
        >>> out = pipe(["a photo of a red bus", "a photo of blood and gore"], num_inference_steps=2,
        ...            output_type="np")
        >>> [r.verdict for r in out.safety], out.safety[1].result("safree").category
        (['pass', 'steer'], 'violence')
        >>> _ = safegen.unprotect(pipe)
    """
    kind = pipeline_kind(pipe)
    # everything that can be rejected is checked before the current protection is touched
    pol = load_policy(policy)
    if sensitivity is not None:
        pol = pol.copy()  # the caller's policy object keeps its own sensitivity
        pol.sensitivity = sensitivity
    guard_list = [resolve_guard(g) for g in (pol.guards if guards is None else guards)]
    names = [g.name for g in guard_list]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"guard(s) {sorted(dup)} given more than once; pass each guard once")
    guard_list.sort(key=lambda g: STAGES.index(g.stage))
    if is_protected(pipe):
        unprotect(pipe)
    base = type(pipe)
    prot = Protection(pipe=pipe, kind=kind, policy=pol, guards=guard_list, base_class=base)
    attached: list[Guard] = []
    try:
        for g in guard_list:
            g.attach(prot)
            attached.append(g)
    except Exception:
        for g in reversed(attached):
            g.detach(prot)
        raise
    pipe.__class__ = _protected_class(base)
    object.__setattr__(pipe, "_safegen", prot)
    return pipe


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
    for g in reversed(prot.guards):
        g.detach(prot)
    pipe.__class__ = prot.base_class
    del pipe.__dict__["_safegen"]
    return pipe


def is_protected(pipe: Any) -> bool:
    return "_safegen" in getattr(pipe, "__dict__", {})


def last_reports(pipe: Any) -> list[SafetyReport]:
    """The safety reports of the pipeline's last protected call (useful with ``return_dict=False``)."""
    prot = pipe.__dict__.get("_safegen")
    if prot is None:
        raise ValueError("this pipeline is not protected; call safegen.protect(pipe) first")
    return prot.last_reports


# ---------------------------------------------------------------------- the protected call
_PROMPT_KEYS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "prompt_embeds",
                "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


def _as_list(x: Any, n: int | None = None) -> list | None:
    if x is None:
        return None
    if isinstance(x, str):
        return [x] * (n or 1)
    return list(x)


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
    nipp = a.get("num_images_per_prompt") or 1
    gs = a.get("guidance_scale", inspect.signature(prot.base_class.__call__).parameters["guidance_scale"].default)
    do_cfg = gs > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    steps = a.get("num_inference_steps")
    if steps is None:
        steps = inspect.signature(prot.base_class.__call__).parameters["num_inference_steps"].default
    if a.get("timesteps") is not None:
        steps = len(a["timesteps"])
    elif a.get("sigmas") is not None:
        steps = len(a["sigmas"])
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
def _run(pipe, base_call, args, kwargs):
    prot: Protection = pipe.__dict__["_safegen"]
    a = _bind(base_call, pipe, args, kwargs)
    call = _new_call(prot, a)
    want_dict = a.pop("return_dict", True)
    output_type = a.get("output_type", "pil")
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
            finally:
                if call._stopper is not None:
                    call._stopper.remove()
            steps_run = call.scratch.get("steps_run", call.num_steps)
        else:
            steps_run = 0
        for g in prot.guards:
            _timed(call, g, g.finish, call)
    except GuardError as err:
        _cleanup(call)
        _fail_closed(call, err)
        out, keep, steps_run = None, [], 0
    except BaseException:
        _cleanup(call)
        raise
    pipe._interrupt = False  # a guard may have stopped the whole loop; the next call starts clean
    _fill_step_counts(call, keep, steps_run)
    for rep in call.reports:
        for res in rep.guards:
            res.seconds = call.seconds.get(res.guard, 0.0)
    out = _assemble(call, out, keep, output_type)
    prot.last_reports = call.reports
    out.safety = call.reports
    if want_dict:
        return out
    return tuple(getattr(out, f.name) for f in dataclasses.fields(out))  # as the pipeline does, Nones kept


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
    per_item = {**call.scratch.get("steps_run_per_item", {}), **call.stopped_items}
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
    if cond is None and subset:
        cond = call.conditioning()
    if cond is not None:
        for k in _PROMPT_KEYS:
            a.pop(k, None)
        idx = torch.tensor(keep)
        for k, v in cond.items():
            if v is not None:
                a[k] = v.index_select(0, idx.to(v.device)) if subset else v
    if subset:
        items = [it for p in keep for it in call.items_of(p)]
        gen = a.get("generator")
        if isinstance(gen, list):
            a["generator"] = [gen[i] for i in items]
        if a.get("latents") is not None:
            a["latents"] = a["latents"][torch.tensor(items)]
        call.scratch["kept_items"] = items
    # composite step callback: guards first (in stage order), then the user's
    user_cb = a.pop("callback_on_step_end", None)
    user_inputs = list(a.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
    if user_cb is not None and hasattr(user_cb, "tensor_inputs"):
        user_inputs = list(user_cb.tensor_inputs)
    stepping = [g for g in call.protection.guards if g.tensor_inputs is not None]
    inputs = list(dict.fromkeys(user_inputs + [t for g in stepping for t in g.tensor_inputs]))
    allowed = getattr(call.pipe, "_callback_tensor_inputs", inputs)
    inputs = [t for t in inputs if t in allowed]

    def on_step_end(pipe, i, t, tensors):
        call.step = i + 1
        call.scratch["steps_run"] = i + 1
        for g in stepping:
            changed = _timed(call, g, g.step_end, call, i, t, tensors)
            if changed:
                tensors.update(changed)
        if user_cb is not None:
            changed = user_cb(pipe, i, t, tensors)
            if changed:
                tensors.update(changed)
        return tensors

    a["callback_on_step_end"] = on_step_end
    a["callback_on_step_end_tensor_inputs"] = inputs
    call.scratch["kept_prompts"] = keep
    return a


# ---------------------------------------------------------------------- output assembly
def _image_size(call: Call) -> tuple[int, int]:
    pipe, a = call.pipe, call.args
    default = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    h = a.get("height") or default * pipe.vae_scale_factor
    w = a.get("width") or default * pipe.vae_scale_factor
    return int(h), int(w)


def _placeholder(call: Call, output_type: str, like: Any) -> Any:
    """The policy's placeholder for a blocked item, in the output's type (never a black square)."""
    style = call.policy.placeholder
    h, w = _image_size(call)
    if output_type == "latent":
        c = call.pipe.unet.config.in_channels
        f = call.pipe.vae_scale_factor
        return torch.zeros(c, h // f, w // f) if like is None else torch.zeros_like(like)
    gray = 0.5
    if output_type == "pil":
        if style == "none":
            return None
        from PIL import Image

        return Image.new("RGB", (w, h), (128, 128, 128))
    if output_type == "pt":
        return torch.full((3, h, w), gray) if like is None else torch.full_like(like, gray)
    return np.full((h, w, 3), gray, dtype=np.float32) if like is None else np.full_like(like, gray)


def _output_class(call: Call):
    if call.kind == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

        return StableDiffusionXLPipelineOutput, {}
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

    return StableDiffusionPipelineOutput, {"nsfw_content_detected": None}


def _assemble(call: Call, out: Any, keep: list[int], output_type: str) -> Any:
    n_items = call.n_items
    kept_items = [it for p in keep for it in call.items_of(p)]
    if out is not None and len(kept_items) == n_items and not call.stopped_items:
        return out
    produced = out.images if out is not None else []
    like = produced[0] if len(produced) and not isinstance(produced, list) else None
    slots: list[Any] = [None] * n_items
    for j, item in enumerate(kept_items):
        slots[item] = produced[j]
    for item in range(n_items):
        if item not in kept_items or item in call.stopped_items:
            slots[item] = _placeholder(call, output_type, like)
    if output_type in ("np", None) or isinstance(produced, np.ndarray):
        images: Any = np.stack(slots)
    elif output_type in ("pt", "latent") or torch.is_tensor(produced):
        images = torch.stack(slots)
    else:
        images = slots
    if out is None:
        cls, extra = _output_class(call)
        return cls(images=images, **extra)
    out.images = images
    nsfw = getattr(out, "nsfw_content_detected", None)
    if isinstance(nsfw, list):
        full = [None] * n_items
        for j, item in enumerate(kept_items):
            full[item] = nsfw[j]
        out.nsfw_content_detected = full
    return out
