"""Per-task ``weights`` and coefficient tables (src/merge/coefficients.py) in TA, TIES, DARE, CART.

Every merge with coefficients is checked against an independent computation from hand-built
task updates (the formulas of docs/algorithms.md#adamerging; PEFT's ``ties`` / ``dare_*`` with
per-task ``weights``), and the defaults against the unchanged paths bit for bit.
"""
from __future__ import annotations

import json

import pytest
import torch
from peft.utils import merge_utils as pm
from safetensors.torch import save_file

from src.merge import Sweep, merge, merge_state_dicts
from src.merge.coefficients import CoefficientTable, weighted_combination
from src.merge.methods import _kernels as K
from src.merge.methods.dare import dare_seed

from .helpers import run_method
from src.merge.methods.ties import elected_entries
from src.merge.registry import TensorGroup, get_method
from src.merge.updates import LowRank, densify

NAMES = ("layers.0.attn.q.weight", "layers.0.mlp.fc.weight", "layers.0.mlp.fc.bias")
SHAPES = {"layers.0.attn.q.weight": (12, 10), "layers.0.mlp.fc.weight": (16, 12), "layers.0.mlp.fc.bias": (16,)}




def model(n=3, seed=0, dtype=torch.float32):
    """Per tensor name, ``n`` dense task updates."""
    g = torch.Generator().manual_seed(seed)
    return {k: [torch.randn(s, generator=g, dtype=dtype) for _ in range(n)] for k, s in SHAPES.items()}


def groups_of(ups, base=None):
    return [TensorGroup(k, None if base is None else base[k], list(v)) for k, v in ups.items()]


def write_table(tmp_path, params=None, default=(0.5, 0.25, 1.5), tasks=("a", "b", "c"), name="c.json"):
    table = CoefficientTable(list(tasks), list(default), dict(params or {}))
    return str(table.save(tmp_path / name)), table


LISTED = {"layers.0.attn.q.weight": [0.1, 0.7, 0.3], "layers.0.mlp.fc.bias": [1.0, -0.5, 0.2]}


# ----- the table -------------------------------------------------------------------------------
def test_table_round_trips_float32_values_exactly(tmp_path):
    values = torch.rand(3, generator=torch.Generator().manual_seed(1)).tolist()  # float32 values as floats
    path, table = write_table(tmp_path, {"w": values}, default=values[::-1])
    back = CoefficientTable.load(path)
    assert back.tasks == ["a", "b", "c"] and back.params["w"] == values and back.default == values[::-1]
    assert back.for_param("w") == values and back.for_param("other") == values[::-1]
    data = json.loads(open(path).read())
    assert data["format"] == "merge-coefficients" and set(data) >= {"tasks", "default", "params"}


@pytest.mark.parametrize("bad,match", [
    ({"tasks": ["a"], "default": [1.0, 2.0]}, "2 coefficients for 1 tasks"),
    ({"tasks": ["a", "b"], "default": [1.0, 2.0], "params": {"w": [1.0]}}, r"params\['w'\] has 1"),
    ({"tasks": ["a"], "default": [float("nan")]}, "not a finite number"),
    ({"tasks": ["a"], "default": ["x"]}, "not a finite number"),
    ({"default": [1.0]}, "missing 'tasks'"),
    ([1, 2], "JSON object"),
])
def test_bad_tables_name_the_file_and_the_problem(tmp_path, bad, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=match) as e:
        get_method("task_arithmetic").make_params(coefficients=str(path))
    assert str(path) in str(e.value)


