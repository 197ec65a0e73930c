"""Element-wise merge methods: average, task_arithmetic, ties, dare, slerp, mlerp.

References: hand-worked numbers, PEFT's ``peft.utils.merge_utils`` (per-tensor scope) and a
direct computation over the concatenated flattened model (global scope).

Where PEFT's semantics differ from ours (so inputs below avoid the difference):
* PEFT's ``calculate_majority_sign_mask`` elects ``+1`` where the sum is exactly 0; TIES
  (and we) fill those entries with the majority sign. Random continuous data never gives
  an exact zero sum of nonzero values; ``test_ties_hand_worked`` shows the difference.
* PEFT's magnitude prune keeps exactly ``k`` indices from ``topk`` (which of several tied
  entries is unspecified); we keep exactly ``k`` too, breaking ties at the threshold by
  (tensor order, row-major index) (``test_exact_density.py``). Random continuous data has no
  ties, so both keep the same set.
* PEFT applies per-task ``weights`` before the disjoint mean but elects signs on the
  unweighted tensors; with one shared ``lam > 0`` that equals ``lam * disjoint_mean``.
* PEFT draws DARE masks from the global RNG, one task after the other
  (``torch.bernoulli(full_like(t, 1 - p))``); we draw one stacked float32 mask per tensor
  from a generator seeded by ``dare_seed(seed, name)``. For float32 inputs, seeding the
  global RNG with that seed makes PEFT draw the very same mask.
"""
from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils as pm

from src.merge.methods.dare import dare_seed
from src.merge.registry import TensorGroup, get_method
from src.merge.reductions import run_reduction

from .helpers import reference_elect_and_merge, run_method

ALL = ["average", "task_arithmetic", "ties", "dare", "slerp", "mlerp"]




def merge_one(name: str, updates, base=None, tensor_name="w", **params) -> torch.Tensor:
    return run_method(name, [TensorGroup(tensor_name, base, list(updates))], **params)[tensor_name]


