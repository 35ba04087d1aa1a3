"""Faults the tests inject through the config (+callbacks.x._target_=helpers.inject.SignalAt, data._target_=...).

Test-only: tests/ is on the path of pytest and, via PYTHONPATH (the inject_path and inject_env fixtures), of the CLI
runs the tests start.
"""

from __future__ import annotations

import os
import signal

import lightning as L
from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send this process `signum` (SIGTERM as SLURM does, or SIGINT as Ctrl+C) once `step` optimizer steps are done."""

    def __init__(self, step: int, signum: str = "SIGTERM"):
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class RaiseAt(Callback):
    """Raise in one DDP rank only, at `step`: the other ranks must not wait for it forever."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise RuntimeError(f"injected failure in rank {self.rank} at step {self.step}")


class SignalInTest(Callback):
    """Send this process `signum` at the first batch of the test that ends a run (Ctrl+C after training)."""

    def __init__(self, signum: str = "SIGINT"):
        self.signum = getattr(signal, signum)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx, *args) -> None:
        if batch_idx == 0 and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class SignalOnSetup:
    """A data module that sends this process `signum` as it is built: Ctrl+C while a run sets up (data=...)."""

    def __init__(self, signum: str = "SIGINT", **data: object):
        os.kill(os.getpid(), getattr(signal, signum))


class SignalInLastValidation(Callback):
    """Send this process `signum` at the first batch of the last epoch's validation (a preemption right there)."""

    def __init__(self, signum: str = "SIGTERM"):
        self.signum = getattr(signal, signum)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx, *a):
        last = trainer.current_epoch == trainer.max_epochs - 1
        if batch_idx == 0 and last and not trainer.sanity_checking and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


def SignalWhileEncoding(signum: str = "SIGTERM", **data: object):  # noqa: N802 (a data._target_, as a class)
    """The data module, sent `signum` while its corpus is first encoded, after the first chunk reached the file."""
    from gruexp.data import CharDataModule, cache

    encode = cache.tokenizers.encode

    def signalled(chunks, tokenizer, name, write):
        def write_then_signal(block):
            write(block)
            os.kill(os.getpid(), getattr(signal, signum))

        return encode(chunks, tokenizer, name, write_then_signal)

    cache.tokenizers.encode = signalled
    return CharDataModule(**data)
