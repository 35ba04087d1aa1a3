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
from typing import Any

import lightning as L
import optuna
import torch

from gruexp.studies import PRUNERS, TRIAL_ENV, check_journal, check_storage, make_pruner, open_storage  # noqa: F401

log = logging.getLogger("gruexp.search")


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
