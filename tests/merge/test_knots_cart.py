"""KnOTS and CART: factored (LoRA) routes against dense references, float64."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml

from src.merge import linalg
from src.merge.methods import _kernels as K
from src.merge.registry import TensorGroup, get_method
from src.merge.reductions import run_reduction
from src.merge.updates import LowRank, densify

D = torch.float64
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "merge"


def run_merge(method, params, groups):
    """Prepare every group, run the global reductions over all states, merge each state."""
    states = {g.name: method.prepare(g, params) for g in groups}
    stats: dict = {}
    for name, factory in method.reductions(params):
        stats[name] = run_reduction(factory(dict(stats)), lambda: iter(states.items()))
    return {name: method.merge(s, params, stats) for name, s in states.items()}


def lora(n, O, I, r, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return [LowRank(torch.randn(O, r, generator=g, dtype=D), torch.randn(r, I, generator=g, dtype=D), scale)
            for _ in range(n)]


def lora_model(n=3, r=2, seed=0):
    """A few LoRA-adapted tensors of different shapes plus a dense 1-D tensor."""
    g = torch.Generator().manual_seed(seed + 100)
    return [
        TensorGroup("layers.0.attn.q.weight", None, lora(n, 12, 10, r, seed)),
        TensorGroup("layers.0.attn.v.weight", None, lora(n, 6, 10, r, seed + 1)),
        TensorGroup("layers.1.mlp.fc.weight", None, lora(n, 16, 8, r, seed + 2)),
        TensorGroup("layers.1.mlp.fc.bias", None, [torch.randn(16, generator=g, dtype=D) for _ in range(n)]),
    ]


def densified(groups):
    return [TensorGroup(g.name, g.base, [densify(u) for u in g.updates]) for g in groups]


def dense_of(outs):
    return {k: densify(v) for k, v in outs.items()}


def assert_close(a, b, tol):
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ------------------------------------------------------------------ linalg


@pytest.mark.parametrize("n,O,I,r", [(3, 12, 10, 2), (4, 5, 9, 2), (2, 7, 3, 4)])
def test_factored_concat_svd_matches_dense(n, O, I, r):
    ups = lora(n, O, I, r, seed=n + O)
    dense = [u.dense() for u in ups]
    svd = linalg.factored_concat_svd([u.B for u in ups], [u.A for u in ups], [u.scale for u in ups])
    ref = torch.linalg.svdvals(torch.cat(dense, dim=1))
    k = svd.S.numel()
    assert k == int((ref > 1e-5).sum())
    assert torch.allclose(svd.S, ref[:k], atol=1e-10, rtol=1e-12)
    assert torch.allclose(svd.U.T @ svd.U, torch.eye(k, dtype=D), atol=1e-10)
    for i in range(n):
        assert torch.allclose((svd.U * svd.S) @ svd.Vh[i], dense[i], atol=1e-10)
    row = linalg.factored_row_concat_svd([u.B for u in ups], [u.A for u in ups], [u.scale for u in ups])
    assert torch.allclose(row.S, torch.linalg.svdvals(torch.cat(dense, dim=0))[: row.S.numel()], atol=1e-10)
    for i in range(n):
        assert torch.allclose((row.U[i] * row.S) @ row.Vh, dense[i], atol=1e-10)
    drow = linalg.dense_row_concat_svd(dense)
    assert torch.allclose(drow.S, row.S, atol=1e-10)


def test_svd_tol_drops_small_components():
    ups = lora(3, 12, 10, 2, seed=1)
    ups[2] = LowRank(ups[2].B, ups[2].A, 1e-9)  # this task's components fall below tol
    svd = linalg.factored_concat_svd([u.B for u in ups], [u.A for u in ups], [u.scale for u in ups], tol=1e-5)
    assert svd.S.numel() == 4 and svd.Vh.shape == (3, 4, 10)
    svd0 = linalg.factored_concat_svd([u.B for u in ups], [u.A for u in ups], [u.scale for u in ups], tol=0.0)
    assert svd0.S.numel() == 6


def test_centered_cores_reconstruct_centered_updates():
    ups = lora(4, 11, 9, 2, seed=3)
    dense = torch.stack([u.dense() for u in ups])
    c = linalg.centered_lowrank_cores([u.B for u in ups], [u.A for u in ups], [u.scale for u in ups])
    mean = dense.mean(0)
    assert torch.allclose(c.QB @ c.mean @ c.QA.T, mean, atol=1e-10)
    for i in range(4):
        assert torch.allclose(c.QB @ c.C[i] @ c.QA.T, dense[i] - mean, atol=1e-10)
        # singular values of the core are those of the centered update
        ref = torch.linalg.svdvals(dense[i] - mean)
        got = torch.linalg.svdvals(c.C[i])
        assert torch.allclose(got, ref[: got.numel()], atol=1e-10)


def test_factored_route_never_forms_the_concatenation(monkeypatch):
    """One 4096x4096 module with 6 rank-16 adapters: no SVD/QR input beyond O x nr."""
    n, O, I, r = 6, 4096, 4096, 16
    ups = lora(n, O, I, r, seed=7)
    real_svd, real_qr = torch.linalg.svd, torch.linalg.qr

    def svd(x, *a, **kw):
        assert x.shape[-1] <= n * r and x.shape[-2] <= n * r, f"SVD of {tuple(x.shape)}"
        return real_svd(x, *a, **kw)

    def qr(x, *a, **kw):
        assert x.numel() <= O * n * r, f"QR of {tuple(x.shape)}"
        return real_qr(x, *a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setattr(torch.linalg, "qr", qr)
    method = get_method("knots")
    params = method.make_params(base_method="ta")
    t0 = time.perf_counter()
    state = method.prepare(TensorGroup("w", None, ups), params)
    elapsed = time.perf_counter() - t0
    assert state.X.shape == (n, n * r, I) and state.U.shape == (O, n * r)
    assert elapsed < 3.0, f"factored prepare took {elapsed:.2f}s"
    # exactness on a few columns without densifying everything
    out = method.merge(state, params, {})
    cols = torch.arange(0, I, 512)
    ref = sum(u.scale * u.B @ u.A[:, cols] for u in ups) * params.lam
    assert torch.allclose(out.B @ out.A[:, cols], ref, atol=1e-9)


# ------------------------------------------------------------------ KnOTS


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("concat", ["column", "row"])
def test_knots_ta_equals_task_arithmetic(reduce, concat):
    groups = lora_model()
    method = get_method("knots")
    params = method.make_params(base_method="ta", lam=0.7, ta_reduce=reduce, concat=concat)
    outs = run_merge(method, params, groups)
    for g in groups:
        x = torch.stack([densify(u) for u in g.updates])
        ref = 0.7 * (x.sum(0) if reduce == "sum" else x.mean(0))
        out = outs[g.name]
        assert isinstance(out, LowRank) == (g.updates[0].__class__ is LowRank)
        assert torch.allclose(densify(out), ref, atol=1e-10, rtol=0), g.name


KNOTS_CASES = [
    dict(base_method="ta"),
    dict(base_method="ties", trim_scope="tensor", sign_fill="tensor"),
    dict(base_method="ties", trim_scope="global", sign_fill="global"),
    dict(base_method="ties", trim_scope="global", sign_fill="tensor", density=0.35),
    dict(base_method="dare_ties", p=0.3, seed=5, sign_fill="global"),
    dict(base_method="ties", trim_scope="global", concat="row"),
    dict(base_method="dare_ties", p=0.2, seed=1, concat="row", sign_fill="tensor"),
]


@pytest.mark.parametrize("case", KNOTS_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_knots_factored_equals_dense_route(case):
    groups = lora_model()
    method = get_method("knots")
    params = method.make_params(lam=0.9, **case)
    fact = run_merge(method, params, groups)
    dense = run_merge(method, params, densified(groups))
    assert isinstance(fact["layers.0.attn.q.weight"], LowRank)
    assert not isinstance(dense["layers.0.attn.q.weight"], LowRank)
    assert_close(dense_of(fact), dense_of(dense), 1e-8)
    assert any(densify(v).abs().max() > 0.1 for v in fact.values())


def _ties_reference(X, thresholds, fill, lam):
    x = K.trim(X, thresholds)
    return lam * K.disjoint_mean(x, K.elect_sign(x, fill))


def test_knots_ties_global_scope_matches_flattened_reference():
    """Global trim = one top-k over every tensor's S V_i^T (and the 1-D values) per task."""
    groups = lora_model(n=4, seed=3)
    method = get_method("knots")
    params = method.make_params(base_method="ties", density=0.25, lam=0.6)
    states = {g.name: method.prepare(g, params) for g in groups}
    flat = torch.cat([s.X.reshape(4, -1) for s in states.values()], dim=1)
    thresholds = [K.topk_threshold(row, 0.25) for row in flat]
    fill = float(torch.sign(K.elect_sign(K.trim(flat, thresholds), 0.0).sum()))
    outs = run_merge(method, params, groups)
    for name, s in states.items():
        merged = _ties_reference(s.X, thresholds, fill, 0.6)
        ref = merged if s.U is None else s.U @ merged
        assert torch.allclose(densify(outs[name]), ref, atol=1e-12), name
    # and the scope matters
    per_tensor = run_merge(method, method.make_params(base_method="ties", density=0.25, trim_scope="tensor"), groups)
    assert not all(torch.allclose(densify(outs[k]), densify(per_tensor[k])) for k in outs)


