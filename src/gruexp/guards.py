"""Guards during training: what Lightning leaves to us when a run diverges or is told to stop, and the exit codes.

- StepChecks: both decisions in one small tensor on the module's device: one collective per DDP step at most,
  none and no host sync on one process but every `log_every_n_steps` batches and where a checkpoint is written.
- DivergenceDetector: a non-finite loss stops the run (Diverged), naming the step, before any checkpoint takes its
  weights.
- InterruptCheckpoint: SIGTERM or SIGINT stop every rank after the same batch and save last.ckpt there
  (Interrupted), so a preempted run resumes exactly; crashes and divergence save nothing.
- stop_on_signals: outside training's batches (setting up, testing) a signal stops the run at once (Stopped).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from gruexp import stack
from gruexp.checkpoints import LAST

log = logging.getLogger(__name__)

INTERRUPT_EXIT = 130  # the shell's code for a run stopped by Ctrl+C (128 + SIGINT)
DIVERGED_EXIT = 3


class Diverged(RuntimeError):
    """The training loss became non-finite; raised before any checkpoint could take the weights that followed it."""

    def __init__(self, step: int, epoch: int, loss: float, clip: float | None = None):
        """`clip`: the gradient clipping norm the run had (None: no clipping), for the advice."""
        self.step, self.epoch, self.loss = step, epoch, loss
        advice = (
            "clip gradients (trainer.gradient_clip_val=1.0)"
            if not clip
            else f"clip harder (trainer.gradient_clip_val is {clip:g})"
        )
        super().__init__(
            f"training diverged: loss is {loss:.4g} (perplexity exp(loss) is not finite) at step {step} "
            f"(epoch {epoch}); lower optimizer.lr or {advice}"
        )


class StepChecks:
    """What DivergenceDetector and InterruptCheckpoint decide, in one small tensor on the module's device.

    Both callbacks share one StepChecks per trainer (`StepChecks.of(trainer)`). Each step's loss (training_step's,
    unscaled) is kept as the device tensor it is (no op, no sync); a *check* turns the losses since the last check
    and this rank's signal into `[signal, -(first non-finite step)]`, reduces it with max over ranks (one
    collective) and reads it on the host (one sync). When a check runs:

    - one process: only where something can have changed what the run must do: every `log_every_n_steps` batches,
      at an epoch's last batch, after a signal (a host flag, read for free each step), before validation, before
      any checkpoint is written and at the end of training. Other steps: no collective, no sync.
    - DDP: every batch, since a signal may reach any one rank at any time and the ranks must stop after the same
      batch (Lightning 2.6 itself broadcasts a SIGTERM flag with `.item()` every DDP step, so this adds no stall).

    Why no non-finite update reaches a checkpoint: every checkpoint Lightning writes goes through
    `Callback.on_save_checkpoint` on every rank before the file is written, and DivergenceDetector checks there
    (and before validation, whose end is where ModelCheckpoint saves); a loss that was not finite raises Diverged,
    so nothing is written. The weights in memory may hold up to `log_every_n_steps` bad updates when that happens;
    they are never saved, and the run ends "diverged".
    """

    _by_trainer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.losses: list[tuple[int, torch.Tensor]] = []  # (global step, its loss, or a chunk's) since the check
        self.signum = 0  # the signal this rank received, 0 if none
        self.stop = 0  # the signal all ranks agreed to stop on
        self.detect = False  # a DivergenceDetector is on: keep each step's loss
        self._step = 0  # the optimizer step the current batch belongs to (global_step at its start)
        self.collectives = 0  # counts, for tests and docs: what the checks cost
        self.host_reads = 0
        self._batch = -1  # the batch whose end was handled (both callbacks call at_batch_end)

    @classmethod
    def of(cls, trainer: L.Trainer) -> StepChecks:
        """The StepChecks of this trainer, made on first use."""
        if trainer not in cls._by_trainer:
            cls._by_trainer[trainer] = cls()
        return cls._by_trainer[trainer]

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_end: bool = False) -> None:
        """Agree over all ranks on [signal, first non-finite step]; raise Diverged if a loss was not finite.

        Away from a batch end (validation, a save, the end) it checks only when losses are pending, which every
        rank has alike; a pending signal, which may reach one rank only, waits for the next batch end.
        """
        distributed = trainer.world_size > 1
        if not self.losses and not (batch_end and (distributed or self.signum)):
            return  # nothing recorded since the last check: nothing can have changed
        device = pl_module.device
        # a steps_per_call chunk keeps its k losses as one tensor, of steps first .. first + k - 1
        steps = [float(s + i) for s, losses in self.losses for i in range(losses.numel())]
        # one host-to-device copy of what the host knows, then device ops only
        known = torch.tensor([float(self.signum), *steps], device=device)
        if self.losses:
            losses = torch.cat([loss.reshape(-1) for _, loss in self.losses]).float()
            # exp(loss) overflows float32 above ~88.7: the perplexity is infinite long before the loss is
            bad = ~torch.isfinite(losses.exp())
            first = torch.where(bad, -known[1:], torch.full_like(known[1:], -math.inf)).amax()
        else:
            first = torch.full((), -math.inf, device=device)
        decision = torch.stack((known[0], first))
        if distributed:  # max over ranks: any rank's signal, the earliest non-finite step
            decision = trainer.strategy.reduce(decision, reduce_op="max")
            self.collectives += 1
        signum, neg_step = decision.tolist()
        self.host_reads += 1
        mine, self.losses = self.losses, []
        self.stop = self.stop or int(signum)
        if neg_step != -math.inf:
            step = int(-neg_step)
            at = [losses.reshape(-1)[step - s] for s, losses in mine if 0 <= step - s < losses.numel()]
            loss = float(at[0]) if at else math.nan
            if math.isfinite(loss) and loss < 88:
                loss = math.nan  # another rank's loss was the bad one: this rank cannot name it
            # the Trainer clips at K = 1, the module under the step engine (gruexp.steps)
            clip = getattr(trainer, "gradient_clip_val", None) or getattr(pl_module, "clip", (None,))[0]
            raise Diverged(step, trainer.current_epoch, loss, clip)

    def at_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any) -> None:
        """After each training batch: keep its loss, check when due, stop (after this batch) on an agreed signal.

        The loss is training_step's, from `outputs`: the one on_before_backward sees is multiplied by the loss
        scale under 16-mixed, whose exp() overflows while the loss is fine.
        """
        progress = trainer.fit_loop.epoch_loop.batch_progress
        batch = progress.total.ready
        if batch == self._batch:
            return  # the other callback of the pair handled this batch
        self._batch = batch
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.detect and isinstance(loss, torch.Tensor):
            self.losses.append((self._step, loss.detach()))
        last = progress.is_last_batch
        due = (
            trainer.world_size > 1
            or last
            or self.signum
            or self.stop
            or trainer.should_stop
            or batch % max(trainer.log_every_n_steps, 1) == 0
        )
        if due:
            self.check(trainer, pl_module, batch_end=True)
        # not at an epoch's last batch, so that its validation runs before the stop (the next batch stops)
        if self.stop and not last:
            raise Interrupted(self.stop, trainer.global_step)


class DivergenceDetector(Callback):
    """Stop the run as "diverged" at the first loss whose perplexity is not finite, on all ranks at once.

    Lightning's EarlyStopping(check_finite=True) checks only a logged metric at epoch end, after ModelCheckpoint may
    already have saved the NaN weights. This keeps every step's loss on the device and checks them as StepChecks
    says: every `log_every_n_steps` batches, at epoch end, before validation and before any checkpoint is written,
    so a non-finite update never reaches a checkpoint and the GPU is not stalled on every step.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        StepChecks.of(trainer).detect = True

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        StepChecks.of(trainer)._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        StepChecks.of(trainer).at_batch_end(trainer, pl_module, outputs)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            StepChecks.of(trainer).check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # every save (ModelCheckpoint, InterruptCheckpoint, trainer.save_checkpoint) passes here on all ranks first
        StepChecks.of(trainer).check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        StepChecks.of(trainer).check(trainer, pl_module)


