"""``Policy.redraws``: an item a loop or output guard blocked although its prompt passed every prompt check is
drawn again from fresh noise; prompt blocks and guard errors never are."""

import numpy as np
import pytest
import torch

import safegen
from safegen.guard import Guard
from safegen.guards import resolve_guard
from safegen.policy import PolicyError, policy_from_dict
from safegen.protection import install

BENIGN = "a photo of a red bus"


class StopsBrightNoise(Guard):
    """A loop guard whose verdict depends only on the draw: it stops an item after its first step when the mean of
    its latents is positive (about half of all seeds)."""

    name = "lvd"  # reported under a loop guard's name, as LVD would be
    stage = "loop"
    tensor_inputs = ("latents",)

    def step_end(self, call, step, t, tensors):
        if step == 0:
            for row, item in enumerate(call.running_items):
                if tensors["latents"][row].mean() > 0:
                    call.stop_item(item, self.name, "bright noise", steps_run=1)


class BlockGore(Guard):
    name = "latent-guard"
    stage = "prompt"

    def prepare(self, call):
        for b, p in enumerate(call.prompts):
            if "gore" in p:
                call.block_prompt(b, self.name, "gore in the prompt", category="violence")


def _bright_seeds(pipe, policy, n: int = 12) -> list[bool]:
    """For seeds 0..n-1: whether the test guard stops that draw (one protected call without redraws)."""
    _protect(pipe, policy, [StopsBrightNoise()], redraws=0)
    out = _call(pipe, [BENIGN] * n, range(n))
    safegen.unprotect(pipe)
    return [r.blocked for r in out.safety]


def _protect(pipe, policy, guards, redraws, redraw_guards=()):
    """Protect with these guard instances as the policy's own stack (what ``safegen.protect`` does when no
    ``guards=`` are named: only then do the policy's redraws apply)."""
    pol = policy.copy()
    pol.redraws, pol.redraw_guards = redraws, list(redraw_guards)  # (the default policy adds sld-max)
    install(pipe, pol, guards, resolve=resolve_guard, redraws=True)
    return pol


def _call(pipe, prompts, seeds):
    return pipe(prompts, num_inference_steps=2, output_type="np",
                generator=[torch.Generator().manual_seed(s) for s in seeds])


def test_a_drifted_draw_is_drawn_again_and_matches_the_plain_pipeline_at_the_derived_seed(sd, lexical_policy):
    stopped = _bright_seeds(sd, lexical_policy)
    bright, dark = stopped.index(True), stopped.index(False)

    _protect(sd, lexical_policy, [StopsBrightNoise()], redraws=3)
    out = _call(sd, [BENIGN, BENIGN], [bright, dark])
    rep = out.safety[0]
    assert rep.redraws, "the blocked draw was not drawn again"
    first = rep.redraws[0]
    assert first["seed"] == bright and first["verdict"] == "block" and "bright noise" in first["reason"]
    assert first["unet_steps_run"] == 1
    assert out.safety[1].redraws == [] and not out.safety[1].blocked  # a passing item is left alone
    assert not rep.blocked  # (with these seeds a redraw passes)
    # the returned image is what the plain pipeline makes at the last redraw's seed
    seed = rep.redraws[-1]["next_seed"]
    safegen.unprotect(sd)
    plain = sd(BENIGN, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed))
    assert np.array_equal(out.images[0], plain.images[0])
    assert "drawn" in rep.reason and "bright noise" in rep.reason
    assert rep.unet_steps_run == sum(d["unet_steps_run"] for d in rep.redraws) + 2


def test_redraws_are_deterministic_for_a_seeded_call(sd, lexical_policy):
    bright = [s for s, b in enumerate(_bright_seeds(sd, lexical_policy)) if b][:3]
    assert len(bright) == 3
    _protect(sd, lexical_policy, [StopsBrightNoise()], redraws=2)
    one, two = _call(sd, [BENIGN] * 3, bright), _call(sd, [BENIGN] * 3, bright)
    assert np.array_equal(one.images, two.images)
    def plain(rep):  # the report without its timings
        d = rep.to_dict()
        for g in d["guards"]:
            g.pop("seconds"), g["details"].pop("call_seconds", None)
        return d

    assert [plain(r) for r in one.safety] == [plain(r) for r in two.safety]
    # each redraw is drawn from a fresh seed: some of the three come back unblocked
    assert any(not r.blocked for r in one.safety)


