# Sourced by the demo scripts: go to the repository root, create .venv when its imports fail
# (scripts/setup_env.sh), and keep every library off the network (no hub downloads).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! .venv/bin/python -c "import src.merge, src.finetune, src.permute, lightning, peft, sklearn" 2>/dev/null; then
  bash scripts/setup_env.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
