"""hydra/launcher=stacked: a sweep's jobs of one shape train as one stack of trials in one process (gruexp.stack).

The local launcher's slots, threads and GPU pool, with a unit of work that is a group of jobs: those whose configs
differ only in stackable values (gruexp.stack.group_key), at most `trials` of them. Each trial is still a Hydra job
of its own (its folder, .hydra/, log, JobReturn), run by Hydra's own run_job in the stack's thread for it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, run_job, setup_globals
from omegaconf import DictConfig, open_dict

from hydra_plugins.gruexp_plugins.launcher import (
    GruexpLocalConf,
    LocalLauncher,
    _announcing,
    _failed,
    _returned,
)

log = logging.getLogger("gruexp.launch")


class StackedLauncher(LocalLauncher):
    """LocalLauncher whose units are stacks of jobs (see the module's doc)."""

    def __init__(self, trials: int | None = None, **params: Any) -> None:
        if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 1):
            print(
                f"Error: hydra.launcher.trials={trials} must be an integer >= 1 (null: every job of a group in one "
                "stack)",
                file=sys.stderr,
            )
            raise SystemExit(2)
        super().__init__(**params)
        self.trials = trials

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Stacks one at a time (array_parallelism 1, no GPU list) run in this process, which has imported all that
        a trial needs (a new process would spend seconds importing it again); otherwise each in a process of its
        own, side by side as the local launcher's jobs."""
        if self.array_parallelism != 1 or self.gpus is not None:
            return super().launch(job_overrides, initial_job_idx)
        import torch

        sweep_dir = self._make_sweep_dir()
        threads = torch.get_num_threads()
        why = f"the sweep's own process, {threads} torch thread{'s' * (threads != 1)}"
        returns: dict[int, JobReturn] = {}
        for unit in self._units(job_overrides):
            jobs = [(initial_job_idx + k, list(job_overrides[k])) for k in unit]
            started = self._say_started(jobs)
            with _sweep_state():
                ended = self.run_stack(jobs, None, why, "this process's")
            returns.update(zip((idx for idx, _ in jobs), ended, strict=True))
            self._say_ended(jobs, sweep_dir, started)
        return [returns[initial_job_idx + k] for k in range(len(job_overrides))]

    def _units(self, job_overrides: Sequence[Sequence[str]]) -> list[list[int]]:
        from gruexp import stack  # here: plugin discovery imports this module, and torch is seconds of CPU

        return stack.groups([stack.group_key(o) for o in job_overrides], self.trials)

    def _unit_name(self, jobs: list[tuple[int, list[str]]]) -> str:
        if len(jobs) == 1:
            return f"job {jobs[0][0]}"
        return f"stack of jobs {','.join(str(idx) for idx, _ in jobs)}"

    def _submit(self, executor: Any, jobs: list[tuple[int, list[str]]], state: Any, why: str, lent: str) -> Any:
        return executor.submit(self.run_stack, jobs, state, why, lent)

    def _results(self, job: Any, jobs: list[tuple[int, list[str]]]) -> list[JobReturn]:
        value = _returned(job, jobs[0][0])
        if isinstance(value, BaseException):
            return [_failed(overrides, value) for _, overrides in jobs]
        return value

    def run_stack(
        self,
        jobs: list[tuple[int, list[str]]],
        singleton_state: dict[type, Singleton] | None,
        threads_why: str,
        gpus_why: str,
    ) -> list[JobReturn]:
        """Every job as a trial of one gruexp.stack.Stack; their JobReturns in order. In a process of the stack's
        own, with the sweep's `singleton_state`; None: in the sweep's process."""
        import submitit

        from gruexp import stack

        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        if singleton_state is not None:
            Singleton.set_state(singleton_state)
            setup_globals()
            job_id = submitit.JobEnvironment().job_id
        else:
            job_id = str(os.getpid())

        def trial(idx: int, overrides: list[str]) -> JobReturn:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sweep_config.hydra.job) as job:
                job.id = f"{job_id}_{idx}"
                job.num = idx
            task = _announcing(self.task_function, idx, threads_why, gpus_why)
            return run_job(
                hydra_context=self.hydra_context,
                task_function=task if singleton_state is not None else _to_log_only(task),
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )

        ended = stack.Stack().run([functools.partial(trial, idx, overrides) for idx, overrides in jobs])
        return [r if isinstance(r, JobReturn) else _failed(o, r) for r, (_, o) in zip(ended, jobs, strict=True)]


_CONSOLE_LOGGERS = ("", "lightning.pytorch", "lightning.fabric")  # root (Hydra's job logging) and Lightning's own


def _to_console(handler: logging.Handler) -> bool:
    return getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _to_log_only(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """`task` logging to its job's log file only: trials in the sweep's own process would print every line of
    every trial to the sweep's console, where the local launcher's jobs print nothing (their logs hold it)."""

    def quiet(cfg: DictConfig) -> Any:
        for name in _CONSOLE_LOGGERS:
            lg = logging.getLogger(name)
            lg.handlers = [h for h in lg.handlers if not _to_console(h)]
        return task(cfg)

    return quiet


@contextlib.contextmanager
def _sweep_state() -> Iterator[None]:
    """The sweep's own log handlers and environment back after its trials: Hydra's run_job configures logging for
    each job and sets its hydra.job.env_set (Optuna's trial) around it, and trials that overlap restore each
    other's variables out of order."""
    saved = {name: list(logging.getLogger(name).handlers) for name in _CONSOLE_LOGGERS}
    environ = dict(os.environ)
    try:
        yield
    finally:
        for name, handlers in saved.items():
            logging.getLogger(name).handlers = handlers
        os.environ.clear()
        os.environ.update(environ)


@dataclass
class GruexpStackedConf(GruexpLocalConf):
    """The schema of hydra/launcher=stacked: the local launcher's fields plus `trials`."""

    _target_: str = "hydra_plugins.gruexp_plugins.stacked.StackedLauncher"
    trials: Any = None  # at most this many jobs a stack (null: every job of a group)


ConfigStore.instance().store(group="hydra/launcher", name="gruexp_stacked", node=GruexpStackedConf, provider="gruexp")
