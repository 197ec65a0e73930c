#!/usr/bin/env bash
# Create (or reuse) the CPU virtual environment in .venv. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements/cpu.txt -c requirements/constraints-cpu.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
