#!/usr/bin/env bash
# Runs one paper experiment through python -m src.pipeline (the scripts in scripts/experiments/ call it).
#   bash scripts/run_experiment.sh NAME [args for python -m src.pipeline]
# SMOKE=1: tiny random models and synthetic data on a CPU; SMOKE_ROOT: where the smoke run goes.
# PYTHON: the interpreter (default: .venv/bin/python when it exists, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
args=()
[ -n "${SMOKE:-}" ] && [ "${SMOKE}" != 0 ] && args+=(--smoke)
[ -n "${SMOKE_ROOT:-}" ] && args+=(--root "$SMOKE_ROOT")
name="$1"
shift
exec "$PY" -m src.pipeline "$name" "${args[@]}" "$@"
