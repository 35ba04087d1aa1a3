"""RunRecord: a training run's summary.json, written whatever happens once Hydra gave the run its folder.

Its one `status` says how the run ended: completed | interrupted | diverged | failed | pruned.

- set-up raised: `failed` with its one-line error, or `interrupted` on a signal (guards.Stopped); raised on.
- fit: guards.Diverged is `diverged`; Lightning's SystemExit (SIGTERM, Ctrl+C) or a stop between batches
  (trainer.interrupted, a signal during the last validation) is `interrupted`; an Optuna pruner's stop is `pruned`;
  anything else `failed`. None of these raise out of fit: the record is written first.
- test (a completed fit only): a signal is `interrupted` (training's metrics kept), an error `failed`.
- a full disk turns the run `failed`: a few bytes of summary.json if they fit, and no empty files left.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from gruexp import guards, threads
from gruexp.checkpoints import LAST, atomic_write, best_checkpoint
from gruexp.errors import first_line, no_space
from gruexp.preflight import is_child_rank

log = logging.getLogger("gruexp.train")  # the run's own lines, under the name train.log has always given them


class RunRecord:
    """summary.json of one training run: its fields, its one status, its wall time, and the run's last log lines.

    Around the whole run (`with RunRecord(cfg) as record:`): a set-up that raises leaves a summary and raises on;
    `fit` and `test` record how they ended instead of raising; when the block ends the summary is written, the
    result lines are logged (rank 0) and the run's error, if any, is raised. DDP ranks other than 0 write nothing.
    """

    def __init__(self, cfg: DictConfig):
        self.out = Path(cfg.paths.output_dir)
        self.summary: dict[str, Any] = {
            "model": cfg.model.get("name"),
            "hidden_size": cfg.model.get("hidden_size"),
            "lr": cfg.optimizer.get("lr"),
            "gradient_clip_val": cfg.trainer.get("gradient_clip_val"),
            "batch_size": cfg.data.get("batch_size"),
            "num_steps": cfg.data.get("num_steps"),
            "partition": cfg.data.get("partition"),
        }
        self.status, self.error = "completed", None
        self.trainer: L.Trainer | None = None  # set once fit starts: set-up is over
        self.model: Any = None
        self.seed: int | None = None
        self.pruning: Any = None
        self.metrics: dict[str, float] = {}  # the trainer's metrics as fit left them
        self.tested: dict[str, float] = {}

    def __enter__(self) -> RunRecord:
        self._start, self._started_at = time.perf_counter(), time.time()
        busy = threads.busy_machine() if not is_child_rank() else None
        if busy:
            log.warning("%s", busy)  # a slow run says why, once
            self.summary["load_at_start"] = os.getloadavg()[0]
        return self

    def fit(
        self, trainer: L.Trainer, model: Any, datamodule: Any, ckpt_path: str | None, seed: int, pruning: Any = None
    ) -> None:
        """trainer.fit, how it ended kept as the run's status (and error) instead of raised."""
        self.trainer, self.model, self.seed, self.pruning = trainer, model, seed, pruning
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        except guards.Diverged as e:
            self.status, self.error = "diverged", e
        except SystemExit as e:  # Lightning's exit after SIGTERM (preemption) or Ctrl+C, last.ckpt saved
            self.status, self.error = "interrupted", SystemExit(e.code or guards.INTERRUPT_EXIT)
        except BaseException as e:
            self.status, self.error = "failed", e
        if self.status == "completed" and trainer.interrupted:
            self.status = "interrupted"
        if self.status == "completed" and pruning is not None and pruning.pruned_epoch is not None:
            self.status = "pruned"
        if self.status in ("completed", "pruned") and (signum := guards.signalled_after_training(trainer, model)):
            self.status, self.error = "interrupted", SystemExit(128 + signum)  # during the last validation: no test
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def test(self, run_test: Callable[[], dict[str, float]]) -> None:
        """After a completed fit only: `run_test()`'s metrics; a signal during it ends the run interrupted."""
        if self.status != "completed":
            return
        try:
            with guards.stop_on_signals("testing the best checkpoint"):
                self.tested = run_test()
        except guards.Stopped as e:  # training's metrics stay; no test metrics
            self.status, self.error = "interrupted", SystemExit(e.code)
        except Exception as e:
            self.status, self.error = "failed", e

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> bool:
        if e is None:
            self._finish()
        elif self.trainer is None and isinstance(e, (Exception, guards.Stopped)):
            self._set_up_failed(e)
        return False  # whatever else escapes (a bug around fit's own bookkeeping) raises as it is

    def _set_up_failed(self, e: BaseException) -> None:
        stopped = isinstance(e, guards.Stopped)
        self.status = "interrupted" if stopped else "failed"
        ended = {"status": self.status} if stopped else {"status": self.status, "error": first_line(e)}
        if not is_child_rank():
            self._write({**self.summary, **ended, "wall_time_s": time.perf_counter() - self._start})
            if stopped:
                log.warning("INTERRUPTED before training started | %s", self.out)
        if stopped:
            raise SystemExit(e.code) from None

    def _finish(self) -> None:
        trainer, model, m, summary, error = self.trainer, self.model, self.metrics, self.summary, self.error
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
                "wall_time_s": time.perf_counter() - self._start,
                "sample": model.sample,
                "seed": self.seed,
                **self.tested,
                "status": self.status,
            }
        )
        # the same tokens over the run's wall time: set-up, validation, checkpoints and the test included
        summary["wall_tokens_per_sec"] = model.throughput.tokens / summary["wall_time_s"]
        if self.status == "pruned":
            summary["pruned_epoch"] = self.pruning.pruned_epoch  # the epoch whose validation the pruner stopped
        if error is not None and not isinstance(error, SystemExit):
            summary["error"] = first_line(error)
        best = best_checkpoint(trainer)
        if best is not None:
            summary["best_val_ppl"] = float(best.best_model_score) if best.best_model_score is not None else math.nan
            summary["best_ckpt"] = best.best_model_path
        if trainer.checkpoint_callbacks:
            last = Path(trainer.checkpoint_callbacks[0].dirpath or self.out / "checkpoints") / LAST
            summary["last_ckpt"] = str(last) if last.is_file() else ""
        if trainer.is_global_zero:
            full_disk = self._write(summary)
            if full_disk is not None and error is None:
                error = full_disk  # the run trained, but its record could not be written: it did not succeed
        # a run that failed before its first step (a bad value found as fit starts) has no result: its error says it all
        if trainer.is_global_zero and (self.status != "failed" or trainer.global_step > 0):
            self._log_result()
        if error is not None:
            raise error

    def _log_result(self) -> None:
        summary, tested = self.summary, self.tested
        log.info(
            "%sval/ppl %.3f | train/ppl %.3f | %s tokens/sec training, %s over the wall time | %s",
            "" if summary["status"] == "completed" else f"{summary['status'].upper()}: ",
            summary["val_ppl"],
            summary["train_ppl"],
            f"{summary['tokens_per_sec']:,.0f}",
            f"{summary['wall_tokens_per_sec']:,.0f}",
            self.out,
        )
        if tested:
            log.info(
                "test/ppl %.3f | test/bpc %.3f (best checkpoint, whole test split: %s tokens)",
                tested["test_ppl"],
                tested["test_bpc"],
                f"{tested['test_tokens']:,}",
            )
        log.info("sample: %s", summary["sample"])

    def _write(self, summary: dict[str, Any]) -> OSError | None:
        """Write summary.json atomically; on a full disk, a `failed` one if any byte fits, no empty file left.
        Returns that full-disk error."""
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "summary.json", lambda f: f.write((json.dumps(summary, indent=2) + "\n").encode()))
            return None
        except OSError as e:
            if no_space(e) is None:
                raise
            full = OSError(e.errno, e.strerror, str(out / "summary.json"))
        summary.update(status="failed", error=no_space(full))
        brief = json.dumps({k: summary[k] for k in ("model", "status", "error")}) + "\n"
        try:  # no room for a temporary copy: the few bytes in place
            (out / "summary.json").write_text(brief)
        except OSError:
            (out / "summary.json").unlink(missing_ok=True)
        for f in out.rglob("*"):  # what this run began to write when the disk filled: empty files mean nothing
            try:
                st = f.lstat()
                if f.is_file() and st.st_size == 0 and st.st_mtime >= self._started_at - 1:
                    f.unlink()
            except OSError:
                pass
        return full
