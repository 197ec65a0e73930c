#!/usr/bin/env bash
# Compositional generalization: 24 DomainNet (category, domain) CLIP ViT-B/32 models; held-in and generalization
# Needs: GPU, DomainNet images + lists in data_root, CLIP weights; a day for 24 models.
# Runs (python -m src.pipeline D_domainnet; finished work is skipped, so a killed run resumes):
#   1. python -m src.finetune.train_all --config configs/finetune/D_domainnet_vitb32_full.yaml \
#        --tasks-file configs/finetune/tasks/D_domainnet.yaml --output checkpoints/D_domainnet
#   2. python -m src.evaluate --config configs/evaluate/D_domainnet.yaml   (statistics, sweeps, report)
# Writes: checkpoints/D_domainnet/, results/D_domainnet/
# SMOKE=1: the same pipeline on tiny random models and synthetic data on a CPU (under
# checkpoints/smoke/D_domainnet, or SMOKE_ROOT); extra arguments go to python -m src.pipeline.
exec bash "$(dirname "$0")/../run_experiment.sh" D_domainnet "$@"
