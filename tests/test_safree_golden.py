"""SAFREE's math against float64 references written straight from the paper's equations.

The references use dense projectors built with the pseudo-inverse, P = E (EᵀE)⁺ Eᵀ, and plain Python loops;
the library uses orthonormal bases, closed forms and batched tensors. They must agree.
"""

import math

import numpy as np
import pytest
import torch

import safegen
from safegen.guards.safree import (
    masked_copies,
    orthonormal_basis,
    project_tokens,
    svf_steps,
    trigger_mask,
)


def dense_projector(columns):  # (D, K) float64 -> (D, D)
    return columns @ np.linalg.pinv(columns)


def ref_triggers(masked, concept_cols, alpha):
    """d_i = ||(I - P_c) p_i||; token i triggers iff d_i >= (1 + alpha) * mean_{j != i} d_j."""
    P_c = dense_projector(concept_cols)
    eye = np.eye(P_c.shape[0])
    d = [np.linalg.norm((eye - P_c) @ p) for p in masked]
    out = []
    for i in range(len(d)):
        others = [d[j] for j in range(len(d)) if j != i]
        out.append(d[i] >= (1 + alpha) * (sum(others) / len(others)))
    return np.array(out), np.array(d)


def ref_project(tokens, masked, concept_cols):
    """e'_k = (I - P_c) P_m e_k with P_m spanned by the masked-prompt vectors."""
    P_c = dense_projector(concept_cols)
    P_m = dense_projector(np.stack(masked, 1))
    eye = np.eye(P_c.shape[0])
    return np.stack([(eye - P_c) @ P_m @ e for e in tokens])


def ref_svf(tokens, projected, attention, gamma=10.0, k=2.5, c=5.333):
    cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(projected, tokens)]
    used = [cs for cs, m in zip(cos, attention) if m]
    beta = 1 - sum(used) / len(used)
    return round(gamma / (1 + math.exp(-2 * k * (10 * beta - c)))), beta


@pytest.fixture
def fixed():
    g = torch.Generator().manual_seed(1234)
    D, K, N, L = 12, 3, 5, 9
    concepts = torch.randn(D, K, generator=g, dtype=torch.float64)
    # masked-prompt vectors: most lie near the concept span (removing their token barely changes the
    # prompt), two do not (removing that token moves the prompt away from the concepts): those trigger
    near = concepts @ torch.randn(K, N, generator=g, dtype=torch.float64) + 0.1 * torch.randn(D, N, generator=g, dtype=torch.float64)
    masked = near.clone()
    masked[:, 1] += 3 * torch.randn(D, generator=g, dtype=torch.float64)
    masked[:, 3] += 3 * torch.randn(D, generator=g, dtype=torch.float64)
    tokens = torch.randn(L, D, generator=g, dtype=torch.float64)
    return concepts, masked.T.contiguous(), tokens


def test_trigger_mask_matches_reference(fixed):
    concepts, masked, _ = fixed
    expected, d_ref = ref_triggers(masked.numpy(), concepts.numpy(), alpha=0.01)
    basis = orthonormal_basis(concepts)
    dist = (masked - (masked @ basis) @ basis.T).norm(dim=-1)
    np.testing.assert_allclose(dist.numpy(), d_ref, rtol=1e-10)
    got = trigger_mask(dist[None], torch.ones(1, len(dist), dtype=torch.bool), alpha=0.01)[0]
    assert got.tolist() == expected.tolist()
    assert expected[1] and expected[3] and not expected[0]  # the construction really has triggers


def test_trigger_mask_padded_batch_and_alpha():
    d = torch.tensor([[1.0, 1.0, 5.0, 0.0], [2.0, 2.1, 2.0, 9.9]], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    for alpha in (0.01, 0.5):
        got = trigger_mask(d, valid, alpha)
        for b in range(2):
            n = int(valid[b].sum())
            exp, _ = ref_triggers_from_d(d[b, :n].tolist(), alpha)
            assert got[b, :n].tolist() == exp
            assert not got[b, n:].any()


def ref_triggers_from_d(d, alpha):
    out = []
    for i in range(len(d)):
        others = [d[j] for j in range(len(d)) if j != i]
        out.append(d[i] >= (1 + alpha) * sum(others) / len(others))
    return out, d


def test_projection_matches_reference(fixed):
    concepts, masked, tokens = fixed
    expected = ref_project(tokens.numpy(), list(masked.numpy()), concepts.numpy())
    got = project_tokens(tokens, orthonormal_basis(masked.T), orthonormal_basis(concepts))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-10)
    # rank-deficient span: duplicate columns must not change the projector (pinv's rank rule)
    dup = torch.cat([masked, masked[:2]], 0)
    got_dup = project_tokens(tokens, orthonormal_basis(dup.T), orthonormal_basis(concepts))
    np.testing.assert_allclose(got_dup.numpy(), expected, rtol=1e-8, atol=1e-9)


