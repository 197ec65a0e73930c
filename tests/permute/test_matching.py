"""Solvers and searches against known answers: recovered permutations, identities, brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from src.finetune.models.resnet import ResNet20
from src.permute.matcher import activation_similarity, match_models
from src.permute.merge import aligned_states, merge_states, weight_similarity
from src.permute.solvers import Match, align, greedy_merge, zip_units
from src.permute.spec import Perm, permute_state, random_permutations
from src.permute.specs import mlp_spec, resnet20_spec

from .helpers import MLP, randomize_norms


def _states(seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(**kw).state_dict()


def _close(a, b):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.parametrize("similarity", ["inner", "correlation"])
def test_weight_matching_recovers_a_known_permutation(similarity):
    spec = mlp_spec(12, 8, 3, 5)
    s0 = _states(0)
    truth = random_permutations(spec, torch.Generator().manual_seed(4))
    s1 = permute_state(spec, truth, s0)
    matches = match_models(spec, [s0, s1], alpha=1.0, similarity=similarity, patience=1)
    for p, m in matches.items():  # merged unit u is model 0's unit u and the permuted copy's unit truth^-1(u)
        assert torch.equal(m.permutations[1], torch.argsort(truth[p]))
    aligned = aligned_states(spec, matches, [s0, s1])
    assert _close(aligned[1], s0)
    assert _close(merge_states(spec, matches, [s0, s1]), s0)  # averaging with a permuted self: the model


def test_resnet_weight_matching_recovers_a_permutation_with_groupnorm():
    torch.manual_seed(0)
    net = ResNet20(1, "group", 4, out_dim=6)
    randomize_norms(net, torch.Generator().manual_seed(0))
    spec = resnet20_spec(1, "group", 4)
    s0 = net.state_dict()
    s1 = permute_state(spec, random_permutations(spec, torch.Generator().manual_seed(5)), s0)
    matches = match_models(spec, [s0, s1], alpha=1.0, similarity="inner", patience=1)
    assert _close(aligned_states(spec, matches, [s0, s1])[1], s0)


def test_group_alignment_never_splits_a_group():
    perm = Perm(12, 4)
    rng = np.random.default_rng(0)
    for _ in range(5):
        S = torch.as_tensor(rng.normal(size=(24, 24)), dtype=torch.float32)
        (m,) = align([S], [perm], models=2)
        p = m.permutations[1].view(3, 4)
        assert ((p // 4) == (p[:, :1] // 4)).all()
        assert sorted(p[:, 0].div(4, rounding_mode="floor").tolist()) == [0, 1, 2]
        # and it is the best group-respecting assignment (brute force over group orders and within-group orders)
        block = S[:12, 12:].numpy()
        best = -np.inf
        for order in itertools.permutations(range(3)):
            total = 0.0
            for g, h in enumerate(order):
                sub = block[4 * g:4 * g + 4, 4 * h:4 * h + 4]
                total += max(sum(sub[i, q[i]] for i in range(4)) for q in itertools.permutations(range(4)))
            best = max(best, total)
        assert block[np.arange(12), m.permutations[1].numpy()].sum() == pytest.approx(best, rel=1e-6)


def test_tied_perms_share_one_group_order():
    rng = np.random.default_rng(1)
    S1 = torch.as_tensor(rng.normal(size=(16, 16)), dtype=torch.float32)
    S2 = torch.as_tensor(rng.normal(size=(16, 16)), dtype=torch.float32)
    a, b = align([S1, S2], [Perm(8, 4, "t"), Perm(8, 4, "t")], models=2)
    assert torch.equal(a.permutations[1].view(2, 4)[:, 0] // 4, b.permutations[1].view(2, 4)[:, 0] // 4)


def test_hungarian_alignment_is_optimal():
    rng = np.random.default_rng(2)
    S = torch.as_tensor(rng.normal(size=(10, 10)), dtype=torch.float32)
    (m,) = align([S], [Perm(5)], models=2)
    block = S[:5, 5:].numpy()
    best = max(sum(block[i, q[i]] for i in range(5)) for q in itertools.permutations(range(5)))
    assert block[np.arange(5), m.permutations[1].numpy()].sum() == pytest.approx(best, rel=1e-6)


def test_greedy_merge_hand_worked():
    # items 0,1 (model 0) and 2,3 (model 1); the best pair is (0, 3), then (1, 2)
    S = np.array([[0, .1, .2, .9], [.1, 0, .5, .3], [.2, .5, 0, .4], [.9, .3, .4, 0]])
    kept, score = greedy_merge(S, np.array([0, 0, 1, 1]), keep=2, alpha=0.0, beta=1.0)
    assert sorted(sorted(k) for k in kept) == [[0, 3], [1, 2]]
    assert score == pytest.approx((0.9 + 0.5) / 2)
    # a same-model pair wins when it is the most similar and the budget allows it
    S2 = np.array([[0, .95, .2, .1], [.95, 0, .3, .2], [.2, .3, 0, .8], [.1, .2, .8, 0]])
    kept, _ = greedy_merge(S2, np.array([0, 0, 1, 1]), keep=2, alpha=0.0, beta=1.0)
    assert sorted(sorted(k) for k in kept) == [[0, 1], [2, 3]]
    kept, _ = greedy_merge(S2, np.array([0, 0, 1, 1]), keep=2, alpha=0.0, beta=0.0)  # no same-model budget
    assert all({i // 2 for i in k} == {0, 1} for k in kept)


def test_zipping_two_identical_models_returns_the_model():
    spec = mlp_spec(12, 8, 3, 5)
    s0 = _states(0)
    for k in (1, 2, 3):  # every unit active on the data: a dead unit correlates with nothing, its partner is arbitrary
        s0[f"fc{k}.bias"] = s0[f"fc{k}.bias"].abs() + 1.0
    x = torch.randn(64, 12)
    act = _self_similarity(spec, s0, x)
    assert all(torch.allclose(a[:8, 8:].diagonal(), torch.ones(8)) for a in act.values())
    matches = match_models(spec, [s0, s0], act, solver="zip", alpha=0.0)
    assert _close(merge_states(spec, matches, [s0, s0]), s0)


def _self_similarity(spec, state, x):
    """Activation correlations of a model with itself, computed directly (no hooks)."""
    return _pair_similarity(spec, state, state, x)


def test_mudsc_alpha_limits_equal_weight_and_activation_matching():
    spec = mlp_spec(12, 8, 3, 5)
    s0, s1 = _states(0), _states(1)
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    act = _pair_similarity(spec, s0, s1, x)

    def differs(a, b):
        return any(not torch.equal(a[p].unmerge[1], b[p].unmerge[1]) for p in spec.perms)

    for solver in ("align", "zip"):
        only_act = match_models(spec, [s0, s1], act, solver=solver, alpha=0.0)
        mudsc0 = match_models(spec, [s0, s1], act, solver=solver, alpha=0.0, max_iter=7)
        weights = match_models(spec, [s0, s1], None, solver=solver, alpha=1.0, seed=3)
        mudsc1 = match_models(spec, [s0, s1], act, solver=solver, alpha=1.0, seed=3)
        for p in spec.perms:
            assert torch.equal(only_act[p].unmerge[1], mudsc0[p].unmerge[1])
            assert torch.equal(weights[p].unmerge[1], mudsc1[p].unmerge[1])
        # the two spaces disagree here, and alpha 0.5 is a third solution, not one of the ends
        mid = match_models(spec, [s0, s1], act, solver=solver, alpha=0.5)
        assert differs(only_act, weights) and differs(mid, only_act) and differs(mid, weights)


def _pair_similarity(spec, s0, s1, x):
    """Activation correlations of two MLPs' hidden units on ``x``, computed directly (no hooks)."""
    feats = []
    for state in (s0, s1):
        model = MLP()
        model.load_state_dict(state)
        h, f = x, {}
        for k in range(1, 4):
            h = torch.relu(getattr(model, f"fc{k}")(h))
            f[f"h{k}"] = h.detach()
        feats.append(f)
    out = {}
    for p in feats[0]:
        F = torch.cat([feats[0][p], feats[1][p]], 1).double()
        out[p] = {"count": torch.tensor(float(len(F))), "sum": F.sum(0), "gram": F.T @ F}
    return activation_similarity(out)