def test_knots_one_d_tensor_is_elementwise_base_method():
    groups = lora_model()
    bias = groups[3]
    method = get_method("knots")
    params = method.make_params(base_method="ties", trim_scope="tensor", sign_fill="tensor", density=0.5, lam=0.4)
    out = method.merge(method.prepare(bias, params), params, {})
    x = torch.stack(bias.updates)
    ref = _ties_reference(x, [K.topk_threshold(xi, 0.5) for xi in x], None, 0.4)
    assert torch.allclose(out, ref, atol=1e-14)


@pytest.mark.parametrize("base_method", ["ties", "dare_ties"])
def test_knots_sign_fill_scope(base_method):
    """Entry 0 of 'a' cancels exactly (+1 - 1): its sign comes from the fill.

    Tensor 'a' alone has a positive majority, the model (with 'b') a negative one.
    """
    a = TensorGroup("a", None, [torch.tensor([1.0, 5, 5, 5], dtype=D), torch.tensor([-1.0, 5, 5, 5], dtype=D)])
    b = TensorGroup("b", None, [torch.full((10,), -7.0, dtype=D)] * 2)
    method = get_method("knots")
    kw = dict(base_method=base_method, density=1.0, p=0.0, trim_scope="tensor", lam=1.0)
    glob = run_merge(method, method.make_params(sign_fill="global", **kw), [a, b])
    tens = run_merge(method, method.make_params(sign_fill="tensor", **kw), [a, b])
    assert glob["a"][0] == -1.0 and tens["a"][0] == 1.0
    assert torch.equal(glob["a"][1:], tens["a"][1:]) and torch.equal(glob["b"], tens["b"])


