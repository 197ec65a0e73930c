"""Analyses of task models and their merges, each a module with a Python API and a command line
(``python -m src.analysis.<module>``), reading task checkpoints and result rows as the other stages do.

- ``scaling`` — scaling with the number of merged models under the KnOTS, CART and compositional protocols.
- ``cka`` — linear CKA between different tasks' update outputs at every attention projection on the same data (full-finetune updates, LoRA branches, KnOTS-aligned ``V_i^T x``; KnOTS Fig. 2 / App. B).
- ``rank_sweeps`` — accuracy against the retained rank (CART: centered / plain task vectors, top-k / bottom-k directions) and KnOTS-TIES vs TIES across LoRA ranks with row / column concatenation (CART Fig. 1, 2, 5; KnOTS Fig. 4, §5.4).
- ``cost`` — FLOPs per layer (the compositional paper's count), measured per-layer merge time and what every method needs (base model, statistics, data).
"""
