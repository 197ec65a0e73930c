"""Data statistics of task models (Gram, diagonal Fisher, K-FAC) for data-dependent merges.

>>> from src.statistics import collect_statistics
>>> collect_statistics("checkpoints/demo/bbc_news", kinds=["gram", "fisher"], n=256)
PosixPath('checkpoints/demo/bbc_news/statistics/train-n256-seed0')

The files' format: ``src/task_statistics.py``; what is computed and how: ``collect.py``;
the command line: ``python -m src.statistics --tasks '[dir_a, dir_b]' --kinds '[gram, fisher]'``.
"""
from .collect import (Statistics, StatisticsCollector, collect_statistics, compute_statistics, linear_layers, trained_weights,
                      missing_kinds, subset_indices, write_statistics)

__all__ = ["Statistics", "StatisticsCollector", "collect_statistics", "compute_statistics", "linear_layers",
           "missing_kinds", "subset_indices", "trained_weights", "write_statistics"]