def rand_updates(n=3, shape=(8, 16), seed=0, scale=1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


# --------------------------------------------------------------------------- registry / params


def test_all_registered_with_documented_params():
    for name in ALL:
        m = get_method(name)
        assert m.name == name
        assert m.Params.__doc__
        if name not in ("average", "mlerp"):  # the two without hyperparameters
            assert "Default" in m.Params.__doc__
        # TA and average keep LoRA factors (their merge is a concatenation); the others densify
        assert m.accepts_low_rank is (name in ("average", "task_arithmetic"))


@pytest.mark.parametrize("name", ALL)
def test_unknown_hyperparameter_names_it(name):
    with pytest.raises(ValueError, match="densityy"):
        get_method(name).make_params(densityy=0.5)


@pytest.mark.parametrize(
    "name,bad",
    [
        ("task_arithmetic", {"reduce": "median"}),
        ("ties", {"density": 1.5}),
        ("ties", {"trim_scope": "layer"}),
        ("ties", {"sign_fill": "model"}),
        ("dare", {"p": 1.0}),
        ("dare", {"mode": "cart"}),
        ("slerp", {"t": 1.5}),
    ],
)
def test_bad_hyperparameter_value(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        get_method(name).make_params(**bad)


def test_needs_base_flags():
    assert not get_method("average").needs_base
    assert not get_method("slerp").needs_base
    assert not get_method("mlerp").needs_base
    assert get_method("ties").needs_base and get_method("task_arithmetic").needs_base
    assert get_method("slerp").num_tasks == 2


# --------------------------------------------------------------------------- average / TA


def test_average_and_ta_mean_agree():
    ups = rand_updates(4)
    avg = merge_one("average", ups)
    torch.testing.assert_close(avg, torch.stack(ups).mean(0))
    torch.testing.assert_close(merge_one("task_arithmetic", ups, lam=1.0, reduce="mean"), avg)


def test_task_arithmetic_matches_peft():
    ups = rand_updates(3)
    ours = merge_one("task_arithmetic", ups, lam=0.3, reduce="sum")
    torch.testing.assert_close(ours, pm.task_arithmetic(ups, torch.full((3,), 0.3)))
    torch.testing.assert_close(
        merge_one("task_arithmetic", ups, lam=0.3, reduce="mean"), pm.task_arithmetic(ups, torch.full((3,), 0.1))
    )


# --------------------------------------------------------------------------- TIES


def test_ties_hand_worked():
    # 3 tasks, one tensor of 6 entries, density 0.5 -> k = int(0.5 * 6) = 3 kept per task.
    #   T1 = [ 4, -1,  2,    0.5, -3,  1.5]  top-3 |.|: 4, 3, 2   -> [ 4,  0, 2,  0, -3,  0]
    #   T2 = [-4,  3, -0.2, -2,    1, -1  ]  top-3 |.|: 4, 3, 2   -> [-4,  3, 0, -2,  0,  0]
    #   T3 = [ 1, -2,  5,   -0.1,  0.3,-6 ]  top-3 |.|: 6, 5, 2   -> [ 0, -2, 5,  0,  0, -6]
    # sums of trimmed:               [ 0,  1, 7, -2, -3, -6]
    # elected signs:                 [ 0, +1, +1, -1, -1, -1]   -> sum of signs = -1
    # entry 0 is a tie (4 and -4 cancel): fill with the majority sign -1
    # elected:                       [-1, +1, +1, -1, -1, -1]
    # disjoint mean (agreeing nonzeros only):
    #   e0: -4 | e1: 3 (the -2 disagrees) | e2: (2+5)/2 = 3.5 | e3: -2 | e4: -3 | e5: -6
    # lam = 0.5 -> [-2, 1.5, 1.75, -1, -1.5, -3]
    ups = [
        torch.tensor([4.0, -1.0, 2.0, 0.5, -3.0, 1.5]),
        torch.tensor([-4.0, 3.0, -0.2, -2.0, 1.0, -1.0]),
        torch.tensor([1.0, -2.0, 5.0, -0.1, 0.3, -6.0]),
    ]
    expected = torch.tensor([-2.0, 1.5, 1.75, -1.0, -1.5, -3.0])
    for trim_scope in ("tensor", "global"):  # one tensor: both scopes coincide
        for sign_fill in ("tensor", "global"):
            got = merge_one("ties", ups, lam=0.5, density=0.5, trim_scope=trim_scope, sign_fill=sign_fill)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # PEFT elects +1 on the tie (sum >= 0), so it takes +4 at entry 0: the documented difference.
    peft = pm.ties(ups, torch.full((3,), 0.5), 0.5)
    assert peft[0] == 2.0
    torch.testing.assert_close(peft[1:], expected[1:])


@pytest.mark.parametrize("density,lam", [(0.3, 0.7), (0.2, 1.0), (1.0, 0.5)])
def test_ties_tensor_scope_matches_peft(density, lam):
    ups = rand_updates(3, (8, 16), seed=1)
    ours = merge_one("ties", ups, lam=lam, density=density, trim_scope="tensor", sign_fill="tensor")
    ref = pm.ties(ups, torch.full((3,), lam), density)
    torch.testing.assert_close(ours, ref)
    assert (ours == 0).float().mean() < 1.0  # not trivially zero


def test_ties_trim_matches_peft_magnitude_prune():
    from src.merge.methods._kernels import topk_threshold, trim

    ups = rand_updates(3, (5, 7), seed=2)
    x = torch.stack(ups)
    ours = trim(x, [topk_threshold(u, 0.25) for u in ups])
    ref = torch.stack([pm.prune(u, 0.25, method="magnitude") for u in ups])
    torch.testing.assert_close(ours, ref)
    assert int((ours[0] != 0).sum()) == int(0.25 * 35)
    # lam * sum of trimmed = PEFT's magnitude_prune merge
    torch.testing.assert_close(0.4 * ours.sum(0), pm.magnitude_prune(ups, torch.full((3,), 0.4), 0.25))


def _ties_direct(tasks: dict[str, list[torch.Tensor]], density, lam, trim_scope, sign_fill):
    """TIES over the concatenated flattened model, written out without the project's kernels."""
    names = list(tasks)
    n = len(tasks[names[0]])
    sizes = [tasks[k][0].numel() for k in names]
    flat = [torch.cat([tasks[k][i].reshape(-1) for k in names]) for i in range(n)]
    if trim_scope == "global":
        trimmed = [pm.prune(f, density, method="magnitude") for f in flat]
    elif trim_scope == "tensor":
        trimmed = [
            torch.cat([pm.prune(tasks[k][i].reshape(-1), density, method="magnitude") for k in names])
            for i in range(n)
        ]
    else:  # no trimming (DARE-TIES)
        trimmed = flat
    merged = reference_elect_and_merge(torch.stack(trimmed), sizes, sign_fill, lam)
    return {k: v.reshape(tasks[k][0].shape) for k, v in zip(names, torch.split(merged, sizes))}


def _two_tensor_model():
    # Tensor "a" is mostly negative (local majority -1), tensor "b" larger, positive and bigger
    # in scale (global majority +1, and it takes most of a global top-k). At a[0, 0] tasks 0
    # and 1 cancel exactly (+-10 survive any trim), so the fill decides that entry.
    g = torch.Generator().manual_seed(3)
    a = [-(torch.randn(6, 5, generator=g).abs()) + 0.3 * torch.randn(6, 5, generator=g) for _ in range(3)]
    b = [3.0 * torch.randn(10, 12, generator=g).abs() - 0.5 for _ in range(3)]
    a[0][0, 0], a[1][0, 0], a[2][0, 0] = 10.0, -10.0, 0.0
    return {"a": a, "b": b}


@pytest.mark.parametrize("trim_scope", ["global", "tensor"])
@pytest.mark.parametrize("sign_fill", ["global", "tensor"])
def test_ties_scopes_match_direct_flattened_model(trim_scope, sign_fill):
    tasks = _two_tensor_model()
    groups = [TensorGroup(k, None, v) for k, v in tasks.items()]
    ours = run_method("ties", groups, lam=0.6, density=0.3, trim_scope=trim_scope, sign_fill=sign_fill)
    ref = _ties_direct(tasks, 0.3, 0.6, trim_scope, sign_fill)
    for k in tasks:
        torch.testing.assert_close(ours[k], ref[k])
    # the tie at a[0, 0] takes the model-wide (+) or the tensor's (-) majority sign
    assert float(ours["a"][0, 0]) == pytest.approx(6.0 if sign_fill == "global" else -6.0)


def test_ties_global_trim_differs_from_tensor_trim():
    tasks = _two_tensor_model()
    groups = [TensorGroup(k, None, v) for k, v in tasks.items()]
    glob = run_method("ties", groups, density=0.3, trim_scope="global", sign_fill="global")
    tens = run_method("ties", groups, density=0.3, trim_scope="tensor", sign_fill="global")
    # global top-k takes almost nothing from the small-scale tensor "a"
    assert (glob["a"] != 0).sum() < (tens["a"] != 0).sum()
    # and keeps exactly int(0.3 * N) entries per task over the whole model
    from src.merge.methods.ties import THRESHOLDS

    m = get_method("ties")
    p = m.make_params(density=0.3)
    thr = run_reduction(m.reductions(p)[0][1]({}), lambda: [(g.name, g) for g in groups])
    assert m.reductions(p)[0][0] == THRESHOLDS
    total = sum(v[0].numel() for v in tasks.values())
    for i in range(3):
        kept = sum(int((tasks[k][i].abs() >= thr[i]).sum()) for k in tasks)
        assert kept == int(0.3 * total)


def test_ties_base_does_not_change_update():
    ups = rand_updates(3, (4, 4), seed=4)
    base = torch.randn(4, 4)
    torch.testing.assert_close(
        merge_one("ties", ups, base=base, density=0.5), merge_one("ties", ups, base=None, density=0.5)
    )


# --------------------------------------------------------------------------- DARE


@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dare_linear_matches_peft_same_mask(p):
    ups = rand_updates(3, (8, 16), seed=5)
    ours = merge_one("dare", ups, tensor_name="layer.0.w", p=p, lam=0.4, mode="linear", seed=7)
    torch.manual_seed(dare_seed(7, "layer.0.w"))  # PEFT draws from the global RNG
    ref = pm.dare_linear(ups, torch.full((3,), 0.4), 1.0 - p)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dare_ties_matches_peft_same_mask(p):
    ups = rand_updates(3, (8, 16), seed=6)
    ours = merge_one("dare", ups, tensor_name="enc.w", p=p, lam=0.6, mode="ties", seed=420)
    torch.manual_seed(dare_seed(420, "enc.w"))
    ref = pm.dare_ties(ups, torch.full((3,), 0.6), 1.0 - p)
    torch.testing.assert_close(ours, ref)


def test_dare_p0_is_task_arithmetic_and_ties_without_trim():
    ups = rand_updates(3, (6, 6), seed=8)
    torch.testing.assert_close(
        merge_one("dare", ups, p=0.0, lam=0.3, mode="linear"), merge_one("task_arithmetic", ups, lam=0.3)
    )
    torch.testing.assert_close(
        merge_one("dare", ups, p=0.0, lam=0.3, mode="ties"),
        merge_one("ties", ups, lam=0.3, density=1.0, trim_scope="tensor", sign_fill="tensor"),
    )


def test_dare_drop_statistics():
    # one task of ones: every output entry is 0 (dropped) or exactly 1/(1-p) (kept, rescaled)
    p = 0.6
    out = merge_one("dare", [torch.ones(50, 60)], p=p, lam=1.0, seed=1)
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=0, atol=0)
    frac = float((out == 0).float().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / out.numel())  # 4 sigma
    assert abs(float(out.mean()) - 1.0) < 0.1  # unbiased in expectation


def test_dare_reproducible_and_isolated_from_global_rng():
    ups = rand_updates(2, (10, 10), seed=9)
    kw = dict(p=0.5, lam=1.0, mode="ties", seed=3)
    torch.manual_seed(0)
    a = merge_one("dare", ups, **kw)
    torch.manual_seed(12345)
    torch.rand(17)
    state = torch.get_rng_state()
    b = merge_one("dare", ups, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a, b)
    c = merge_one("dare", ups, **{**kw, "seed": 4})
    assert not torch.equal(a, c)


def test_dare_masks_depend_on_name_not_order():
    ups = {n: rand_updates(2, (6, 6), seed=i) for i, n in enumerate(["x.w", "y.w", "z.w"])}
    groups = [TensorGroup(n, None, u) for n, u in ups.items()]
    fwd = run_method("dare", groups, p=0.5, seed=11)
    rev = run_method("dare", groups[::-1], p=0.5, seed=11)
    alone = run_method("dare", [groups[1]], p=0.5, seed=11)
    for n in ups:
        assert torch.equal(fwd[n], rev[n])
    assert torch.equal(alone["y.w"], fwd["y.w"])
    # same updates under two names get different masks
    same = run_method("dare", [TensorGroup("u", None, ups["x.w"]), TensorGroup("v", None, ups["x.w"])], p=0.5)
    assert not torch.equal(same["u"], same["v"])


def test_dare_ties_global_fill_matches_direct():
    # the +-10 tie at a[0, 0] survives the drop only if both masks keep it: seed 2 keeps it
    tasks = _two_tensor_model()
    groups = [TensorGroup(k, None, v) for k, v in tasks.items()]
    p, seed = 0.3, 2
    ours = run_method("dare", groups, p=p, lam=0.5, mode="ties", seed=seed, sign_fill="global")
    dropped = {}
    for k, v in tasks.items():
        g = torch.Generator().manual_seed(dare_seed(seed, k))
        mask = torch.bernoulli(torch.full((len(v), *v[0].shape), 1 - p), generator=g)
        dropped[k] = [v[i] * mask[i] / (1 - p) for i in range(len(v))]
    ref = _ties_direct(dropped, 1.0, 0.5, None, "global")
    for k in tasks:
        torch.testing.assert_close(ours[k], ref[k])
    loc = run_method("dare", groups, p=p, lam=0.5, mode="ties", seed=seed, sign_fill="tensor")
    ref_loc = _ties_direct(dropped, 1.0, 0.5, None, "tensor")
    for k in tasks:
        torch.testing.assert_close(loc[k], ref_loc[k])
    # the fill decides the tie: model-wide majority +, tensor "a" majority -
    assert float(ours["a"][0, 0]) == pytest.approx(0.5 * 10 / 0.7)
    assert float(loc["a"][0, 0]) == pytest.approx(-0.5 * 10 / 0.7)


# --------------------------------------------------------------------------- SLERP / MLERP


def test_slerp_endpoints_with_and_without_base():
    w0, w1 = rand_updates(2, (5, 4), seed=10)
    torch.testing.assert_close(merge_one("slerp", [w0, w1], t=0.0), w0)
    torch.testing.assert_close(merge_one("slerp", [w0, w1], t=1.0), w1)
    base = torch.randn(5, 4)
    # with a base the inputs are updates; the method returns merged weight minus base
    upd = merge_one("slerp", [w0 - base, w1 - base], base=base, t=1.0)
    torch.testing.assert_close(upd + base, w1)


def test_slerp_hand_computed_2d():
    # v0 = (2, 0), v1 = (0, 1): angle pi/2; s0 = sin((1-t) pi/2), s1 = sin(t pi/2) (sin(pi/2) = 1)
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    h = math.sqrt(0.5)
    torch.testing.assert_close(merge_one("slerp", [v0, v1], t=0.5), torch.tensor([2 * h, h]))
    # t = 1/3: s0 = sin(pi/3) = sqrt(3)/2, s1 = sin(pi/6) = 1/2
    torch.testing.assert_close(merge_one("slerp", [v0, v1], t=1 / 3), torch.tensor([math.sqrt(3), 0.5]))
    # unit vectors at 60 degrees, midpoint is the unit vector at 30 degrees (norm preserved)
    u0, u1 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    torch.testing.assert_close(
        merge_one("slerp", [u0, u1], t=0.5), torch.tensor([math.sqrt(3) / 2, 0.5])
    )


def test_slerp_colinear_falls_back_to_lerp():
    v = torch.tensor([1.0, -2.0, 3.0])
    for other, t in [(2.5 * v, 0.3), (-v, 0.25), (v, 0.5)]:
        out = merge_one("slerp", [v, other], t=t)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, (1 - t) * v + t * other)
    # nearly colinear (cos > 0.9995) also interpolates linearly
    w = v + torch.tensor([0.0, 0.0, 0.05])
    cos = float(torch.dot(v, w) / (v.norm() * w.norm()))
    assert 0.9995 < cos < 1
    torch.testing.assert_close(merge_one("slerp", [v, w], t=0.4), torch.lerp(v, w, 0.4))
    # a zero tensor has no direction: linear too
    z = torch.zeros(3)
    torch.testing.assert_close(merge_one("slerp", [z, v], t=0.5), 0.5 * v)


def test_slerp_requires_two_tasks():
    with pytest.raises(ValueError, match="exactly 2"):
        merge_one("slerp", rand_updates(3, (3,)))


def test_mlerp_norm_property():
    ws = rand_updates(4, (6, 5), seed=12)
    ws[2] = ws[2] * 3.0
    out = merge_one("mlerp", ws)
    avg = torch.stack(ws).mean(0)
    assert float(out.norm()) == pytest.approx(max(float(w.norm()) for w in ws), rel=1e-5)
    assert float(out.norm()) > float(avg.norm()) * 1.1
    torch.testing.assert_close(out / out.norm(), avg / avg.norm())  # same direction
    # with a base: the merged WEIGHT has the largest weight norm
    base = torch.randn(6, 5)
    upd = merge_one("mlerp", [w - base for w in ws], base=base)
    torch.testing.assert_close(upd + base, out)


def test_mlerp_zero_average_returns_average():
    w = torch.randn(4, 4)
    out = merge_one("mlerp", [w, -w])
    assert torch.equal(out, torch.zeros(4, 4))
