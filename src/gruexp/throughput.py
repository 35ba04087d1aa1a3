"""Training throughput: tokens/sec per epoch and over the whole run, and the model FLOPs utilisation (train/mfu).

Tokens are counted on the host from batch shapes and the device is synchronised once an epoch, so the training
step does no host sync for them. CharLM holds one Throughput and supplies it to the trainer as a callback.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

# NVIDIA's H200 (SXM) has the H100 SXM's compute; its datasheet's FP16/BF16 989 and 1979 TFLOP/s are without and
# with sparsity. Lightning's table knows an H200 only by names CUDA does not report (CUDA says "NVIDIA H200"), and
# lists the sparse figures. Dense FLOP/s, as Lightning's H100's.
H200_FLOPS: dict[torch.dtype | str, float] = {
    torch.float32: 66.9e12,
    "tfloat32": 494.7e12,
    torch.bfloat16: 989.4e12,
    torch.float16: 989.4e12,
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak FLOP/s in `dtype` (float32 counts as TF32 unless matmul precision is 'highest'), for
    train/mfu: Lightning's get_available_flops, and the H200 by the name CUDA gives it; None where unknown (CPUs)."""
    if device.type == "cuda" and torch.cuda.get_device_name(device).lower() == "nvidia h200":
        if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
            dtype = "tfloat32"
        return H200_FLOPS.get(dtype)
    return get_available_flops(device, dtype)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the matrix products run in under a Trainer's `precision` ("bf16-mixed" -> bfloat16, ...).

    Not Lightning's own reading (fabric's `_plugin_to_compute_dtype`): it knows only Fabric's plugins and takes a
    Trainer's bf16 and 16-bit plugins for float32, which would measure their MFU against the fp32 peak.
    """
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def mfu(tokens_per_sec: float, flops_per_token: int, peak: float, world_size: int = 1) -> float:
    """Model FLOPs utilisation: the model's FLOP/s over the peak FLOP/s of all `world_size` devices."""
    return tokens_per_sec * flops_per_token / (peak * world_size)


def gather_epoch(module: L.LightningModule, tokens: int, seconds: float) -> tuple[int, float]:
    """All ranks' training tokens and the slowest rank's time: one all_gather on the module's device."""
    if module.trainer.world_size == 1:
        return tokens, seconds
    here = torch.tensor([float(tokens), seconds], dtype=torch.float64, device=module.device)
    everyone = module.all_gather(here).reshape(-1, 2).cpu()
    return int(everyone[:, 0].sum()), float(everyone[:, 1].max())


class Throughput(Callback):
    """Training tokens over training wall time, per epoch and over the whole run (all ranks' tokens).

    As a callback it times each training epoch, counts its tokens from the target batches' shapes and logs
    train/tokens_per_sec (and, where the device's peak FLOP/s is known, train/mfu) for it.
    """

    def __init__(self, flops_per_token: int | None = None) -> None:
        self.flops_per_token = flops_per_token  # model FLOPs per training token, for train/mfu
        self.tokens, self.seconds = 0, 0.0
        self.epochs: list[tuple[int, float]] = []  # (tokens, seconds) per epoch, for plots
        self.peak: float | None = None  # the device's peak FLOP/s in the compute dtype; None: no train/mfu
        self._epoch_tokens = 0  # this rank's training tokens this epoch
        self._t0 = time.perf_counter()

    def add(self, tokens: int, seconds: float) -> float:
        """Add one epoch; return its tokens/sec."""
        seconds = max(seconds, 1e-9)
        self.epochs.append((tokens, seconds))
        self.tokens += tokens
        self.seconds += seconds
        return tokens / seconds

    @property
    def tokens_per_sec(self) -> float:
        """All epochs' tokens over their summed training time (not the last epoch's, not a mean of rates)."""
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = peak_flops(pl_module.device, compute_dtype(str(trainer.precision)))

    def _start_epoch(self) -> None:
        self._t0, self._epoch_tokens = time.perf_counter(), 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_epoch()  # a mid-epoch resume skips on_train_epoch_start: time that partial epoch from here

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_epoch()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # a chunk of steps_per_call batches says how many it trained (max_steps may stop inside it)
        self._epoch_tokens += (
            outputs["tokens"] if isinstance(outputs, dict) and "tokens" in outputs else batch[1].numel()
        )
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # here, not in on_train_epoch_end: the callbacks before this one (ppl.png, the epoch line) run their
            # on_train_epoch_end first and must see this epoch's figures; validation has not run yet
            self._end_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_epoch(trainer, pl_module)  # an epoch that did not end at its last batch (max_steps)

    def _end_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's train/tokens_per_sec (and train/mfu); add it to the run's."""
        if self._epoch_tokens == 0:
            return  # logged at its last batch already, or a resume re-entering an epoch's end with no batch trained
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once an epoch: the time covers the epoch's queued kernels
        seconds = time.perf_counter() - self._t0
        rate = self.add(*gather_epoch(pl_module, self._epoch_tokens, seconds))
        self._epoch_tokens = 0
        # the values are the same on every rank already: max over ranks keeps them exact and silences the hint
        same = {"on_step": False, "on_epoch": True, "sync_dist": True, "reduce_fx": "max"}
        pl_module.log("train/tokens_per_sec", float(rate), prog_bar=True, **same)
        if self.peak and self.flops_per_token:
            pl_module.log("train/mfu", mfu(rate, self.flops_per_token, self.peak, trainer.world_size), **same)
