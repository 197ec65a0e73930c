#!/usr/bin/env bash
# KnOTS: CLIP ViT-L/14 LoRA (r16) on the 8 vision tasks
# Needs: one GPU (~24 GB), hub weights openai/clip-vit-large-patch14, the 8 datasets; hours.
# Runs (python -m src.pipeline A_knots_vitl14; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/A_knots_vitl14_lora.yaml \
#        --tasks-file configs/finetune/tasks/A_vision.yaml --output checkpoints/A_vitl14_lora
#   2. python -m src.evaluate --config configs/evaluate/A_knots_vitl14_lora.yaml   (statistics, sweeps, report)
# Writes: checkpoints/A_vitl14_lora/, results/A_knots_vitl14_lora/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/A_knots_vitl14, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" A_knots_vitl14 "$@"
