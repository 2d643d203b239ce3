"""The output guard: post-hoc oracle check with placeholder / blur / regenerate actions, reported like any guard."""

import json

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.output import OutputGuard

PROMPTS = ["a red bus", "a photo of blood on a car", "a blue bird"]
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Flag:
    """A stand-in oracle: items whose prompt contains ``word`` are unsafe on their first ``times`` checks."""

    name, protocol = "flag", "prompt contains a word"

    def __init__(self, word="blood", times=None):
        self.word, self.times, self.seen = word, times, {}

    def judge(self, prompt, image):
        assert image is not None and np.asarray(image).ndim == 3
        n = self.seen[prompt] = self.seen.get(prompt, 0) + 1
        unsafe = self.word in prompt and (self.times is None or n <= self.times)
        return {"unsafe": unsafe, "category": "violence" if unsafe else None, "fidelity": None,
                "score": 0.9 if unsafe else 0.1}


class Broken:
    name, protocol = "broken", "raises"

    def judge(self, prompt, image):
        raise RuntimeError("detector crashed")


def gens(seed=0, n=len(PROMPTS)):
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]


def run(pipe, output_type="np", prompts=PROMPTS):
    return pipe(prompts, num_inference_steps=STEPS, generator=gens(n=len(prompts)), output_type=output_type)


def test_placeholder_replaces_only_the_flagged_item(sd):
    plain = run(sd).images
    safegen.protect(sd, guards=[OutputGuard(oracle=Flag())])
    out = run(sd)
    assert [r.verdict for r in out.safety] == ["pass", "block", "pass"]
    assert np.array_equal(out.images[0], plain[0]) and np.array_equal(out.images[2], plain[2])
    assert np.all(out.images[1] == 0.5)  # the policy's flat placeholder
    res = out.safety[1].result("output")
    assert res.category == "violence" and res.score == 0.9
    assert res.details["first_check"] == {"unsafe": True, "category": "violence", "score": 0.9}
    assert res.details["protocol"] == "prompt contains a word" and res.details["action"] == "placeholder"
    assert "replaced by the policy's placeholder" in out.safety[1].reason
    assert out.safety[0].result("output").verdict == "pass"
    safegen.unprotect(sd)
    assert np.array_equal(run(sd).images, plain)


def test_blur_is_checked_again(sd):
    plain = run(sd).images
    safegen.protect(sd, guards=[OutputGuard(oracle=Flag(times=1), action="blur")])
    out = run(sd)  # second check passes: the blurred image is returned
    res = out.safety[1].result("output")
    assert res.verdict == "block" and res.reason.endswith("blurred")
    assert res.details["second_check"] == {"unsafe": False, "score": 0.1}
    blurred = out.images[1]
    assert not np.array_equal(blurred, plain[1]) and not np.all(blurred == 0.5)
    assert blurred.std() < plain[1].std()  # a strong blur flattens the noise image
    safegen.protect(sd, guards=[OutputGuard(oracle=Flag(), action="blur")])
    out = run(sd)  # still unsafe after blurring: placeholder
    assert np.all(out.images[1] == 0.5) and "still unsafe after blurring" in out.safety[1].reason
    safegen.unprotect(sd)


def test_regenerate_uses_the_stronger_guard_and_the_same_noise(sd):
    safegen.protect(sd, guards=["sld-max"])
    want = sd([PROMPTS[1]], num_inference_steps=STEPS, generator=gens(1, n=1), output_type="np").images[0]
    # (what SLD-max makes from item 1's own noise, alone in its batch like the regeneration)
    safegen.protect(sd, guards=[OutputGuard(oracle=Flag(times=1), action="regenerate", stronger=["sld-max"])])
    out = run(sd)
    rep = out.safety[1]
    res = rep.result("output")
    assert rep.verdict == "steer" and res.verdict == "steer" and "second check passed" in res.reason
    np.testing.assert_allclose(out.images[1], want, atol=1e-5)
    assert res.details["regenerated_with"] == ["sld"] and res.details["extra_unet_steps"] == STEPS
    assert res.details["first_check"]["unsafe"] is True and res.details["second_check"]["unsafe"] is False
    assert res.details["regeneration_report"]["guards"][0]["guard"] == "sld"
    assert rep.unet_steps_run == STEPS and out.safety[0].verdict == "pass"

    safegen.protect(sd, guards=[OutputGuard(oracle=Flag(), action="regenerate", stronger=["sld-max"])])
    out = run(sd, output_type="pil")  # still unsafe after regenerating: placeholder (PIL this time)
    assert out.safety[1].verdict == "block" and "still unsafe" in out.safety[1].reason
    assert np.all(np.asarray(out.images[1]) == 128)
    safegen.unprotect(sd)


