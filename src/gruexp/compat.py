"""Every private Lightning name gruexp's module and callbacks use, each behind one small named function or class.

They are pinned to the Lightning range in pyproject.toml (`lightning>=2.4,<2.7`): a release may move or rename any
of them without notice, so tests/test_compat.py checks each one on a real Trainer and fails where one has gone.
Lifting the pin means running that file first. Each is here because no public API gives the same thing:

- should_update_logs: whether this step's metrics reach the loggers (`log_every_n_steps`, or the run stopping);
  CharLM keeps its loss, and StepMetrics writes the gradient norm, only on those steps.
- batches_that_stepped: the step number Lightning's own step metrics are logged at (global_step counts optimizer
  steps, and differs from it under gradient accumulation and resumes).
- advance_logging_step: moves that step on inside one call of the training step (gruexp.steps' K steps), so
  that step metrics are logged at the optimizer step they belong to.
- advance_optimizer_step: counts an optimizer step that ran outside Lightning's optimizer (a replayed CUDA graph's,
  gruexp.graphs), so that global_step, max_steps and checkpoints count it.
- forget_train_loader: drops the training loader that estimated_stepping_batches set up (in configure_optimizers,
  before a checkpoint's loop state is restored): Lightning sets its loader up once per fit and loads a saved loader
  position only then, so a resumed run would start its epoch over; forgotten, the fit loop sets it up again.
- checkpoint_batches_that_stepped: the same counter as a checkpoint stores it (Lightning's loop state layout), the
  step a resumed run's logging goes on from.
- attached_trainer: the module's trainer, or None outside one (`module.trainer` raises there).
- CURRENT_HOOK: the attribute Lightning names the running hook in, about 50 times a training step.
- RichBar: Lightning's Rich progress bar with its start, stop and epoch-description methods given public names.

launch.py's DDP launcher and preflight.py's precision list use a few more private names; tests/test_compat.py checks
those too.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

CURRENT_HOOK = "_current_fx_name"


def should_update_logs(trainer: L.Trainer) -> bool:
    """True on the training steps whose metrics Lightning writes to the loggers."""
    return trainer._logger_connector.should_update_logs


def batches_that_stepped(trainer: L.Trainer) -> int:
    """The step Lightning logs its own training-step metrics at (batches that stepped the optimizer)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def advance_logging_step(trainer: L.Trainer) -> None:
    """Count one more optimizer step for the loggers inside a training-step call (the step engine's K steps);
    Lightning adds the call's last one itself after the call."""
    trainer.fit_loop.epoch_loop._batches_that_stepped += 1


def advance_optimizer_step(trainer: L.Trainer) -> None:
    """Count one optimizer step of manual optimization that did not go through LightningOptimizer.step."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def forget_train_loader(trainer: L.Trainer) -> None:
    """Make the fit loop set its training loader up again when it starts (then with a resumed run's position)."""
    trainer.fit_loop._combined_loader = None


def checkpoint_batches_that_stepped(checkpoint: dict) -> int:
    """batches_that_stepped as a Lightning checkpoint saved it; 0 for a checkpoint without loop state."""
    state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(state.get("_batches_that_stepped", 0))


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer running `module`, or None when it runs in none (a bare module saved or loaded by hand)."""
    return module._trainer


class RichBar(RichProgressBar):
    """Lightning's RichProgressBar whose private start, stop and train-description methods call public ones.

    Subclasses override start_bar, stop_bar and train_description (calling super() for Lightning's behaviour).
    """

    def _init_progress(self, trainer: L.Trainer) -> None:
        self.start_bar(trainer)

    def _stop_progress(self) -> None:
        self.stop_bar()

    def _get_train_description(self, current_epoch: int) -> str:
        return self.train_description(current_epoch)

    def start_bar(self, trainer: L.Trainer) -> None:
        """Start the live bar (each stage calls this; Lightning starts it once until it is stopped)."""
        super()._init_progress(trainer)

    def stop_bar(self) -> None:
        """Stop the live bar."""
        super()._stop_progress()

    def train_description(self, current_epoch: int) -> str:
        """The text left of the training bar, for the 0-based `current_epoch`."""
        return super()._get_train_description(current_epoch)
