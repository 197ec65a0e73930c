"""Model merging toolkit: finetune task models, merge them without training, evaluate."""
import os as _os

# torch's OpenMP threads spin while they wait for work; on a CPU shared with other jobs the
# spinning steals the cores the working threads need (measured 5-10x slower than one thread).
# libgomp reads this once, when torch loads it: both CLIs import this package first.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
