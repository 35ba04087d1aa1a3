"""Faults at one optimizer step, also inside a steps_per_call chunk (+callbacks.x._target_=helpers.mid_chunk...).

helpers.inject acts at a batch end, which with steps_per_call K > 1 is a chunk's end; these act in
on_before_optimizer_step, which Lightning calls at every optimizer step (K per call under the step engine).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal

import lightning as L
from lightning.pytorch.callbacks import Callback


class SignalBeforeStep(Callback):
    """Send this process `signum` just before optimizer step `step` (0-based: when global_step == step). In a
    sweep, `seed: ${seed}` with `only_seed` arms it in that job only (the jobs of a stack share a process)."""

    def __init__(self, step: int, signum: str = "SIGTERM", seed: int | None = None, only_seed: int | None = None):
        self.step, self.signum = step, getattr(signal, signum)
        self.armed = only_seed is None or seed == only_seed

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.armed and trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class NanGradsAt(Callback):
    """Make every gradient NaN just before optimizer step `step`: the weights it leaves are NaN, and so is the loss
    of the next step, `step` + 1. `seed`, `only_seed`: as SignalBeforeStep's."""

    def __init__(self, step: int, seed: int | None = None, only_seed: int | None = None):
        self.step = step
        self.armed = only_seed is None or seed == only_seed

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.armed and trainer.global_step == self.step:
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.fill_(math.nan)


class HookOrder(Callback):
    """Record each per-step hook Lightning calls around backward and the optimizer step, with global_step and the
    hook name the module holds meanwhile, and whether on_before_backward came through Lightning's precision plugin
    (its pre_backward is on the stack); written to `path` (JSON) at the end of training."""

    def __init__(self, path: str):
        self.path, self.calls, self.through_lightning = path, [], set()

    def _note(self, trainer: L.Trainer, pl_module: L.LightningModule, hook: str) -> None:
        self.calls.append([hook, trainer.global_step, pl_module._current_fx_name])

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._note(trainer, pl_module, "on_before_backward")
        self.through_lightning.add(any(f.function == "pre_backward" for f in inspect.stack(0)))

    def on_after_backward(self, trainer, pl_module) -> None:
        self._note(trainer, pl_module, "on_after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._note(trainer, pl_module, "on_before_optimizer_step")

    def on_train_end(self, trainer, pl_module) -> None:
        with open(self.path, "w") as f:
            json.dump({"calls": self.calls, "through_lightning": sorted(self.through_lightning)}, f)