class Interrupted(SystemExit):
    """Training stopped on a signal at a batch boundary, after last.ckpt was saved; exit status 128 + signal."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(128 + signum)


class InterruptCheckpoint(Callback):
    """On SIGTERM (SLURM preemption) or SIGINT (Ctrl+C): finish the batch, save last.ckpt on every rank, exit.

    Lightning's own SIGTERM handling raises on each rank at the first batch end after that rank saw the signal;
    under DDP the ranks can stop at different batches and then wait on each other's collectives forever, and it
    leaves SIGINT to raise KeyboardInterrupt mid-step. So during training we take both signals, agree (StepChecks:
    the same tensor as DivergenceDetector's, one collective per DDP step, none on one process) whether any rank
    got one, and all stop after the same batch (not an epoch's last, so that epoch's validation still runs before
    the stop). A second signal of the same kind acts at once (the old handlers). Only interruptions save: after a
    crash or divergence the weights may be bad and the last good file stays.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._checks = StepChecks()  # replaced by the trainer's at on_train_start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checks = StepChecks.of(trainer)
        # after Lightning installed its SIGTERM handler (just before training): ours go on top until the end
        if not self._previous and _in_main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        elif (trials := stack.current()) is not None:  # a stacked trial: the stack's main thread takes signals
            trials.listen(self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning(
            "%s: finishing the current batch, saving last.ckpt, then exiting (send it again to abort now)",
            signal.Signals(signum).name,
        )
        self._checks.signum = signum
        self._restore()

    def _restore(self) -> None:
        if _in_main_thread():
            for s, handler in self._previous.items():
                signal.signal(s, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        StepChecks.of(trainer).at_batch_end(trainer, pl_module, outputs)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        ckpt = trainer.checkpoint_callback
        if not isinstance(exception, Interrupted) or not isinstance(ckpt, ModelCheckpoint) or not ckpt.dirpath:
            return
        # raised from on_train_batch_end: Lightning resumes this like ModelCheckpoint's every_n_train_steps saves
        path = os.path.join(ckpt.dirpath, LAST)
        trainer.save_checkpoint(path)
        ckpt.last_model_path = path
        if trainer.is_global_zero:
            log.warning(
                "saved %s at epoch %d, step %d: resume with ckpt_path=last (or ckpt_path=%s)",
                path,
                trainer.current_epoch,
                trainer.global_step,
                path,
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


def signalled_after_training(trainer: L.Trainer, pl_module: L.LightningModule) -> int:
    """A signal InterruptCheckpoint took after training's last batch (during the last validation, which it lets
    finish, and its save): the run must end interrupted, not go on to test. Agreed over DDP ranks; 0 if none."""
    checks = StepChecks.of(trainer)
    signum = checks.stop or checks.signum
    if trainer.world_size > 1:  # every rank asks, so the collective matches: a signal may reach one rank only
        agreed = trainer.strategy.reduce(torch.tensor(float(signum), device=pl_module.device), reduce_op="max")
        signum = int(agreed)
    return int(signum)


class Stopped(SystemExit):
    """SIGINT or SIGTERM outside training's batches (setting up, testing): stopped at once; exit 128 + signal."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(128 + signum)


@contextmanager
def stop_on_signals(doing: str) -> Iterator[None]:
    """While setting up or testing, SIGINT and SIGTERM stop the run at once, with one line, as Stopped.

    Unhandled, SIGTERM kills the process silently (exit 143, no summary, a half-written token file left), and
    Lightning turns Ctrl+C inside trainer.test into exit 1. Raised here, every `finally` on the way out runs.
    """
    if not _in_main_thread():
        yield
        return
    said: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not said:
            said.append(signum)
            log.warning("%s while %s: stopping", signal.Signals(signum).name, doing)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in InterruptCheckpoint.SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