def test_activation_similarity_is_the_correlation():
    x = torch.randn(300, 4, dtype=torch.float64)
    stats = {"p": {"count": torch.tensor(300.0), "sum": x.sum(0), "gram": x.T @ x}}
    expected = torch.as_tensor(np.corrcoef(x.numpy().T), dtype=torch.float32)
    torch.testing.assert_close(activation_similarity(stats)["p"], expected, atol=1e-5, rtol=1e-5)


def test_weight_similarity_inner_is_git_rebasin_objective():
    # for the last hidden perm with the others at identity: C = W_a W_b^T (rows) + V_a^T V_b (columns)
    spec = mlp_spec(12, 8, 3, 5)
    s0, s1 = _states(0), _states(1)
    ident = {p: Match.identity(8, 2) for p in spec.perms}
    C = weight_similarity(spec, "h3", ident, [s0, s1], kind="inner")[:8, 8:]
    expected = s0["fc3.weight"] @ s1["fc3.weight"].T + torch.outer(s0["fc3.bias"], s1["fc3.bias"]) \
        + s0["proj.weight"].T @ s1["proj.weight"]
    torch.testing.assert_close(C, expected, rtol=1e-5, atol=1e-5)


def test_zip_groups_pairs_whole_groups():
    rng = np.random.default_rng(3)
    S = rng.normal(size=(16, 16))
    S = torch.as_tensor((S + S.T) / 2, dtype=torch.float32)
    (m,) = zip_units([S], [Perm(8, 4)], models=2)
    assert m.merge[0].shape == (8, 8)
    for g in range(2):  # each merged group draws from exactly two whole source groups
        rows = slice(4 * g, 4 * g + 4)
        sources = {(i, int(u) // 4) for i in range(2) for u in torch.nonzero(m.merge[i][rows].sum(0)).flatten()}
        assert len(sources) == 2
