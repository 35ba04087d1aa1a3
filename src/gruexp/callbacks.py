"""What Lightning lacks: a one-line bar and per-epoch log lines (epochs from 1), ppl.png, W&B sample tables, and
the training steps' loss and gradient norm written to the loggers without Lightning's per-call costs."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar

from gruexp.compat import RichBar, batches_that_stepped, should_update_logs
from gruexp.tracking import plot_ppl_curves, wandb_loggers

log = logging.getLogger("gruexp.callbacks")

BAR_KEYS = {"train/ppl": "train_ppl", "val/ppl": "val_ppl", "train/tokens_per_sec": "tok/s"}


def _metric(trainer: L.Trainer, key: str) -> float:
    v = trainer.callback_metrics.get(key)
    return float(v) if v is not None else math.nan


def fmt_metric(key: str, value: float) -> str:
    """How a metric reads on the console: perplexities to 3 decimals, tokens/sec a whole number with separators."""
    return f"{value:,.0f}" if "tokens" in key or key == "tok/s" else f"{value:.3f}"


class _EpochTracking:
    """Mixed into both progress displays: 1-based epochs and the epoch of the latest validation.

    Epochs are counted from 1 everywhere a user reads them (bar, log lines, samples, plots); Lightning's
    `current_epoch` is 0-based while an epoch runs and equals the number of finished epochs between them.
    """

    _val_epoch = 0  # 1-based epoch of the latest validation; 0: none yet

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._val_epoch = trainer.current_epoch + 1

    def _val_is_fresh(self, finished_epoch: int) -> bool:
        """True when validation ran at the end of `finished_epoch` (1-based), i.e. val/ppl is that epoch's."""
        return self._val_epoch == finished_epoch


class MetricsBar(_EpochTracking, RichBar):
    """Lightning's Rich bar on one 120-column line: epoch (from 1), batches, time, train ppl, val ppl, tokens/sec.

    No validation bar (it is short and left stale lines behind); log lines and warnings print above the bar.
    """

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._finished = 0
        self._restore: list[tuple[logging.StreamHandler, Any]] = []

    def configure_columns(self, trainer: L.Trainer) -> list:
        # Lightning's columns less the batches/sec one (tok/s says it better), with a 20-column bar
        columns = super().configure_columns(trainer)[:-1]
        columns[1].bar_width = 20
        return columns

    def train_description(self, current_epoch: int) -> str:
        return f"Epoch {current_epoch + 1}" + (f"/{self.trainer.max_epochs}" if self.trainer.max_epochs else "")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # tokens/sec: the last finished epoch's train/tokens_per_sec, the value CSV and W&B hold for that epoch
        items = super().get_metrics(trainer, pl_module)
        out = {short: fmt_metric(short, float(items[k])) for k, short in BAR_KEYS.items() if k in items}
        if "val_ppl" in out and self._val_epoch and not self._val_is_fresh(self._finished):
            out["val_ppl"] += f" (ep {self._val_epoch})"  # an older epoch's: say which
        return out

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = trainer.current_epoch  # epochs finished so far: the 1-based number of the last one
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = trainer.current_epoch + 1  # this one (its validation, if any, has run)
        super().on_train_epoch_end(trainer, pl_module)

    # The validation pass gets no bar of its own.
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        if trainer.state.fn != "fit":
            super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: D102
        if trainer.state.fn != "fit":
            super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _EpochTracking.on_validation_end(self, trainer, pl_module)
        RichBar.on_validation_end(self, trainer, pl_module)

    # Rich redirects sys.stdout/sys.stderr while the bar is live, so that what is printed goes above it; logging's
    # handlers hold the original streams and would write into the bar's line instead. Point them at Rich's proxy
    # while the bar lives.
    def start_bar(self, trainer: L.Trainer) -> None:
        before = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
        super().start_bar(trainer)
        if self._restore or not self.progress:
            return
        for handler in _console_handlers():
            which = before.get(id(handler.stream))
            proxy = getattr(sys, which) if which else None
            if proxy is not None and proxy is not handler.stream:
                self._restore.append((handler, handler.setStream(proxy)))

    def stop_bar(self) -> None:
        super().stop_bar()
        for handler, stream in self._restore:
            handler.setStream(stream)
        self._restore = []


