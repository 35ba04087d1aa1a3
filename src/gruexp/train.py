"""train(cfg): build the data, model, callbacks, loggers and trainer from the Hydra config, fit, summarise.

python -m gruexp.train model=scratch trainer.max_epochs=2 model.hidden_size=64 optimizer.lr=0.5
"""

from __future__ import annotations

import sys

import hydra

if __name__ == "__main__" and not {"--help", "-h", "--hydra-help"}.isdisjoint(sys.argv[1:]):
    # help needs the config only: printed before torch and Lightning are imported (seconds of CPU otherwise)
    hydra.main(version_base="1.3", config_path="../../conf", config_name="train")(lambda cfg: None)()
    raise SystemExit(0)

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gruexp import checkpoints, console, guards, launch, preflight, search, stack, steps, sweeps, tracking
from gruexp.errors import user_error
from gruexp.record import RunRecord

log = logging.getLogger("gruexp.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one model as the config says, test its best checkpoint, return the run's summary (also summary.json).

    Whatever happens after Hydra gave this run its folder, RunRecord leaves a summary.json whose `status` says how
    the run ended (completed | interrupted | diverged | failed | pruned), bad input included.
    """
    with RunRecord(cfg) as record:
        # a signal while the corpus is encoded, say: `interrupted`, one line, no half-written token file
        with guards.stop_on_signals("setting up"):
            # everything a user's value can break, before any training: one line each (gruexp.preflight)
            preflight.check_train_config(cfg)
            preflight.check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
            torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
            child = preflight.is_child_rank()  # a DDP rank > 0 re-runs this set-up: rank 0 has said it all
            seed = L.seed_everything(cfg.seed, workers=True, verbose=not child)
            trials = stack.current()  # a trial of stacked sweep jobs (hydra/launcher=stacked): its stack, else None
            accelerator = cfg.trainer.get("accelerator", "auto")
            plan = steps.plan_steps(cfg.steps_per_call, cfg.cuda_graph, accelerator, stacked=trials is not None)
            steps.check_trainer(plan, cfg.trainer)
            datamodule = instantiate(cfg.data, seed=seed, steps_per_call=plan.steps_per_call, **_taken(plan, cfg))
            if not child:
                log.info("data: %s", datamodule.describe())
            vocab = datamodule.vocab.idx_to_token
            resume = _checkpoint_to_resume(cfg, vocab, verbose=not child)
            if resume:
                plan = checkpoints.check_steps_per_call(resume, plan)  # a stacked trial resumed alone: the engine
                datamodule.limit_train_batches = _taken(plan, cfg).get("limit_train_batches")
            engine = steps.trainer_overrides(plan, cfg.trainer)  # what the step engine takes from Lightning
            preflight.check_memory(cfg, len(vocab), trials.size if trials else 1)  # before the model allocates
            optimizer, scheduler = instantiate(cfg.optimizer), instantiate(cfg.get("scheduler"))
            clip = {k: cfg.trainer.get(k) for k in ("gradient_clip_val", "gradient_clip_algorithm")} if engine else {}
            model = instantiate(
                cfg.model,
                vocab=vocab,
                optimizer=optimizer,
                scheduler=scheduler,
                steps_per_call=plan.steps_per_call,
                cuda_graph=plan.cuda_graph,
                engine=plan.engine,
                stack=trials,
                **clip,
            )
            callbacks = _instantiate_all(cfg.get("callbacks"))
            callbacks.append(launch.SameConfigOnAllRanks(launch.config_digest(cfg, seed), _describe(cfg)))
            pruning = search.pruning_callback()  # an Optuna trial (hparams_search=optuna): report, stop when pruned
            callbacks += [pruning] if pruning else []
            loggers = _loggers(cfg, resume)
            trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **engine)
        record.fit(trainer, model, datamodule, resume.path if resume else None, seed=seed, pruning=pruning)
        record.test(lambda: _test(trainer, model, datamodule))
    return record.summary


def _taken(plan: steps.StepPlan, cfg: DictConfig) -> dict[str, Any]:
    """What the data module applies itself when the step engine runs the steps: the batch limit, in batches."""
    return {"limit_train_batches": cfg.trainer.get("limit_train_batches")} if plan.manual else {}


def _checkpoint_to_resume(cfg: DictConfig, vocab: list[str], verbose: bool) -> checkpoints.Resume | None:
    """The checkpoint `ckpt_path` names, refused in one line if it is of another model, size, vocabulary or split
    (not resumed silently), or leaves nothing to train."""
    expect = checkpoints.model_signature(cfg.model, vocab) | checkpoints.split_signature(cfg.data)
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    sweep_job = hc is not None and hc.mode is not None and hc.mode.name == "MULTIRUN"  # its overrides as written
    job = OmegaConf.to_container(hc.overrides.task, resolve=False) if sweep_job else None
    ckpt_path = checkpoints.resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.output_dir), expect, job)
    if not ckpt_path:
        return None
    resume = checkpoints.read_resume(ckpt_path)
    checkpoints.check_training_left(resume, cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps"))
    if verbose and str(cfg.ckpt_path) != "last":  # `last` has named its file already
        log.info("resuming %s", ckpt_path)
    return resume


def _instantiate_all(group: DictConfig | None, wandb_id: str | None = None) -> list[Any]:
    """Every `_target_` entry of a callbacks/logger group; a null entry switches one off. `wandb_id`: the W&B run a
    resumed run continues (Lightning's WandbLogger resumes the run of that id)."""
    return [
        instantiate(c, **({"id": wandb_id} if wandb_id and str(c._target_).endswith("WandbLogger") else {}))
        for c in (group or {}).values()
        if c is not None and "_target_" in c
    ]


def _loggers(cfg: DictConfig, resume: checkpoints.Resume | None) -> list[Any]:
    """The config's loggers, each given the whole resolved config (W&B's run config, CSV's hparams.yaml); a resumed
    run's go on with its checkpoint's W&B run and CSV history."""
    loggers = _instantiate_all(cfg.get("logger"), resume.wandb_id if resume else None)
    run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    for lg in loggers:
        lg.log_hyperparams(run_config)
    if resume and not preflight.is_child_rank():
        tracking.continue_csv_history(loggers, resume.path, resume.log_step, cfg.paths.output_dir)
    return loggers


def _describe(cfg: DictConfig) -> str:
    """The swept keys of a run, for logs: model, hidden size, lr, clip (floats as console.brief_overrides)."""
    return console.brief_overrides(
        [
            f"model={cfg.model.name}",
            f"hidden_size={cfg.model.hidden_size}",
            f"lr={cfg.optimizer.get('lr')}",
            f"gradient_clip_val={cfg.trainer.get('gradient_clip_val')}",
        ]
    )


def _test(trainer: L.Trainer, model: L.LightningModule, datamodule: Any) -> dict[str, float]:
    """test/ppl and test/bpc of the best checkpoint (the last weights without one) on the whole test split."""
    if not datamodule.test_dataloader():
        return {}
    ckpt = checkpoints.best_checkpoint(trainer)
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    # the W&B run was finished with fit (tracking.WandbLogger.finalize): testing through it would start a second run
    wandb = tracking.wandb_loggers(trainer.loggers)
    trainer.loggers = [lg for lg in trainer.loggers if lg not in wandb]
    with console.quiet_restore():
        result = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    if "test/ppl" not in result:
        return {}
    ppl = float(result["test/ppl"])
    tokens = datamodule.split_len("test") - 1  # every token after the split's first, over all ranks
    return {"test_ppl": ppl, "test_bpc": float(result.get("test/bpc", math.log2(ppl))), "test_tokens": tokens}


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point: run train(cfg); a user error is one line and exit status 2, not a traceback."""
    try:
        with launch.job_scope():  # DDP ranks re-run this job only; nothing of it leaks into a sweep's next job
            summary = train(cfg)
    except Exception as e:
        user = user_error(e)
        if user is None and not isinstance(e, guards.Diverged):
            raise  # a bug: keep its traceback
        if not preflight.is_child_rank():  # every DDP rank has the same config: rank 0 says it once
            log.error("%s", user or e)
        hc = HydraConfig.get()
        if hc.mode.name == "MULTIRUN" and sweeps.is_grid_sweep(hc):
            # a grid sweep: recorded in its summary.json, the sweep goes on, and sweeps.SweepOutcome fails it at
            # its end, after the best of the finished jobs is printed (a raise would stop the sweep before that)
            return None
        if hc.mode.name == "MULTIRUN":
            raise  # other sweepers (Optuna) decide themselves what a failed trial does
        sys.exit(2 if user else guards.DIVERGED_EXIT)
    return summary["val_ppl"]  # the objective a sweeper (Optuna) minimises


if __name__ == "__main__":
    conf = Path(__file__).resolve().parents[2] / "conf"
    preflight.check_choices(sys.argv[1:], conf)
    preflight.check_stacking(sys.argv[1:])
    preflight.check_overrides(sys.argv[1:], conf, "train")
    main()