def test_prompt_blocks_and_guard_errors_are_never_redrawn(sd, lexical_policy):
    calls = []
    sd.unet.register_forward_pre_hook(lambda m, a, kw: calls.append(a[0].shape[0]), with_kwargs=True)

    class Fails(Guard):
        name = "output"
        stage = "output"

        def after_decode(self, call, out, output_type):
            raise RuntimeError("oracle down")

    _protect(sd, lexical_policy, [BlockGore()], redraws=3)
    out = _call(sd, ["a photo of blood and gore"], [0])
    assert out.safety[0].blocked and out.safety[0].redraws == [] and calls == []
    safegen.unprotect(sd)
    _protect(sd, lexical_policy, [Fails()], redraws=3)
    out = _call(sd, [BENIGN], [0])
    assert out.safety[0].verdict == "error" and out.safety[0].redraws == []
    assert len(calls) == 2  # one draw of two steps (CFG batched): no redraw


def test_redraws_setting_is_validated_in_files_and_in_code():
    pol = safegen.load_policy("default")
    assert pol.redraws == 1 and pol.to_dict()["redraws"] == 1
    for bad in (-1, 4, True, 1.5, "1"):
        with pytest.raises(PolicyError, match="redraws"):
            pol.redraws = bad
        with pytest.raises(PolicyError, match="redraws"):
            policy_from_dict({**pol.to_dict(), "redraws": bad}, "p.yaml")
    assert policy_from_dict({**pol.to_dict(), "redraws": 0}, "p.yaml").redraws == 0


def test_redraw_guards_steer_only_the_redraw_and_unprotect_removes_them(sd, lexical_policy):
    stopped = _bright_seeds(sd, lexical_policy)
    bright, dark = stopped.index(True), stopped.index(False)
    plain = _call(sd, [BENIGN, BENIGN], [bright, dark]).images
    _protect(sd, lexical_policy, [StopsBrightNoise()], redraws=1, redraw_guards=["sld-max"])
    out = _call(sd, [BENIGN, BENIGN], [bright, dark])
    first, redrawn = out.safety[1], out.safety[0]
    # the first draw runs without SLD (to float precision: the stopped item left the batch after one step)
    assert first.result("sld") is None and np.allclose(out.images[1], plain[1], atol=1e-5)
    assert redrawn.redraws and redrawn.result("sld") is not None  # the redraw ran with SLD added
    if not redrawn.blocked:
        safegen.unprotect(sd)
        seed = redrawn.redraws[-1]["next_seed"]
        unsteered = sd(BENIGN, num_inference_steps=2, output_type="np",
                       generator=torch.Generator().manual_seed(seed)).images[0]
        assert not np.array_equal(out.images[0], unsteered)  # SLD changed the redraw
    safegen.unprotect(sd)
    assert np.array_equal(_call(sd, [BENIGN, BENIGN], [bright, dark]).images, plain)


def test_redraw_guards_are_checked_by_name_and_at_protect(sd, lexical_policy):
    with pytest.raises(PolicyError, match="redraw_guards\\[0\\]"):
        policy_from_dict({**lexical_policy.to_dict(), "redraw_guards": ["sld-maximum"]}, "p.yaml")
    with pytest.raises(PolicyError, match="redraw_guards\\[1\\]"):
        lexical_policy.copy().redraw_guards = ["sld-max", "no-such-guard"]
    pol = lexical_policy.copy()
    pol.redraws, pol.redraw_guards = 1, ["output-check"]
    with pytest.raises(ValueError, match="redraw_guards cannot use"):
        safegen.protect(sd, policy=pol)
    assert not safegen.is_protected(sd)
    safegen.protect(sd, policy=pol, guards=["safree"])  # named guards: no redraws, so nothing to check
    assert safegen.is_protected(sd)
