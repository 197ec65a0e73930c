"""Paper pipelines: one command per experiment, finetune -> merges -> evaluation -> report.

``python -m src.pipeline NAME [--smoke]`` (or ``bash scripts/experiments/NAME.sh``; ``SMOKE=1``
for the smoke mode) runs an experiment of ``experiments.py`` through the stages' own commands,
skipping finished work so that a killed run resumes; ``smoke.py`` holds the tiny substitutes
of the smoke mode.
"""
