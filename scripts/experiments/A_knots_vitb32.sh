#!/usr/bin/env bash
# KnOTS: CLIP ViT-B/32 LoRA (r16) on the 8 vision tasks; per-task and joint 748-label Hits@k
# Needs: one GPU (~8 GB), hub weights openai/clip-vit-base-patch32, the 8 datasets (hub or data_root); hours.
# Runs (python -m src.pipeline A_knots_vitb32; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/A_knots_vitb32_lora.yaml \
#        --tasks-file configs/finetune/tasks/A_vision.yaml --output checkpoints/A_vitb32_lora
#   2. python -m src.evaluate --config configs/evaluate/A_knots_vitb32_lora.yaml   (statistics, sweeps, report)
# Writes: checkpoints/A_vitb32_lora/, results/A_knots_vitb32_lora/{rows.jsonl,report.md,sensitivity.png}
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/A_knots_vitb32, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" A_knots_vitb32 "$@"
