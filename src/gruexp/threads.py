"""CPU threads per process when several processes share one machine: sweep jobs side by side, DDP ranks on CPU.

torch starts one intra-op thread per core in every process: k processes on c cores then run k*c threads, and
OpenMP's spin-waits make them many times slower than k processes of c//k threads each (docs/multi-gpu.md).
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


def busy_machine(threads: int | None = None) -> str | None:
    """A line when other work already fills the machine's cores as a run starts, with the slowdown to expect.

    The load average counts the runnable processes of the whole machine: with L of them on C cores, a run of k
    threads gets about C / (L + k) of a core each instead of one, so it runs about (L + k) / C times slower than
    on an idle machine (README's times); below 1.3x nothing is said.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average (Windows)
        return None
    cores, k = os.cpu_count() or 1, threads or torch_threads()
    slowdown = (load + k) / cores
    if load < cores or slowdown < 1.3:
        return None
    return (
        f"this machine is busy: load average {load:.1f} on {cores} cores before this run started; expect it to "
        f"run about {slowdown:.1f}x slower than on an idle machine"
    )


def torch_threads() -> int:
    """The threads torch's CPU kernels use in this process."""
    import torch

    return torch.get_num_threads()
