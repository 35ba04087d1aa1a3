"""Faults at one optimizer step, also inside a steps_per_call chunk (+callbacks.x._target_=helpers.mid_chunk...).

helpers.inject acts at a batch end, which with steps_per_call K > 1 is a chunk's end; these act in
on_before_optimizer_step, which Lightning calls at every optimizer step (K per call under the step engine).
"""

from __future__ import annotations

import math
import os
import signal

import lightning as L
from lightning.pytorch.callbacks import Callback


class SignalBeforeStep(Callback):
    """Send this process `signum` just before optimizer step `step` (0-based: when global_step == step)."""

    def __init__(self, step: int, signum: str = "SIGTERM"):
        self.step, self.signum = step, getattr(signal, signum)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class NanGradsAt(Callback):
    """Make every gradient NaN just before optimizer step `step`: the weights it leaves are NaN, and so is the loss
    of the next step, `step` + 1."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)
