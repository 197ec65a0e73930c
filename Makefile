PY ?= .venv/bin/python
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1

.PHONY: setup test bench demo
setup:
	bash scripts/setup_env.sh

test:
	$(PY) -m pytest tests

bench:
	$(PY) benchmarks/bench_merge.py

demo:
	bash scripts/demo.sh