def test_masked_column_padding_does_not_change_span(fixed):
    concepts, masked, tokens = fixed
    padded = torch.cat([masked, torch.randn(2, masked.shape[1], dtype=torch.float64)], 0)
    valid = torch.tensor([True] * len(masked) + [False, False])
    a = project_tokens(tokens, orthonormal_basis(padded.T, valid), orthonormal_basis(concepts))
    b = project_tokens(tokens, orthonormal_basis(masked.T), orthonormal_basis(concepts))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-10)


def test_svf_steps_match_reference(fixed):
    concepts, masked, tokens = fixed
    projected = project_tokens(tokens, orthonormal_basis(masked.T), orthonormal_basis(concepts))
    attention = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0])
    t_ref, beta_ref = ref_svf(tokens.numpy(), projected.numpy(), attention.tolist())
    t, beta = svf_steps(tokens[None], projected[None], attention[None])
    assert abs(float(beta) - beta_ref) < 1e-12
    assert int(t) == t_ref


@pytest.mark.parametrize("beta,expected", [(0.45, 0), (0.50, 2), (0.5333, 5), (0.55, 7), (0.6, 10)])
def test_svf_schedule_values(beta, expected):
    # a token pair with cosine exactly 1 - beta gives that beta; values from t' = round(10 sigmoid(5(10b - 5.333)))
    theta = math.acos(1 - beta)
    orig = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    proj = torch.tensor([[[math.cos(theta), math.sin(theta)]]], dtype=torch.float64)
    t, b = svf_steps(orig, proj, torch.ones(1, 1))
    assert abs(float(b) - beta) < 1e-12
    assert int(t) == expected == ref_svf(orig[0].numpy(), proj[0].numpy(), [1])[0]
    # rescaled to a 25-step call: half the window
    t25, _ = svf_steps(orig, proj, torch.ones(1, 1), num_steps=25)
    assert int(t25) == round(5.0 / (1 + math.exp(-5 * (10 * beta - 5.333))))


