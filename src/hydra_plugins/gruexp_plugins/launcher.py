"""hydra/launcher=local: submitit's local executor, N jobs side by side, each with its share of the cores and its GPUs.

What the plugin's own `submitit_local` lacks (submitit's LocalExecutor has none of it):
- a bound: at most `array_parallelism` jobs run at once, a new one starting as soon as one ends;
- CPU threads: each job gets `cores // (jobs side by side x its trainer.devices)` torch threads (at least 1),
  through OMP_NUM_THREADS/MKL_NUM_THREADS set before the job's Python starts; an OMP_NUM_THREADS of the user wins;
- GPUs: submitit gives every job the same CUDA_VISIBLE_DEVICES (empty, i.e. no GPU, unless gpus_per_node is set).
  Here a lock-protected pool hands each job `trainer.devices` GPUs of its own and takes them back when its process
  ends, crashed or not (job.num % N would put two jobs on one GPU as soon as jobs end out of order), and
  array_parallelism is capped at what the pool can serve at once. On a machine without GPUs nothing changes.
The variables reach the job through submitit's own `setup` commands (shell lines run before the job's Python).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf

from gruexp.console import brief_overrides
from gruexp.sweeps import read_summary
from gruexp.threads import THREAD_VARS, threads_per_process, usable_cores, user_threads

log = logging.getLogger("gruexp.launch")

_GPU_ACCELERATORS = ("auto", "gpu", "cuda")
_POLL_S = 0.2  # how often a job's process is checked for its end (submitit's own wait polls once a second)


class DevicePool:
    """GPU ids lent to running jobs: `acquire(k)` waits until k are free and takes them, `release` gives them back."""

    def __init__(self, ids: Sequence[str]):
        self.ids = [str(i) for i in ids]
        self._free = list(self.ids)
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self.ids)

    def acquire(self, k: int) -> list[str]:
        """Take k free ids (the lowest first), waiting while fewer are free; k larger than the pool is an error."""
        if k > len(self.ids):
            raise ValueError(f"{k} GPUs wanted from a pool of {len(self.ids)}")
        with self._cond:
            self._cond.wait_for(lambda: len(self._free) >= k)
            taken, self._free = self._free[:k], self._free[k:]
            return taken

    def release(self, ids: Sequence[str]) -> None:
        """Give ids back (in the pool's order, so the next job takes the lowest free one) and wake the waiters."""
        with self._cond:
            back = set(self._free) | set(ids)
            self._free = [i for i in self.ids if i in back]
            self._cond.notify_all()

    def free(self) -> list[str]:
        with self._cond:
            return list(self._free)


def visible_gpus() -> list[str]:
    """The GPUs this process may hand out: CUDA_VISIBLE_DEVICES's entries when set, else every device torch counts."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = []
        for entry in (e.strip() for e in env.split(",")):
            if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry ("-1" hides all)
                break
            ids.append(entry)
        return ids
    import torch  # the sweep's parent (gruexp.train) has imported it already

    return [str(i) for i in range(torch.cuda.device_count())]


def job_processes(cfg: DictConfig, gpus: int) -> tuple[int, bool]:
    """(processes, wants GPUs) of one job from its `trainer` config: DDP runs trainer.devices processes."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    devices = OmegaConf.select(cfg, "trainer.devices", default=1)
    on_gpu = gpus > 0 and accelerator in _GPU_ACCELERATORS
    if OmegaConf.is_config(devices):
        devices = OmegaConf.to_container(devices)
    if isinstance(devices, str):
        devices = devices.strip()
        if devices.lstrip("-").isdigit():
            devices = int(devices)
        elif devices == "auto":
            devices = 1
        else:  # "0,1": device indices
            devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, list | tuple):
        n = len(devices)
    elif isinstance(devices, int) and devices == -1:  # Lightning's "all devices"
        n = gpus if on_gpu else usable_cores()
    else:
        n = int(devices)
    return max(1, n), on_gpu


