"""SafetyDPO: the DPO loss, expert training, merge math, the fused guard and its exact undo, LoRA file checks."""

import doctest
import json
import math

import numpy as np
import pytest
import torch

import safegen
from safegen.training import safetydpo as sd_mod
from safegen.training.safetydpo import (
    LoRAFileError,
    PreferencePairs,
    comerge,
    dpo_loss,
    lora_deltas,
    merge_experts,
    read_lora,
    save_lora,
    train_expert,
)


def random_lora(unet, rank=2, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(rank, m.in_features, generator=g) * scale, torch.randn(m.out_features, rank, generator=g) * scale)
            for n, m in sd_mod._lora_modules(unet).items()}


def pairs_for(pipe, n=4, seed=0):
    """Synthetic preference pairs: the preferred latent is smooth, the dispreferred one carries a bright corner."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, 4, 16, 16, generator=g) * 0.3
    lo = w.clone()
    lo[:, :, :4, :4] += 2.0
    emb, _ = pipe.encode_prompt(["blood and gore"] * n, "cpu", 1, False)
    empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    return PreferencePairs(w, lo, emb.half(), empty.half(), ["blood and gore"] * n, ["violence"] * n)


def run(pipe, prompt="a red bus", steps=2):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, output_type="np").images


# ---------------------------------------------------------------------- the loss


def test_dpo_loss_matches_hand_computation():
    noise = torch.tensor([[[[0.5, -1.0]]], [[[0.0, 2.0]]]])
    pw = torch.tensor([[[[0.4, -0.8]]], [[[0.1, 1.5]]]])
    pl = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])
    rw = torch.tensor([[[[0.5, -0.5]]], [[[0.3, 2.0]]]])
    rl = torch.tensor([[[[0.6, -1.0]]], [[[0.2, 2.2]]]])
    beta = 50.0
    expected, wins = [], []
    for i in range(2):
        def e(x):
            return float(((x[i] - noise[i]) ** 2).mean())
        delta = (e(pw) - e(pl)) - (e(rw) - e(rl))
        z = -beta / 2 * delta
        expected.append(math.log1p(math.exp(-z)))  # −log σ(z)
        wins.append(z > 0)
    loss, acc = dpo_loss(pw, pl, rw, rl, noise, beta)
    assert float(loss) == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert float(acc) == pytest.approx(sum(wins) / 2)
    # the policy equal to the reference: log 2
    assert float(dpo_loss(pw, pl, pw, pl, noise, beta)[0]) == pytest.approx(math.log(2))


def test_a_few_steps_lower_the_dpo_loss_and_leave_the_unet_clean(sd, tmp_path):
    data = pairs_for(sd)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    out = tmp_path / "expert.safetensors"
    summary = train_expert(sd, data, out=out, category="violence", steps=30, batch_size=4, lr=3e-3, beta=500.0,
                           empty_share=0.0, progress=False)
    assert len(summary["losses"]) == 30
    assert all(torch.equal(before[k], v) for k, v in sd.unet.state_dict().items())  # adapter removed
    assert not any("lora" in n for n, _ in sd.unet.named_parameters())
    # on a fixed (t, noise) batch the trained LoRA beats the reference: loss below log 2
    g = torch.Generator().manual_seed(1)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(sd.scheduler.config)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(4, 4, 16, 16, generator=g)
    x = torch.cat([sched.add_noise(data.preferred, noise, t), sched.add_noise(data.dispreferred, noise, t)])
    cond = torch.cat([data.embeds, data.embeds]).float()
    with torch.no_grad():
        ref = sd.unet(x, torch.cat([t, t]), encoder_hidden_states=cond).sample
        safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(out))])
        pol = sd.unet(x, torch.cat([t, t]), encoder_hidden_states=cond).sample
        safegen.unprotect(sd)
    loss, _ = dpo_loss(pol[:4], pol[4:], ref[:4], ref[4:], noise, 500.0)
    assert float(loss) < math.log(2) - 0.05
    meta = read_lora(out, sd.unet)[1]
    assert meta["category"] == "violence" and meta["kind"] == "expert" and meta["rank"] == 4


def test_training_is_seeded(sd, tmp_path):
    data = pairs_for(sd)
    kw = dict(category="violence", batch_size=2, lr=1e-3, beta=100.0, progress=False, checkpoint_every=2)
    full = train_expert(sd, data, out=tmp_path / "a.safetensors", steps=4, **kw)
    train_expert(sd, data, out=tmp_path / "c.safetensors", steps=4, **kw)
    a, _ = read_lora(tmp_path / "a.safetensors")
    c, _ = read_lora(tmp_path / "c.safetensors")
    assert all(torch.equal(a[k][0], c[k][0]) and torch.equal(a[k][1], c[k][1]) for k in a)  # seeded
    assert len(full["losses"]) == 4


def test_resume_continues_from_checkpoint(sd, tmp_path, monkeypatch):
    data = pairs_for(sd)
    kw = dict(category="violence", batch_size=2, lr=1e-3, beta=100.0, progress=False, checkpoint_every=2)
    ref = tmp_path / "ref.safetensors"
    train_expert(sd, data, out=ref, steps=4, **kw)
    out = tmp_path / "x.safetensors"
    # interrupt the run right after the step-2 checkpoint
    real = sd_mod.dpo_loss
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sd_mod, "dpo_loss", boom)
    with pytest.raises(KeyboardInterrupt):
        train_expert(sd, data, out=out, steps=4, **kw)
    monkeypatch.setattr(sd_mod, "dpo_loss", real)
    assert (tmp_path / "x.ckpt-0000002.safetensors").is_file() and not out.exists()
    summary = train_expert(sd, data, out=out, steps=4, resume=True, **kw)
    assert summary["start"] == 2 and len(summary["losses"]) == 2
    a, _ = read_lora(ref)
    b, _ = read_lora(out)
    assert all(torch.allclose(a[k][0], b[k][0], atol=1e-6) and torch.allclose(a[k][1], b[k][1], atol=1e-6) for k in a)
    assert not list(tmp_path.glob("x.ckpt*"))


def test_train_rejects_v_prediction(sd2v):
    data = pairs_for(sd2v)
    with pytest.raises(ValueError, match="epsilon-prediction only"):
        train_expert(sd2v, data, out="x.safetensors", steps=1, progress=False)


# ---------------------------------------------------------------------- merging


def test_comerge_weighs_updates_by_own_category_activation():
    d1 = {"m": torch.tensor([[3.0, 1.0], [-1.0, 0.0]])}
    d2 = {"m": torch.tensor([[1.0, 2.0], [2.0, 0.5]])}
    # expert 1's data barely uses input 0: its large update there loses to expert 2's
    a1 = {"m": torch.tensor([0.1, 1.0])}
    a2 = {"m": torch.tensor([1.0, 1.0])}
    m = comerge([d1, d2], [a1, a2])["m"]
    assert torch.equal(m, torch.tensor([[1.0, 2.0], [2.0, 0.5]]))
    a1 = {"m": torch.tensor([1.0, 1.0])}
    assert torch.equal(comerge([d1, d2], [a1, a2])["m"], torch.tensor([[3.0, 2.0], [2.0, 0.5]]))
    with pytest.raises(ValueError, match="same architecture"):
        comerge([d1, {"other": d2["m"]}], [a1, a2])


def test_merge_files_linear_ties_and_exact_refactoring(sd, tmp_path):
    f1, f2 = random_lora(sd.unet, seed=1), random_lora(sd.unet, seed=2)
    p1 = save_lora(tmp_path / "e1.safetensors", f1, {"category": "violence", "kind": "expert"})
    p2 = save_lora(tmp_path / "e2.safetensors", f2, {"category": "sexual", "kind": "expert"})
    s = merge_experts([p1, p2], tmp_path / "lin.safetensors", method="linear")
    merged, meta = read_lora(tmp_path / "lin.safetensors", sd.unet)
    want = {k: (lora_deltas(f1)[k] + lora_deltas(f2)[k]) / 2 for k in f1}
    got = lora_deltas(merged)
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)  # rank 2+2 holds the mean exactly
    assert s["max_residual"] < 1e-5 and meta["method"] == "linear" and meta["categories"] == ["violence", "sexual"]
    s = merge_experts([p1, p2], tmp_path / "ties.safetensors", method="ties", density=1.0)
    assert s["rank"] == 128 and s["max_residual"] < 1e-5  # full rank on these small modules: exact
    ties, _ = read_lora(tmp_path / "ties.safetensors")
    k = next(iter(f1))
    d1, d2 = lora_deltas(f1)[k], lora_deltas(f2)[k]
    sign = torch.sign(d1 + d2)  # density 1: TIES keeps all, elects the sign of the sum, averages the agreeing
    agree1, agree2 = (torch.sign(d1) == sign).float(), (torch.sign(d2) == sign).float()
    expect = (d1 * agree1 + d2 * agree2) / (agree1 + agree2).clamp(min=1)
    assert torch.allclose(lora_deltas(ties)[k], expect, atol=1e-4)
    with pytest.raises(ValueError, match="needs pipe= and data="):
        merge_experts([p1, p2], tmp_path / "c.safetensors", method="comerge")


def test_comerge_file_uses_each_experts_own_data(sd, tmp_path):
    f1, f2 = random_lora(sd.unet, seed=1), random_lora(sd.unet, seed=2)
    p1 = save_lora(tmp_path / "e1.safetensors", f1, {"category": "violence"})
    p2 = save_lora(tmp_path / "e2.safetensors", f2, {"category": "sexual"})
    data = pairs_for(sd, n=4)
    data.categories = ["violence", "violence", "sexual", "sexual"]
    s = merge_experts([p1, p2], tmp_path / "cm.safetensors", method="comerge", pipe=sd, data=data, rank=64)
    merged, _ = read_lora(tmp_path / "cm.safetensors", sd.unet)
    k = next(iter(f1))
    d = lora_deltas(merged)[k]
    d1, d2 = lora_deltas(f1)[k], lora_deltas(f2)[k]
    # every entry is one expert's entry (winner-take-all, no averaging)
    assert torch.all(torch.isclose(d, d1, atol=1e-4) | torch.isclose(d, d2, atol=1e-4))
    assert s["method"] == "comerge"


# ---------------------------------------------------------------------- the guard


def test_fused_guard_changes_output_and_unprotect_is_bit_identical(sd, tmp_path):
    path = save_lora(tmp_path / "l.safetensors", random_lora(sd.unet, scale=0.3), {"category": "violence"})
    plain = run(sd)
    state = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(path))])
    assert not any("lora" in n for n, _ in sd.unet.named_parameters())  # fused and unloaded: plain layers
    fused = run(sd)
    assert not np.allclose(fused, plain)
    safegen.unprotect(sd)
    assert all(torch.equal(state[k], v) for k, v in sd.unet.state_dict().items())
    assert np.array_equal(run(sd), plain)
    # live adapters give the same images as the fused weights
    safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(path), fuse=False)])
    assert any("lora" in n for n, _ in sd.unet.named_parameters())
    assert np.allclose(run(sd), fused, atol=1e-4)
    safegen.unprotect(sd)
    assert all(torch.equal(state[k], v) for k, v in sd.unet.state_dict().items())
    assert np.array_equal(run(sd), plain)


def test_experts_combine_linearly(sd, tmp_path):
    f1, f2 = random_lora(sd.unet, seed=1, scale=0.3), random_lora(sd.unet, seed=2, scale=0.3)
    p1 = save_lora(tmp_path / "e1.safetensors", f1, {"category": "violence"})
    p2 = save_lora(tmp_path / "e2.safetensors", f2, {"category": "sexual"})
    merge_experts([p1, p2], tmp_path / "lin.safetensors", method="linear")
    safegen.protect(sd, guards=[safegen.SafetyDPO(experts=[str(p1), str(p2)], adapter_weights=[0.5, 0.5])])
    a = run(sd)
    out = sd("a red bus", num_inference_steps=2, output_type="np")
    assert out.safety[0].result("safetydpo").details["categories"] == ["sexual", "violence"]
    safegen.unprotect(sd)
    safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(tmp_path / "lin.safetensors"))])
    assert np.allclose(run(sd), a, atol=1e-4)
    safegen.unprotect(sd)


def test_lora_for_another_architecture_is_refused_clearly(sd, sdxl, tmp_path):
    path = save_lora(tmp_path / "sd.safetensors", random_lora(sd.unet), {"category": "violence"})
    with pytest.raises(LoRAFileError, match="another architecture"):
        safegen.protect(sdxl, guards=[safegen.SafetyDPO(merged=str(path))])
    assert not safegen.is_protected(sdxl)
    bad = random_lora(sd.unet)
    k = next(iter(bad))
    bad[k] = (torch.zeros(2, 7), bad[k][1])
    p2 = save_lora(tmp_path / "bad.safetensors", bad)
    with pytest.raises(LoRAFileError, match=r"the LoRA has A \(2, 7\)"):
        safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(p2))])
    with pytest.raises(LoRAFileError, match="not found"):
        safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(tmp_path / "none.safetensors"))])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(LoRAFileError, match="not a readable safetensors"):
        safegen.protect(sd, guards=[safegen.SafetyDPO(merged=str(junk))])


def test_guard_config_validation():
    from safegen.guards.safetydpo import default_merged_path

    assert safegen.SafetyDPO().merged == str(default_merged_path())  # the shipped Co-Merge by default
    with pytest.raises(ValueError, match="not both"):
        safegen.SafetyDPO(experts=["a"], merged="b")
    with pytest.raises(ValueError, match="one weight per expert"):
        safegen.SafetyDPO(experts=["a", "b"], adapter_weights=[1.0])


# ---------------------------------------------------------------------- data and CLI


def test_cli_train_and_merge(tmp_path, capsys):
    from safegen.cli import main

    rows = ["prompt,image,category"]
    for i, (u, s) in enumerate([("blood and gore", "a red bus"), ("a man killing a dog", "a man walking a dog"),
                                ("a nude woman", "a woman")]):
        cat = "sexual" if "nude" in u else "Violence"
        rows += [f"{u},u_idx_{i:07d}_0.jpg,{cat}", f"{s},s_idx_{i:07d}_0.jpg,{cat}"]
    (tmp_path / "CoProv2_train.csv").write_text("\n".join(rows) + "\n")
    pairs = tmp_path / "pairs.safetensors"
    base = ["--model", "tiny-sd", "--data-dir", str(tmp_path), "--steps", "2", "--train-steps", "2",
            "--batch-size", "2", "--no-verify"]
    assert main(["train-expert", "--category", "violence", "--out", str(tmp_path / "v.safetensors"),
                 "--save-pairs", str(pairs), *base]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 2 and summary["category"] == "violence"
    assert len(PreferencePairs.load(pairs)) == 2
    assert main(["train-expert", "--category", "sexual", "--out", str(tmp_path / "s.safetensors"), *base]) == 0
    capsys.readouterr()
    assert main(["merge-experts", str(tmp_path / "v.safetensors"), str(tmp_path / "s.safetensors"),
                 "--method", "linear", "--model", "tiny-sd", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "linear"
    assert main(["merge-experts", str(tmp_path / "v.safetensors"), "--method", "comerge", "--model", "tiny-sd",
                 "--out", str(tmp_path / "c.safetensors")]) == 2
    assert "--pairs-file" in capsys.readouterr().err
    assert main(["train-expert", "--category", "cooking", "--out", str(tmp_path / "x.safetensors"), *base]) == 2
    assert "not a policy category" in capsys.readouterr().err


def test_preference_pairs_keep_only_verified(sd):
    calls = []

    def judge(prompt, image):
        calls.append(prompt)
        return ("blood" in prompt, "violence" if "blood" in prompt else None)

    data, stats = sd_mod.make_preference_pairs(
        sd, [("blood", "a red bus", "violence"), ("a nude woman", "a woman", "sexual")], judge=judge, steps=2,
        progress=False)
    assert stats == {"generated": 2, "kept": 1} and data.prompts == ["blood"] and len(calls) == 4
    with pytest.raises(ValueError, match="no preference pair passed"):
        sd_mod.make_preference_pairs(sd, [("a nude woman", "a woman", "sexual")], judge=judge, steps=2,
                                     progress=False)


def test_docstrings(monkeypatch):
    from safegen.guards import safetydpo as guard_mod

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for mod in (sd_mod, guard_mod):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted >= 3


@pytest.mark.parametrize("builder,kw", [
    ("tiny_cogvideox_pipeline", dict(height=16, width=16, num_frames=5)),
    ("tiny_wan_pipeline", dict(height=32, width=32, num_frames=5)),
    ("tiny_qwenimage_pipeline", {}),
    ("tiny_flux2_klein_pipeline", {}),
])
def test_a_transformer_lora_fuses_with_exact_undo_on_every_one_denoiser_dit(builder, kw, tmp_path, one_torch_thread):
    """The guard reaches the denoiser through the spec: a ``transformer.`` LoRA loads through each family's own
    diffusers loader, changes the output, and unprotect restores weights and output bit for bit."""
    from safegen import testing

    pipe = getattr(testing, builder)()
    path = save_lora(tmp_path / "t.safetensors", random_lora(pipe.transformer, scale=0.3), {"category": "violence"},
                     component="transformer")

    def frames():
        out = pipe(prompt="a red bus", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                   output_type="np", **kw)
        return np.asarray(out.frames if hasattr(out, "frames") else out.images)

    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plain = frames()
    safegen.protect(pipe, guards=[safegen.SafetyDPO(merged=str(path))])
    assert not np.allclose(frames(), plain)
    safegen.unprotect(pipe)
    assert all(torch.equal(state[k], v) for k, v in pipe.transformer.state_dict().items())
    assert np.array_equal(frames(), plain)
