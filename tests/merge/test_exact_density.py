"""TIES-style trimming keeps EXACTLY ``k = int(density * N)`` entries per task, ties or not.

bf16 finetuning deltas take few distinct magnitudes, so many entries tie with the
``k``-th largest magnitude; keeping ``|x| >= threshold`` kept all of them (up to 28% more
than ``density`` asks for on a real 1.1B bf16 model). The documented tie-break: among the
entries equal to the threshold, those first in (engine tensor order, flat row-major index)
order are kept. The references below are a full stable sort of the flattened concatenation
in that order (global scope) or of each tensor (per-tensor scope), written without the
project's kernels.
"""
from __future__ import annotations

import pytest
import torch

from src.merge import Sweep, merge_state_dicts
from src.merge.methods import _kernels as K
from src.merge.registry import get_method
from src.merge.reductions import TopKThreshold, run_reduction

from .helpers import reference_elect_and_merge

#: Few distinct magnitudes, all exact in bf16 (and their sums with small integers too).
MAGNITUDES = torch.tensor([0.125, 0.25, 0.5, 1.0])
SHAPES = {"embed.weight": (40, 30), "l0.w": (20, 30), "l0.b": (30,), "l1.w": (30, 20), "norm.weight": (20,)}
DENSITIES = [0.05, 0.2, 0.37, 0.5, 0.9]


def tied_values(shape, g: torch.Generator, zero_fraction: float = 0.0) -> torch.Tensor:
    """bf16 values from +-MAGNITUDES (heavy ties), optionally with exact zeros."""
    idx = torch.randint(len(MAGNITUDES), shape, generator=g)
    sign = torch.randint(2, shape, generator=g) * 2 - 1
    x = MAGNITUDES[idx] * sign
    if zero_fraction:
        x = torch.where(torch.rand(shape, generator=g) < zero_fraction, torch.zeros(()), x)
    return x.to(torch.bfloat16)


