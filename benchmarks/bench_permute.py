"""Matching two ViT-B/32-sized vision towers from cached statistics (issue bar: a few seconds on 2 cores).

    OMP_NUM_THREADS=2 python benchmarks/bench_permute.py
    python benchmarks/bench_permute.py --methods act_align zipit --layers 12 --json out.json

Two CLIP ViT-B/32 vision towers' state dicts (12 blocks, 768 units, 12 heads of 64, MLP 3,072;
transformers' names; random weights: matching time does not depend on the values) and, per perm,
a cached activation statistic of the right shape (``count``, ``sum``, ``gram`` of the stacked
units of both models, ``2d x 2d``), made from random correlated features before the clock
starts. Timed: ``match_models`` for the methods' settings (``src/permute/run.py`` METHODS), then
the merge of the two states with the matching — i.e. everything after the data pass. The
weight-space searches (Git Re-Basin, MuDSC) iterate; their sweep count is printed.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from src.permute.matcher import activation_similarity, match_models
from src.permute.merge import merge_states
from src.permute.specs import clip_vision_spec

SETTINGS = {
    "act_align": dict(solver="align", alpha=0.0),
    "zipit": dict(solver="zip", alpha=0.0),
    "git_rebasin": dict(solver="align", alpha=1.0, similarity="inner", patience=1),
    "mudsc_align": dict(solver="align", alpha=0.5),
    "mudsc_zip": dict(solver="zip", alpha=0.5),
}


def random_states(spec, seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {}
    for name, axes in spec.axes.items():
        shape = []
        for a, axis in enumerate(axes):
            if axis is not None:
                shape.append(spec.perms[axis[0]].size)
            elif name.endswith("patch_embedding.weight"):
                shape.append(3 if a == 1 else 32)
            elif name.endswith("position_embedding.weight"):
                shape.append(50)
            else:  # visual projection output
                shape.append(512)
        shapes[name] = shape
    return [{n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()} for _ in range(2)]


def random_statistics(spec, samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    stats = {}
    for p, perm in spec.perms.items():
        base = torch.randn(samples, perm.size, generator=g)
        shuffled = base[:, torch.randperm(perm.size, generator=g)] + 0.5 * torch.randn(samples, perm.size, generator=g)
        F = torch.cat([base, shuffled], 1).double()
        stats[p] = {"count": torch.tensor(float(samples)), "sum": F.sum(0), "gram": F.T @ F}
    return activation_similarity(stats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=256, help="features drawn for the synthetic statistics")
    parser.add_argument("--max_iter", type=int, default=100)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    spec = clip_vision_spec(768, 12, 3072, args.layers)
    states = random_states(spec, 0)
    act = random_statistics(spec, args.samples, 1)
    print(f"spec: {len(spec.perms)} perms, {len(spec.axes)} tensors, "
          f"{sum(t.numel() for t in states[0].values()) / 1e6:.1f}M parameters per model; threads {torch.get_num_threads()}")
    rows = []
    for method in args.methods:
        opts = dict(SETTINGS[method])
        start = time.perf_counter()
        report = {}
        matches = match_models(spec, states, act if opts["alpha"] < 1 else None, max_iter=args.max_iter,
                               report=report, **opts)
        matched = time.perf_counter() - start
        merge_states(spec, matches, states)
        total = time.perf_counter() - start
        rows.append({"method": method, "match_s": round(matched, 2), "match_and_merge_s": round(total, 2),
                     "sweeps": report["sweeps"]})
        print(f"{method:12s} match {matched:7.2f} s   match + merge {total:7.2f} s   sweeps {report['sweeps']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
