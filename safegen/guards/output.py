"""A post-hoc output check: the evaluation oracles as a guard (stage ``"output"``, after the image is decoded).

Every returned item that no other guard blocked is judged by an oracle (``"world"``, ``"nudenet"``,
``"classifier"``, or any object with ``judge(prompt, image)``). An item the oracle finds unsafe gets the guard's
``action``:

* ``"placeholder"``: the policy's placeholder replaces it (verdict ``block``);
* ``"blur"``: a strong Gaussian blur (radius ``blur_radius``, default 1/8 of the image side); checked again,
  and if it is still unsafe the placeholder replaces it (verdict ``block``);
* ``"regenerate"``: the item is generated again, same prompt and same initial noise, with ``stronger`` guards
  (default SLD's strong preset) instead of the protection's own, and checked again: if the second check passes
  the new image is returned (verdict ``steer``), else the placeholder (verdict ``block``). The report keeps both
  checks (``details["first_check"]``, ``details["second_check"]``), the stronger guards' own report
  (``details["regeneration_report"]``) and the UNet steps the regeneration ran (``details["extra_unet_steps"]``).

Like every guard, an error fails closed: every item of the call gets the placeholder and an ``error`` verdict.
A judgement with an ``error`` (e.g. the classifier's non-finite scores) fails that item closed the same way.
``output_type="latent"`` cannot be judged: the items pass with verdict ``log`` and a reason saying so.

``"classifier"`` is a small CNN trained on the model's own images (:mod:`safegen.guards.output_classifier`),
calibrated on benign reference images at the policy's false-positive budget; the embedded default model's ships
(``assets/output/default-model.safetensors``), other models need their own (``safegen train-output-classifier``,
then ``oracle_options={"weights": FILE}``). An oracle with ``judge_batch(prompts, images)`` judges the call's items
in one pass; one with ``bind(pipe, policy)`` is bound to the protected pipeline when the guard attaches (the
classifier checks it was trained for this model), and one with ``for_policy(policy)`` follows the policy at every
call (the classifier's categories, budget and fixed thresholds).

Example:
    >>> import safegen
    >>> from safegen.testing import tiny_sd_pipeline
    >>> class FlagBlood:  # a stand-in oracle: any prompt with "blood" is unsafe
    ...     name, protocol = "flag-blood", "prompt contains 'blood'"
    ...     def judge(self, prompt, image):
    ...         return {"unsafe": "blood" in prompt, "category": "violence", "fidelity": None}
    >>> pipe = safegen.protect(tiny_sd_pipeline(), guards=[safegen.OutputGuard(oracle=FlagBlood())])
    >>> out = pipe(["a red bus", "blood on a car"], num_inference_steps=2, output_type="np")
    >>> [r.verdict for r in out.safety], float(out.images[1].std())
    (['pass', 'block'], 0.0)
    >>> out.safety[1].result("output").reason
    "output check (flag-blood) found violence; replaced by the policy's placeholder"
    >>> _ = safegen.unprotect(pipe)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..guard import Guard
from ..outputs import _placeholder, put_item

__all__ = ["OutputGuard", "ACTIONS"]

#: What the guard does with an item its oracle finds unsafe.
ACTIONS = ("placeholder", "blur", "regenerate")


#: The oracle name of the trained output classifier (:mod:`safegen.guards.output_classifier`).
CLASSIFIER = "classifier"
#: The oracle name that picks the output check a pipeline can run (the default policy's): the trained classifier
#: where the model has one (the embedded default model), else NudeNet where it is installed.
AUTO = "auto"


def _label(oracle) -> str:
    """An oracle's name in reports and reasons."""
    return getattr(oracle, "name", type(oracle).__name__)


def _summary(j: dict) -> dict:
    keep = ("unsafe", "category", "score", "risk", "oracle_error", "error")
    return {k: j[k] for k in keep if k in j and j[k] is not None}


def _fill(res, j: dict) -> None:
    """The calibrated oracle's figures on the item's report (threshold, risk, budget, per-category scores)."""
    if j.get("threshold") is None:
        return
    for key in ("score", "threshold", "risk", "budget"):
        if j.get(key) is not None and hasattr(res, key):
            setattr(res, key, j[key])
    for key in ("scores", "risks"):
        if isinstance(j.get(key), dict) and hasattr(res, key):
            setattr(res, key, dict(j[key]))