def test_missing_or_invalid_json_table(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        get_method("ties").make_params(coefficients=str(tmp_path / "none.json"))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_method("cart").make_params(coefficients=str(tmp_path / "x.json"))


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare", "cart"])
def test_weights_are_validated(name, tmp_path):
    method = get_method(name)
    with pytest.raises(ValueError, match="weights"):
        method.make_params(weights="1,2")
    with pytest.raises(ValueError, match="weights"):
        method.make_params(weights=[])
    with pytest.raises(ValueError, match="weights"):
        method.make_params(weights=[1.0, True])
    with pytest.raises(ValueError, match="not a finite number"):
        method.make_params(weights=[1.0, float("inf")])
    ups = model(n=3)
    with pytest.raises(ValueError, match="weights has 2 entries, the merge has 3 task models"):
        run_method(name, groups_of(ups), weights=[1.0, 2.0], **({"rank": 1} if name == "cart" else {}))
    path, _ = write_table(tmp_path, default=[1.0, 1.0], tasks=["a", "b"])
    with pytest.raises(ValueError, match="is for 2 tasks"):
        run_method(name, groups_of(ups), coefficients=path, **({"rank": 1} if name == "cart" else {}))


# ----- defaults unchanged ----------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("task_arithmetic", {"lam": 0.3}), ("task_arithmetic", {"lam": 0.7, "reduce": "mean"}),
    ("ties", {"lam": 0.6, "density": 0.3}), ("ties", {"density": 0.5, "trim_scope": "tensor", "sign_fill": "tensor"}),
    ("dare", {"p": 0.4, "lam": 0.5, "seed": 3}), ("dare", {"p": 0.3, "mode": "ties", "sign_fill": "global"}),
    ("cart", {"lam": 1.5, "rank": 2}), ("cart", {"rank_ratio": 0.3, "low_rank_params": "attn"}),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unit_weights_and_tables_of_ones_are_bit_identical_to_the_defaults(tmp_path, name, params, seed):
    dtype = torch.float64 if name == "cart" else torch.float32
    ups = model(n=3, seed=seed, dtype=dtype)
    ones, _ = write_table(tmp_path, {NAMES[0]: [1.0, 1.0, 1.0]}, default=[1.0, 1.0, 1.0])
    plain = run_method(name, groups_of(ups), **params)
    for extra in ({"weights": None}, {"weights": [1.0, 1.0, 1.0]}, {"weights": [1, 1, 1]}, {"coefficients": ones},
                  {"weights": [1.0, 1.0, 1.0], "coefficients": ones}):
        other = run_method(name, groups_of(ups), **params, **extra)
        for k in plain:
            assert torch.equal(densify(plain[k]), densify(other[k])), (name, params, extra, k)


def test_unit_weights_bit_identical_for_lora_and_through_the_engine():
    g = torch.Generator().manual_seed(3)
    tasks = [{n: LowRank(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g), 2.0) for n in ("a.w", "b.w")}
             for _ in range(3)]
    base = {n: torch.randn(8, 6, generator=g) for n in ("a.w", "b.w")}
    for name, params in [("task_arithmetic", {"lam": 0.4}), ("ties", {"density": 0.4}), ("cart", {"rank": 1}),
                         ("dare", {"p": 0.2})]:
        plain = merge_state_dicts(name, tasks, base=base, **params)
        unit = merge_state_dicts(name, tasks, base=base, weights=[1.0, 1.0, 1.0], **params)
        for k in plain:
            assert torch.equal(plain[k], unit[k]), (name, k)


# ----- Task Arithmetic -------------------------------------------------------------------------
def test_task_arithmetic_with_a_table_is_the_per_tensor_weighted_sum(tmp_path):
    ups = model(n=3, seed=4)
    path, table = write_table(tmp_path, LISTED)
    out = run_method("task_arithmetic", groups_of(ups), coefficients=path)
    for k, u in ups.items():
        c = LISTED.get(k, table.default)  # unlisted tensors take the default
        ref = c[0] * u[0] + c[1] * u[1] + c[2] * u[2]
        torch.testing.assert_close(out[k], ref)
    # weights multiply the table; lam and mean scale the whole
    w = [2.0, 0.5, -1.0]
    out = run_method("task_arithmetic", groups_of(ups), coefficients=path, weights=w, lam=0.3, reduce="mean")
    for k, u in ups.items():
        c = LISTED.get(k, table.default)
        ref = 0.3 / 3 * sum(w[i] * c[i] * u[i] for i in range(3))
        torch.testing.assert_close(out[k], ref)


def test_task_arithmetic_weights_on_lora_stay_factored():
    g = torch.Generator().manual_seed(5)
    ups = [LowRank(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g), 1.5) for _ in range(3)]
    w = [0.2, 1.0, 3.0]
    out = run_method("task_arithmetic", [TensorGroup("x", None, ups)], weights=w, lam=0.5)["x"]
    assert isinstance(out, LowRank)
    torch.testing.assert_close(densify(out), 0.5 * sum(w[i] * ups[i].dense() for i in range(3)))


