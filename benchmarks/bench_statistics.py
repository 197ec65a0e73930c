"""Data-statistics benchmark on the demo task models (run ``bash scripts/demo.sh`` first).

    OMP_NUM_THREADS=2 python benchmarks/bench_statistics.py [--tasks-dir checkpoints/demo] [--n 128] [--repeats 3]

Examples/s of the statistics pass (``compute_statistics``: gram + fisher + kfac_in + kfac_out in
one Lightning epoch, timed from the call to its return: Trainer set-up, loop, cross-rank reduction)
against the model's plain training step on the same batches: forward, backward and an optimizer
step of the same module (its own optimizer settings, the parameters a finetune trains: the LoRA
factors, or every encoder weight for a full finetune), a bare PyTorch loop over pre-collated
batches. Per task, the first ``--n`` examples of the seeded training-split permutation, at the
DataModule's training batch size. The issue's bar: statistics >= 80% of the training step's
examples/s. The statistics loop's own time (without the Trainer's set-up) is shown too.

Rows: each LoRA checkpoint with statistics of ``all`` Linear layers and of the ``trained`` ones
(the LoRA-adapted layers, ``--layers trained``), and (``--full``) the same network as a full
finetune built in memory, whose training step trains every encoder weight (statistics: all layers).
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

import torch  # noqa: E402

from src.evaluate.models import datamodule_of  # noqa: E402
from src.finetune.load import build_module, load_task_model  # noqa: E402
from src.finetune.optim import build_optimizer  # noqa: E402
from src.statistics.collect import _Subset, compute_statistics, split_data, subset_indices, trained_weights  # noqa: E402
from src.task_checkpoint import read_task_info  # noqa: E402
from src.task_statistics import KINDS  # noqa: E402


def training_throughput(module, batches: list[dict]) -> float:
    """Examples/s of forward + backward + optimizer step (a copy of the trainable state is restored after)."""
    trainable = [p for n, p in module.named_parameters() if ("lora_" in n) == (module.finetune == "lora")
                 and (module.finetune == "lora" or n.startswith("model.") and ".pooler." not in n)]
    saved = [p.detach().clone() for p in trainable]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = build_optimizer(trainable, module.optim, len(batches))
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.train()
    try:
        start = time.perf_counter()
        n = 0
        for batch in batches:
            loss = module.example_losses(batch).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n += len(batch["labels"])
        elapsed = time.perf_counter() - start
    finally:
        module.eval()
        with torch.no_grad():
            for p, s in zip(trainable, saved):
                p.copy_(s)
                p.requires_grad_(False)
    return n / elapsed


def full_variant(task_dir, info):
    """The task's network as a FULL finetune (the same family module with ``finetune="full"``,
    built in memory from the pretrained base): its training step trains every encoder weight."""
    module = build_module(info, Path(task_dir))
    spec = info.hparams["module"]
    module = type(module)(**{**spec.get("init_args", {}), "finetune": "full"})
    module.build_model(list(info.label_names), (info.hparams or {}).get("templates"))
    return module.requires_grad_(False).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks-dir", default="checkpoints/demo")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--layers", default="all,trained", help="for the LoRA models: all, trained, or both")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                    help="also the same network as a full finetune (built in memory)")
    args = ap.parse_args()
    task_dirs = sorted(p.parent for p in Path(args.tasks_dir).glob("*/task.json"))
    if not task_dirs:
        sys.exit(f"error: {args.tasks_dir}: run `bash scripts/demo.sh` first (needs the demo task checkpoints)")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    layer_sets = [k.strip() for k in args.layers.split(",") if k.strip()]
    print(f"## Statistics ({', '.join(kinds)}) vs training step, {args.n} training examples per task, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| task | model | layers | batch | statistics (ex/s) | statistics loop only (ex/s) | training step (ex/s) | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    totals: dict[tuple[str, str], list[float]] = {}
    for task_dir in task_dirs:
        info = read_task_info(task_dir)
        dm = datamodule_of(info, task_dir)
        dataset, collate = split_data(dm, "train")
        n = min(args.n, len(dataset))
        subset = _Subset(dataset, subset_indices(len(dataset), n, 0))
        batch_size = dm.batch_size
        batches = [collate([subset[j] for j in range(i, min(i + batch_size, n))]) for i in range(0, n, batch_size)]
        runs = [(info.kind, load_task_model(task_dir), layers) for layers in layer_sets]
        if args.full and info.kind == "lora":
            runs.append(("full (in memory)", full_variant(task_dir, info), "all"))
        for model, module, layers in runs:
            selection = "all" if layers == "all" else trained_weights(module, task_dir)
            stats_rate, loop_rate, train_rate = [], [], []
            for _ in range(args.repeats):  # alternate, so a busy machine slows both alike
                start = time.perf_counter()
                result = compute_statistics(module, subset, collate, kinds, batch_size=batch_size, accelerator="cpu",
                                            progress=False, layers=selection)
                stats_rate.append(n / (time.perf_counter() - start))
                loop_rate.append(n / result.wall_s)
                train_rate.append(training_throughput(module, batches))
            ms, ml, mt = (statistics.median(r) for r in (stats_rate, loop_rate, train_rate))
            total = totals.setdefault((model.split()[0], layers), [0.0, 0.0])
            total[0] += n / ms
            total[1] += n / mt
            print(f"| {info.task} | {model} | {layers} ({len(result.tokens)} Linear) | {batch_size} | {ms:.1f} | "
                  f"{ml:.1f} | {mt:.1f} | {ms / mt:.2f} |", flush=True)
    for (model, layers), (stats_s, train_s) in totals.items():
        print(f"| all tasks | {model} | {layers} | | | | | {train_s / stats_s:.2f} (time ratio training / statistics) |")


if __name__ == "__main__":
    main()