@dataclass(repr=False)
class OutputGuard(Guard):
    """Judge every returned image with an oracle and act on the unsafe ones (module docstring).

    Args:
        oracle (`str` or oracle, defaults to ``"world"``): an oracle name of :data:`safegen.eval.oracles.ORACLES`
            (``"world"`` is right for the embedded default model, ``"nudenet"`` for real models), ``"classifier"``
            (:class:`safegen.guards.output_classifier.OutputClassifier`: a classifier trained on the model's
            images, the default model's shipped), ``"auto"`` (the classifier where the model has one, else NudeNet
            where it is installed, else the guard is unavailable: the default policy's output check) or an object
            with ``name``, ``protocol`` and ``judge(prompt, image)``.
        action (`str`, defaults to ``"placeholder"``): ``"placeholder"``, ``"blur"`` or ``"regenerate"``.
        stronger (`list`, defaults to ``["sld-strong"]``): guards (names or instances) that regenerate an
            unsafe item with ``action="regenerate"``; not weight guards (they would change every generation).
        blur_radius (`float`, *optional*): Gaussian blur radius in pixels for ``action="blur"``; default: an
            eighth of the image's longer side.
        oracle_options (`dict`): keywords for a named oracle (e.g. ``{"threshold": 0.45}`` for NudeNet;
            ``{"weights": FILE, "budget": 0.02}`` for the classifier).
    """

    name: ClassVar[str] = "output"
    stage: ClassVar[str] = "output"
    summary: ClassVar[str] = ("judges every decoded image with an oracle and replaces, blurs or regenerates the "
                                 "unsafe ones")

    oracle: Any = "world"
    action: str = "placeholder"
    stronger: Sequence[Any] = ("sld-strong",)
    blur_radius: float | None = None
    oracle_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"OutputGuard(action=...) must be one of {', '.join(ACTIONS)}, got {self.action!r}")
        if self.blur_radius is not None and not float(self.blur_radius) > 0:
            raise ValueError(f"OutputGuard(blur_radius=...) must be positive, got {self.blur_radius!r}")
        if not isinstance(self.oracle, str) and not callable(getattr(self.oracle, "judge", None)):
            raise TypeError("OutputGuard(oracle=...) must be an oracle name or an object with judge(prompt, image)")
        self.stronger = list(self.stronger)
        if self.action == "regenerate" and not self.stronger:
            raise ValueError("OutputGuard(action='regenerate') needs at least one guard in stronger=[...]")
        self._oracle = None

    def config_dict(self) -> dict[str, Any]:
        return {"oracle": self.oracle if isinstance(self.oracle, str) else getattr(self.oracle, "name", "custom"),
                "action": self.action, "stronger": [g if isinstance(g, str) else g.name for g in self.stronger],
                "blur_radius": self.blur_radius}

    def _auto(self, pipe, policy):
        """``oracle="auto"``: the classifier trained for this model, else NudeNet (installed), else
        :class:`~safegen.errors.GuardUnavailable` saying what to do."""
        from ..errors import GuardUnavailable
        from .output_classifier import OutputClassifier

        try:
            clf = OutputClassifier.from_options(**self.oracle_options)
            return clf.bind(pipe, policy)
        except GuardUnavailable as e:
            why = str(e)
        from ..eval.oracles import get_oracle

        nudenet = get_oracle("nudenet")
        try:
            nudenet._detector()
        except ImportError:
            raise GuardUnavailable(f"no output check runs on this model: {why}; and NudeNet, the check for real "
                                   "models, is not installed (pip install 'safegen[nudenet]')") from None
        return nudenet

    @property
    def judge(self):
        """The oracle object (built on first use; ``"auto"`` is picked per pipeline when the guard attaches)."""
        if self._oracle is None:
            if isinstance(self.oracle, str) and self.oracle.lower() == AUTO:
                raise RuntimeError("OutputGuard(oracle='auto') picks its oracle per pipeline: protect one first")
            if isinstance(self.oracle, str) and self.oracle.lower() == CLASSIFIER:
                from .output_classifier import OutputClassifier

                self._oracle = OutputClassifier.from_options(**self.oracle_options)
            elif isinstance(self.oracle, str):
                from ..eval.oracles import get_oracle

                self._oracle = get_oracle(self.oracle, **self.oracle_options)
            else:
                self._oracle = self.oracle
        return self._oracle

    def weight_files(self) -> list:
        if isinstance(self.oracle, str) and self.oracle.lower() == CLASSIFIER:
            from pathlib import Path

            from .output_classifier import default_weights_path

            weights = self.oracle_options.get("weights")
            return [Path(weights) if weights is not None else default_weights_path()]
        return []

    @property
    def oracle_name(self) -> str:
        if isinstance(self.oracle, str) and self.oracle.lower() == AUTO and self._oracle is None:
            return AUTO  # picked per pipeline (the reports name the one each call used)
        return _label(self.judge)

    def _bound(self, call):
        """The oracle this pipeline judges with (bound to it at attach time when the oracle can be), under the
        call's policy as it is now (an oracle with ``for_policy``: a changed sensitivity applies at once)."""
        st = call.protection.state(self)
        if st is None or st.oracle is None:
            return self.judge  # (an "auto" guard always has its bound oracle)
        for_policy = getattr(st.oracle, "for_policy", None)
        if callable(for_policy):
            st.oracle = for_policy(call.policy)
        return st.oracle

    # ------------------------------------------------------------------ lifecycle
    def attach(self, protection) -> None:
        if isinstance(self.oracle, str) and self.oracle.lower() == AUTO:
            oracle = self._auto(protection.pipe, protection.policy)
        else:
            oracle = self.judge  # a missing oracle package fails at protect() time, not in the middle of a run
            bind = getattr(oracle, "bind", None)
            if callable(bind):  # e.g. the classifier: made for one model, calibrated at the policy's budget
                oracle = bind(protection.pipe, protection.policy)
        protection.set_state(self, _Attached(oracle=oracle))
        if self.action != "regenerate":
            return
        from ..protection import Protection, attach_all

        if protection.resolve is None and any(isinstance(g, str) for g in self.stronger):
            raise ValueError("OutputGuard(stronger=[names]) needs safegen.protect to resolve the names; pass guard "
                             "instances when protecting through the core directly")
        guards = [g if not isinstance(g, str) else protection.resolve(g) for g in self.stronger]
        bad = [g.name for g in guards if g.stage in ("weights", "output")]
        if bad:
            raise ValueError(f"OutputGuard(stronger=...) cannot use {bad}: weight guards would change every "
                             "generation and output guards would recurse; use prompt, conditioning or loop guards")
        regen = Protection(pipe=protection.pipe, kind=protection.kind, policy=protection.policy, guards=guards,
                           base_class=protection.base_class)
        attach_all(regen)
        protection.set_state(self, _Attached(oracle=oracle, regen=regen))

    def detach(self, protection) -> None:
        st = protection.drop_state(self)
        regen = st.regen if st is not None else None
        if regen is not None:
            for g in reversed(regen.guards):
                g.detach(regen)

    def prepare(self, call) -> None:
        # the initial noise of every item, to regenerate an item from the same starting point
        st = _CallState(args=dict(call.args))
        gen = call.args.get("generator")
        if self.action == "regenerate" and gen is not None:
            gens = gen if isinstance(gen, list) else [gen]
            st.gen_states = [(g.device, g.get_state().clone()) for g in gens]
        call.set_state(self, st)

    # ------------------------------------------------------------------ after decoding
    def after_decode(self, call, out, output_type: str) -> None:
        """Judge the items of ``out`` and act on the unsafe ones (the protected call runs this on its output)."""
        field_name = _output_field(call)
        images = getattr(out, field_name)
        items = [i for i in range(call.n_items) if not call.reports[i].blocked]
        if output_type == "latent":
            for i in items:
                res = call.result(i, self.name)
                res.verdict = "log"
                res.reason = "output_type='latent' cannot be judged: not checked"
            return
        prompts = _item_prompts(call)
        oracle = self._bound(call)
        flagged, judged = [], []
        arrays = {}
        for i in items:
            arr = _as_array(images[i])
            if arr is not None and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                # a NaN/inf image cannot be judged (and is no image): fail closed for this item
                put_item(out, field_name, i, _placeholder_like(call, output_type, images[i]))
                res = call.result(i, self.name)
                res.verdict = "error"
                res.reason = "the output holds non-finite values (NaN or inf): item blocked (fail closed)"
                continue
            judged.append(i)
            arrays[i] = arr
        found_all = _judge_items(oracle, [prompts[i] for i in judged], [arrays[i] for i in judged])
        for i, found_j in zip(judged, found_all):
            j = dict(found_j)
            if j.get("oracle_error"):
                raise ValueError(f"the output oracle could not read item {i}: {j['oracle_error']}")
            res = call.result(i, self.name)
            res.details = {"oracle": _label(oracle), "protocol": getattr(oracle, "protocol", ""),
                           "action": self.action, "first_check": _summary(j)}
            if "frames" in j:  # a clip: which of its frames the oracle found unsafe
                res.details["frames"], res.details["num_frames"] = j["frames"], j["num_frames"]
            _fill(res, j)
            if j.get("error"):  # the oracle could not decide on this item (e.g. non-finite scores): fail closed
                put_item(out, field_name, i, _placeholder_like(call, output_type, images[i]))
                res.verdict, res.reason = "error", f"output check ({_label(oracle)}): {j['error']}"
                continue
            if j.get("unsafe"):
                res.category = j.get("category")
                res.score = j.get("score")
                flagged.append(i)
        if not flagged:
            return
        if self.action == "regenerate":
            self._regenerate(call, out, field_name, images, flagged, prompts, output_type)
            return
        for i in flagged:
            res = call.result(i, self.name)
            found = res.category or "unsafe content"
            if self.action == "blur":
                blurred = _blur(images[i], self.blur_radius)
                j2 = dict(oracle.judge(prompts[i], _as_array(blurred)))
                res.details["second_check"] = _summary(j2)
                if not j2.get("unsafe") and not j2.get("oracle_error") and not j2.get("error"):
                    put_item(out, field_name, i, blurred)
                    res.verdict, res.reason = "block", f"output check ({_label(oracle)}) found {found}; blurred"
                    continue
                how = "still unsafe after blurring; replaced by the policy's placeholder"
            else:
                how = "replaced by the policy's placeholder"
            put_item(out, field_name, i, _placeholder_like(call, output_type, images[i]))
            res.verdict, res.reason = "block", f"output check ({_label(oracle)}) found {found}; {how}"

    def _regenerate(self, call, out, field_name, images, flagged, prompts, output_type) -> None:
        regen = call.protection.state(self).regen
        oracle = self._bound(call)
        st = call.state(self) or _CallState(args=dict(call.args))
        args = _regen_args(call, st, flagged, output_type)
        names = [g.name for g in regen.guards]
        again = regen.run(**args)  # the same pipeline, called under the stronger guards' protection
        new_images = getattr(again, field_name)
        for k, i in enumerate(flagged):
            res = call.result(i, self.name)
            rep2 = again.safety[k]
            j2 = dict(oracle.judge(prompts[i], _as_array(new_images[k])))
            res.details.update(second_check=_summary(j2), regenerated_with=names,
                               regeneration_report=rep2.to_dict(), extra_unet_steps=int(rep2.unet_steps_run))
            found = res.category or "unsafe content"
            if not j2.get("unsafe") and not j2.get("oracle_error") and not j2.get("error"):
                put_item(out, field_name, i, new_images[k])
                res.verdict = "block" if rep2.blocked else "steer"
                res.reason = (f"output check ({_label(oracle)}) found {found}; regenerated with "
                              f"{'+'.join(names)}: " + ("blocked there, placeholder returned" if rep2.blocked
                                                        else "second check passed"))
            else:
                put_item(out, field_name, i, _placeholder_like(call, output_type, images[i]))
                res.verdict = "block"
                res.reason = (f"output check ({_label(oracle)}) found {found}; regenerated with {'+'.join(names)}"
                              ": still unsafe, replaced by the policy's placeholder")


