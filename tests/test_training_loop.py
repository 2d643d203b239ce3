"""safegen.training.loop.TrainingLoop: a run interrupted after a checkpoint and resumed ends with exactly the weights
of the uninterrupted run (per-step seeding of batches and dropout, optimizer state, LR schedule position)."""

import pytest
import torch

from safegen.training.loop import Checkpoints, TrainingLoop

STEPS, EVERY = 10, 3


class Interrupted(Exception):
    pass


def _model(init_seed: int) -> torch.nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    torch.random.set_rng_state(state)
    return model


def _run(folder, *, as_mapping: bool, init_seed: int = 0, resume: bool = False, stop_at: int | None = None):
    """Train a tiny regressor with dropout (AdamW, cosine schedule with warm-up, clipping, a checkpoint every
    EVERY steps); raise Interrupted at the start of step ``stop_at``. Returns (model, loop)."""
    model = _model(init_seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=1e-2)
    weights = dict(model.named_parameters()) if as_mapping else model  # a mapping: like SafetyDPO's LoRA params
    loop = TrainingLoop(weights, opt, steps=STEPS, seed=7, stream="test", schedule="cosine", warmup=2, clip=1.0,
                        checkpoints=Checkpoints(folder, "tiny"), checkpoint_every=EVERY, progress=False)
    if resume:
        assert loop.resume() is not None
    for step, gen in loop:
        if step == stop_at:
            raise Interrupted
        x = torch.randn(8, 4, generator=gen)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(8, 1, generator=gen)
        loop.update(((model(x) - y) ** 2).mean())  # dropout draws from the (per-step seeded) global RNG
    return model, loop


@pytest.mark.parametrize("as_mapping", [False, True], ids=["module", "mapping"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, as_mapping):
    caller_rng = torch.random.get_rng_state()
    full, full_loop = _run(tmp_path / "full", as_mapping=as_mapping)
    assert torch.equal(torch.random.get_rng_state(), caller_rng)  # the caller's RNG is untouched

    with pytest.raises(Interrupted):
        _run(tmp_path / "cut", as_mapping=as_mapping, stop_at=7)
    assert [p.name for p in Checkpoints(tmp_path / "cut", "tiny").paths()][-1] == "tiny-0000006.safetensors"
    # a fresh process: other initial weights, overwritten by the checkpoint's
    resumed, loop = _run(tmp_path / "cut", as_mapping=as_mapping, init_seed=1, resume=True)
    assert loop.start == 6 and loop.ran == STEPS - 6 and loop.position == STEPS
    assert loop.losses == full_loop.losses[6:]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert loop.optimizer.param_groups[0]["lr"] == full_loop.optimizer.param_groups[0]["lr"]


def test_non_finite_loss_stops_the_run_without_touching_the_weights(tmp_path):
    from safegen.errors import TrainingDivergedError

    model = _model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    loop = TrainingLoop(model, opt, steps=STEPS, seed=7, stream="test", progress=False)
    with pytest.raises(TrainingDivergedError, match="non-finite loss nan at step 0"):
        for _step, gen in loop:
            loop.update(model(torch.randn(2, 4, generator=gen)).sum() * float("nan"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_reports_a_diverged_training_in_one_line(capsys):
    import argparse

    from safegen.cliargs import run_command
    from safegen.errors import TrainingDivergedError

    def diverge(args):
        raise TrainingDivergedError("train-x: non-finite loss inf at step 3")

    parser = argparse.ArgumentParser(prog="safegen")
    parser.set_defaults(func=diverge)
    assert run_command(parser, []) == 1
    err = capsys.readouterr().err
    assert err == "safegen: error: train-x: non-finite loss inf at step 3\n"
