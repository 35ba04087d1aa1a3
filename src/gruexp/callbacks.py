"""What Lightning lacks: progress quiet in logs, a run's perplexity-curve PNG, W&B sample tables and summary."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, RichProgressBar

from gruexp.tracking import plot_ppl_curves, wandb_loggers

log = logging.getLogger("gruexp.callbacks")

BAR_KEYS = {"train/ppl": "train_ppl", "val/ppl": "val_ppl", "train/tokens_per_sec": "tok/s"}


def _metric(trainer: L.Trainer, key: str) -> float:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else math.nan


class MetricsBar(RichProgressBar):
    """Lightning's Rich bar showing only epoch, train/ppl, val/ppl and tokens/sec (short names, no v_num)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        return {short: items[k] for k, short in BAR_KEYS.items() if k in items}


class EpochLines(ProgressBar):
    """The progress display for non-interactive logs (Slurm, CI, `> log`): one line per epoch, no carriage returns."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # An epoch's tokens/sec is logged by CharLM.on_train_epoch_end, after callbacks' hook of that name: so each line
    # is written when the next epoch starts, and the last one when training ends.
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > self._first_epoch:
            self._line(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line(trainer, pl_module)

    def _line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        m = self.get_metrics(trainer, pl_module)
        parts = [f"epoch {trainer.current_epoch}/{trainer.max_epochs}"]
        parts += [f"{k} {float(m[k]):.{0 if 'tokens' in k else 3}f}" for k in BAR_KEYS if k in m]
        log.info(" | ".join(parts))


def progress(enabled: bool = True, refresh_rate: int = 1) -> Callback:
    """The progress display: a live Rich bar on a terminal, one line per epoch when stdout is not a TTY.

    `enabled` is `trainer.enable_progress_bar`: when false this returns a callback that does nothing, since Lightning
    refuses a progress-bar callback alongside `enable_progress_bar=false`.
    """
    if not enabled:
        return Callback()
    return MetricsBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else EpochLines()


class PerplexityCurve(Callback):
    """Collects train/val perplexity per epoch and writes `ppl.png` into the run folder (and to W&B) at the end."""

    def __init__(self, dirpath: str | Path, filename: str = "ppl.png") -> None:
        self.path = Path(dirpath) / filename
        self.curves: dict[str, list[tuple[int, float]]] = {"train/ppl": [], "val/ppl": []}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.curves["val/ppl"].append((trainer.current_epoch + 1, _metric(trainer, "val/ppl")))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.curves["train/ppl"].append((trainer.current_epoch + 1, _metric(trainer, "train/ppl")))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or not any(self.curves.values()):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hp = pl_module.hparams
        title = f"{hp.get('name', '')} hidden {hp.get('hidden_size', '')}"
        plot_ppl_curves({"": self.curves}, self.path, title)
        for lg in wandb_loggers(trainer.loggers):
            import wandb

            lg.experiment.log({"plots/ppl": wandb.Image(str(self.path))})


class WandbExtras(Callback):
    """W&B-only extras: a table of generated samples per validation epoch and the run's summary at the end."""

    def __init__(self, temperature: float = 1.0, seed: int = 0) -> None:
        self.temperature, self.seed = temperature, seed
        self.table = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            for lg in wandb_loggers(trainer.loggers):
                lg.experiment.define_metric("val/ppl", summary="min,last")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = wandb_loggers(trainer.loggers)
        if trainer.sanity_checking or not loggers or not trainer.is_global_zero:
            return
        import wandb

        if self.table is None:  # INCREMENTAL: each epoch's log adds its row instead of re-uploading the table
            self.table = wandb.Table(
                columns=["epoch", "step", "val/ppl", "greedy", f"T={self.temperature}"], log_mode="INCREMENTAL"
            )
        hp = pl_module.hparams
        sampled = pl_module.predict(
            hp.sample_prefix,
            hp.sample_chars,
            temperature=self.temperature,
            generator=torch.Generator().manual_seed(self.seed),
        )
        self.table.add_data(
            trainer.current_epoch + 1, trainer.global_step, _metric(trainer, "val/ppl"), pl_module.sample, sampled
        )
        for lg in loggers:
            lg.log_metrics({"val/samples": self.table}, step=trainer.global_step)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_score", None)
        summary = {
            "best/val_ppl": float(best) if best is not None else _metric(trainer, "val/ppl"),
            "train/tokens_per_sec": pl_module.tokens_per_sec,  # the whole run's (CharLM.throughput)
            "epochs": trainer.current_epoch,
            "sample": pl_module.sample,
        }
        for lg in wandb_loggers(trainer.loggers):
            lg.experiment.summary.update(summary)
