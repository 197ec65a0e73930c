#!/usr/bin/env bash
# The offline permutation-merging demo (MuDSC Table 1 in miniature), end to end on a CPU:
#   1. creates .venv if needed (scripts/setup_env.sh)
#   2. trains two 4-layer MLPs from DIFFERENT random initializations on disjoint halves of
#      scikit-learn's bundled digits (8x8 images), each classifying with the frozen MiniLM
#      embeddings of its digit names (skips a task whose checkpoint exists)
#   3. merges them with Average, Git Re-Basin, Activation Align, ZipIt, Weight Zip, MuDSC-Align
#      and MuDSC-Zip (python -m src.permute: activation statistics on training data, MuDSC's alpha
#      searched on training data, BatchNorm-free MLPs so no reset is needed), into
#      checkpoints/demo_permutation-merged/<method>/ (finished methods are skipped on a re-run)
#   4. evaluates every merged network per task and jointly (all 10 digits) with the evaluation
#      stage: tables in checkpoints/demo_permutation-eval/report.md
# Each half has about 540 training images: 256 for the activation statistics, the next 256 score
# MuDSC's alpha grid. Extra arguments go to the merge step, e.g. --alpha 0.5 --output checkpoints/other
set -euo pipefail
source "$(dirname "$0")/offline_env.sh"
.venv/bin/python -m src.finetune.train_all --config configs/finetune/demo_permutation.yaml \
  --tasks-file configs/finetune/tasks/demo_permutation.yaml --output checkpoints/demo_permutation
.venv/bin/python -m src.permute --tasks '[checkpoints/demo_permutation/digits-0of2, checkpoints/demo_permutation/digits-1of2]' \
  --output checkpoints/demo_permutation-merged --n_examples 256 --search_examples 256 --reset_examples 256 "$@"
.venv/bin/python -m src.evaluate --config configs/evaluate/demo_permutation.yaml --print_report true
