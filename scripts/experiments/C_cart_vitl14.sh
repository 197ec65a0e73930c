#!/usr/bin/env bash
# CART: open_clip ViT-L/14 full finetunes of the 8 vision tasks
# Needs: GPU (~40 GB for training), the openclip extra, the 8 datasets; hours.
# Runs (python -m src.pipeline C_cart_vitl14; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/C_cart_vitl14_openclip_full.yaml \
#        --tasks-file configs/finetune/tasks/A_vision.yaml --output checkpoints/C_vitl14_openclip
#   2. python -m src.evaluate --config configs/evaluate/C_cart_vitl14.yaml   (statistics, sweeps, report)
# Writes: checkpoints/C_vitl14_openclip/, results/C_cart_vitl14/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/C_cart_vitl14, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" C_cart_vitl14 "$@"
