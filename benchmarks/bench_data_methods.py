"""Per-layer merge time of the data-dependent methods beside the element-wise ones (on demand).

    python benchmarks/bench_data_methods.py                  # CPU (MaTS K-FAC takes minutes here)
    python benchmarks/bench_data_methods.py --device cuda    # the GPU, like the paper's Table 4
    python benchmarks/bench_data_methods.py --methods regmean mats-gram --repeats 5

One mT5-xl feed-forward weight (``wi``: 5120 x 2048, i.e. ``k = 5120`` outputs, ``d = 2048``
inputs) and five task models, in memory, with random statistics of the right shapes: diagonal
Fisher (5120, 2048), Gram (2048, 2048) SPD, K-FAC ``kfac_in`` (2048, 2048) and ``kfac_out``
(5120, 5120) SPD. Each method is called through :class:`~src.merge.MergeEngine` exactly as a
merge would call it (updates formed from the base, statistics loaded and checked, prepare,
reductions, merge, ``W0`` added back); the inputs are generated and the engine opened before
the clock starts, so the time is the merge alone. Median of ``--repeats`` runs (fewer when one
run exceeds ``--budget`` seconds: MaTS K-FAC on a CPU).

The compositional paper's Table 4 ("Realistic Evaluation of Model Merging for Compositional
Generalization") measured the same layer on its GPU: Average 1.2 ms, TA 1.9, TIES 2.1,
Fisher 0.8, RegMean 49.9, MaTS 4,280 ms (CG with 50 iterations whose matrix-vector products go
through scipy on the host). Its FLOP counts per ``d x k`` layer and ``M`` models are printed
beside: MaTS' ``(M + N) d^2 k`` is the RegMean (Gram) subspace; the K-FAC subspace costs
``M d k (d + k)`` per iteration (multiply-adds, the paper's unit).
"""
from __future__ import annotations

import argparse
import json
import statistics as stats_mod
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the cases, inputs and timing loop live in src/analysis/cost.py (python -m src.analysis.cost uses them too)
from src.analysis.cost import CASES, case_flops, make_inputs, paper_ms, time_case  # noqa: E402

DEFAULT_CASES = ["average", "task_arithmetic", "ties", "fisher", "regmean", "regmean-f32", "mats-gram", "mats-kfac"]


def paper_gflop(label: str, M: int, d: int, k: int, N: int) -> str:
    """The compositional paper's FLOP count (Table 3 as recorded; mats-kfac: this project's K-FAC
    count), in GFLOP (multiply-adds), or "" where there is none."""
    value = case_flops(label, d, k, M, N)[0]
    return f"{value / 1e9:,.1f}" if value is not None else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=DEFAULT_CASES, choices=list(CASES))
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--out-features", type=int, default=5120)
    p.add_argument("--in-features", type=int, default=2048)
    p.add_argument("--iterations", type=int, default=50, help="MaTS CG iterations (the paper's timing: 50)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="stop repeating a method after this many seconds")
    p.add_argument("--json", type=Path, default=None, help="also write the timings here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    base, tasks, side = make_inputs(args.tasks, args.out_features, args.in_features)
    M, d, k = args.tasks, args.in_features, args.out_features
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"one {k} x {d} layer, {M} task models, {where}, torch {torch.__version__}\n", flush=True)
    rows = []
    for label in args.methods:
        params, times = time_case(label, base, tasks, side, device, args.repeats, args.budget, args.iterations)
        ms = 1e3 * stats_mod.median(times)
        rows.append({"method": label, "params": params, "median_ms": ms, "runs": len(times),
                     "times_ms": [1e3 * t for t in times], "paper_ms": paper_ms(label),
                     "paper_gflop": paper_gflop(label, M, d, k, args.iterations)})
        print(f"  {label}: {ms:,.1f} ms (median of {len(times)})", file=sys.stderr, flush=True)

    print(f"| method | hyperparameters | this run, {device.type} (ms, median) | runs | "
          "paper Table 4, GPU (ms) | GFLOP (paper's count) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        paper = "" if r["paper_ms"] is None else f"{r['paper_ms']:,.1f}"
        print(f"| {r['method']} | {hp} | {r['median_ms']:,.1f} | {r['runs']} | {paper} | {r['paper_gflop']} |")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "shape": [k, d], "tasks": M, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
