"""Finetuning stage: LightningModules and DataModules that write task checkpoints."""