def _console_handlers() -> list[logging.StreamHandler]:
    """The stream (not file) handlers of the root logger and of Lightning's own loggers."""
    loggers = [logging.getLogger(), logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric")]
    return [
        h
        for lg in loggers
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


class EpochLines(_EpochTracking, ProgressBar):
    """The progress display for non-interactive logs (Slurm, CI, `> log`): one line per epoch, no carriage returns.

    `epoch 3/30 | train/ppl 9.043 | val/ppl 9.560 | tokens/sec 57,727`; val/ppl only after epochs that validated.
    """

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # An epoch's train/ppl and tokens/sec may be logged after callbacks' on_train_epoch_end (an epoch cut short by
    # max_steps is logged from CharLM's and Throughput's): so each line is written when the next epoch starts, and
    # the last one when training ends.
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
        epoch = trainer.current_epoch  # between epochs: the number of finished ones, i.e. the 1-based last one
        m = self.get_metrics(trainer, pl_module)  # tokens/sec: this epoch's train/tokens_per_sec, as CSV and W&B
        names = {"train/ppl": "train/ppl", "val/ppl": "val/ppl", "train/tokens_per_sec": "tokens/sec"}
        parts = [f"epoch {epoch}/{trainer.max_epochs}"]
        for key, name in names.items():
            if key in m and (key != "val/ppl" or self._val_is_fresh(epoch)):
                parts.append(f"{name} {fmt_metric(name, float(m[key]))}")
        log.info(" | ".join(parts))


class ParameterCount(ModelSummary):
    """Lightning's model summary as one line, `model fused: 226,844 parameters`, instead of its table.

    Being a ModelSummary, it takes the place of the one Lightning adds (trainer.enable_model_summary); Lightning's
    table is `callbacks.model_summary=null` away, or `_target_: lightning.pytorch.callbacks.ModelSummary` for depth.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            n = sum(p.numel() for p in pl_module.parameters())
            name = getattr(pl_module, "hparams", {}).get("name", type(pl_module).__name__)
            log.info("model %s: %s parameters", name, f"{n:,}")


def progress(enabled: bool = True, refresh_rate: int = 1) -> Callback:
    """The progress display: a live Rich bar on a terminal, one line per epoch when stdout is not a TTY.

    `enabled` is `trainer.enable_progress_bar`: when false this returns a callback that does nothing, since Lightning
    refuses a progress-bar callback alongside `enable_progress_bar=false`.
    """
    if not enabled:
        return Callback()
    return MetricsBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else EpochLines()


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` (train/grad_norm, what clipping by norm acts on), on the device: no host sync."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class StepMetrics(Callback):
    """On the steps the loggers write: train/loss and the global L2 gradient norm before clipping (what
    trainer.gradient_clip_val acts on), computed on the device (lightning's grad_norm() copies every norm to the host:
    a GPU sync per parameter per step). The module hands its loss over with keep().

    Handed to each logger directly, at Lightning's step and with its epoch key, not through self.log: its result
    collection costs a measurable share of a small model's step (docs/precision.md), and these are step values with
    nothing to reduce over steps or ranks. Nor through Lightning's logger connector, which calls every logger's
    save() after each call (Lightning #4664, won't fix): CSVLogger would reopen and append metrics.csv every logging
    step (slow on a cluster's network file system) instead of every `flush_logs_every_n_steps` steps; epoch ends,
    validation and the run's end still write it out.
    """

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None  # the training step's loss on a step the loggers write

    def keep(self, trainer: L.Trainer, loss: torch.Tensor) -> None:
        """Keep the training step's loss if this step is logged (written with the gradient norm, before the step)."""
        if should_update_logs(trainer):
            self.loss = loss.detach()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not trainer.loggers or not should_update_logs(trainer):
            return
        metrics = {} if self.loss is None else {"train/loss": self.loss}
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            metrics["train/grad_norm"] = grad_norm(grads)
        self._write(trainer, metrics)

    def write(self, trainer: L.Trainer, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Log a step's loss and gradient norm computed elsewhere (a replayed CUDA graph's step) if it is logged."""
        if trainer.loggers and should_update_logs(trainer):
            self._write(trainer, {"train/loss": loss, "train/grad_norm": grad_norm})

    @staticmethod
    def _write(trainer: L.Trainer, metrics: dict[str, torch.Tensor]) -> None:
        if not metrics:
            return
        values = torch.stack([v.float() for v in metrics.values()]).tolist()  # one host read for all of them
        scalars = dict(zip(metrics, values, strict=True)) | {"epoch": trainer.current_epoch}
        step = batches_that_stepped(trainer)  # the step Lightning's own step metrics get
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)


def _lr(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """The configured learning rate (a scheduler's start value), as the sweep table writes it."""
    lr = getattr(getattr(pl_module, "optimizer", None), "keywords", {}).get("lr")  # Hydra's partial optimizer
    if lr is None and trainer.optimizers:
        group = trainer.optimizers[0].param_groups[0]
        lr = group.get("initial_lr", group.get("lr"))
    return f"{lr:g}" if isinstance(lr, (int, float)) else "?"


class PerplexityCurve(Callback):
    """Collects train/val perplexity per epoch and writes `ppl.png` into the run folder (and to W&B) at the end.

    The curves travel in every checkpoint (Lightning saves a callback's state_dict), so a resumed run's ppl.png
    starts at epoch 1, not at the resume; a run that stops on a signal or an error draws what it has.
    """

    def __init__(self, dirpath: str | Path, filename: str = "ppl.png") -> None:
        self.path = Path(dirpath) / filename
        self.curves: dict[str, list[tuple[int, float]]] = {"train/ppl": [], "val/ppl": []}

    def state_dict(self) -> dict[str, Any]:
        return {"curves": {k: [list(p) for p in v] for k, v in self.curves.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curves = {k: [(int(e), float(v)) for e, v in points] for k, points in state_dict["curves"].items()}

    def _put(self, key: str, epoch: int, value: float) -> None:
        points = self.curves[key]
        if points and points[-1][0] == epoch:  # a resume from an epoch's end passes that end again
            points.pop()
        points.append((epoch, value))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._put("val/ppl", trainer.current_epoch + 1, _metric(trainer, "val/ppl"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._put("train/ppl", trainer.current_epoch + 1, _metric(trainer, "train/ppl"))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown after an exception (the interrupt's included)
        if trainer.state.fn != "fit":
            return
        try:
            self.teardown(trainer, pl_module, "fit")
        except Exception as e:  # the plot must not hide why the run stopped (a full disk, say): that error goes on
            log.warning("could not draw %s: %s", self.path, e)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or not any(self.curves.values()):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hp = pl_module.hparams
        title = f"{hp.get('name', '')}, hidden {hp.get('hidden_size', '')}, lr {_lr(trainer, pl_module)}"
        clip = trainer.gradient_clip_val
        title += f", clip {clip:g}" if isinstance(clip, (int, float)) else ", no clipping"
        plot_ppl_curves({"": self.curves}, self.path, title, mark_best=True)
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
            # the whole run's training tokens over its training time (summary.json's tokens_per_sec); W&B's own
            # train/tokens_per_sec summary stays the last epoch's, as its history defines the name
            "run/tokens_per_sec": pl_module.tokens_per_sec,
            "epochs": trainer.current_epoch,
            "sample": pl_module.sample,
        }
        for lg in wandb_loggers(trainer.loggers):
            lg.experiment.summary.update(summary)