def test_knots_dare_seed_and_lam_are_honored():
    groups = lora_model()
    method = get_method("knots")
    p = dict(base_method="dare_ties", p=0.5, sign_fill="tensor")
    a = dense_of(run_merge(method, method.make_params(seed=1, lam=1.0, **p), groups))
    b = dense_of(run_merge(method, method.make_params(seed=1, lam=2.0, **p), groups))
    c = dense_of(run_merge(method, method.make_params(seed=2, lam=1.0, **p), groups))
    assert_close({k: 2 * v for k, v in a.items()}, b, 1e-12)
    assert not all(torch.allclose(a[k], c[k]) for k in a)


def test_knots_conv_weight_goes_dense_route():
    g = torch.Generator().manual_seed(0)
    ups = [torch.randn(4, 3, 2, 2, generator=g, dtype=D) for _ in range(3)]
    method = get_method("knots")
    params = method.make_params(base_method="ta", lam=1.0)
    out = method.merge(method.prepare(TensorGroup("conv.weight", None, ups), params), params, {})
    assert out.shape == (4, 3, 2, 2) and torch.allclose(out, sum(ups), atol=1e-10)


def test_knots_mixed_inputs_use_dense_route():
    groups = lora_model()
    g = groups[0]
    mixed = TensorGroup(g.name, None, [g.updates[0].dense()] + g.updates[1:])
    method = get_method("knots")
    params = method.make_params(base_method="ties", trim_scope="tensor", sign_fill="tensor")
    a = method.merge(method.prepare(mixed, params), params, {})
    b = method.merge(method.prepare(g, params), params, {})
    assert not isinstance(a, LowRank) and torch.allclose(a, densify(b), atol=1e-8)


# ------------------------------------------------------------------ CART


