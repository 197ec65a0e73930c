"""Permutation merging: models trained from different initializations, matched unit by unit.

Modules: ``spec.py`` (what a permutation spec says; applying permutations), ``specs.py`` (the
specs this project ships: MLP, ResNet-20 BN/GN, CLIP ViT), ``data_passes.py`` (activation
statistics and the BatchNorm reset, Lightning loops with hooks), ``solvers.py`` (Hungarian
alignment, ZipIt's greedy zip, group and tied variants), ``merge.py`` (merged and aligned
states, weight-space similarity), ``matcher.py`` (activation / weight / MuDSC dual-space
searches), ``run.py`` (the methods end to end, outputs), ``__main__.py`` (the command line).
"""
