"""gruexp's Optuna sweeper (`hparams_search=optuna`): Optuna >= 4 through its ask/tell API.

Written here because hydra-optuna-sweeper's releases pin optuna<3, never hand the trial to the job (no pruning)
and restart a study's trial count. This sweeper keeps that plugin's search-space syntax (choice, range, interval,
tag(log, interval)) and adds:
- storage: a journal file in the sweep folder by default (file-locked: parallel jobs may share it), or any URL;
- batches: ask n_jobs trials, launch them together (hydra/launcher=local or slurm run them side by side), tell;
- pruning: each job finds its study and trial in GRUEXP_OPTUNA_TRIAL (gruexp.search.OptunaPruning reports to it);
- resume: n_trials counts the study's finished trials; trials left RUNNING by a dead sweeper fail and are retried;
- identity: the study is named after its fixed overrides and search space, or refused when a named one differs.
"""

import hashlib
import json
import logging
import math
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from gruexp import UserError
from gruexp.console import brief_overrides
from gruexp.studies import TRIAL_ENV, check_journal, check_storage, make_pruner, open_storage

log = logging.getLogger("gruexp.search")

# Overrides that change how a trial runs, not what it computes: left out of the study's name.
NOT_IN_STUDY_NAME = [
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "logger",
    "tags",
]


# trials asked together for hydra/launcher=stacked when neither n_jobs nor hydra.launcher.trials says: a stack's worth
STACKED_BATCH = 8


@dataclass
class GruexpOptunaSweeperConf:
    """hydra.sweeper for hparams_search=optuna (conf/hparams_search/optuna.yaml sets the search)."""

    _target_: str = "hydra_plugins.gruexp_plugins.optuna_sweeper.GruexpOptunaSweeper"
    _recursive_: bool = False  # the sweeper builds the sampler itself (its seed moves on when a study resumes)
    study_name: str | None = None  # null: gruexp-<hash of the fixed overrides and the search space>
    storage: str | None = None  # null: <sweep folder>/optuna.journal; a journal file path or an Optuna storage URL
    direction: str = "minimize"
    n_trials: int = 20  # finished trials of the whole study: running the command again continues it
    n_jobs: int | None = None  # trials per batch; null: the launcher's array_parallelism (local, slurm), else 1
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    pruner: Any = "none"  # median | hyperband | none | {_target_: optuna.pruners.X, ...}
    monitor: str = "val/ppl"  # what a job reports after every validation (the pruner's input)
    max_retry: int = 1  # retries of a trial whose sweeper died while it ran
    not_in_study_name: list[str] = field(default_factory=lambda: list(NOT_IN_STUDY_NAME))
    params: dict[str, str] | None = None  # the search space, `key: choice(...)` / `interval(...)` / ...


ConfigStore.instance().store(
    group="hydra/sweeper", name="gruexp_optuna", node=GruexpOptunaSweeperConf, provider="gruexp"
)


def _refuse(message: str) -> None:
    """A user error in a sweep's setup: one line and exit status 2 (SystemExit passes through Hydra's reporting)."""
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def distribution(override: Override) -> BaseDistribution | None:
    """The Optuna distribution of a sweep override (hydra-optuna-sweeper's mapping), None for a fixed value."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        # as hydra-optuna-sweeper: range(start, stop, step) samples start..stop, stop included
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{override.input_line}: the Optuna sweeper takes choice, range and interval sweeps")


def search_space(arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Split overrides into the search space (name -> distribution) and the fixed overrides (name -> value)."""
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(arguments):
        key = override.get_key_element()
        dist = distribution(override)
        # the last word on a key wins: `model.hidden_size=16` on the command line fixes a key that params searches
        if dist is None:
            fixed[key] = override.get_value_element_as_str()
            space.pop(key, None)
        else:
            space[key] = dist
            fixed.pop(key, None)
    return space, fixed