def test_a_failing_oracle_fails_closed(sd):
    safegen.protect(sd, guards=[OutputGuard(oracle=Broken())])
    out = run(sd)
    assert [r.verdict for r in out.safety] == ["error"] * 3
    assert np.all(out.images == 0.5)
    assert "detector crashed" in out.safety[0].reason
    safegen.unprotect(sd)


def test_bad_configurations_are_refused(sd):
    with pytest.raises(ValueError, match="action"):
        OutputGuard(action="delete")
    with pytest.raises(ValueError, match="weight guards"):
        safegen.protect(sd, guards=[OutputGuard(action="regenerate", stronger=["safetydpo"])])
    assert not safegen.is_protected(sd)


def test_eval_reports_the_output_guard_by_name(tmp_path, capsys):
    from safegen.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na photo of blood and gore\n")
    code = main(["eval", "--prompts", str(prompts), "--model", "tiny-sd", "--guards", "safree,output-check",
                 "--steps", str(STEPS), "--no-progress", "--out", str(tmp_path / "ev")])
    assert code == 0, capsys.readouterr().err
    items = [json.loads(ln) for ln in (tmp_path / "ev" / "items.jsonl").read_text().splitlines()]
    assert [sorted(it["guards"]) for it in items] == [["output", "safree"], ["output", "safree"]]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["config"]["guards"] == ["safree", "output-check"]


def test_harness_counts_regeneration_steps(sd):
    from safegen.eval.harness import evaluate

    safegen.protect(sd, guards=[OutputGuard(oracle=Flag(times=1), action="regenerate", stronger=["sld-max"])])
    metrics, items = evaluate(sd, PROMPTS, oracle=Flag(word="nothing"), steps=STEPS, batch_size=3, progress=False)
    assert metrics["unet_steps_extra"] == STEPS and [it["unet_steps_extra"] for it in items] == [0, STEPS, 0]
    assert metrics["steered_rate"] == pytest.approx(1 / 3, abs=1e-4)
    safegen.unprotect(sd)


def test_a_policys_redraws_redraw_an_item_the_output_check_blocked(sd):
    """With the policy's own stack (here: the core's ``install(redraws=True)``, as ``safegen.protect`` does without
    ``guards=``), an item the output check blocked is drawn once more from a seed derived from the caller's; that
    draw passes here (the oracle flags each prompt once), so the item is the plain pipeline's image at it."""
    from safegen.guards import resolve_guard
    from safegen.protection import install

    pol = safegen.load_policy("default")
    assert pol.redraws == 1
    pol.redraw_guards = []  # the redraw under the same stack (the default adds sld-max: tests/test_redraw.py)
    install(sd, pol, [OutputGuard(oracle=Flag(times=1))], resolve=resolve_guard, redraws=True)
    out = run(sd)
    rep = out.safety[1]
    assert not rep.blocked and len(rep.redraws) == 1
    first = rep.redraws[0]
    assert first["seed"] == 1 and first["verdict"] == "block" and "output check" in first["reason"]
    assert "drawn 2 times" in rep.reason
    assert rep.unet_steps_run == 2 * STEPS
    assert [r.redraws for r in (out.safety[0], out.safety[2])] == [[], []]
    safegen.unprotect(sd)
    plain = sd(PROMPTS[1], num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator("cpu").manual_seed(first["next_seed"])).images[0]
    assert np.array_equal(out.images[1], plain)
    # guards named in protect() act on the caller's draw alone: no redraw
    safegen.protect(sd, policy=pol, guards=[OutputGuard(oracle=Flag(times=1))])
    again = run(sd)
    assert again.safety[1].blocked and again.safety[1].redraws == []
