"""Keep a streaming merge's resident memory bounded by what it really holds.

glibc raises its mmap threshold after large blocks are freed, so a loop that allocates
and frees tensor-sized blocks ends up keeping them in the heap: resident memory grows to
many times the live tensors. Pinning the threshold at 32 MiB (glibc's own ceiling) makes
every tensor-sized block its own mapping, returned to the system as soon as it is freed,
while the small chunk temporaries of the kernels keep reusing heap memory (a 1 MiB pin
made every temporary a fresh mapping: measured 1.5x slower).

The CPU threads are a process resource too: :func:`use_free_cores` sizes torch's thread pool
to the cores that are idle when a merge starts (the merge CLI calls it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import resource
import time
from typing import Optional

import psutil

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = False


def return_freed_memory_to_os(threshold: int = 32 << 20) -> bool:
    """Pin glibc's mmap/trim thresholds (once per process); False where not glibc."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark.

    ``VmHWM`` of /proc/self/status where it exists: ``ru_maxrss`` of a child process also
    counts what its parent held when it forked, so it overstates a CLI run's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


def free_cores(interval: float = 0.1) -> float:
    """How many of this process's CPUs (its affinity set) were idle over ``interval`` seconds.

    Sampled from ``/proc/stat`` (idle + iowait time per CPU); the load of every other process
    counts, whatever its priority. ``len(affinity)`` where ``/proc/stat`` cannot be read.
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))

    def snapshot() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *fields = line.split()
                    if int(name[3:]) in cpus:
                        v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                        out[int(name[3:])] = (v[3] + v[4], sum(v))
        return out

    try:
        before = snapshot()
        time.sleep(interval)
        after = snapshot()
    except (OSError, ValueError, IndexError):
        return float(len(cpus))
    free = 0.0
    for cpu in before.keys() & after.keys():
        idle, total = after[cpu][0] - before[cpu][0], after[cpu][1] - before[cpu][1]
        free += idle / total if total > 0 else 1.0
    return free


def _cgroup_cpu_limit() -> Optional[float]:
    """The cgroup v2 CPU quota in cores (``cpu.max``), if one is set."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def use_free_cores(interval: float = 0.1) -> int:
    """Set torch's intra-op threads to the CPUs free right now (at least 1); return the count.

    torch starts one OpenMP thread per core. On a machine other jobs keep busy, every parallel
    region then waits for threads the scheduler has not run yet (and by default they spin
    while waiting): measured 3-12x slower than one thread. A user's ``OMP_NUM_THREADS`` is
    kept as it is. ``src/__init__.py`` also shortens libgomp's spinning (``GOMP_SPINCOUNT``)
    for load that starts while a merge runs.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = min(cores, max(1, int(free_cores(interval) + 0.5)))
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    torch.set_num_threads(n)
    return n
