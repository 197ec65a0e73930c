#!/usr/bin/env bash
# MuDSC: ResNet-20x8 pair 0 from different inits on CIFAR-100 50+50; seven permutation merges; Table 1
# Needs: one small GPU, CIFAR-100 (hub or data_root), CLIP text tower weights; about an hour per pair.
# Runs (python -m src.pipeline E_mudsc_cifar100; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/E_mudsc_resnet20_cifar100.yaml \
#        --tasks-file configs/finetune/tasks/E_cifar100_50_50.yaml --output checkpoints/E_resnet20x8
#   2. python -m src.permute --config configs/permute/E_mudsc_cifar100.yaml
#   3. python -m src.evaluate --config configs/evaluate/E_mudsc_cifar100.yaml   (statistics, sweeps, report)
# Writes: checkpoints/E_resnet20x8/, checkpoints/E_resnet20x8-merged/split0/<method>/, results/E_mudsc_cifar100/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/E_mudsc_cifar100, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" E_mudsc_cifar100 "$@"
