"""Which implementation runs the fused GRU: the one place that reads the environment and decides.

Backends (one file each, docs/fused-backends.md): "c" (gru_cpu.py + gru_cpu.c: the CPU, reset-after), "ops"
(gru_ops.py: the torch-op loop, anywhere, both forms, the reference) and "cudnn" (gru_cudnn.py: torch._VF.gru on
fused's parameters, reset-after). The environment states a preference, read when the model is built:

    GRUEXP_FUSED_CPU=c|ops          (default c)
    GRUEXP_FUSED_GPU=auto|cudnn|ops (default auto: cuDNN for reset-after, the op loop for reset-before)

`choose_backend` is the pure rule; `choose` applies it with what only the machine can say (whether the C loop
builds here) and returns the backend that will really run; a backend forced by the model's `backend=` argument
runs or fails with one line saying why, never falls back.
"""

from __future__ import annotations

import os

import torch

from gruexp import UserError

BACKENDS = ("c", "ops", "cudnn")
CPU_CHOICES = ("c", "ops")
GPU_CHOICES = ("auto", "cudnn", "ops")
# The C loop computes in float32 or float64; bf16/fp16 recurrences reach it upcast to float32 (amp.fp32_recurrence).
C_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def cpu_choice() -> str:
    """$GRUEXP_FUSED_CPU: 'c' (default: the C loop where it can be built) or 'ops' (the torch-op loop)."""
    choice = os.environ.get("GRUEXP_FUSED_CPU", "c")
    if choice not in CPU_CHOICES:
        raise UserError(f"GRUEXP_FUSED_CPU must be 'c' (the C loop) or 'ops' (the torch-op loop), got {choice!r}")
    return choice


def gpu_choice() -> str:
    """$GRUEXP_FUSED_GPU: 'auto' (default), 'cudnn' or 'ops'."""
    choice = os.environ.get("GRUEXP_FUSED_GPU", "auto")
    if choice not in GPU_CHOICES:
        raise UserError(f"GRUEXP_FUSED_GPU must be one of {', '.join(GPU_CHOICES)}, got {choice!r}")
    return choice


def check_forced(backend: str | None, reset_after: bool) -> str | None:
    """A model's `backend=` argument, refused in one line if no such backend exists or it lacks this form."""
    if backend is None:
        return None
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)} (or None: chosen per call), got {backend!r}")
    if not reset_after and backend != "ops":
        raise UserError(f"backend={backend!r} computes the reset-after form only: reset_after=False runs 'ops'")
    return backend


def unavailable(
    backend: str, device: torch.device | str, dtype: torch.dtype, reset_after: bool, c_loadable: bool = True
) -> str | None:
    """Why `backend` cannot run a call on parameters of this device and dtype, or None where it can."""
    device = torch.device(device)
    if backend == "c":
        if device.type != "cpu":
            return f"the C loop runs on the CPU, and the model is on {device}"
        if not reset_after:
            return "the C loop computes the reset-after form only"
        if dtype not in C_DTYPES:
            return f"the C loop computes in float32 or float64, not {dtype}"
        if not c_loadable:
            return "the C loop could not be built on this machine (the warning above says why)"
    elif backend == "cudnn" and not reset_after:
        return "cuDNN has no reset-before form"
    return None


def choose_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    reset_after: bool,
    *,
    cpu: str = "c",
    gpu: str = "auto",
    c_loadable: bool = True,
) -> str:
    """The backend for one call: the environment's preference (cpu on the CPU, gpu on CUDA) where it can run,
    else the op loop, which runs everywhere. c_loadable: whether gru_cpu.load() built the C loop here."""
    device = torch.device(device)
    if device.type == "cpu":
        prefer = cpu
    elif device.type == "cuda":
        prefer = "ops" if gpu == "ops" else "cudnn"
    else:
        prefer = "ops"
    return prefer if unavailable(prefer, device, dtype, reset_after, c_loadable) is None else "ops"


def _c_loadable() -> bool:
    from gruexp.models import gru_cpu  # builds the C loop on first use: only asked where it would run

    return gru_cpu.load() is not None


def choose(
    device: torch.device | str,
    dtype: torch.dtype,
    reset_after: bool,
    *,
    cpu: str | None = None,
    gpu: str | None = None,
    forced: str | None = None,
) -> str:
    """The backend that will run a call: `forced` if it can (else a UserError saying why), otherwise
    choose_backend with the environment's choices (read now where None) and whether the C loop builds here."""
    if forced is not None:
        why = unavailable(forced, device, dtype, reset_after)
        if why is None and forced == "c" and not _c_loadable():
            why = unavailable(forced, device, dtype, reset_after, c_loadable=False)
        if why is not None:
            raise UserError(f"fused GRU: backend={forced!r} cannot run here: {why}")
        return forced
    cpu, gpu = cpu or cpu_choice(), gpu or gpu_choice()
    backend = choose_backend(device, dtype, reset_after, cpu=cpu, gpu=gpu)
    if backend == "c" and not _c_loadable():
        backend = choose_backend(device, dtype, reset_after, cpu=cpu, gpu=gpu, c_loadable=False)
    return backend
