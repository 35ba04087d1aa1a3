"""CPU threads per process when several processes share one machine: sweep jobs side by side, DDP ranks on CPU.

torch starts one intra-op thread per core in every process: k processes on c cores then run k*c threads, and
OpenMP's spin-waits make them many times slower than k processes of c//k threads each (15x on 2 cores, issue 12).
Kept free of torch imports: the Hydra launcher plugin uses it in the sweep's parent process.
"""

from __future__ import annotations

import os
from pathlib import Path

# Read by OpenMP and MKL when torch loads them: they must be in the environment before the process starts.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), lowered to a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def user_threads() -> str | None:
    """OMP_NUM_THREADS as the user set it (respected as is), or None when it is unset or empty."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return value or None


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """`cores // processes`, at least 1: each of `processes` processes running side by side gets its share."""
    return max(1, (cores if cores is not None else usable_cores()) // max(1, processes))