def tied_model(n_tasks=3, seed=0, zero_fraction=0.0, shapes=SHAPES):
    """Base weights (small integers) and task weights = base + tied delta, all exact in bf16."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randint(-2, 3, s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    deltas = [{k: tied_values(s, g, zero_fraction) for k, s in shapes.items()} for _ in range(n_tasks)]
    tasks = [{k: (base[k].float() + d[k].float()).to(torch.bfloat16) for k in shapes} for d in deltas]
    return base, deltas, tasks


def stable_topk_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest ``|flat|``; among equal magnitudes, the lower index first."""
    order = torch.sort(flat.abs().double(), descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def reference_masks(deltas, density, scope):
    """Per task, the kept mask over the concatenation of the flattened tensors (dict order)."""
    out = []
    for d in deltas:
        if scope == "global":
            flat = torch.cat([v.float().reshape(-1) for v in d.values()])
            out.append(stable_topk_mask(flat, int(density * flat.numel())))
        else:
            out.append(torch.cat([stable_topk_mask(v.float().reshape(-1), int(density * v.numel()))
                                  for v in d.values()]))
    return torch.stack(out)


def reference_ties(deltas, mask, lam, sign_fill, dtype=torch.float32):
    """TIES on the flattened concatenation with a given trim mask; returns per-tensor updates."""
    shapes = {k: v.shape for k, v in deltas[0].items()}
    X = torch.stack([torch.cat([d[k].to(dtype).reshape(-1) for k in shapes]) for d in deltas]) * mask
    sizes = [s_.numel() for s_ in shapes.values()]
    merged = reference_elect_and_merge(X, sizes, sign_fill, lam)
    return {k: v.reshape(shapes[k]) for k, v in zip(shapes, torch.split(merged, sizes))}


# --------------------------------------------------------------------------- the statistic


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("zero_fraction", [0.0, 0.6])
def test_global_statistic_keeps_exactly_k_with_ties(monkeypatch, dtype, density, zero_fraction):
    monkeypatch.setattr(K, "CHUNK_ENTRIES", 64)  # the tie cut falls inside a tensor spanning many chunks
    _, deltas, _ = tied_model(seed=1, zero_fraction=zero_fraction)
    stacked = {k: torch.stack([d[k] for d in deltas]).to(dtype) for k in SHAPES}
    res = run_reduction(TopKThreshold(lambda s: s, density), lambda: list(stacked.items()))
    assert len(res) == 3 and all(isinstance(t, float) for t in res)
    ref = reference_masks(deltas, density, "global")
    # tensors looked up in reverse order: the quotas are per tensor name, not consumed in order
    masks = {k: K.keep_mask(stacked[k], res, res.tie_quota(k)) for k in reversed(SHAPES)}
    got = torch.cat([masks[k].reshape(3, -1) for k in SHAPES], dim=1)
    total = sum(torch.Size(s).numel() for s in SHAPES.values())
    assert got.sum(dim=1).tolist() == [int(density * total)] * 3
    assert torch.equal(got, ref)
    # the old rule (|x| >= threshold) keeps more: the test data do exercise ties
    if 0 < density < 1:
        old = torch.cat([(stacked[k].abs().float().reshape(3, -1) >= torch.tensor(res).unsqueeze(1)) for k in SHAPES], 1)
        assert (old.sum(dim=1) > got.sum(dim=1)).any()


@pytest.mark.parametrize("route", ["topk", "histogram"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.0, *DENSITIES, 1.0])
def test_per_tensor_trim_keeps_exactly_k_with_ties(monkeypatch, route, dtype, density):
    monkeypatch.setattr(K, "HISTOGRAM_SELECT_MIN", 1 if route == "histogram" else 10 ** 9)
    monkeypatch.setattr(K, "CHUNK_ENTRIES", 256)
    x = tied_values((3, 60, 70), torch.Generator().manual_seed(2), zero_fraction=0.3).to(dtype)
    trims = [K.topk_trim(xi, density) for xi in x]
    mask = K.keep_mask(x, [t for t, _ in trims], [q for _, q in trims])
    for i in range(3):
        assert int(mask[i].sum()) == int(density * x[i].numel())
        assert torch.equal(mask[i].reshape(-1), stable_topk_mask(x[i].float().reshape(-1), int(density * x[i].numel())))
    # and the plain threshold is unchanged: the k-th largest magnitude
    for (t, _), xi in zip(trims, x):
        assert t == K.topk_threshold(xi, density)


@pytest.mark.parametrize("fill", [None, 1.0, -1.0])
def test_fused_kernel_with_tie_quotas_equals_reference_steps(monkeypatch, fill):
    """ties_combine / elected_sign_sum with tie quotas == the reference steps on the exact
    stable top-k mask, across chunk boundaries and with exact cancellations (needing the fill)."""
    monkeypatch.setattr(K, "CHUNK_ENTRIES", 64)
    x = tied_values((4, 17, 23), torch.Generator().manual_seed(3), zero_fraction=0.2).float()
    trims = [K.topk_trim(xi, 0.45) for xi in x]
    thresholds, quotas = [t for t, _ in trims], [q for _, q in trims]
    assert any(q is not None for q in quotas)
    mask = torch.stack([stable_topk_mask(xi.reshape(-1), int(0.45 * xi.numel())).reshape(xi.shape) for xi in x])
    ref_x = x * mask
    want = K.disjoint_mean(ref_x, K.elect_sign(ref_x, fill))
    assert bool(((torch.sign(ref_x.sum(0)) == 0) & (ref_x != 0).any(0)).any())  # cancellations happen
    torch.testing.assert_close(K.ties_combine(x, thresholds, fill, tie_quota=quotas), want, rtol=0, atol=0)
    torch.testing.assert_close(K.trim(x, thresholds, quotas), ref_x, rtol=0, atol=0)
    assert float(K.elected_sign_sum(x, thresholds, quotas)) == float(torch.sign(ref_x.sum(0)).sum())


# --------------------------------------------------------------------------- through the public API


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("density", DENSITIES)
def test_ties_bf16_one_task_keeps_exactly_k(scope, density):
    """One task: TIES returns the trimmed update itself, so the kept entries are visible."""
    base, deltas, tasks = tied_model(n_tasks=1, seed=4)
    out = merge_state_dicts("ties", tasks, base=base, lam=1.0, density=density, trim_scope=scope, sign_fill=scope)
    kept = torch.cat([(out[k] != base[k]).reshape(-1) for k in SHAPES])
    ref = reference_masks(deltas, density, scope)[0]
    if scope == "global":
        assert int(kept.sum()) == int(density * kept.numel())
    else:
        for k in SHAPES:
            assert int((out[k] != base[k]).sum()) == int(density * base[k].numel()), k
    assert torch.equal(kept, ref)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("sign_fill", ["global", "tensor"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_bf16_equals_stable_sort_reference(monkeypatch, scope, sign_fill, density):
    monkeypatch.setattr(K, "CHUNK_ENTRIES", 64)  # tie cuts inside tensors spanning many chunks
    base, deltas, tasks = tied_model(n_tasks=3, seed=5, zero_fraction=0.3)
    out = merge_state_dicts("ties", tasks, base=base, lam=0.7, density=density, trim_scope=scope, sign_fill=sign_fill)
    ref = reference_ties(deltas, reference_masks(deltas, density, scope), 0.7, sign_fill)
    for k in SHAPES:
        assert out[k].dtype == torch.bfloat16
        torch.testing.assert_close(out[k], (base[k].float() + ref[k]).to(torch.bfloat16), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_knots_ties_bf16_equals_stable_sort_reference(scope):
    """KnOTS-TIES trims the same way (1-D tensors: element-wise TIES on the raw values)."""
    shapes = {"l0.b": (30,), "norm.weight": (20,), "l1.b": (50,)}
    base, deltas, tasks = tied_model(n_tasks=3, seed=6, zero_fraction=0.2, shapes=shapes)
    out = merge_state_dicts("knots", tasks, base=base, base_method="ties", lam=0.6, density=0.3,
                            trim_scope=scope, sign_fill=scope)
    ref = reference_ties(deltas, reference_masks(deltas, 0.3, scope), 0.6, scope, dtype=torch.float64)
    for k in shapes:
        torch.testing.assert_close(out[k], (base[k].double() + ref[k]).to(torch.bfloat16), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_merge_order_and_sweep_do_not_change_the_kept_set(scope):
    """Tie quotas belong to tensor names: merging tensors in any order, or in a sweep, agrees."""
    base, deltas, tasks = tied_model(n_tasks=3, seed=7)
    params = dict(lam=1.0, density=0.3, trim_scope=scope, sign_fill="tensor")
    want = merge_state_dicts("ties", tasks, base=base, **params)
    sweep = Sweep("ties", tasks, base=base, progress=False)
    for point, got in sweep.run({"density": [0.5, 0.3]}, fixed=params):
        if point["density"] == 0.3:
            for k in SHAPES:
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    # the method driven by hand, tensors merged in reverse order
    method = get_method("ties")
    p = method.make_params(**params)
    groups = {k: method.prepare(sweep.engine.group(k), p) for k in SHAPES}
    stats: dict = {}
    for name, factory in method.reductions(p):
        stats[name] = run_reduction(factory(dict(stats)), lambda: list(groups.items()))
    for k in reversed(SHAPES):
        got = (base[k].float() + method.merge(groups[k], p, stats)).to(torch.bfloat16)
        torch.testing.assert_close(got, want[k], rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_float32_without_ties_is_unchanged(scope):
    """Continuous float32 updates (no ties): the plain top-k, same as before the tie-break."""
    g = torch.Generator().manual_seed(8)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    deltas = [{k: torch.randn(s, generator=g) * 10.0 ** (i % 3 - 1) for i, (k, s) in enumerate(SHAPES.items())}
              for _ in range(3)]
    tasks = [{k: base[k] + d[k] for k in SHAPES} for d in deltas]
    deltas = [{k: t[k] - base[k] for k in SHAPES} for t in tasks]  # exactly what the engine sees
    out = merge_state_dicts("ties", tasks, base=base, lam=0.8, density=0.3, trim_scope=scope, sign_fill=scope)
    mask = reference_masks(deltas, 0.3, scope)
    # no ties: the mask is the plain |x| >= k-th largest rule
    X = torch.stack([torch.cat([d[k].reshape(-1) for k in SHAPES]) for d in deltas])
    if scope == "global":
        kth = torch.stack([(X[i].abs() * mask[i]).masked_fill(~mask[i], float("inf")).min() for i in range(3)])
        assert torch.equal(mask, X.abs() >= kth.unsqueeze(1))
    ref = reference_ties(deltas, mask, 0.8, scope)
    for k in SHAPES:
        torch.testing.assert_close(out[k], base[k] + ref[k], rtol=1e-6, atol=1e-6)
