#!/usr/bin/env bash
# KnOTS: Llama-3-8B LoRA on 6 NLI tasks, per-task heads
# Needs: one 24-80 GB GPU (bf16, or 4-bit), gated Llama-3 weights, the NLI datasets; hours.
# Runs (python -m src.pipeline B_knots_nli; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/B_knots_llama3_8b_nli.yaml \
#        --tasks-file configs/finetune/tasks/B_nli.yaml --output checkpoints/B_llama3_8b
#   2. python -m src.evaluate --config configs/evaluate/B_knots_llama3_nli.yaml   (statistics, sweeps, report)
# Writes: checkpoints/B_llama3_8b/, results/B_knots_llama3_nli/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/B_knots_nli, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" B_knots_nli "$@"