def test_task_arithmetic_streamed_with_a_table_is_bit_identical_to_the_loaded_path(tmp_path):
    g = torch.Generator().manual_seed(6)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tasks = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, t in enumerate(tasks):
        save_file(t, str(tmp_path / f"t{i}.safetensors"))
        paths.append(tmp_path / f"t{i}.safetensors")
    path, table = write_table(tmp_path, LISTED)
    params = {"coefficients": path, "weights": [1.0, 2.0, 0.5], "lam": 0.8}
    streamed = merge("task_arithmetic", paths, base=tmp_path / "base.safetensors", params=params, progress=False).tensors
    loaded = merge("task_arithmetic", tasks, base=base, params=params, progress=False).tensors
    for k in base:
        assert torch.equal(streamed[k], loaded[k]), k
        c = LISTED.get(k, table.default)
        ref = base[k] + 0.8 * sum([1.0, 2.0, 0.5][i] * c[i] * (tasks[i][k] - base[k]) for i in range(3))
        torch.testing.assert_close(streamed[k], ref)


def test_sweep_over_weights_and_tables(tmp_path):
    ups = model(n=3, seed=7)
    state_dicts = [{k: v[i] for k, v in ups.items()} for i in range(3)]
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    path, _ = write_table(tmp_path, LISTED)
    sweep = Sweep("ties", state_dicts, base=base, progress=False)
    grid = [{"weights": [1.0, 1.0, 1.0]}, {"weights": [0.5, 2.0, 1.0]}, {"coefficients": path}]
    runs = list(sweep.run(grid, fixed={"density": 0.5}, as_updates=True))
    assert len({repr(p) for p, _ in runs}) == 3
    for point, merged in runs:
        direct = merge_state_dicts("ties", state_dicts, base=base, density=0.5, **point)
        for k in ups:
            assert torch.equal(merged[k], direct[k]), (point, k)
    assert not torch.equal(runs[0][1][NAMES[0]], runs[1][1][NAMES[0]])


# ----- TIES ------------------------------------------------------------------------------------
def ties_reference(x: torch.Tensor, density: float, coefs, disjoint: str, lam: float):
    """Per tensor (tensor scope, tensor sign fill), straight from the definitions: trim, elect
    (unweighted), weight the elected vectors, disjoint mean or sum."""
    t = K.trim(x, [K.topk_threshold(xi, density) for xi in x])
    s = K.elect_sign(t)
    agree = (torch.sign(t) == s) & (t != 0)
    e = t * agree
    total = sum(coefs[i] * e[i] for i in range(x.shape[0]))
    if disjoint == "mean":
        total = total / agree.sum(0).clamp(min=1)
    return lam * total


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_ties_with_a_table_weights_the_elected_vectors(tmp_path, disjoint):
    ups = model(n=3, seed=8)
    path, table = write_table(tmp_path, LISTED)
    w = [1.0, 0.5, 2.0]
    out = run_method("ties", groups_of(ups), coefficients=path, weights=w, lam=0.7, density=0.4,
                     trim_scope="tensor", sign_fill="tensor", disjoint=disjoint)
    for k, u in ups.items():
        c = [w[i] * LISTED.get(k, table.default)[i] for i in range(3)]
        torch.testing.assert_close(out[k], ties_reference(torch.stack(u), 0.4, c, disjoint, 0.7))


def test_ties_weighted_mean_matches_peft_ties_with_weights():
    ups = model(n=3, seed=9)
    w = [0.3, 1.2, 0.8]
    out = run_method("ties", groups_of(ups), weights=w, lam=1.0, density=0.3, trim_scope="tensor", sign_fill="tensor")
    for k, u in ups.items():
        torch.testing.assert_close(out[k], pm.ties(u, torch.tensor(w), 0.3))


def test_ties_global_scope_with_a_table_matches_the_flattened_model(tmp_path):
    """Global trim and fill come from the unweighted model; only the combination is weighted."""
    ups = model(n=3, seed=10)
    path, table = write_table(tmp_path, LISTED)
    out = run_method("ties", groups_of(ups), coefficients=path, density=0.3, disjoint="sum")
    flat = torch.cat([torch.stack(u).reshape(3, -1) for u in ups.values()], dim=1)
    t = K.trim(flat, [K.topk_threshold(xi, 0.3) for xi in flat])
    s = K.elect_sign(t)
    e = t * ((torch.sign(t) == s) & (t != 0))
    start = 0
    for k, u in ups.items():
        m = u[0].numel()
        c = LISTED.get(k, table.default)
        ref = sum(c[i] * e[i, start:start + m] for i in range(3)).reshape(u[0].shape)
        torch.testing.assert_close(out[k], ref)
        start += m


