"""The streaming global reductions are exact, whatever the scale and precision of the values."""
import pytest
import torch

from src.merge.reductions import SignSum, TopKThreshold, run_reduction


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.999, 1.0])
def test_global_topk_keeps_exactly_k_per_task(dtype, density):
    g = torch.Generator().manual_seed(0)
    # tensors of very different scales, like layers of a model; three tasks each
    tensors = [[torch.randn(30, 40, generator=g, dtype=dtype) * 10.0 ** (i - 3) for _ in range(3)] for i in range(7)]
    thresholds = run_reduction(TopKThreshold(lambda s: s, density), lambda: [(str(i), t) for i, t in enumerate(tensors)])
    assert len(thresholds) == 3
    for task in range(3):
        flat = torch.cat([t[task].reshape(-1) for t in tensors]).abs()
        k = int(density * flat.numel())
        assert int((flat >= thresholds[task]).sum()) == k
        if 0 < k < flat.numel():  # the threshold IS the k-th largest magnitude
            assert thresholds[task] == pytest.approx(float(torch.topk(flat, k).values[-1]), rel=0, abs=0)


def test_topk_needs_no_pass_over_nothing_and_rejects_bad_density():
    assert run_reduction(TopKThreshold(lambda s: s, 0.3), lambda: []) == []
    with pytest.raises(ValueError, match="density"):
        TopKThreshold(lambda s: s, 1.5)


def test_sign_sum():
    states = [torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, 0.0])]
    assert run_reduction(SignSum(lambda s: s), lambda: [("a", states[0]), ("b", states[1])]) == -1.0


@pytest.mark.parametrize("fill", [None, 1.0, -1.0])
@pytest.mark.parametrize("trimmed", [True, False])
def test_fused_chunked_ties_equals_the_reference_steps(monkeypatch, fill, trimmed):
    """ties_combine == disjoint_mean(elect_sign(trim(x), fill)), across chunk boundaries,
    including exact cancellations (elected sign 0 with nonzero values) that need the fill."""
    from src.merge.methods import _kernels as K

    monkeypatch.setattr(K, "CHUNK_ENTRIES", 64)  # many chunks
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 17, 23, generator=g, dtype=torch.float64)
    x[:, 2, 5] = torch.tensor([1.5, -1.5, 0.0, 0.0])  # cancels: sign 0, needs the fill
    x[:, 9, 1] = torch.tensor([2.0, -1.0, -1.0, 0.0])
    x[:, 0, 0] = 0.0
    thresholds = [K.topk_threshold(xi, 0.6) for xi in x] if trimmed else None
    ref_x = K.trim(x, thresholds) if trimmed else x
    want = K.disjoint_mean(ref_x, K.elect_sign(ref_x, fill))
    got = K.ties_combine(x, thresholds, fill)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    assert float(K.elected_sign_sum(x, thresholds)) == float(torch.sign(ref_x.sum(0)).sum())
    if fill is not None and not trimmed:
        assert got[2, 5] == pytest.approx(1.5 * fill)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.7, 1.0])
def test_per_tensor_threshold_histogram_route_equals_topk(monkeypatch, dtype, density):
    from src.merge.methods import _kernels as K

    x = torch.randn(300, 500, generator=torch.Generator().manual_seed(1), dtype=dtype)
    monkeypatch.setattr(K, "HISTOGRAM_SELECT_MIN", 10 ** 9)
    by_topk = K.topk_threshold(x, density)
    monkeypatch.setattr(K, "HISTOGRAM_SELECT_MIN", 1)
    by_histogram = K.topk_threshold(x, density)
    assert by_histogram == by_topk
    assert int((x.abs() >= by_histogram).sum()) == int(density * x.numel())


def test_global_topk_tie_quota_hand_worked():
    """Ties with the k-th magnitude: the first ones in (tensor order, row-major index) are kept.

    Task 0: a = [1, -1, 2], b = [[1], [-3]]; N = 5, density 0.6 -> k = 3. Largest: 3 (b), 2 (a),
    then the ties |1| at a[0], a[1], b[0]: only a[0] fits. Task 1 has no surplus ties.
    """
    from src.merge.methods._kernels import keep_mask

    a = torch.tensor([[1.0, -1.0, 2.0], [5.0, 4.0, 3.0]])
    b = torch.tensor([[[1.0], [-3.0]], [[0.5], [0.25]]])
    res = run_reduction(TopKThreshold(lambda s: s, 0.6), lambda: [("a", a), ("b", b)])
    assert list(res) == [1.0, 3.0]
    assert res.tie_quota("a") == [1, None] and res.tie_quota("b") == [0, None]
    assert res.tie_quota("not seen") is None
    assert keep_mask(a, res, res.tie_quota("a")).tolist() == [[True, False, True], [True, True, True]]
    assert keep_mask(b, res, res.tie_quota("b")).tolist() == [[[False], [True]], [[False], [False]]]
