"""Finetune one task model with LightningCLI and write its task checkpoint.

    python -m src.finetune fit --config configs/finetune/demo.yaml --data.init_args.task bbc_news \
        --export.output_dir checkpoints/demo/{task}
    python -m src.finetune fit --config configs/finetune/A_knots_vitb32_lora.yaml \
        --data.init_args.task cars --trainer.devices 4 --trainer.strategy ddp
    python -m src.finetune fit --config ... --ckpt_path path/to/last.ckpt          # resume

``model`` is any :class:`~src.finetune.base.TaskModule` subclass and ``data`` any
LightningDataModule (``class_path`` + ``init_args``). The ``export`` group configures
:class:`~src.finetune.export.TaskCheckpointExport`, which writes the task-checkpoint directory
when fit ends (``{task}`` in ``export.output_dir`` becomes the datamodule's task name).
Every trainer option (precision, strategy, devices, num_nodes, accumulate_grad_batches,
callbacks such as EarlyStopping on ``val/acc``) comes from the config or a flag.

The output directory is checked before anything is built (``--export.overwrite`` replaces an
existing non-empty directory that is not an earlier task checkpoint); at the end the command
prints where the task checkpoint went and its zero-shot and finetuned accuracies. A resumed fit
(``--ckpt_path``) restores the random state too (``src/finetune/resume.py``). Known harmless
warnings and per-load progress bars of dependencies are silenced (``src/finetune/quiet.py``).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from ..safe_output import OutputError
from .base import TaskModule
from .export import TaskCheckpointExport
from .quiet import quiet_known_noise
from .resume import ResumeRNG


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TaskCheckpointExport, "export")


def main(args: Optional[list[str]] = None, run: bool = True) -> FinetuneCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()
    return FinetuneCLI(
        TaskModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={"callbacks": [ResumeRNG()]},
    )


if __name__ == "__main__":
    try:
        main()
    except OutputError as e:  # a refused output path is a user mistake: no traceback
        sys.exit(f"error: {e}")
