#!/usr/bin/env bash
# The embedded demo, end to end on a laptop CPU: no GPU, no hub downloads.
#   1. creates .venv if needed (scripts/setup_env.sh)
#   2. finetunes four text tasks with LoRA on the real pretrained all-MiniLM-L6-v2 encoder
#      (skips tasks whose checkpoint exists; delete checkpoints/demo to start over)
#   3. evaluates: the finetuned and zero-shot references, every merge method with its
#      hyperparameters selected on validation (quick grids), the Ensemble and the joint
#      benchmark; rows in checkpoints/demo-eval/rows.jsonl (finished ones are skipped on a
#      re-run), tables in checkpoints/demo-eval/report.md, plot in sensitivity.png
#   4. the permutation-merging demo (scripts/demo_permutation.sh): two MLPs from different
#      initializations on the digits halves, merged by Git Re-Basin, ZipIt, MuDSC...; tables in
#      checkpoints/demo_permutation-eval/report.md
# Extra arguments go to the evaluation, e.g. the KnOTS paper's full grids:
#   bash scripts/demo.sh --protocol knots --rows checkpoints/demo-eval-knots/rows.jsonl
set -euo pipefail
source "$(dirname "$0")/offline_env.sh"
.venv/bin/python -m src.finetune.train_all --config configs/finetune/demo.yaml \
  --tasks-file configs/finetune/tasks/demo.yaml --output checkpoints/demo
.venv/bin/python -m src.evaluate --config configs/evaluate/demo.yaml --print_report true "$@"
bash scripts/demo_permutation.sh
