"""Data-dependent merge methods: fisher, regmean, mats.

Every reference is computed independently of the implementation: RegMean as the
least-squares solution of the stacked regressions (``torch.linalg.lstsq``) or from its
formula in float64, MaTS' K-FAC system as an explicit Kronecker-product solve, Fisher merging
entry by entry. All merges go through the engine (``merge_state_dicts`` / ``merge``) with
statistics given per task (``{kind: {name: tensor}}``) or as a tag of task directories.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from src.merge import LowRank, MergeInputError, Sweep, get_method, merge, merge_state_dicts
from src.task_checkpoint import TaskInfo, write_task_info
from src.task_statistics import kind_path

REPO = Path(__file__).resolve().parents[2]
DATA_METHODS = ["fisher", "regmean", "mats"]
O, I, N_TASKS = 5, 7, 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layer_tasks(seed=0, n=N_TASKS, O=O, I=I):
    """A base ``{w: (O, I), b: (O,)}`` and ``n`` task models around it (float32)."""
    g = gen(seed)
    base = {"w": torch.randn(O, I, generator=g), "b": torch.randn(O, generator=g)}
    tasks = [{k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, tasks


def activations(seed=1, n=N_TASKS, tokens=40, I=I, scale=None):
    """Per task an input matrix ``X_i`` (tokens, I) with its own feature scales."""
    g = gen(seed)
    out = []
    for _ in range(n):
        s = torch.rand(I, generator=g) * 2 + 0.2 if scale is None else scale
        out.append(torch.randn(tokens, I, generator=g) * s)
    return out


def spd(k: int, g: torch.Generator) -> torch.Tensor:
    M = torch.randn(k, k, generator=g)
    return M @ M.T / k + 0.2 * torch.eye(k)


def mean_of(tasks, key):
    return torch.stack([t[key] for t in tasks]).mean(0)


# --------------------------------------------------------------------------- registry / configs


def test_registered_with_documented_params_and_configs():
    for name in DATA_METHODS:
        m = get_method(name)
        assert m.name == name and m.Params.__doc__ and "Default" in m.Params.__doc__
        assert m.accepts_low_rank is False  # LoRA updates are densified by the engine
        spec = yaml.safe_load((REPO / "configs/merge" / f"{name}.yaml").read_text())
        assert spec["method"] == name
        m.make_params(**spec["params"])  # the config's values are valid
        assert "--statistics" in (REPO / "configs/merge" / f"{name}.yaml").read_text()
    assert get_method("fisher").required_statistics(get_method("fisher").make_params()) == ("fisher",)
    assert get_method("regmean").required_statistics(get_method("regmean").make_params()) == ("gram",)
    mats = get_method("mats")
    assert mats.required_statistics(mats.make_params()) == ("kfac_in", "kfac_out")
    assert mats.required_statistics(mats.make_params(subspace="gram")) == ("gram",)
    assert mats.required_statistics(mats.make_params(subspace="fisher")) == ("fisher",)


@pytest.mark.parametrize("name,bad", [
    ("fisher", {"fisher_floor": -1.0}), ("fisher", {"normalize": "l1"}), ("fisher", {"scales": [0.0, 0.0]}),
    ("regmean", {"a": 1.5}), ("regmean", {"solve_dtype": "float16"}),
    ("mats", {"subspace": "diag"}), ("mats", {"iterations": -1}), ("mats", {"iterations": 2.5}),
    ("mats", {"init": "ties"}), ("mats", {"a": -0.1}),
])
def test_bad_hyperparameters_are_refused(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_method(name).make_params(**bad)


# --------------------------------------------------------------------------- RegMean


@pytest.mark.parametrize("with_base", [True, False])
def test_regmean_a1_is_the_least_squares_solution_of_the_stacked_regressions(with_base):
    base, tasks = layer_tasks()
    X = activations()
    stats = [{"gram": {"w": x.T @ x}} for x in X]
    out = merge_state_dicts("regmean", tasks, base=base if with_base else None, statistics=stats, a=1.0)
    Xs = torch.cat(X).double()
    Y = torch.cat([x.double() @ t["w"].double().T for x, t in zip(X, tasks)])
    want = torch.linalg.lstsq(Xs, Y).solution.T  # argmin_W sum_i ||X_i W^T - X_i W_i^T||^2
    torch.testing.assert_close(out["w"].double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"], mean_of(tasks, "b"), atol=1e-6, rtol=1e-6)  # no statistics: averaged


def test_regmean_a0_is_the_diag_gram_weighted_average_per_input_column():
    base, tasks = layer_tasks()
    grams = [x.T @ x for x in activations()]
    out = merge_state_dicts("regmean", tasks, base=base, statistics=[{"gram": {"w": G}} for G in grams], a=0.0)
    want = torch.zeros(O, I, dtype=torch.float64)
    for j in range(I):
        d = [float(G[j, j]) for G in grams]
        want[:, j] = sum(dj * t["w"][:, j].double() for dj, t in zip(d, tasks)) / sum(d)
    torch.testing.assert_close(out["w"].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("a", [0.3, 0.9])
def test_regmean_formula_with_shrunk_off_diagonal(a):
    base, tasks = layer_tasks(seed=3)
    grams = [x.T @ x / len(x) for x in activations(seed=4)]
    out = merge_state_dicts("regmean", tasks, base=base, statistics=[{"gram": {"w": G}} for G in grams], a=a)
    shrunk = [a * G.double() + (1 - a) * torch.diag(torch.diagonal(G.double())) for G in grams]
    rhs = sum(Gt @ t["w"].double().T for Gt, t in zip(shrunk, tasks))
    want = torch.linalg.solve(sum(shrunk), rhs).T
    torch.testing.assert_close(out["w"].double(), want, atol=2e-5, rtol=1e-5)


def test_regmean_dead_input_features_get_the_average():
    base, tasks = layer_tasks(seed=5)
    X = activations(seed=6)
    dead, half_dead = 2, 4
    for i, x in enumerate(X):
        x[:, dead] = 0.0  # no task ever activates this feature
        if i == 0:
            x[:, half_dead] = 0.0  # one task never does: still determined by the others
    stats = [{"gram": {"w": x.T @ x}} for x in X]
    out = merge_state_dicts("regmean", tasks, base=base, statistics=stats, a=1.0)
    torch.testing.assert_close(out["w"][:, dead], mean_of(tasks, "w")[:, dead], atol=1e-6, rtol=1e-6)
    alive = [j for j in range(I) if j != dead]
    Xs = torch.cat(X).double()[:, alive]
    Y = torch.cat([x.double() @ t["w"].double().T for x, t in zip(X, tasks)])
    want = torch.linalg.lstsq(Xs, Y).solution.T
    torch.testing.assert_close(out["w"][:, alive].double(), want, atol=2e-5, rtol=1e-5)
    assert torch.isfinite(out["w"]).all()


def test_regmean_singular_gram_is_solved_with_a_jitter_and_a_warning():
    base, tasks = layer_tasks(seed=7)
    X = activations(seed=8)
    g = gen(9)
    for x, count in zip(X, (4, 4, 8)):  # features 0 and 1 identical, of +-1 entries: sum_i G_i[0, 0] = 16
        col = torch.zeros(len(x))
        col[:count] = torch.randint(0, 2, (count,), generator=g).float() * 2 - 1
        x[:, 0] = x[:, 1] = col
    stats = [{"gram": {"w": x.T @ x}} for x in X]  # the sum is exactly singular: its 2nd pivot is 16 - 4 * 4 = 0
    with pytest.warns(UserWarning, match="regmean: 'w'.*jitter"):
        out = merge_state_dicts("regmean", tasks, base=base, statistics=stats, a=1.0)
    assert torch.isfinite(out["w"]).all()
    # still a least-squares solution of the stacked regressions (which one: undetermined)
    Xs = torch.cat(X).double()
    Y = torch.cat([x.double() @ t["w"].double().T for x, t in zip(X, tasks)])
    best = (Xs @ torch.linalg.lstsq(Xs, Y, driver="gelsd").solution - Y).norm()
    assert (Xs @ out["w"].double().T - Y).norm() <= best * (1 + 1e-5)


def test_regmean_gram_of_wrong_shape_is_an_error():
    base, tasks = layer_tasks()
    stats = [{"gram": {"w": torch.eye(O)}} for _ in tasks]
    with pytest.raises(ValueError, match=r"gram statistics of 'w'.*expected \(7, 7\)"):
        merge_state_dicts("regmean", tasks, base=base, statistics=stats)


def test_regmean_on_lora_updates_equals_regmean_on_the_densified_weights():
    g = gen(11)
    base = {"w": torch.randn(O, I, generator=g), "b": torch.randn(O, generator=g)}
    adapters = [{"w": LowRank(torch.randn(O, 2, generator=g), torch.randn(2, I, generator=g), 0.5)} for _ in range(3)]
    dense = [{"w": base["w"] + a["w"].dense()} for a in adapters]
    stats = [{"gram": {"w": x.T @ x}} for x in activations(seed=12)]
    from_lora = merge_state_dicts("regmean", adapters, base=base, statistics=stats, a=0.8)
    from_dense = merge_state_dicts("regmean", dense, base=base, statistics=stats, a=0.8)
    assert set(from_lora) == {"w"}
    torch.testing.assert_close(from_lora["w"], from_dense["w"], atol=1e-5, rtol=1e-5)
    # without a base, a LoRA-only merge gives the merged update W - W0
    update = merge_state_dicts("regmean", adapters, statistics=stats, a=0.8)
    torch.testing.assert_close(update["w"] + base["w"], from_dense["w"], atol=1e-5, rtol=1e-5)


def test_regmean_sweep_over_a_prepares_once_and_matches_single_merges():
    base, tasks = layer_tasks(seed=13)
    stats = [{"gram": {"w": x.T @ x}} for x in activations(seed=14)]
    sweep = Sweep("regmean", tasks, base=base, progress=False, statistics=stats)
    results = list(sweep.run({"a": [0.0, 0.5, 1.0]}))
    assert sweep.prepare_calls == 2  # w and b, once for the whole grid
    for point, merged in results:
        single = merge_state_dicts("regmean", tasks, base=base, statistics=stats, **point)
        for k in single:
            torch.testing.assert_close(merged[k], single[k], atol=0, rtol=0)


# --------------------------------------------------------------------------- Fisher


def test_fisher_equal_fishers_is_the_average_and_uncovered_params_are_averaged():
    base, tasks = layer_tasks()
    F = torch.rand(O, I, generator=gen(2)) + 0.1
    stats = [{"fisher": {"w": F.clone()}} for _ in tasks]  # no Fisher for "b"
    out = merge_state_dicts("fisher", tasks, base=base, statistics=stats)
    torch.testing.assert_close(out["w"], mean_of(tasks, "w"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"], mean_of(tasks, "b"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("floor", [1e-8, 0.0])
def test_fisher_weighted_average_and_zero_fisher_entries_get_the_average(floor):
    base, tasks = layer_tasks(seed=1)
    g = gen(3)
    fishers = [torch.rand(O, I, generator=g) for _ in tasks]
    for f in fishers:
        f[0, :3] = 0.0  # no task's gradient reached these entries
    fishers[0][1, 1] = 0.0  # one task's only: a plain weighted average of the others
    stats = [{"fisher": {"w": f, "b": torch.ones(O)}} for f in fishers]
    out = merge_state_dicts("fisher", tasks, base=base, statistics=stats, fisher_floor=floor)
    w = torch.stack([t["w"] for t in tasks]).double()
    Fs = torch.stack(fishers).double().clamp(min=floor)
    want = (Fs * w).sum(0) / Fs.sum(0)
    want[0, :3] = w.mean(0)[0, :3]
    assert torch.isfinite(out["w"]).all()
    torch.testing.assert_close(out["w"].double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["w"][0, :3], mean_of(tasks, "w")[0, :3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["b"], mean_of(tasks, "b"), atol=1e-6, rtol=1e-6)


def test_fisher_scales_and_normalization():
    base, tasks = layer_tasks(seed=4)
    g = gen(5)
    fw = [torch.rand(O, I, generator=g) * (10.0 ** i) for i in range(len(tasks))]  # Fishers of different scales
    fb = [torch.rand(O, generator=g) * (10.0 ** -i) for i in range(len(tasks))]
    stats = [{"fisher": {"w": a, "b": b}} for a, b in zip(fw, fb)]
    scales = [1.0, 0.5, 2.0]

    def ref(key, fishers, norms):
        x = torch.stack([t[key] for t in tasks]).double()
        wts = torch.stack([s * f.double() / n for s, f, n in zip(scales, fishers, norms)])
        return (wts * x).sum(0) / wts.sum(0)

    plain = merge_state_dicts("fisher", tasks, base=base, statistics=stats, scales=scales, fisher_floor=0.0)
    torch.testing.assert_close(plain["w"].double(), ref("w", fw, [1.0] * 3), atol=1e-5, rtol=1e-5)
    tensor = merge_state_dicts("fisher", tasks, base=base, statistics=stats, scales=scales, fisher_floor=0.0,
                               normalize="tensor")
    for key, fs in (("w", fw), ("b", fb)):
        torch.testing.assert_close(tensor[key].double(), ref(key, fs, [f.double().norm() for f in fs]),
                                   atol=1e-5, rtol=1e-5)
    model = merge_state_dicts("fisher", tasks, base=base, statistics=stats, scales=scales, fisher_floor=0.0,
                              normalize="model")
    norms = [torch.cat([a.double().flatten(), b.double().flatten()]).norm() for a, b in zip(fw, fb)]
    for key, fs in (("w", fw), ("b", fb)):
        torch.testing.assert_close(model[key].double(), ref(key, fs, norms), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scales has 2 entries for 3 task models"):
        merge_state_dicts("fisher", tasks, base=base, statistics=stats, scales=[1.0, 1.0])


def test_fisher_without_base_merges_the_weights():
    _, tasks = layer_tasks(seed=6)
    fishers = [torch.rand(O, I, generator=gen(i)) + 0.01 for i in range(len(tasks))]
    out = merge_state_dicts("fisher", tasks, statistics=[{"fisher": {"w": f}} for f in fishers])
    Fs = torch.stack(fishers)
    want = (Fs * torch.stack([t["w"] for t in tasks])).sum(0) / Fs.sum(0)
    torch.testing.assert_close(out["w"], want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- MaTS


def kfac_stats(seed=21, n=N_TASKS):
    g = gen(seed)
    return [{"kfac_in": {"w": spd(I, g)}, "kfac_out": {"w": spd(O, g)}} for _ in range(n)]


def test_mats_kfac_converges_to_the_kronecker_solve():
    base, tasks = layer_tasks(seed=20)
    stats = kfac_stats()
    # vec_r(G X A) = (G kron A^T) vec_r(X) for row-major vec; A is symmetric
    K = [torch.kron(s["kfac_out"]["w"].double(), s["kfac_in"]["w"].double().T.contiguous()) for s in stats]
    rhs = sum(k @ t["w"].double().flatten() for k, t in zip(K, tasks))
    want = torch.linalg.solve(sum(K), rhs).reshape(O, I)
    out = merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=200)
    torch.testing.assert_close(out["w"].double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["b"], mean_of(tasks, "b"), atol=1e-6, rtol=1e-6)  # no statistics: averaged


def test_mats_does_not_depend_on_the_statistics_scale():
    """K-FAC output factors can be ~1e-12: the CG scalars must not underflow in float32."""
    base, tasks = layer_tasks(seed=31)
    stats = kfac_stats(seed=32)
    tiny = [{"kfac_in": {"w": s["kfac_in"]["w"] * 1e-3}, "kfac_out": {"w": s["kfac_out"]["w"] * 1e-13}} for s in stats]
    for kw in ({"iterations": 3}, {"iterations": 200}, {"iterations": 200, "a": 0.5}):
        want = merge_state_dicts("mats", tasks, base=base, statistics=stats, **kw)["w"]
        got = merge_state_dicts("mats", tasks, base=base, statistics=tiny, **kw)["w"]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    grams = [{"gram": {"w": x.T @ x * 1e-12}} for x in activations(seed=33)]
    fishers = [{"fisher": {"w": torch.rand(O, I, generator=gen(34 + i)) * 1e-14}} for i in range(N_TASKS)]
    for sub, st, ref in (("gram", grams, "regmean"), ("fisher", fishers, "fisher")):
        got = merge_state_dicts("mats", tasks, base=base, statistics=st, subspace=sub, iterations=300, a=1.0)["w"]
        kw = {"a": 1.0} if ref == "regmean" else {"fisher_floor": 0.0}
        want = merge_state_dicts(ref, tasks, base=base, statistics=st, **kw)["w"]
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_mats_starts_from_task_arithmetic_and_moves_toward_the_solution():
    base, tasks = layer_tasks(seed=22)
    stats = kfac_stats(seed=23)
    dW = sum(t["w"] - base["w"] for t in tasks)
    start = merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=0, lam_init=0.4)
    torch.testing.assert_close(start["w"], base["w"] + 0.4 * dW, atol=1e-6, rtol=1e-6)
    avg = merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=0, init="average")
    torch.testing.assert_close(avg["w"], mean_of(tasks, "w"), atol=1e-6, rtol=1e-6)
    pre = merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=0, init="base")
    torch.testing.assert_close(pre["w"], base["w"], atol=0, rtol=0)
    final = merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=200)["w"]
    errors = [(merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=k, lam_init=0.4)["w"]
               - final).norm() for k in (0, 2, 5)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("a", [1.0, 0.6])
def test_mats_gram_subspace_converges_to_regmean(a):
    base, tasks = layer_tasks(seed=24)
    stats = [{"gram": {"w": x.T @ x / len(x)}} for x in activations(seed=25)]
    regmean = merge_state_dicts("regmean", tasks, base=base, statistics=stats, a=a)
    mats = merge_state_dicts("mats", tasks, base=base, statistics=stats, subspace="gram", a=a, iterations=100)
    torch.testing.assert_close(mats["w"], regmean["w"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mats["b"], regmean["b"], atol=1e-6, rtol=1e-6)


def test_mats_fisher_subspace_converges_to_fisher_merging():
    base, tasks = layer_tasks(seed=26)
    g = gen(27)
    # few distinct values: CG on a diagonal system converges in (number of distinct entries) steps
    levels = torch.tensor([0.5, 1.0, 2.0])
    stats = [{"fisher": {"w": levels[torch.randint(0, 3, (O, I), generator=g)]}} for _ in tasks]
    fisher = merge_state_dicts("fisher", tasks, base=base, statistics=stats, fisher_floor=0.0)
    mats = merge_state_dicts("mats", tasks, base=base, statistics=stats, subspace="fisher", iterations=200)
    torch.testing.assert_close(mats["w"], fisher["w"], atol=1e-4, rtol=1e-4)


def test_mats_a_shrinks_both_kfac_factors():
    base, tasks = layer_tasks(seed=28)
    stats = kfac_stats(seed=29)
    a = 0.5

    def shrink(M):
        M = M.double()
        return a * M + (1 - a) * torch.diag(torch.diagonal(M))

    K = [torch.kron(shrink(s["kfac_out"]["w"]), shrink(s["kfac_in"]["w"])) for s in stats]
    rhs = sum(k @ t["w"].double().flatten() for k, t in zip(K, tasks))
    want = torch.linalg.solve(sum(K), rhs).reshape(O, I)
    out = merge_state_dicts("mats", tasks, base=base, statistics=stats, iterations=200, a=a)
    torch.testing.assert_close(out["w"].double(), want, atol=1e-4, rtol=1e-4)


def test_mats_needs_a_base_for_full_models():
    _, tasks = layer_tasks()
    with pytest.raises(ValueError, match="needs a base model"):
        merge_state_dicts("mats", tasks, statistics=kfac_stats())


# --------------------------------------------------------------------------- missing statistics


def _task_dirs(root: Path, base: dict, tasks: list[dict], stats: list[dict], tag: str) -> list[str]:
    """Full task checkpoints with their statistics under ``statistics/<tag>/`` (``None``: none)."""
    dirs = []
    for i, (t, s) in enumerate(zip(tasks, stats)):
        d = root / f"task{i}"
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"))
        write_task_info(d, TaskInfo(task=f"t{i}", base_model="tiny", family="test", kind="full", label_names=["a"]))
        for kind, tensors in (s or {}).items():
            path = kind_path(d, tag, kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        dirs.append(str(d))
    return dirs


def test_statistics_tag_of_task_directories(tmp_path):
    base, tasks = layer_tasks()
    stats = [{"gram": {"w": x.T @ x}} for x in activations()]
    dirs = _task_dirs(tmp_path, base, tasks, stats, "train-n8-seed0")
    out = merge("regmean", dirs, base=base, statistics="train-n8-seed0", params={"a": 0.5}, progress=False).tensors
    want = merge_state_dicts("regmean", tasks, base=base, statistics=stats, a=0.5)
    torch.testing.assert_close(out["w"], want["w"], atol=0, rtol=0)


def test_missing_statistics_name_the_task(tmp_path):
    base, tasks = layer_tasks()
    grams = [{"gram": {"w": x.T @ x}} for x in activations()]
    tag = "train-n8-seed0"
    # a task directory without the tag
    dirs = _task_dirs(tmp_path / "a", base, tasks, [grams[0], None, grams[2]], tag)
    with pytest.raises(MergeInputError, match=rf"task1: has no statistics '{tag}'"):
        merge("regmean", dirs, base=base, statistics=tag, progress=False)
    # a task directory with the tag but without the kind the method needs
    dirs = _task_dirs(tmp_path / "b", base, tasks, [grams[0], grams[1], {"fisher": {"w": torch.ones(O, I)}}], tag)
    with pytest.raises(MergeInputError, match=r"task2: has no gram statistics for method 'regmean'"):
        merge("regmean", dirs, base=base, statistics=tag, progress=False)
    # MaTS (K-FAC) with only Gram statistics
    dirs = _task_dirs(tmp_path / "c", base, tasks, grams, tag)
    with pytest.raises(MergeInputError, match=r"task0: has no kfac_in, kfac_out statistics for method 'mats'"):
        merge("mats", dirs, base=base, statistics=tag, progress=False)
    # one task lacks the statistics of one tensor the others have
    partial = [grams[0], {"gram": {"x": torch.eye(I)}}, grams[2]]
    dirs = _task_dirs(tmp_path / "d", base, tasks, partial, tag)
    with pytest.raises(MergeInputError, match=r"task1: has no gram statistics for 'w'"):
        merge("regmean", dirs, base=base, statistics=tag, progress=False)


def test_missing_statistics_in_memory():
    base, tasks = layer_tasks()
    grams = [{"gram": {"w": x.T @ x}} for x in activations()]
    for name in DATA_METHODS:
        with pytest.raises(ValueError, match=rf"method '{name}' needs data statistics"):
            merge_state_dicts(name, tasks, base=base)
    with pytest.raises(MergeInputError, match="has no gram statistics for method 'regmean'"):
        merge_state_dicts("regmean", tasks, base=base, statistics=[grams[0], {}, grams[2]])
    with pytest.raises(ValueError, match="one entry per task model expected"):
        merge_state_dicts("regmean", tasks, base=base, statistics=grams[:2])


def test_cg_stays_on_the_device_without_host_syncs(monkeypatch):
    """No ``.item()`` / ``bool()`` / ``float()`` of a tensor inside the CG loop."""
    from src.merge.methods.mats import conjugate_gradient

    g = gen(30)
    S = spd(6, g)
    b = torch.randn(4, 6, generator=g)
    syncs = []
    for attr in ("item", "__bool__", "__float__", "tolist"):
        orig = getattr(torch.Tensor, attr)
        monkeypatch.setattr(torch.Tensor, attr,
                            lambda self, *a, _o=orig, _n=attr, **k: syncs.append(_n) or _o(self, *a, **k))
    x = conjugate_gradient(lambda X: X @ S, b, torch.zeros(4, 6), 30)
    monkeypatch.undo()
    assert syncs == []
    torch.testing.assert_close(x @ S, b, atol=1e-4, rtol=1e-4)


def test_mats_sweep_over_iterations_resumes_cg_with_identical_results():
    """A sweep over MaTS' iterations continues one CG run per tensor: N = 7 after N = 3 is bit for
    bit the N = 7 of a fresh merge (the same steps in the same order), and a smaller N restarts."""
    from src.merge import Sweep
    from src.merge.methods.mats import ConjugateGradient

    torch.manual_seed(0)
    out_f, in_f, tasks = 6, 5, 3
    base = {"w": torch.randn(out_f, in_f)}
    models = [{"w": base["w"] + 0.1 * torch.randn(out_f, in_f)} for _ in range(tasks)]
    stats = []
    for _ in range(tasks):
        xa, xg = torch.randn(20, in_f), torch.randn(20, out_f)
        stats.append({"kfac_in": {"w": xa.T @ xa / 20}, "kfac_out": {"w": xg.T @ xg / 20}})
    sweep = Sweep("mats", models, base=base, progress=False, statistics=stats)
    calls = []
    real = ConjugateGradient.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ConjugateGradient, "__init__", lambda self, *a: calls.append(1) or real(self, *a))
        swept = {n: sweep.merge({"iterations": n, "lam_init": 0.5}, as_updates=True)["w"] for n in (3, 7, 2)}
    assert len(calls) == 2  # 3 -> 7 resumed; 2 restarted
    for n, value in swept.items():
        fresh = Sweep("mats", models, base=base, progress=False, statistics=stats).merge(
            {"iterations": n, "lam_init": 0.5}, as_updates=True)["w"]
        assert torch.equal(value, fresh), n