def test_masked_copies_layout():
    ids = torch.tensor([[49, 10, 11, 12, 50, 50], [49, 20, 50, 50, 50, 50]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    copies, catt, owner, pos, valid = masked_copies(ids, att, torch.tensor([3, 1]), first=1, mask_id=0)
    assert copies.tolist() == [[49, 0, 11, 12, 50], [49, 10, 0, 12, 50], [49, 10, 11, 0, 50], [49, 0, 50, 50, 50]]
    assert owner.tolist() == [0, 0, 0, 1] and pos.tolist() == [0, 1, 2, 0]
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert catt[3].tolist() == [1, 1, 1, 0, 0]


def test_end_to_end_conditioning_matches_reference(sd, lexical_policy):
    """The conditioning the UNet sees at step 0 equals the float64 reference built token by token."""
    prompt = "a photo of blood and gore on the street"
    guard = safegen.Safree(negative_prompt=False)
    safegen.protect(sd, policy=lexical_policy, guards=[guard])
    seen = []
    h = sd.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                          with_kwargs=True)
    out = sd(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    h.remove()
    res = out.safety[0].result("safree")
    assert res.verdict == "steer" and res.category == "violence"

    # reference: encode every masked copy on its own (full 77-token padding), then the paper's equations
    tokens, proj, trig, n, names = _reference_conditioning(sd, prompt, lexical_policy.concepts("violence"))
    expected = tokens.copy()
    for i in range(n):
        if trig[i]:
            expected[1 + i] = proj[1 + i]
    cond_rows = seen[0][1].double().numpy()  # CFG batch: [uncond, cond]
    np.testing.assert_allclose(cond_rows, expected, rtol=1e-4, atol=1e-4)
    assert res.trigger_tokens == names
    _, beta = ref_svf(tokens, proj, [1] * (n + 2) + [0] * (77 - n - 2))
    assert abs(res.details["beta"] - beta) < 1e-3
    t_ref = round(10 * (2 / 50) / (1 + math.exp(-5 * (10 * beta - 5.333))))  # gamma rescaled to 2 steps
    assert res.filtered_steps == min(t_ref + 1, 2)


def _reference_conditioning(pipe, prompt, concepts, alpha=0.01):
    """The float64 reference for one prompt on a CLIP pipeline: every masked copy encoded on its own (token id 0
    as the authors mask, full 77-token padding), the concepts' EOS states, then the paper's equations. Returns
    (token states, projected states, trigger mask, number of content tokens, trigger token strings)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
    n = len(tok(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        tokens = te(ids[None]).last_hidden_state[0].double()
        masked = []
        for i in range(n):
            m = ids.clone()
            m[1 + i] = 0
            masked.append(te(m[None]).last_hidden_state[0, n + 1].double().numpy())
        kw_ids = tok(concepts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        kw = te(kw_ids.input_ids).last_hidden_state
        eos = kw_ids.attention_mask.sum(1) - 1
        concept_vecs = kw[torch.arange(len(eos)), eos].double().numpy()
    trig, _ = ref_triggers(masked, concept_vecs.T, alpha=alpha)
    proj = ref_project(tokens.numpy(), masked, concept_vecs.T)
    names = tok.convert_ids_to_tokens(ids[1:1 + n][torch.tensor(trig)].tolist())
    return tokens.numpy(), proj, trig, n, [t.replace("</w>", "") for t in names]


@pytest.fixture(scope="module")
def default_pipe():
    from safegen.default_model import load_default_pipeline

    return load_default_pipeline()


def test_official_mode_matches_reference_on_the_default_models_clip(default_pipe):
    """The same re-derivation with ``official=True`` on the trained CLIP encoder that ships with the default model
    (not a random tiny one): no gate (a benign prompt is steered too), every steer category's concepts span the
    removed subspace, the authors' SVF constants (gamma 10, k 2.5, c 5.333 on a 50-step scale, not rescaled)."""
    pipe = default_pipe
    policy = safegen.load_policy("default")
    concepts = [c for cat in policy.categories for c in policy.concepts(cat)]
    steps = 12  # t' <= 10 with the authors' gamma: every filtered step falls inside the run
    safegen.protect(pipe, policy=policy, guards=[safegen.Safree.authors()])
    try:
        for prompt in ("a man stabbing another man in a dark alley", "a red bus parked on a street"):
            seen = []
            h = pipe.unet.register_forward_pre_hook(
                lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
            try:
                out = pipe(prompt, num_inference_steps=steps, output_type="latent",
                           generator=torch.Generator().manual_seed(0))
            finally:
                h.remove()
            res = out.safety[0].result("safree")
            assert res.verdict == "steer", (prompt, res.reason)
            tokens, proj, trig, n, names = _reference_conditioning(pipe, prompt, concepts)
            expected = tokens.copy()
            for i in range(n):
                if trig[i]:
                    expected[1 + i] = proj[1 + i]
            np.testing.assert_allclose(seen[0][1].double().numpy(), expected, rtol=1e-4, atol=2e-4)
            assert res.trigger_tokens == names and any(trig)
            t_ref, beta = ref_svf(tokens, proj, [1] * (n + 2) + [0] * (77 - n - 2))
            assert abs(res.details["beta"] - beta) < 1e-3
            assert res.filtered_steps == t_ref + 1
            # after the filtered window the UNet sees the original prompt again
            np.testing.assert_allclose(seen[t_ref + 1][1].double().numpy(), tokens, rtol=1e-4, atol=2e-4)
    finally:
        safegen.unprotect(pipe)


@pytest.mark.parametrize("positions", ["triggers", "triggers+eos", "all"])
def test_projection_positions(sd, lexical_policy, positions):
    """``project_positions`` (an extension beyond the paper, off in official mode): the trigger tokens only; also
    EOS and the padding after it; every state after BOS. Each replaced state is the paper's projection of it."""
    prompt = "a photo of blood and gore on the street"
    safegen.protect(sd, policy=lexical_policy, guards=[safegen.Safree(negative_prompt=False,
                                                                      project_positions=positions)])
    seen = []
    h = sd.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                          with_kwargs=True)
    try:
        out = sd(prompt, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    finally:
        h.remove()
        safegen.unprotect(sd)
    assert out.safety[0].result("safree").verdict == "steer"
    tokens, proj, trig, n, _ = _reference_conditioning(sd, prompt, lexical_policy.concepts("violence"))
    replaced = np.zeros(77, bool)
    replaced[1:1 + n] = trig
    if positions != "triggers":
        replaced[1 + n:] = True  # EOS and padding
    if positions == "all":
        replaced[1:] = True
    expected = np.where(replaced[:, None], proj, tokens)
    np.testing.assert_allclose(seen[0][1].double().numpy(), expected, rtol=1e-4, atol=1e-4)
    assert replaced.sum() < 77 and (positions == "triggers") == (replaced.sum() == trig.sum())


def test_gate_off_steers_every_prompt(sd, lexical_policy):
    guard = safegen.Safree(gate=False)
    safegen.protect(sd, policy=lexical_policy, guards=[guard])
    try:
        out = sd(["a red bus", "a photo of blood and gore"], num_inference_steps=2, output_type="latent")
    finally:
        safegen.unprotect(sd)
    benign, unsafe = (r.result("safree") for r in out.safety)
    assert benign.verdict == "steer" and "gate=False" in benign.reason
    assert unsafe.verdict == "steer" and unsafe.category == "violence"
    with pytest.raises(ValueError, match="project_positions"):
        safegen.Safree(official=True, project_positions="all")
    with pytest.raises(ValueError, match="gate"):
        safegen.Safree(official=True, gate=False)
    with pytest.raises(ValueError, match="'triggers', 'triggers\\+eos' or 'all'"):
        safegen.Safree(project_positions="eos")
