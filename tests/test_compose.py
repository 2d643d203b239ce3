"""protect composes with the diffusers features users turn on with it (issue 18): ``torch.compile`` on the UNet
(the ``torch.compile(unet)`` wrapper and in-place ``unet.compile()``), group offloading CPU → CPU, and attention
processor swaps (``AttnProcessor`` / ``AttnProcessor2_0``).

Every case runs the guards that hook the UNet together, on the tiny SD pipeline (32×32, 3 steps, 3 prompts):

* item 0, "a photo of blood and gore": SAFREE steers it and adds its re-attention reference rows and up-block
  hooks (``safegen.safree.*``); SLD (max preset, no warm-up) adds its safety rows on every step
  (``safegen.sld.rows``);
* item 1, "gore": Latent Guard blocks it before the loop (no UNet step);
* item 2, "a blue cat": LVD's classifier flags it at steps 0 and 1, so it is stopped after step 1 (the item
  stopper's ``safegen.lvd.stop-items`` hook and its ``vae.decode`` patch).

and checks, with the feature turned on before protect and after it (a user may do either):

1. the protected call runs and every item's report says what each guard did;
2. its output equals the output of the same protected call without the feature: bit for bit where the feature
   does not change the arithmetic (group offloading CPU → CPU, the default ``AttnProcessor2_0``), within float
   tolerance where it does (``AttnProcessor``'s explicit softmax, compiled graphs); a guard whose hooks were
   silently not run would change item 0 far beyond that tolerance;
3. during the call :func:`safegen.hooks.safegen_hooks` lists the guards' hooks and patches; group offloading's
   hooks share the blocks' diffusers hooks registries with them; with the ``torch.compile`` wrapper the row hooks
   are on the wrapper (outside the compiled region) and the block hooks on the blocks it compiles;
4. after unprotect no safegen hook, patch or registry is left, every module's hooks registry and ``forward`` are
   exactly what they were before protect (group offloading's hooks stay), the feature is still on, and the
   unprotected output is bit-identical to the output before protect (same seed).

What was found doing this (fixed in safegen, and pinned here):

* ``torch.compile(pipe.unet)`` returns an ``OptimizedModule`` that forwards attribute reads and writes to the
  module it wraps. safegen's hooks registry for the wrapper ended up on the *wrapped* UNet, pointing at the
  wrapper: after unprotect the UNet kept an (empty) ``_diffusers_hook``, and once the user took the wrapper off
  again (``pipe.unet = pipe.unet._orig_mod``) the next protected call registered SLD's and SAFREE's row hooks on
  the wrapper's forward, which no longer runs: both guards were silently dropped
  (:func:`test_compile_then_uncompile_keeps_the_guards`). safegen now keeps its registry in the module's own
  ``__dict__``.
* LVD's model fingerprint used ``unet or transformer``; ``bool()`` of an ``OptimizedModule`` raises ``TypeError``
  (it defines ``__len__``), and its class name is not the UNet's: LVD could not be attached to a compiled UNet.
* SafetyDPO loads LoRAs with diffusers' loader, which cannot reach into the ``torch.compile`` wrapper: protect on a
  wrapped UNet failed with a misleading "module ... does not exist in this UNet (OptimizedModule)", and compiling
  *after* protect made unprotect fail and leave the LoRA in the UNet. Now protect says so clearly, and unprotect
  undoes the LoRA through the wrapper (:func:`test_safetydpo_and_torch_compile`; in-place ``unet.compile()``
  worked in either order already, checked by hand).

Not fixed (a design limit of per-call hooks, correct but slow): SAFREE's re-attention hooks sit on the UNet's mid
and up blocks, inside the compiled region, and are new objects on every protected call, so dynamo recompiles the
UNet about 3 times per protected call (new hook objects, the extra reference rows, the call's mask cache) and,
past ``torch._dynamo.config.recompile_limit`` (8), gives up and runs the UNet frame eagerly for the rest of the
process. Outputs stay right (the eager fallback runs the hooks); only the speed-up is lost. The other guards' hooks
sit on the UNet itself, outside the ``torch.compile(unet)`` wrapper's compiled region (inside it with
``unet.compile()``).

The compile tests use the ``aot_eager`` backend by default (``SAFEGEN_TEST_COMPILE_BACKEND=inductor`` for the real
default): on the shared 2-core machine this was written on, inductor (a C++ compiler is present) took ~290 s for
the first compile of the tiny UNet and ~170 s more for the recompiles of one protected call (SLD only), far over a
test's budget. ``aot_eager`` still runs
everything that can break composition: dynamo traces the UNet together with the safegen hooks on its blocks
(re-attention's mid/up-block hooks run *inside* the compiled region; with the wrapper, the row hooks on the UNet
itself run outside it), guards on them and recompiles for the extra rows, and AOTAutograd functionalizes the
graph; only inductor's code generation is skipped. In that exploratory inductor run (SLD on the wrapper) the
compiled output was within 4e-6 of the eager one ([0, 1] images) and the output after unprotect was bit-identical
to the one before protect; this file as a whole was not run under inductor.
"""

