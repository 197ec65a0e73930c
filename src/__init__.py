"""Model merging toolkit: finetune task models, merge them without training, evaluate."""
import os as _os

# torch's OpenMP threads (libgomp) spin ~3 ms for more work before they sleep; on a CPU other
# jobs keep busy the spinning steals the time the working threads need: TIES with 2 threads
# on 2 busy cores ran 12x slower than on 1 thread. 1000 spins (~10 us) cost nothing on an
# idle machine (PASSIVE, no spin, cost 40% there). libgomp reads it once, when torch loads:
# both CLIs import this package first. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")