class LocalLauncher(BaseSubmititLauncher):
    """submitit's local launcher with a bound on jobs side by side, CPU threads per job and a GPU pool."""

    _EXECUTOR = "local"

    def __init__(self, array_parallelism: int = 0, gpus: Sequence[Any] | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.array_parallelism = array_parallelism
        if OmegaConf.is_config(gpus):
            gpus = OmegaConf.to_container(gpus, resolve=True)
        if gpus is not None and not isinstance(gpus, list | tuple):
            fix = "write e.g. 'hydra.launcher.gpus=[0,1]'"
            print(f"Error: hydra.launcher.gpus={gpus} is not a list of GPU ids: {fix}", file=sys.stderr)
            raise SystemExit(2)
        self.gpus = None if gpus is None else [str(g) for g in gpus]

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict[type, Singleton],
        threads_why: str = "",
        gpus_why: str = "no GPU",
    ) -> JobReturn:
        """In the job's process: run the Hydra job, first logging (into its log) the threads and GPUs it got."""
        self.task_function = _announcing(self.task_function, job_num, threads_why, gpus_why)
        return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)

    def _executor(self, setup: list[str]) -> Any:
        """A submitit local executor for one job, parameters as the plugin's launcher passes them, plus `setup`."""
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="local", folder=params.pop("submitit_folder"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"local_{k}": v for k, v in params.items()})
        executor.update_parameters(local_setup=setup)
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        num_jobs = len(job_overrides)
        sweep_dir = self._make_sweep_dir()

        pool = DevicePool(self.gpus if self.gpus is not None else visible_gpus())
        loader = self.hydra_context.config_loader
        wants = [job_processes(loader.load_sweep_config(self.config, list(o)), len(pool)) for o in job_overrides]
        too_many = [(n, on_gpu) for n, on_gpu in wants if on_gpu and n > len(pool)]
        if too_many:
            print(
                f"Error: a job wants trainer.devices={too_many[0][0]} GPUs but hydra/launcher=local has {len(pool)} "
                f"({', '.join(pool.ids)}): lower trainer.devices or list more in hydra.launcher.gpus",
                file=sys.stderr,
            )
            raise SystemExit(2)

        plan = self._units(job_overrides)
        side_by_side = min(self.array_parallelism if self.array_parallelism > 0 else len(plan), len(plan))
        if all(on_gpu for _, on_gpu in wants):
            fit = len(pool) // min(n for n, _ in wants)
            if fit < side_by_side:
                log.info("array_parallelism %d capped at %d: %d GPUs (%s)", side_by_side, fit, len(pool), pool.ids)
                side_by_side = fit

        cores, fixed = usable_cores(), user_threads()
        units = []
        for unit in plan:
            processes, on_gpu = wants[unit[0]]
            if fixed is None:
                threads = threads_per_process(side_by_side * processes, cores)
                each = f"{processes} process{'es' * (processes > 1)}"
                why = f"{cores} cores // ({side_by_side} jobs side by side x {each})"
                exports = {var: str(threads) for var in THREAD_VARS}
            else:
                why, exports = f"OMP_NUM_THREADS={fixed} set by you", {}
            jobs = [(initial_job_idx + k, list(job_overrides[k])) for k in unit]
            units.append((jobs, processes if on_gpu else 0, exports, why))

        submit_lock = threading.Lock()
        state = Singleton.get_state()

        stopping = threading.Event()  # set on Ctrl+C: slots still waiting for GPUs start nothing more

        def run(jobs: list[tuple[int, list[str]]], num_gpus: int, exports: dict[str, str], why: str) -> Any:
            """One slot: take the unit's GPUs, start it, wait for its process to end, give the GPUs back."""
            gpus = pool.acquire(num_gpus) if num_gpus else []
            try:
                if stopping.is_set():
                    return None
                env = {**exports, **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if num_gpus else {})}
                setup = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
                lent = f"GPUs {','.join(gpus)} of the pool {','.join(pool.ids)}" if num_gpus else "no GPU"
                with submit_lock:  # one submission at a time: the launcher is pickled into each job's folder
                    job = self._submit(self._executor(setup), jobs, state, why, lent)
                started = self._say_started(jobs)
                while not job.done():
                    time.sleep(_POLL_S)
                self._say_ended(jobs, sweep_dir, started)
                return job
            finally:
                pool.release(gpus)  # the unit's process has ended (or never started): its GPUs are free

        slots = ThreadPoolExecutor(max_workers=max(1, side_by_side), thread_name_prefix="gruexp-job")
        try:
            futures = [slots.submit(run, *unit) for unit in units]
            ended = [f.result() for f in futures]
        except BaseException:  # Ctrl+C (which the running jobs get too): start no job that has not started yet
            stopping.set()
            slots.shutdown(wait=False, cancel_futures=True)
            raise
        slots.shutdown()
        returns = {}
        for job, (jobs, *_) in zip(ended, units, strict=True):
            returns.update(zip((idx for idx, _ in jobs), self._results(job, jobs), strict=True))
        return [returns[initial_job_idx + k] for k in range(num_jobs)]

    def _make_sweep_dir(self) -> Path:
        """hydra.sweep.dir, made (with hydra.sweep.mode) and said."""
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit 'local' sweep output dir : %s", sweep_dir)
        return sweep_dir

    def _units(self, job_overrides: Sequence[Sequence[str]]) -> list[list[int]]:
        """The sweep's jobs (indices into job_overrides) as the units that each run in a process: one job each."""
        return [[k] for k in range(len(job_overrides))]

    def _unit_name(self, jobs: list[tuple[int, list[str]]]) -> str:
        return f"job {jobs[0][0]}"

    def _say_started(self, jobs: list[tuple[int, list[str]]]) -> float:
        """`job 3 started: <its overrides>` (a stack: all of its jobs'); returns when, for _say_ended."""
        log.info("%s started: %s", self._unit_name(jobs), "; ".join(brief_overrides(o) for _, o in jobs))
        return time.monotonic()

    def _say_ended(self, jobs: list[tuple[int, list[str]]], sweep_dir: Path, started: float) -> None:
        """`job 3 ended: completed, val/ppl 5.43 (12 s)`, from each job's summary.json."""
        outcomes = ", ".join(_outcome(sweep_dir / str(idx)) for idx, _ in jobs)
        log.info("%s ended: %s (%.0f s)", self._unit_name(jobs), outcomes, time.monotonic() - started)

    def _submit(self, executor: Any, jobs: list[tuple[int, list[str]]], state: Any, why: str, lent: str) -> Any:
        """Submit a unit's process: here one Hydra job, run by `__call__`."""
        (idx, overrides) = jobs[0]
        return executor.submit(self, overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", state, why, lent)

    def _results(self, job: Any, jobs: list[tuple[int, list[str]]]) -> list[JobReturn]:
        """The JobReturns of a unit's ended process."""
        (idx, overrides) = jobs[0]
        return [_result(job, idx, overrides)]


def _outcome(folder: Path) -> str:
    """`completed, val/ppl 5.43` from a job's summary.json; what is known without one."""
    summary = read_summary(folder)
    if summary is None:
        return f"no summary.json in {folder}"
    ppl = summary.get("val_ppl")
    return f"{summary.get('status', '?')}, val/ppl {ppl:.3f}" if isinstance(ppl, float) else summary.get("status", "?")


def _result(job: Any, idx: int, overrides: list[str]) -> JobReturn:
    """The JobReturn of an ended submitit job; a FAILED one, naming its log, for a process that died without one."""
    value = _returned(job, idx)
    return _failed(overrides, value) if isinstance(value, BaseException) else value


def _returned(job: Any, idx: int) -> Any:
    """What an ended submitit job's function returned; the error, naming its log, where its process gave nothing."""
    try:
        if job.paths.result_pickle.exists():
            return job.results()[0]  # Hydra's own JobReturn (or a stack's list); FAILED with what the task raised
        # No result file after the process ended: killed or exited early (submitit would wait 15 s, then raise).
        tail = job.stderr() or ""
        return RuntimeError(
            f"job #{idx} ended without a result ({job.state}): see {job.paths.stderr}"
            + (f"\n{tail[-2000:]}" if tail.strip() else "")
        )
    except Exception as e:  # submitit's FailedJobError: the job raised past Hydra (e.g. SystemExit)
        return e


def _failed(overrides: list[str], error: BaseException) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret.return_value = error
    return ret


def _announcing(
    task: Callable[[DictConfig], Any], job_num: int, threads_why: str, gpus_why: str
) -> Callable[[DictConfig], Any]:
    """`task`, logging first (Hydra has set up the job's log by then) the torch threads and GPUs the job sees."""

    def announced(cfg: DictConfig) -> Any:
        import torch

        threads = torch.get_num_threads()
        log.info(
            "job %d: %d torch thread%s (%s); CUDA_VISIBLE_DEVICES=%s (%s)",
            job_num,
            threads,
            "s" * (threads != 1),
            threads_why,
            os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            gpus_why,
        )
        return task(cfg)

    return announced


@dataclass
class GruexpLocalConf(LocalQueueConf):
    """The schema of hydra/launcher=local: the plugin's local launcher fields plus `array_parallelism` and `gpus`."""

    _target_: str = "hydra_plugins.gruexp_plugins.launcher.LocalLauncher"
    array_parallelism: int = 2
    gpus: Any = None  # null: every GPU this process sees; [] none; [0,2] these (ids as CUDA_VISIBLE_DEVICES takes)


ConfigStore.instance().store(group="hydra/launcher", name="gruexp_local", node=GruexpLocalConf, provider="gruexp")