import os

import numpy as np
import pytest
import torch

import safegen
from safegen.hooks import safegen_hooks

BACKEND = os.environ.get("SAFEGEN_TEST_COMPILE_BACKEND", "aot_eager")
PROMPTS = ["a photo of blood and gore", "gore", "a blue cat"]
STEPS = 3
CATS = ["sexual", "violence"]


# ---------------------------------------------------------------------- the guards and the calls
def _policy():
    """The default policy with SAFREE's semantic gate off: on tiny random encoders only literal phrases decide."""
    pol = safegen.load_policy("default")
    for cat in pol.categories.values():
        cat.thresholds["safree"] = 2.0
    return pol


def _classifier(pipe):
    """An LVD classifier (built for this UNet) that flags the last undecided running item as violence."""
    from safegen.guards.lvd import LatentClassifier, LVDConfig, unet_fingerprint

    clf = LatentClassifier(LVDConfig(4, categories=list(CATS), model=unet_fingerprint(pipe)))

    def forward(x0, noise):
        logits = torch.full((x0.shape[0], len(CATS)), -10.0)
        logits[-1, 1] = 10.0
        return logits

    clf.forward = forward
    return clf


def _guards(pipe):
    from safegen.guards.latent_guard import LatentGuard, LatentGuardHead
    from safegen.guards.lvd import LVD
    from safegen.guards.sld import SLD

    head = LatentGuardHead.mean_match(pipe.text_encoder.config.hidden_size)  # exact concept phrases score ~τ
    # literal=False: Latent Guard decides on its scores alone (only the exact phrase "gore" reaches 0.999 τ), so the
    # first prompt, which writes policy phrases, passes it and is steered by SAFREE and SLD
    return [safegen.Safree(reattention=True), SLD.max(warmup_steps=0),
            LVD.from_classifier(_classifier(pipe), window=2, ratio=1.0),
            LatentGuard.from_head(head, backbone="pipeline", threshold=0.999 * head.tau.item(), literal=False)]


def _protect(pipe):
    return safegen.protect(pipe, policy=_policy(), guards=_guards(pipe))


def _run(pipe, **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(list(PROMPTS), generator=gens, num_inference_steps=STEPS, output_type="np", **kw)


def _run_watching_hooks(pipe):
    """A protected call whose step callback records, at the first step, the safegen hooks on the pipeline and
    every module's diffusers hooks (:func:`_state`)."""
    seen, registries = [], {}

    def cb(p, i, t, tensors):
        if i == 0:
            seen.extend(safegen_hooks(p))
            registries.update({k: v[0] for k, v in _state(p)[0].items()})
        return {}

    return _run(pipe, callback_on_step_end=cb), seen, registries


def _check_reports(out):
    r0, r1, r2 = out.safety
    assert r0.verdict == "steer" and r0.result("safree").verdict == "steer"
    assert r0.result("safree").filtered_steps >= 1
    sld = r0.result("sld")
    assert sld.verdict == "steer" and sld.details["unet_calls_with_safety_rows"] == STEPS  # its hook ran each step
    assert r0.unet_steps_run == STEPS and not r0.blocked
    assert r1.blocked and r1.result("latent_guard").verdict == "block" and r1.unet_steps_run == 0
    assert r2.blocked and r2.result("lvd").verdict == "block" and r2.result("lvd").stopped_at_step == 1
    assert r2.unet_steps_run == 2


def _check_hooks_seen(feature, seen, registries):
    for name in ("safegen.sld.rows", "safegen.safree.rows", "safegen.safree.reattention-drop",
                 "safegen.safree.reattention-up0", "safegen.safree.reattention-up1", "safegen.lvd.x0"):
        assert name in seen, (name, seen)
    if feature == "group-offload":  # one registry per block, group offloading's hook and safegen's side by side
        assert {"group_offloading", "safegen.safree.reattention-up0"} <= set(registries["unet.up_blocks.0"])
        assert {"group_offloading", "safegen.sld.rows", "safegen.safree.rows"} <= set(registries["unet"])
    if feature == "compile":  # the row hooks wrap the compiled call; the wrapped UNet itself carries none
        assert {"safegen.sld.rows", "safegen.safree.rows"} <= set(registries["unet"])
        assert "unet._orig_mod" not in registries
        assert "safegen.safree.reattention-up0" in registries["unet._orig_mod.up_blocks.0"]


def _modules(pipe):
    for comp_name, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for name, m in comp.named_modules():
                yield f"{comp_name}.{name}" if name else comp_name, m


def _state(pipe):
    """Every module's diffusers hooks (by name) and its instance ``forward`` (by identity), and the instance
    attributes of the scheduler and the VAE (where safegen's patches go)."""
    mods = {}
    for name, m in _modules(pipe):
        reg = m.__dict__.get("_diffusers_hook")
        fwd = m.__dict__.get("forward")
        if reg is not None or fwd is not None:
            mods[name] = (None if reg is None else list(reg._hook_order), None if fwd is None else id(fwd))
    return mods, sorted(pipe.scheduler.__dict__), sorted(pipe.vae.__dict__)


# ---------------------------------------------------------------------- the features
def _compile(pipe):
    pipe.unet = torch.compile(pipe.unet, backend=BACKEND)


def _compile_in_place(pipe):
    pipe.unet.compile(backend=BACKEND)


def _group_offload(pipe):
    cpu = torch.device("cpu")
    pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                   num_blocks_per_group=1)


