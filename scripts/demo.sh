#!/usr/bin/env bash
# The embedded demo, end to end on a laptop CPU: no GPU, no hub downloads.
#   1. creates .venv if needed (scripts/setup_env.sh)
#   2. finetunes four text tasks with LoRA on the real pretrained all-MiniLM-L6-v2 encoder
#      (skips tasks whose checkpoint exists; delete checkpoints/demo to start over)
#   3. merges the four task models with six methods and scores every merged model on
#      every task's test split: checkpoints/demo-merged/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import src.merge, src.finetune, lightning, peft" 2>/dev/null; then
  bash scripts/setup_env.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m src.finetune.train_all --config configs/finetune/demo.yaml \
  --tasks-file configs/finetune/tasks/demo.yaml --output checkpoints/demo
.venv/bin/python scripts/demo_merge.py --tasks-dir checkpoints/demo --output checkpoints/demo-merged
