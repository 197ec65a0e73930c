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
"""
from __future__ import annotations

import os
from typing import Optional

import lightning as L
from lightning.pytorch.cli import LightningCLI

from .base import TaskModule
from .export import TaskCheckpointExport


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(TaskCheckpointExport, "export")


def main(args: Optional[list[str]] = None, run: bool = True) -> FinetuneCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return FinetuneCLI(
        TaskModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