def _attn(cls_name):
    def turn_on(pipe):
        from diffusers.models import attention_processor

        pipe.unet.set_attn_processor(getattr(attention_processor, cls_name)())

    return turn_on


def _processors(pipe):
    return {type(p).__name__ for p in pipe.unet.attn_processors.values()}


#: feature → (turn it on, is it on?, max |difference| to the protected output without it; 0 = bit-identical)
FEATURES = {
    "compile": (_compile, lambda p: type(p.unet).__name__ == "OptimizedModule", 1e-4),
    "compile-in-place": (_compile_in_place, lambda p: p.unet._compiled_call_impl is not None, 1e-4),
    "group-offload": (_group_offload,
                      lambda p: "group_offloading" in p.unet.up_blocks[0].__dict__["_diffusers_hook"].hooks, 0.0),
    "AttnProcessor": (_attn("AttnProcessor"), lambda p: _processors(p) == {"AttnProcessor"}, 1e-4),
    "AttnProcessor2_0": (_attn("AttnProcessor2_0"), lambda p: _processors(p) == {"AttnProcessor2_0"}, 0.0),
}


def _fresh():
    from safegen.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread for the whole module (the reference outputs are compared bit for bit with the tests' own, and a
    different thread count changes float sums); tiny models run fastest on one thread anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference():
    """On a pipeline without any feature: the unprotected output and the protected call."""
    pipe = _fresh()
    plain = _run(pipe).images
    _protect(pipe)
    out = _run(pipe)
    _check_reports(out)
    safegen.unprotect(pipe)
    assert not np.array_equal(out.images[0], plain[0])  # item 0 is steered
    return plain, out


def _fresh_dynamo(feature):
    """Compile tests start from empty dynamo caches: each protected call installs new hook objects on the UNet's
    blocks, so dynamo recompiles the UNet ~3 times per protected call and, past its recompile limit (8), runs it
    eagerly for the rest of the process; without the reset a later test would check the eager fallback only."""
    if feature.startswith("compile"):
        torch._dynamo.reset()


def _graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _close(got, want, tol):
    if tol == 0:
        assert np.array_equal(got, want), float(np.abs(got - want).max())
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)


# ---------------------------------------------------------------------- the tests
# compiling is the slow part (~40 s a case on a 2-core CPU): make test compiles the wrapper before protect (plus
# the un-compile and SafetyDPO cases below, which compile after protect); SAFEGEN_TEST_ALL_ORDERS=1 runs every
# feature in both orders (all pass)
_ALL = os.environ.get("SAFEGEN_TEST_ALL_ORDERS") == "1"
BEFORE = [f for f in FEATURES if _ALL or f != "compile-in-place"]
AFTER = [f for f in FEATURES if _ALL or not f.startswith("compile")]


@pytest.mark.parametrize("feature", BEFORE)
def test_feature_before_protect(feature, reference):
    turn_on, is_on, tol = FEATURES[feature]
    ref_plain, ref = reference
    _fresh_dynamo(feature)
    pipe = _fresh()
    turn_on(pipe)
    before = _state(pipe)
    plain = _run(pipe).images
    _close(plain, ref_plain, tol)

    _protect(pipe)
    graphs = _graphs()
    out, seen, registries = _run_watching_hooks(pipe)
    if feature.startswith("compile"):
        assert _graphs() > graphs  # the protected call ran through dynamo (the hooks are traced with the UNet)
    _check_reports(out)
    _check_hooks_seen(feature, seen, registries)
    _close(out.images, ref.images, tol)
    assert [r.verdict for r in out.safety] == [r.verdict for r in ref.safety]

    safegen.unprotect(pipe)
    assert safegen_hooks(pipe) == []
    assert _state(pipe) == before
    assert is_on(pipe)
    assert np.array_equal(_run(pipe).images, plain)


