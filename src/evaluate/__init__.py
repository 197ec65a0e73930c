"""Evaluation stage: score task models, merged models and baselines; write result rows; report.

Python API (the CLI ``python -m src.evaluate`` calls the same code)::

    from src.evaluate import EvalConfig, MethodSpec, run_evaluation, load_merged
    rows = run_evaluation(EvalConfig(experiment="demo", tasks=task_dirs, protocol="quick",
                                     methods=[MethodSpec("ties", label="TIES")]))
    module = load_merged("merged/ties", "bbc_news")   # one task's module running a merged model

Modules: ``models.py`` (one base, weight swapping, ``load_merged``), ``loop.py`` (the Lightning
loops), ``metrics.py`` / ``text_metrics.py``, ``protocols.py`` (selection grids),
``rows.py`` (the result schema), ``run.py`` (an evaluation run), ``report.py`` (tables, plots).
"""
from __future__ import annotations

from .models import EvaluationError, ModelBank, WeightSwap, load_merged
from .rows import RowStore, make_row, read_rows
from .run import EvalConfig, EvaluationRun, JointSpec, MethodSpec, run_evaluation

__all__ = ["EvalConfig", "EvaluationRun", "JointSpec", "MethodSpec", "run_evaluation", "load_merged", "ModelBank",
           "WeightSwap", "EvaluationError", "RowStore", "make_row", "read_rows"]
