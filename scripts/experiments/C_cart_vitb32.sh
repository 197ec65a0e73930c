#!/usr/bin/env bash
# CART: open_clip ViT-B/32 full finetunes of the 8 vision tasks (Tables 1-2, with test-time adaptation)
# Needs: GPU, the openclip extra, the 8 datasets (or converted released checkpoints); hours.
# Runs (python -m src.pipeline C_cart_vitb32; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/C_cart_vitb32_openclip_full.yaml \
#        --tasks-file configs/finetune/tasks/A_vision.yaml --output checkpoints/C_vitb32_openclip
#   2. python -m src.evaluate --config configs/evaluate/C_cart_vitb32.yaml   (statistics, sweeps, report)
# Writes: checkpoints/C_vitb32_openclip/, results/C_cart_vitb32/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/C_cart_vitb32, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" C_cart_vitb32 "$@"
