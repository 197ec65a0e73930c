"""The Lightning data passes: activation sums against a direct computation, BatchNorm reset."""
from __future__ import annotations

import torch
from torch import nn

from src.finetune.models.resnet import ResNet20
from src.permute.data_passes import activation_statistics, reset_batchnorm
from src.permute.specs import mlp_spec, resnet20_spec

from .helpers import MLP, Task, loader


def test_activation_statistics_match_a_direct_computation():
    torch.manual_seed(0)
    models = [MLP(), MLP()]
    spec = mlp_spec(12, 8, 3, 5)
    x = torch.randn(40, 12)
    stats = activation_statistics([Task(m) for m in models], spec, [loader(x[:25]), loader(x[25:])], accelerator="cpu")
    for k, name in ((1, "h1"), (3, "h3")):
        feats = []
        for m in models:
            h = x
            for j in range(1, k + 1):
                h = torch.relu(getattr(m, f"fc{j}")(h))
            feats.append(h.detach())
        F = torch.cat(feats, 1).double()
        assert float(stats[name]["count"]) == 40
        torch.testing.assert_close(stats[name]["sum"], F.sum(0))
        torch.testing.assert_close(stats[name]["gram"], F.T @ F)


def test_activation_statistics_memory_does_not_grow_with_examples():
    torch.manual_seed(0)
    spec = resnet20_spec(1, "batch", 4)
    small = activation_statistics([Task(ResNet20(1, "batch", 4, out_dim=6).eval())] * 2, spec,
                                  [loader(torch.randn(4, 3, 8, 8))], accelerator="cpu")
    large = activation_statistics([Task(ResNet20(1, "batch", 4, out_dim=6).eval())] * 2, spec,
                                  [loader(torch.randn(20, 3, 8, 8))], accelerator="cpu")
    for p in spec.perms:
        assert small[p]["gram"].shape == large[p]["gram"].shape == (2 * spec.perms[p].size,) * 2
        assert float(large[p]["count"]) > float(small[p]["count"])  # pixels x examples, pooled points
    # stage-3 residual stream: three block outputs (8x8 / 4 pixels... ) pooled with the projection input
    assert float(large["res3"]["count"]) == 20 * (3 * 2 * 2 + 1)


def test_batchnorm_reset_restores_fresh_statistics():
    torch.manual_seed(0)
    net = ResNet20(1, "batch", 4, out_dim=6).eval()
    x = torch.randn(30, 3, 8, 8)
    fresh = ResNet20(1, "batch", 4, out_dim=6)
    fresh.load_state_dict(net.state_dict())
    for m in fresh.modules():  # a fresh pass: running statistics as cumulative averages over the data
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    fresh.train()
    with torch.no_grad():
        fresh(x)
    for m in net.modules():  # scramble what the reset must replace
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
    assert reset_batchnorm([Task(net)], [loader(x, batch_size=30)], accelerator="cpu")
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        if "running" in name:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not net.training and all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert not reset_batchnorm([Task(MLP())], [loader(torch.randn(3, 12))], accelerator="cpu")
