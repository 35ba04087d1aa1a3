"""The job side of an Optuna search (hparams_search=optuna): open this job's trial, report, prune.

The sweeper (hydra_plugins/gruexp_plugins/optuna_sweeper.py) asks Optuna for a trial and hands the job its study,
storage and trial id in the environment variable GRUEXP_OPTUNA_TRIAL (through `hydra.job.env_set`, so that every
launcher passes it on, DDP ranks included). `OptunaPruning` reports the monitored metric after every validation
and stops the job when the study's pruner says so; the sweeper then tells the trial PRUNED.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import torch

from gruexp import UserError

log = logging.getLogger("gruexp.search")

TRIAL_ENV = "GRUEXP_OPTUNA_TRIAL"
PRUNERS = ("median", "hyperband", "none")


def open_storage(spec: str) -> optuna.storages.BaseStorage | str:
    """An Optuna storage from a URL (sqlite:///..., postgresql://..., passed to Optuna as is) or a journal file path.

    A journal file (JournalFileBackend) needs no database server and locks the file for every write, so parallel
    jobs and sweepers on one filesystem can share it.
    """
    if "://" in spec:
        return spec
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(os.path.abspath(spec)))


def check_storage(spec: str, key: str = "hydra.sweeper.storage") -> None:
    """Refuse in one line (UserError) a storage Optuna would fail on once the search has begun to write.

    A URL: its scheme must be a database SQLAlchemy knows, its driver installed, a sqlite file's folder there. A
    journal path: its folder must exist, and the journal itself must be whole (check_journal).
    """
    if "://" not in spec:
        path = Path(spec).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"{key}={spec}: the folder {path.parent} does not exist: create it or give another path")
        check_journal(path)
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(spec)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise UserError(
            f"{key}={spec} is not a storage Optuna can open: give a journal file path, sqlite:///<file>.db, "
            "postgresql://... or mysql://..."
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        why = f"needs the database driver {e.name or e}: pip install it, or use sqlite"
        raise UserError(f"{key}={spec} {why}") from None
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        folder = Path(url.database).expanduser().parent
        if not folder.is_dir():
            raise UserError(f"{key}={spec}: the folder {folder} does not exist: create it or give another path")


def check_journal(path: Path) -> None:
    """Refuse a journal Optuna cannot read to its end: a record cut off by a crash mid-write or a full disk.

    Optuna's reader skips a partial last line, but its next write lands on that line and makes the whole journal
    unreadable for good; so nothing is written into it, and the line says how to keep its whole records. Read
    under the journal's own lock: a sharing sweeper's half-written record is not damage.
    """
    if not path.is_file():
        return
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(os.path.abspath(path))  # the lock JournalFileBackend takes to write
    locked = lock.acquire()
    try:
        data = path.read_bytes()
    finally:
        if locked:
            lock.release()
    offset = records = 0
    for line in data.splitlines(keepends=True):
        try:
            whole = line.endswith(b"\n") and isinstance(json.loads(line), dict)
        except ValueError:
            whole = False
        if not whole:
            where = "its last record is cut off" if offset + len(line) == len(data) else f"record {records + 1} is"
            raise UserError(
                f"{path} is damaged ({where} not whole at byte {offset} of {len(data)}: a crash mid-write or a full"
                f" disk): nothing was written into it; keep its {records} whole records with `truncate -s {offset}"
                f" {path}` (Optuna reads the trials they hold) and run again, or give another hydra.sweeper.storage"
            )
        offset, records = offset + len(line), records + 1


def make_pruner(spec: Any) -> optuna.pruners.BasePruner:
    """`median`, `hyperband`, `none` (Optuna's defaults), or a mapping with `_target_` and its arguments."""
    if isinstance(spec, dict) or hasattr(spec, "items"):
        from hydra.errors import InstantiationException
        from hydra.utils import instantiate

        try:
            pruner = instantiate(dict(spec))
        except InstantiationException as e:
            raise UserError(
                f"hydra.sweeper.pruner={dict(spec)} does not build a pruner ({str(e).strip().splitlines()[0]}): "
                "give {_target_: optuna.pruners.<Name>, ...} with that pruner's arguments"
            ) from None
        if not isinstance(pruner, optuna.pruners.BasePruner):
            raise UserError(f"hydra.sweeper.pruner._target_={spec.get('_target_')} is not an Optuna pruner")
        return pruner
    name = "none" if spec is None else str(spec).lower()
    if name == "median":
        return optuna.pruners.MedianPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UserError(
        f"hydra.sweeper.pruner={spec} is not a pruner: use one of {', '.join(PRUNERS)} "
        "or {_target_: optuna.pruners.<Name>, ...}"
    )


def trial_spec() -> dict[str, Any] | None:
    """This job's trial as the sweeper gave it (study, storage, trial_id, number, pruner, monitor), else None."""
    raw = os.environ.get(TRIAL_ENV)
    return json.loads(raw) if raw else None


def open_trial(spec: dict[str, Any]) -> optuna.Trial:
    """The running trial `spec` names, in its study, with the study's pruner (the pruner lives in code, not storage)."""
    study = optuna.load_study(
        study_name=spec["study"],
        storage=open_storage(spec["storage"]),
        sampler=optuna.samplers.RandomSampler(),  # a job samples nothing: its params came as overrides
        pruner=make_pruner(spec.get("pruner")),
    )
    return optuna.Trial(study, spec["trial_id"])


class OptunaPruning(L.Callback):
    """Report `monitor` to this job's trial after every validation; stop the run when the trial is pruned.

    Rank 0 alone talks to the storage and the pruner; its decision is broadcast as a tensor on the module's device,
    so all DDP ranks set `should_stop` after the same validation and stop at the same batch (as EarlyStopping does).
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.monitor: str = spec.get("monitor", "val/ppl")
        self.validations = 0
        self.pruned_epoch: int | None = None
        self._trial: optuna.Trial | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self._trial = open_trial(self.spec)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1  # Optuna's step: the k-th validation (epoch k with check_val_every_n_epoch=1)
        prune = False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None and math.isfinite(float(value)):
                self._trial.report(float(value), self.validations)
                # at the last epoch's validation pruning saves nothing: the trial completes with its value
                prune = not (last and trainer.is_last_batch) and self._trial.should_prune()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(prune)], device=pl_module.device)
            torch.distributed.broadcast(flag, src=0)
            prune = bool(flag.item())
        if not prune:
            return
        self.pruned_epoch = trainer.current_epoch + 1  # counted from 1, as the log and summary.json count epochs
        trainer.should_stop = True
        log.info(
            "rank %d: trial %s pruned at validation %d (epoch %d, step %d)",
            trainer.global_rank,
            self.spec.get("number"),
            self.validations,
            self.pruned_epoch,
            trainer.global_step,
        )
        if trainer.is_global_zero:  # the sweeper reads it to tell the trial PRUNED
            self._trial.set_user_attr("pruned_epoch", self.pruned_epoch)


def pruning_callback() -> OptunaPruning | None:
    """The pruning callback when this job is an Optuna trial (GRUEXP_OPTUNA_TRIAL set by the sweeper), else None."""
    spec = trial_spec()
    return OptunaPruning(spec) if spec else None