@pytest.mark.parametrize("feature", AFTER)
def test_feature_after_protect(feature, reference):
    """Turned on while protected: the guards hook whatever ``pipe.unet`` is at call time, so nothing is lost."""
    turn_on, is_on, tol = FEATURES[feature]
    ref_plain, ref = reference
    _fresh_dynamo(feature)
    pipe = _fresh()
    _protect(pipe)
    turn_on(pipe)
    before = _state(pipe)
    graphs = _graphs()
    out, seen, registries = _run_watching_hooks(pipe)
    if feature.startswith("compile"):
        assert _graphs() > graphs
    _check_reports(out)
    _check_hooks_seen(feature, seen, registries)
    _close(out.images, ref.images, tol)
    assert _state(pipe) == before  # the call's hooks and patches are gone after it

    safegen.unprotect(pipe)
    assert safegen_hooks(pipe) == [] and not safegen.is_protected(pipe)
    assert _state(pipe) == before
    assert is_on(pipe)
    # the unprotected output under the feature, as on a pipeline that was never protected
    other = _fresh()
    turn_on(other)
    assert np.array_equal(_run(pipe).images, _run(other).images)


def test_compile_then_uncompile_keeps_the_guards(reference):
    """A protected call on the compiled wrapper, then the wrapper taken off again: the next protected call on the
    plain UNet must still run SLD's and SAFREE's hooks, and nothing of the wrapper's registry stays on the UNet."""
    ref_plain, ref = reference
    _fresh_dynamo("compile")
    pipe = _fresh()
    unet = pipe.unet
    _compile(pipe)
    _protect(pipe)
    _check_reports(_run(pipe))
    assert "_diffusers_hook" not in unet.__dict__ and "forward" not in unet.__dict__
    pipe.unet = pipe.unet._orig_mod
    out = _run(pipe)
    _check_reports(out)
    assert np.array_equal(out.images, ref.images)  # the same protected output as a never-compiled pipeline
    safegen.unprotect(pipe)
    assert safegen_hooks(pipe) == [] and "_diffusers_hook" not in unet.__dict__ and "forward" not in unet.__dict__
    assert np.array_equal(_run(pipe).images, ref_plain)


def test_safetydpo_and_torch_compile(tmp_path):
    """SafetyDPO's LoRAs go in through diffusers' loader, which cannot reach into a ``torch.compile`` wrapper:
    protect says so; compiling after protect works, and unprotect takes the LoRA out through the wrapper."""
    from safegen.guards.safetydpo import SafetyDPO
    from safegen.lora import _lora_modules, save_lora

    pipe = _fresh()
    g = torch.Generator().manual_seed(0)
    save_lora(tmp_path / "e.safetensors",
              {n: (torch.randn(2, m.in_features, generator=g) * 0.1, torch.randn(m.out_features, 2, generator=g) * 0.1)
               for n, m in _lora_modules(pipe.unet).items()}, {"category": "violence"})

    def run(p):
        return p("a red bus", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                 output_type="np").images

    plain = run(pipe)
    safegen.protect(pipe, guards=[SafetyDPO(experts=[str(tmp_path / "e.safetensors")])])
    ref = run(pipe)
    safegen.unprotect(pipe)
    assert not np.array_equal(ref, plain)

    _compile(pipe)
    with pytest.raises(TypeError, match=r"torch\.compile.*protect before compiling"):
        safegen.protect(pipe, guards=[SafetyDPO(experts=[str(tmp_path / "e.safetensors")])])
    assert not safegen.is_protected(pipe) and safegen_hooks(pipe) == []
    pipe.unet = pipe.unet._orig_mod

    for fuse in (False, True):
        safegen.protect(pipe, guards=[SafetyDPO(experts=[str(tmp_path / "e.safetensors")], fuse=fuse)])
        _compile(pipe)
        np.testing.assert_allclose(run(pipe), ref, rtol=0, atol=1e-4)
        safegen.unprotect(pipe)
        assert safegen_hooks(pipe) == [] and not getattr(pipe.unet, "peft_config", None)
        pipe.unet = pipe.unet._orig_mod
        assert np.array_equal(run(pipe), plain)
