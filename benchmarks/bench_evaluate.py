"""Evaluation-stage benchmark on the demo task models (run ``bash scripts/demo.sh`` first).

    OMP_NUM_THREADS=2 python benchmarks/bench_evaluate.py [--tasks-dir checkpoints/demo] [--repeats 3]

1. **Loop overhead**: examples/s of the Lightning validation loop (``Evaluator.metrics``, what
   every evaluation runs) vs a bare ``torch.inference_mode()`` forward over the same
   pre-collated batches already on the device (``loop.bare_forward_throughput``), per task's
   validation set. The issue's bar: >= 90%.
2. **Merge + apply vs evaluate**: per method at one grid point, the seconds to merge in memory
   (``Sweep.merge``, after the sweep's one-time preparation), add to the base and copy into the
   loaded model, against the seconds to evaluate that point on every task's validation set. The
   bar: <= 10%.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.finetune.quiet import quiet_known_noise  # noqa: E402

quiet_known_noise()

from src.evaluate.loop import Evaluator, bare_forward_throughput, split_loader  # noqa: E402
from src.evaluate.models import ModelBank, datamodule_of  # noqa: E402
from src.merge import Sweep  # noqa: E402

POINTS = {
    "task_arithmetic": {"lam": 0.5},
    "ties": {"lam": 0.7, "density": 0.3},
    "dare": {"mode": "ties", "p": 0.5, "lam": 0.7, "seed": 420},
    "knots": {"base_method": "ties", "lam": 0.7, "density": 0.3},
    "cart": {"lam": 1.0, "rank": 8},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks-dir", default="checkpoints/demo")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    task_dirs = sorted(p.parent for p in Path(args.tasks_dir).glob("*/task.json"))
    if len(task_dirs) < 2:
        sys.exit(f"error: {args.tasks_dir}: run `bash scripts/demo.sh` first (needs the demo task checkpoints)")
    bank = ModelBank(task_dirs)
    evaluator = Evaluator(accelerator="cpu", progress=False)
    loaders = {t: split_loader(datamodule_of(bank.infos[t], bank.task_dirs[t]), "val") for t in bank.tasks}

    print("## Lightning evaluation loop vs bare inference_mode forward (validation sets)\n")
    print("| task | examples | Lightning (ex/s) | bare forward (ex/s) | ratio |")
    print("|---|---:|---:|---:|---:|")
    total_l = total_b = 0.0
    for task, loader in loaders.items():
        module = bank.modules[task]
        n = len(loader.dataset)
        lightning, bare = [], []
        for _ in range(args.repeats):  # alternate, so a busy machine slows both alike
            lightning.append(n / evaluator.metrics(module, loader, "val").wall_s)
            bare.append(bare_forward_throughput(module, loader))
        ml, mb = statistics.median(lightning), statistics.median(bare)
        total_l += n / ml
        total_b += n / mb
        print(f"| {task} | {n} | {ml:.0f} | {mb:.0f} | {ml / mb:.2f} |")
    print(f"| all | | | | {total_b / total_l:.2f} (time ratio bare / Lightning) |\n")

    print("## Merge + apply vs evaluate, one grid point (validation sets of all tasks)\n")
    print("| method | prepare (once per sweep) s | merge + apply s | evaluate s | fraction |")
    print("|---|---:|---:|---:|---:|")
    for method, point in POINTS.items():
        start = time.perf_counter()
        sweep = Sweep(method, task_dirs, base=bank.base_state(), progress=False)
        sweep.merge(point, as_updates=True)  # first call: per-tensor preparation, global reductions
        prepare = time.perf_counter() - start
        merge_s, eval_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            state = bank.with_updates(sweep.merge({**point, "lam": point.get("lam", 1.0) * 0.99}, as_updates=True))
            bank.swap.apply(state)
            merge_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            for task, loader in loaders.items():
                evaluator.metrics(bank.modules[task], loader, "val")
            eval_s.append(time.perf_counter() - start)
            bank.swap.restore()
        m, e = statistics.median(merge_s), statistics.median(eval_s)
        print(f"| {method} | {prepare:.2f} | {m:.3f} | {e:.2f} | {100 * m / e:.1f}% |")


if __name__ == "__main__":
    main()
