#!/usr/bin/env bash
# Compositional generalization: mT5-xl-lm-adapt on 5 (task, language) pairs
# Needs: GPU with >= 40 GB (bf16), the cross-lingual datasets; a day.
# Runs (python -m src.pipeline D_crosslingual; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/D_crosslingual_mt5xl.yaml \
#        --tasks-file configs/finetune/tasks/D_crosslingual.yaml --output checkpoints/D_mt5xl
#   2. python -m src.evaluate --config configs/evaluate/D_crosslingual.yaml   (statistics, sweeps, report)
# Writes: checkpoints/D_mt5xl/, results/D_crosslingual/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/D_crosslingual, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" D_crosslingual "$@"