def study_identity(
    space: dict[str, BaseDistribution], fixed: dict[str, str], direction: str, ignore: Sequence[str]
) -> dict[str, Any]:
    """What makes a study distinct: its fixed overrides (less `ignore`), search space and direction."""

    def ignored(key: str) -> bool:
        k = key.lstrip("+~")
        return any(k == p or k.startswith(p + ".") for p in ignore)

    return {
        "fixed": {k: v for k, v in sorted(fixed.items()) if not ignored(k)},
        "space": {k: json.loads(optuna.distributions.distribution_to_json(d)) for k, d in sorted(space.items())},
        "direction": direction,
    }


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def _describe(identity: dict[str, Any]) -> str:
    fixed = " ".join(f"{k}={v}" for k, v in identity["fixed"].items()) or "(none)"
    return f"fixed {fixed}; searching {', '.join(identity['space']) or '(nothing)'}"


def _process_token(pid: int) -> str:
    """host:pid:start time: names a live process unambiguously (a pid alone may be reused)."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "?"
    return f"{socket.gethostname()}:{pid}:{start}"


def _owner_alive(owner: str | None) -> bool:
    """Whether the sweeper that asked a RUNNING trial still runs. Unknown (another host) counts as alive."""
    if not owner:
        return False
    host, pid, _ = owner.split(":", 2)
    if host != socket.gethostname():
        return True  # cannot tell from here: leave its trial alone
    return _process_token(int(pid)) == owner


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """Numbers of the trials that a later trial retries (Optuna's retry callback records them)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def finished(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards n_trials: complete, pruned or failed, but not a failure that is retried."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state.is_finished() and t.number not in retried]


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The finished trials and those that another live sweeper runs now (several sweepers may share a study)."""
    return finished(trials) + [t for t in trials if t.state == TrialState.RUNNING]


class GruexpOptunaSweeper(Sweeper):
    """Hydra sweeper on Optuna's ask/tell API: ask a batch of trials, launch them as jobs, tell their results."""

    def __init__(
        self,
        study_name: str | None,
        storage: str | None,
        direction: str,
        n_trials: int,
        n_jobs: int | None,
        sampler: Any,
        pruner: Any,
        monitor: str,
        max_retry: int,
        not_in_study_name: list[str],
        params: dict[str, str] | None,
    ) -> None:
        self.study_name, self.storage, self.direction = study_name, storage, direction
        self.n_trials, self.n_jobs, self.monitor, self.max_retry = n_trials, n_jobs, monitor, max_retry
        self.sampler_cfg = sampler
        self.pruner_cfg = OmegaConf.to_container(pruner) if isinstance(pruner, DictConfig) else pruner
        self.not_in_study_name = list(not_in_study_name)
        self.params = params or {}
        self.owner = _process_token(os.getpid())

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created ...": the sweeper says it
        # name the study before the launcher reads hydra.sweep.dir (submitit resolves its folder from it at once)
        arguments = [f"{k}={v}" for k, v in self.params.items()] + list(config.hydra.overrides.task)
        self.space, self.fixed = search_space(arguments)
        if not self.space:
            _refuse("hparams_search=optuna has nothing to search: give hydra.sweeper.params or a choice()/interval()")
        self.identity = study_identity(self.space, self.fixed, self.direction, self.not_in_study_name)
        self.name = self._name_study(self.identity)
        self._check_settings()
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        # trials launched together: the launcher runs array_parallelism jobs at once (local, slurm); basic runs one;
        # the stacked launcher trains a batch as one stack (`trials` at most)
        launcher = config.hydra.launcher
        if "trials" in launcher:
            if self.n_jobs == 1:
                _refuse(
                    "hydra.sweeper.n_jobs=1 asks Optuna for one trial at a time, so hydra/launcher=stacked has none to "
                    "stack with it: raise hydra.sweeper.n_jobs or leave it null"
                )
            self.batch_size = self.n_jobs or int(launcher.trials or STACKED_BATCH)
        else:
            self.batch_size = self.n_jobs or int(launcher.get("array_parallelism", 1) or 1)

    def _check_settings(self) -> None:
        """The sweeper's own values, before anything is written: a refused search leaves no multirun.yaml, no
        journal, no folder."""
        if not isinstance(self.n_trials, int) or isinstance(self.n_trials, bool) or self.n_trials < 1:
            _refuse(f"hydra.sweeper.n_trials must be an integer >= 1 (the study's trials), got {self.n_trials}")
        try:
            make_pruner(self.pruner_cfg)
            if self.storage:
                check_storage(str(self.storage))
            else:
                check_journal(Path(str(self.config.hydra.sweep.dir)).absolute() / "optuna.journal")
        except UserError as e:
            _refuse(str(e))

    # --- the study ---------------------------------------------------------------------------------------------

    def _name_study(self, identity: dict[str, Any]) -> str:
        """The study's name: the configured one, or one derived from its identity; put into the sweep folder."""
        name = self.study_name or f"gruexp-{identity_hash(identity)}"
        with read_write(self.config.hydra), open_dict(self.config.hydra):  # sweep.dir interpolates the name
            self.config.hydra.sweeper.study_name = name
        return name

    def _open_study(self, name: str, identity: dict[str, Any]) -> tuple[optuna.Study, str]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        spec = self.storage or str(sweep_dir / "optuna.journal")
        storage = open_storage(spec)
        try:
            existing = optuna.load_study(study_name=name, storage=storage).trials
        except KeyError:
            existing = []
        # trial k runs in folder k: a study with fewer trials than the folder holds (another storage, a lost
        # journal) would run its next trials over those runs
        taken = sorted(
            int(p.name)
            for p in sweep_dir.iterdir()
            if p.name.isdigit() and int(p.name) >= len(existing) and p.is_dir() and any(p.iterdir())
        )
        if taken:
            _refuse(
                f"{sweep_dir} holds the runs of trials {', '.join(map(str, taken[:3]))}{', ...' * (len(taken) > 3)} "
                f"but study {name} in {spec} has {len(existing)} trials: its next trials would overwrite them; give "
                "the hydra.sweeper.storage those trials were told to, or another hydra.sweep.dir"
            )
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # as Hydra's sweepers do; report.py reads it
        sampler_cfg = dict(OmegaConf.to_container(OmegaConf.create(self.sampler_cfg)))
        if existing and sampler_cfg.get("seed") is not None:
            # a resumed study would otherwise draw its first trials' params again from the same seed
            sampler_cfg["seed"] = int(sampler_cfg["seed"]) + len(existing)
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            sampler=instantiate(sampler_cfg),
            pruner=make_pruner(self.pruner_cfg),
            direction=self.direction,
            load_if_exists=True,
        )
        theirs = study.user_attrs.get("identity")
        if theirs is None and not study.trials:
            study.set_user_attr("identity", identity)  # shown in optuna-dashboard too
            study.set_user_attr("identity_hash", identity_hash(identity))
        elif theirs != identity:
            _refuse(
                f"study {name} in {spec} holds another search ("
                + (_describe(theirs) if theirs else "made elsewhere")
                + f"), this command's is {_describe(identity)}: set another hydra.sweeper.study_name, or none to "
                "get a name derived from the search"
            )
        return study, spec

    def _fail_stale(self, study: optuna.Study) -> None:
        """Fail the trials that a dead sweeper left RUNNING and enqueue them again (at most max_retry times).

        Optuna's own fail_stale_trials needs a heartbeat, which JournalStorage has not and ask/tell would have to
        send from the sweeper; a trial records the sweeper process that asked it instead (user attr `sweeper`).
        """
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if _owner_alive(t.user_attrs.get("sweeper")):
                    continue
                study.tell(t.number, state=TrialState.FAIL)
                failed = study._storage.get_trial(t._trial_id)
                retry(study, failed)
                again = len(RetryHeartbeatStaleTrialCallback.retry_history(failed)) < self.max_retry
                log.warning(
                    "trial %d was left running by a sweep that ended: failed%s",
                    t.number,
                    ", retried with the same params" if again else f", not retried ({self.max_retry} retries done)",
                )

    # --- the sweep ---------------------------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        space, fixed, identity, name = self.space, self.fixed, self.identity, self.name  # from `arguments`, in setup
        study, storage = self._open_study(name, identity)
        self._fail_stale(study)
        done = len(finished(study.trials))
        log.info(
            "study %s (%s), storage %s: %d trials finished, %d to go",
            name,
            _describe(identity),
            storage,
            done,
            max(0, self.n_trials - done),
        )
        while (to_go := self.n_trials - len(counted(study.trials))) > 0:
            trials = [study.ask(space) for _ in range(min(self.batch_size, to_go))]
            for trial in trials:
                trial.set_user_attr("sweeper", self.owner)
            batch = [(t, self._job_overrides(t, fixed, name, storage)) for t in trials]
            if len(batch) > 1:  # a config that does not compose would abort the launch of the whole batch
                batch = [(t, o) for t, o in batch if self._composes(study, t, o)]
            if not batch:
                continue
            try:
                returns = self.launcher.launch([o for _, o in batch], initial_job_idx=batch[0][0].number)
            except Exception as e:
                if len(batch) > 1:
                    raise  # which job failed is unknown: the trials stay RUNNING and are retried on the next run
                returns = [JobReturn(status=JobStatus.FAILED, _return_value=e)]  # e.g. a config that did not compose
            for (trial, _), ret in zip(batch, returns, strict=True):
                self._tell(study, trial, ret)
        self._write_results(study)

    def _job_overrides(self, trial: optuna.Trial, fixed: dict[str, str], name: str, storage: str) -> list[str]:
        """The trial's params, the fixed overrides, its folder (= trial number) and its trial for the job."""
        spec = {
            "study": name,
            "storage": storage,
            "trial_id": trial._trial_id,
            "number": trial.number,
            "pruner": self.pruner_cfg,
            "monitor": self.monitor,
        }
        quoted = json.dumps(spec, separators=(",", ":")).replace("\\", "\\\\").replace("'", "\\'")
        return [
            *(f"{k}={v}" for k, v in trial.params.items()),
            *(f"{k}={v}" for k, v in fixed.items()),
            f"hydra.sweeper.study_name={name}",
            f"hydra.sweep.subdir={trial.number}",
            f"++hydra.job.env_set.{TRIAL_ENV}='{quoted}'",
        ]

    def _composes(self, study: optuna.Study, trial: optuna.Trial, overrides: list[str]) -> bool:
        """Whether the trial's config composes (Hydra's validate_batch_is_legal, per trial): else the trial FAILs."""
        try:
            self.hydra_context.config_loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)
        except Exception as e:  # a bad value in the search space fails this trial, not the search
            log.warning("trial %d failed: %s", trial.number, str(e).strip().splitlines()[0])
            study.tell(trial, state=TrialState.FAIL)
            return False
        return True

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn) -> None:
        """Tell the job's outcome: FAIL when it raised or returned no finite value, PRUNED, or its value."""
        if ret.status != JobStatus.COMPLETED:
            error = str(ret._return_value).strip().splitlines()
            log.warning("trial %d failed: %s", trial.number, error[0] if error else type(ret._return_value).__name__)
            study.tell(trial, state=TrialState.FAIL)
            return
        pruned_epoch = study._storage.get_trial(trial._trial_id).user_attrs.get("pruned_epoch")
        if pruned_epoch is not None:
            log.info("trial %d pruned at epoch %d", trial.number, pruned_epoch)
            study.tell(trial, state=TrialState.PRUNED)
            return
        try:
            value = float(ret.return_value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            log.warning("trial %d failed: its job returned %r, not a finite objective", trial.number, ret.return_value)
            study.tell(trial, state=TrialState.FAIL)
            return
        study.tell(trial, value)

    def _write_results(self, study: optuna.Study) -> None:
        """Log the study's best trial and write optimization_results.yaml (as hydra-optuna-sweeper did)."""
        states = [t.state for t in finished(study.trials)]
        counts = ", ".join(f"{states.count(s)} {s.name.lower()}" for s in TrialState if states.count(s))
        if TrialState.COMPLETE not in states and TrialState.PRUNED not in states:
            # a sweep without a result must not end as if it had one
            print(f"Error: every trial of study {study.study_name} failed: see their train.log files", file=sys.stderr)
            raise SystemExit(1)
        if TrialState.COMPLETE not in states:
            log.warning("study %s: %s; no trial completed, so no best trial", study.study_name, counts)
            return
        best = study.best_trial
        log.info(
            "study %s: %s; best trial %d, %s %.4f: %s",
            study.study_name,
            counts,
            best.number,
            self.monitor,
            best.value,
            brief_overrides([f"{k}={v}" for k, v in best.params.items()]),  # optimization_results.yaml: exact
        )
        results = {
            "name": "optuna",
            "study_name": study.study_name,
            "best_trial": best.number,
            "best_params": best.params,
            "best_value": best.value,
        }
        OmegaConf.save(OmegaConf.create(results), Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml")