# ---------------------------------------------------------------------- helpers
def _output_field(call) -> str:
    spec = getattr(call, "spec", None)
    return getattr(spec, "output", None) or "images"


def _item_prompts(call) -> list[str]:
    n = call.num_images_per_prompt
    if call.prompts is None:
        return [""] * call.n_items
    return [call.prompts[i // n] for i in range(call.n_items)]


def _as_array(img):
    if img is None or isinstance(img, np.ndarray):
        return img
    if torch.is_tensor(img):
        return np.moveaxis(img.detach().float().cpu().numpy(), -3, -1)
    if isinstance(img, (list, tuple)):
        return np.stack([np.asarray(f.convert("RGB")) for f in img])
    return np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)


def _judge_items(oracle, prompts: list, arrays: list) -> list[dict]:
    """The oracle's verdict per item in one pass over the call: an image is judged as it is; a clip (F, H, W, 3)
    frame by frame, and it is unsafe when any frame is: its verdict is its worst frame's (the unsafe frame the
    oracle scores highest, else the first frame's), with ``frames`` the unsafe frames' indices. A frame the oracle
    could not read or decide on makes the clip's verdict that error (fail closed)."""
    spans, flat_p, flat_a = [], [], []
    for p, a in zip(prompts, arrays):
        frames = [a] if a is None or a.ndim != 4 else list(a)
        spans.append((len(flat_a), len(flat_a) + len(frames)))  # this item's rows of the flat batch
        flat_p += [p] * len(frames)
        flat_a += frames
    if callable(getattr(oracle, "judge_batch", None)):
        found = oracle.judge_batch(flat_p, flat_a)
    else:
        found = [oracle.judge(p, a) for p, a in zip(flat_p, flat_a)]
    out = []
    for k, a in enumerate(arrays):
        mine = [dict(f) for f in found[spans[k][0]:spans[k][1]]]
        if a is None or a.ndim != 4:
            out.append(mine[0])
            continue
        bad = next((f for f in mine if f.get("oracle_error") or f.get("error")), None)
        if bad is not None:
            out.append(bad)
            continue
        unsafe = [t for t, f in enumerate(mine) if f.get("unsafe")]
        worst = max(unsafe, key=lambda t: float(mine[t].get("score") or 0.0)) if unsafe else 0
        out.append({**mine[worst], "frames": unsafe, "num_frames": len(mine)})
    return out


def _blur(img, radius: float | None):
    """A strong Gaussian blur in the item's own type (PIL, HxWx3 / FxHxWx3 array, 3xHxW / Fx3xHxW tensor)."""
    from PIL import Image, ImageFilter

    def one(pil):
        r = float(radius) if radius is not None else max(pil.size) / 8.0
        return pil.filter(ImageFilter.GaussianBlur(r))

    if hasattr(img, "filter"):
        return one(img.convert("RGB"))
    if isinstance(img, (list, tuple)):
        return [one(f.convert("RGB")) for f in img]
    tensor = torch.is_tensor(img)
    arr = _as_array(img)
    frames = arr if arr.ndim == 4 else arr[None]
    floaty = frames.dtype != np.uint8
    u8 = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8) if floaty else frames
    done = np.stack([np.asarray(one(Image.fromarray(f))) for f in u8])
    res = done.astype(np.float32) / 255.0 if floaty else done
    res = res if arr.ndim == 4 else res[0]
    if tensor:
        return torch.from_numpy(np.moveaxis(res, -1, -3).copy()).to(img.dtype).to(img.device)
    return res.astype(arr.dtype, copy=False)


def _placeholder_like(call, output_type: str, like):
    return _placeholder(call, output_type, like)


@dataclass
class _Attached:
    """What the guard attached to one pipeline: the oracle bound to it and, for ``action="regenerate"``, the
    stronger guards' protection."""

    oracle: Any = None
    regen: Any = None


@dataclass
class _CallState:
    """Per call: the call's arguments and its generators' states before the loop (to regenerate an item from the
    same initial noise)."""

    args: dict
    gen_states: list | None = None


def _regen_args(call, st: _CallState, items: list[int], output_type: str) -> dict[str, Any]:
    """The original call's arguments for ``items`` only: one output per prompt, each item's own initial noise."""
    from ..protection import item_arguments

    a = item_arguments(call, st.args, items)
    states = st.gen_states
    if states is not None:
        def restored(k):
            device, state = states[k]
            g = torch.Generator(device=device)
            g.set_state(state)
            return g

        a["generator"] = [restored(i) for i in items] if len(states) == call.n_items else \
            [restored(0) for _ in items]
    a["output_type"] = output_type
    a["return_dict"] = True
    return a
