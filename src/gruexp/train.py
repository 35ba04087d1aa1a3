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

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gruexp import checks, console, faults, launch, search, threads, tracking

log = logging.getLogger("gruexp.train")


def _instantiate_all(group: DictConfig | None, wandb_id: str | None = None) -> list[Any]:
    """Every `_target_` entry of a callbacks/logger group; a null entry switches one off. `wandb_id`: the W&B run a
    resumed run continues (Lightning's WandbLogger resumes the run of that id)."""
    return [
        instantiate(c, **({"id": wandb_id} if wandb_id and str(c._target_).endswith("WandbLogger") else {}))
        for c in (group or {}).values()
        if c is not None and "_target_" in c
    ]


def write_json(path: Path, payload: dict) -> None:
    """Write atomically (faults.atomic_write): a reader never sees half a file, a kill leaves no temporary one."""
    faults.atomic_write(path, lambda f: f.write((json.dumps(payload, indent=2) + "\n").encode()))


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit one model as the config says and return its final metrics (also written to summary.json).

    Whatever happens after Hydra gave this run its folder, the folder ends with a summary.json whose `status`
    says how the run ended (completed | interrupted | diverged | failed), bad input included.
    """
    out = Path(cfg.paths.output_dir)
    start, started_at = time.perf_counter(), time.time()
    summary: dict[str, Any] = {
        "model": cfg.model.get("name"),
        "hidden_size": cfg.model.get("hidden_size"),
        "lr": cfg.optimizer.get("lr"),
        "gradient_clip_val": cfg.trainer.get("gradient_clip_val"),
        "batch_size": cfg.data.get("batch_size"),
        "num_steps": cfg.data.get("num_steps"),
        "partition": cfg.data.get("partition"),
    }
    busy = threads.busy_machine() if not checks.is_child_rank() else None
    if busy:
        log.warning("%s", busy)  # a slow run says why, once
        summary["load_at_start"] = os.getloadavg()[0]
    try:  # everything a user's value can break, before any training: one line each (gruexp.checks)
        # a signal while the corpus is encoded, say: `interrupted`, one line, no half-written token file
        with faults.stop_on_signals("setting up"):
            checks.check_train_config(cfg)
            faults.check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", 1))
            torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
            child = checks.is_child_rank()  # a DDP rank > 0 re-runs this set-up: rank 0 has said it all
            seed = L.seed_everything(cfg.seed, workers=True, verbose=not child)
            datamodule = instantiate(cfg.data, seed=seed)
            if not child:
                log.info("data: %s", datamodule.describe())
            vocab = datamodule.vocab.idx_to_token
            # a checkpoint of another model, size, vocabulary or split is refused here, not resumed silently
            expect = checks.model_signature(cfg.model, vocab) | checks.split_signature(cfg.data)
            ckpt_path = faults.resolve_ckpt_path(cfg.get("ckpt_path"), out, expect=expect)
            if ckpt_path:
                checks.check_training_left(ckpt_path, cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps"))
                if not child and str(cfg.ckpt_path) != "last":  # `last` has named its file already
                    log.info("resuming %s", ckpt_path)
            checks.check_memory(cfg, len(vocab))  # before the model allocates anything
            model = instantiate(
                cfg.model,
                vocab=vocab,
                optimizer=instantiate(cfg.optimizer),
                scheduler=instantiate(cfg.get("scheduler")),
            )
            callbacks = _instantiate_all(cfg.get("callbacks"))
            callbacks.append(launch.SameConfigOnAllRanks(launch.config_digest(cfg, seed), _describe(cfg)))
            pruning = search.pruning_callback()  # an Optuna trial (hparams_search=optuna): report, stop when pruned
            callbacks += [pruning] if pruning else []
            loggers = _instantiate_all(cfg.get("logger"), checks.resumed_wandb_id(ckpt_path) if ckpt_path else None)
            run_config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
            for lg in loggers:
                lg.log_hyperparams(run_config)  # the whole resolved config: W&B's run config, CSV's hparams.yaml
            trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except (Exception, faults.Stopped) as e:
        stopped = isinstance(e, faults.Stopped)
        ended = {"status": "interrupted"} if stopped else {"status": "failed", "error": _first_line(e)}
        if not checks.is_child_rank():
            _write_summary(out, {**summary, **ended, "wall_time_s": time.perf_counter() - start}, started_at)
            if stopped:
                log.warning("INTERRUPTED before training started | %s", out)
        if stopped:
            raise SystemExit(e.code) from None
        raise

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
    if status == "completed" and pruning is not None and pruning.pruned_epoch is not None:
        status = "pruned"
    if status in ("completed", "pruned") and (signum := faults.signalled_after_training(trainer, model)):
        status, error = "interrupted", SystemExit(128 + signum)  # during the last validation: no test after it

    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    tested: dict[str, float] = {}
    if status == "completed":
        try:
            with faults.stop_on_signals("testing the best checkpoint"):
                tested = _test(trainer, model, datamodule)
        except faults.Stopped as e:  # training's metrics stay; no test metrics
            status, error = "interrupted", SystemExit(e.code)
        except Exception as e:
            status, error = "failed", e
    summary.update(
        {
            "train_ppl": m.get("train/ppl", math.nan),
            "val_ppl": m.get("val/ppl", math.nan),
            "train_bpc": m.get("train/bpc", math.nan),
            "val_bpc": m.get("val/bpc", math.nan),
            "tokens_per_sec": model.tokens_per_sec,  # the run's training tokens over its training steps' time
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "wall_time_s": time.perf_counter() - start,
            "sample": model.sample,
            "seed": seed,
            **tested,
            "status": status,  # completed | interrupted | diverged | failed | pruned
        }
    )
    # the same tokens over the run's wall time: set-up, validation, checkpoints and the test included
    summary["wall_tokens_per_sec"] = model.throughput.tokens / summary["wall_time_s"]
    if status == "pruned":
        summary["pruned_epoch"] = pruning.pruned_epoch  # the epoch whose validation the Optuna pruner stopped
    if error is not None and not isinstance(error, SystemExit):
        summary["error"] = _first_line(error)
    best = _best_checkpoint(trainer)
    if best is not None:
        summary["best_val_ppl"] = float(best.best_model_score) if best.best_model_score is not None else math.nan
        summary["best_ckpt"] = best.best_model_path
    if trainer.checkpoint_callbacks:
        last = Path(trainer.checkpoint_callbacks[0].dirpath or out / "checkpoints") / faults.LAST
        summary["last_ckpt"] = str(last) if last.is_file() else ""
    if trainer.is_global_zero:
        full_disk = _write_summary(out, summary, started_at)
        if full_disk is not None and error is None:
            error = full_disk  # the run trained, but its record could not be written: it did not succeed
    # a run that failed before its first step (a bad value found as fit starts) has no result: its error says it all
    if trainer.is_global_zero and (status != "failed" or trainer.global_step > 0):
        log.info(
            "%sval/ppl %.3f | train/ppl %.3f | %s tokens/sec training, %s over the wall time | %s",
            "" if summary["status"] == "completed" else f"{summary['status'].upper()}: ",
            summary["val_ppl"],
            summary["train_ppl"],
            f"{summary['tokens_per_sec']:,.0f}",
            f"{summary['wall_tokens_per_sec']:,.0f}",
            out,
        )
        if tested:
            log.info(
                "test/ppl %.3f | test/bpc %.3f (best checkpoint, whole test split: %s tokens)",
                tested["test_ppl"],
                tested["test_bpc"],
                f"{tested['test_tokens']:,}",
            )
        log.info("sample: %s", summary["sample"])
    if error is not None:
        raise error
    return summary


def _first_line(e: BaseException) -> str:
    """An error as summary.json's one-line `error`."""
    user = faults.user_error(e)
    text = str(user or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _write_summary(out: Path, summary: dict[str, Any], since: float) -> OSError | None:
    """Write summary.json; on a full disk, a `failed` one if any byte fits, no empty file left. Returns that error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "summary.json", summary)
        return None
    except OSError as e:
        if faults.no_space(e) is None:
            raise
        full = OSError(e.errno, e.strerror, str(out / "summary.json"))
    summary.update(status="failed", error=faults.no_space(full))
    brief = json.dumps({k: summary[k] for k in ("model", "status", "error")}) + "\n"
    try:  # no room for a temporary copy: the few bytes in place
        (out / "summary.json").write_text(brief)
    except OSError:
        (out / "summary.json").unlink(missing_ok=True)
    for f in out.rglob("*"):  # what this run began to write when the disk filled: empty files mean nothing
        try:
            st = f.lstat()
            if f.is_file() and st.st_size == 0 and st.st_mtime >= since - 1:
                f.unlink()
        except OSError:
            pass
    return full


def _test(trainer: L.Trainer, model: L.LightningModule, datamodule: Any) -> dict[str, float]:
    """test/ppl and test/bpc of the best checkpoint (the last weights without one) on the whole test split."""
    if not datamodule.test_dataloader():
        return {}
    ckpt = _best_checkpoint(trainer)
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


def _best_checkpoint(trainer: L.Trainer) -> Any:
    """The ModelCheckpoint that keeps best.ckpt (the one with a monitor; the other writes last.ckpt every epoch)."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)


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
        if not checks.is_child_rank():  # every DDP rank has the same config: rank 0 says it once
            log.error("%s", user or e)
        hc = HydraConfig.get()
        if hc.mode.name == "MULTIRUN" and "BasicSweeper" in str(hc.sweeper.get("_target_")):
            # a grid sweep: recorded in its summary.json, the sweep goes on, and faults.SweepOutcome fails it at
            # its end, after the best of the finished jobs is printed (a raise would stop the sweep before that)
            return None
        if hc.mode.name == "MULTIRUN":
            raise  # other sweepers (Optuna) decide themselves what a failed trial does
        sys.exit(2 if user else faults.DIVERGED_EXIT)
    return summary["val_ppl"]  # the objective a sweeper (Optuna) minimises


if __name__ == "__main__":
    conf = Path(__file__).resolve().parents[2] / "conf"
    faults.check_choices(sys.argv[1:], conf)
    checks.check_overrides(sys.argv[1:], conf, "train")
    main()
