"""train(cfg): build the data, model, callbacks, loggers and trainer from the Hydra config, fit, summarise.

python -m gruexp.train model=scratch trainer.max_epochs=2 model.hidden_size=64 optimizer.lr=0.5
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from gruexp import faults, launch, tracking

log = logging.getLogger("gruexp.train")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Every `_target_` entry of a callbacks/logger group; a null entry switches one off."""
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a reader never sees half a file, even if the run is killed mid-write."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _describe(cfg: DictConfig) -> str:
    """The swept keys of a run, for logs: model, hidden size, lr, clip."""
    return (
        f"model={cfg.model.name} hidden_size={cfg.model.hidden_size} lr={cfg.optimizer.get('lr')} "
        f"gradient_clip_val={cfg.trainer.get('gradient_clip_val')}"
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one model as the config says and return its final metrics (also written to summary.json)."""
    out = Path(cfg.paths.output_dir)
    faults.check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
    ckpt_path = faults.resolve_ckpt_path(cfg.get("ckpt_path"), out)
    seed = L.seed_everything(cfg.seed, workers=True)
    start = time.perf_counter()

    datamodule = instantiate(cfg.data, seed=seed)
    log.info("data: %s", datamodule.describe())
    model = instantiate(
        cfg.model,
        vocab=datamodule.vocab.idx_to_token,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.get("scheduler")),
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    callbacks.append(launch.SameConfigOnAllRanks(launch.config_digest(cfg, seed), _describe(cfg)))
    loggers = _instantiate_all(cfg.get("logger"))
    run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    for lg in loggers:
        lg.log_hyperparams(run_config)  # the whole resolved config: W&B's run config, CSV's hparams.yaml
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    status, error = "completed", None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except faults.Diverged as e:
        status, error = "diverged", e
    except SystemExit as e:  # Lightning's exit after SIGTERM (preemption) or Ctrl+C, last.ckpt saved
        status, error = "interrupted", SystemExit(e.code or faults.INTERRUPT_EXIT)
    except BaseException as e:
        status, error = "failed", e
    if status == "completed" and trainer.interrupted:
        status = "interrupted"

    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested: dict[str, float] = {}
    if status == "completed":
        try:
            tested = _test(trainer, model, datamodule)
        except Exception as e:
            status, error = "failed", e
    summary = {
        "model": cfg.model.name,
        "hidden_size": cfg.model.hidden_size,
        "lr": cfg.optimizer.get("lr"),
        "gradient_clip_val": cfg.trainer.get("gradient_clip_val"),
        "batch_size": cfg.data.batch_size,
        "num_steps": cfg.data.num_steps,
        "partition": cfg.data.partition,
        "train_ppl": m.get("train/ppl", math.nan),
        "val_ppl": m.get("val/ppl", math.nan),
        "tokens_per_sec": m.get("train/tokens_per_sec", math.nan),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "wall_time_s": time.perf_counter() - start,
        "sample": model.sample,
        "seed": seed,
        **tested,
        "status": status,  # completed | interrupted | diverged | failed
    }
    if error is not None and not isinstance(error, SystemExit):
        summary["error"] = str(error).splitlines()[0] if str(error) else type(error).__name__
    ckpt = trainer.checkpoint_callback
    if ckpt is not None:
        summary["best_val_ppl"] = float(ckpt.best_model_score) if ckpt.best_model_score is not None else math.nan
        summary["best_ckpt"] = ckpt.best_model_path
        summary["last_ckpt"] = ckpt.last_model_path
    if trainer.is_global_zero:
        write_json(out / "summary.json", summary)
        log.info(
            "%sval/ppl %.3f | train/ppl %.3f | %.0f tokens/sec | %s",
            "" if status == "completed" else f"{status.upper()}: ",
            summary["val_ppl"],
            summary["train_ppl"],
            summary["tokens_per_sec"],
            out,
        )
        if tested:
            log.info("test/ppl %.3f | test/bpc %.3f (best checkpoint, whole test split)", *tested.values())
        log.info("sample: %s", summary["sample"])
    if error is not None:
        raise error
    return summary


def _test(trainer: L.Trainer, model: L.LightningModule, datamodule: Any) -> dict[str, float]:
    """test/ppl and test/bpc of the best checkpoint (the last weights without one) on the whole test split."""
    if not datamodule.test_dataloader() or not is_overridden("test_step", model):
        return {}
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    # the W&B run was finished with fit (tracking.WandbLogger.finalize): testing through it would start a second run
    wandb = tracking.wandb_loggers(trainer.loggers)
    trainer.loggers = [lg for lg in trainer.loggers if lg not in wandb]
    result = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    if "test/ppl" not in result:
        return {}
    ppl = float(result["test/ppl"])
    return {"test_ppl": ppl, "test_bpc": float(result.get("test/bpc", math.log2(ppl)))}


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Entry point: run train(cfg); a user error is one line and exit status 2, not a traceback."""
    try:
        with launch.job_scope():  # DDP ranks re-run this job only; nothing of it leaks into a sweep's next job
            summary = train(cfg)
    except Exception as e:
        user = faults.user_error(e)
        if user is None and not isinstance(e, faults.Diverged):
            raise  # a bug: keep its traceback
        log.error("%s", user or e)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise  # let the sweep record this job as failed and go on with the others
        sys.exit(2 if user else faults.DIVERGED_EXIT)
    return summary["val_ppl"]  # the objective a sweeper (Optuna) minimises


if __name__ == "__main__":
    faults.check_choices(sys.argv[1:], Path(__file__).resolve().parents[2] / "conf")
    main()