def test_elected_entries_give_ties_combine_with_ties_and_fills():
    """The elected vectors behind weighted TIES carry exactly TIES' trim, tie quota and fill."""
    x = torch.tensor([[[1.0, -1.0, 2.0, 0.5], [3.0, 1.0, -1.0, -1.0]],
                      [[-1.0, 1.0, -2.0, 0.5], [1.0, 1.0, 1.0, -1.0]]])
    for thresholds, quota, fill in [(None, None, None), ([1.0, 1.0], [2, 3], None), ([1.0, 1.0], None, -1.0),
                                    ([0.5, 1.0], [1, None], 1.0)]:
        e = elected_entries(x, thresholds, fill, quota)
        ref = K.ties_combine(x, thresholds, fill, tie_quota=quota)
        torch.testing.assert_close(e.sum(0) / (e != 0).sum(0).clamp(min=1), ref)
        assert ((e == 0) | (e == x)).all()


# ----- DARE ------------------------------------------------------------------------------------
def test_dare_linear_with_weights_matches_peft_same_mask():
    ups = model(n=3, seed=11)["layers.0.mlp.fc.weight"]
    w = [0.5, 1.5, -0.2]
    out = run_method("dare", [TensorGroup("enc.w", None, ups)], p=0.4, lam=0.6, seed=7, weights=w)["enc.w"]
    torch.manual_seed(dare_seed(7, "enc.w"))  # PEFT draws the same mask from the global RNG
    torch.testing.assert_close(out, 0.6 * pm.dare_linear(ups, torch.tensor(w), 0.6))


def test_dare_ties_with_a_table_matches_peft_same_mask(tmp_path):
    ups = model(n=3, seed=12)["layers.0.attn.q.weight"]
    path, _ = write_table(tmp_path, {"enc.w": [0.9, 0.4, 1.3]})
    out = run_method("dare", [TensorGroup("enc.w", None, ups)], p=0.3, lam=0.5, seed=420, mode="ties",
                     coefficients=path)["enc.w"]
    torch.manual_seed(dare_seed(420, "enc.w"))
    torch.testing.assert_close(out, 0.5 * pm.dare_ties(ups, torch.tensor([0.9, 0.4, 1.3]), 0.7))


# ----- CART ------------------------------------------------------------------------------------
def cart_reference(weights, lam, k, coefs):
    """``W_avg + lam * sum_i c_i LR_k(W_i - W_avg)`` by one SVD per task (CART++ Eq. 6)."""
    w = torch.stack(weights)
    avg = w.mean(0)
    out = avg.clone()
    if w.dim() == 3 and k > 0:
        for c, wi in zip(coefs, w):
            U, S, Vh = torch.linalg.svd(wi - avg, full_matrices=False)
            out += lam * c * (U[:, :k] * S[:k]) @ Vh[:k]
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_cart_with_a_table_weights_the_low_rank_centered_vectors(tmp_path, lora):
    g = torch.Generator().manual_seed(13)
    D = torch.float64
    if lora:
        ups = {k: [LowRank(torch.randn(s[0], 2, generator=g, dtype=D), torch.randn(2, s[1], generator=g, dtype=D), 0.5)
                   for _ in range(3)] for k, s in SHAPES.items() if len(s) == 2}
        ups["layers.0.mlp.fc.bias"] = [torch.randn(16, generator=g, dtype=D) for _ in range(3)]
    else:
        ups = model(n=3, seed=13, dtype=D)
    path, table = write_table(tmp_path, LISTED)
    w = [1.0, 2.0, 0.5]
    out = run_method("cart", groups_of(ups), coefficients=path, weights=w, lam=1.3, rank=2, low_rank_params="attn|mlp")
    for k, u in ups.items():
        c = [w[i] * LISTED.get(k, table.default)[i] for i in range(3)]
        ref = cart_reference([densify(x) for x in u], 1.3, 2, c)
        assert torch.allclose(densify(out[k]), ref, atol=1e-10), k
    # tensors that get the average take no coefficient: the bias is the plain average
    bias = torch.stack([densify(x) for x in ups["layers.0.mlp.fc.bias"]]).mean(0)
    assert torch.equal(densify(out["layers.0.mlp.fc.bias"]), bias)


def test_weighted_combination_adds_in_task_order():
    v = torch.randn(4, 5, generator=torch.Generator().manual_seed(14))
    c = torch.tensor([0.3, 1.7, -0.2, 0.9]).tolist()  # float32 values, as a learned table holds
    ref = ((v[0] * c[0] + v[1] * c[1]) + v[2] * c[2]) + v[3] * c[3]
    assert torch.equal(weighted_combination(v, c), ref)
    # AdaMerging's differentiable coefficients (float64 tensors of the same values) round alike
    lam = torch.tensor(c, dtype=torch.float32, requires_grad=True)
    assert torch.equal(weighted_combination(v, lam.double()).detach(), ref)