def cart_reference(weights, lam, k):
    """Direct dense CART from the paper's formula on task weights."""
    w = torch.stack(weights)
    avg = w.mean(0)
    out = avg.clone()
    if w.dim() == 3 and k > 0:
        for wi in w:
            U, S, Vh = torch.linalg.svd(wi - avg, full_matrices=False)
            out += lam * (U[:, :k] * S[:k]) @ Vh[:k]
    return out


def test_cart_endpoints_are_weight_averaging():
    groups = lora_model(n=4)
    method = get_method("cart")
    for g in groups + densified(groups):
        avg = torch.stack([densify(u) for u in g.updates]).mean(0)
        for kw in (dict(rank_ratio=0.0), dict(rank=0), dict(rank_ratio=1.0), dict(rank=10_000)):
            params = method.make_params(lam=3.0, **kw)
            out = method.merge(method.prepare(g, params), params, {})
            assert torch.allclose(densify(out), avg, atol=1e-10), (g.name, kw)


def test_cart_with_base_model_equals_paper_formula_on_weights():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(9, 7, generator=g, dtype=D)
    ups = [torch.randn(9, 7, generator=g, dtype=D) for _ in range(3)]
    method = get_method("cart")
    params = method.make_params(lam=1.5, rank=2)
    out = method.merge(method.prepare(TensorGroup("blk.attn.w", base, ups), params), params, {})
    ref = cart_reference([base + u for u in ups], 1.5, 2)
    assert torch.allclose(base + out, ref, atol=1e-10)


@pytest.mark.parametrize("kw", [dict(rank=1), dict(rank=3), dict(rank_ratio=0.3), dict(rank_ratio=0.05)])
def test_cart_factored_equals_dense_and_reference(kw):
    groups = lora_model(n=3, r=2, seed=5)
    method = get_method("cart")
    params = method.make_params(lam=0.8, **kw)
    fact = run_merge(method, params, groups)
    dense = run_merge(method, params, densified(groups))
    assert isinstance(fact["layers.0.attn.q.weight"], LowRank)
    assert fact["layers.0.attn.q.weight"].rank <= 3 * 2
    assert not isinstance(dense["layers.0.attn.q.weight"], LowRank)
    assert_close(dense_of(fact), dense_of(dense), 1e-9)
    for g in groups:
        kk = kw["rank"] if "rank" in kw else max(1, int(kw["rank_ratio"] * min(g.shape)))
        ref = cart_reference([densify(u) for u in g.updates], 0.8, kk)
        assert torch.allclose(densify(fact[g.name]), ref, atol=1e-9), g.name
    # an intermediate rank is not the average
    q = groups[0]
    avg = torch.stack([densify(u) for u in q.updates]).mean(0)
    assert not torch.allclose(densify(fact[q.name]), avg, atol=1e-3)


def test_cart_one_d_and_unmatched_params_are_the_average():
    groups = lora_model(n=3)
    method = get_method("cart")
    params = method.make_params(lam=2.0, rank=1, low_rank_params=r"attn")
    outs = run_merge(method, params, groups)
    for g in groups:
        avg = torch.stack([densify(u) for u in g.updates]).mean(0)
        same = torch.allclose(densify(outs[g.name]), avg, atol=1e-12)
        assert same == ("attn" not in g.name), g.name


def test_cart_lam_is_linear():
    g = densified(lora_model(n=3))[0]
    method = get_method("cart")
    avg = torch.stack(g.updates).mean(0)
    state = method.prepare(g, method.make_params())
    a = method.merge(state, method.make_params(lam=1.0, rank=2), {}) - avg
    b = method.merge(state, method.make_params(lam=2.5, rank=2), {}) - avg
    assert a.abs().max() > 1e-3 and torch.allclose(2.5 * a, b, atol=1e-12)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("cfg", ["knots_ta", "knots_ties", "knots_dare_ties", "cart"])
def test_configs_build_params(cfg):
    data = yaml.safe_load((CONFIGS / f"{cfg}.yaml").read_text())
    method = get_method(data["method"])
    params = method.make_params(**data["params"])
    if cfg == "knots_ties":
        assert (params.lam, params.density, params.trim_scope) == (0.6, 0.2, "global")
    if cfg == "knots_dare_ties":
        assert (params.lam, params.p, params.base_method) == (0.7, 0.1, "dare_ties")
    if cfg == "cart":
        assert (params.lam, params.rank_ratio) == (2.0, 0.12)
