"""The C inner loop of the fused GRU on the CPU (gru_cpu.c): compiled once per machine, cached, called via ctypes.

Why C and not torch ops: at d2l's shape one step of the recurrence is about ten small ATen calls of a few
microseconds each, forward and backward, and that dispatch costs as much as the step's GEMM. This CPU build of
torch cannot fuse TorchScript (no LLVM), torch.compile takes about a minute per new shape, and a
torch.utils.cpp_extension build compiles the ATen headers for about a minute on every fresh machine. The kernel
needs none of that: plain C, compiled in well under a second by the system's C compiler, calling the BLAS torch
itself links (sgemm_ in libtorch_cpu) through a pointer. Where any of it is missing (no compiler, a torch whose
library exports no sgemm_) `load()` returns None with one warning, and fused.py keeps its torch-op loop, which
computes the same function. GRUEXP_FUSED_CPU=ops chooses that loop on purpose.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from gruexp import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gru_cpu.c")
# -march=native: the gate loops use the machine's widest SIMD, so the cache key below names the CPU.
# -fno-trapping-math: without it gcc vectorises neither floorf nor the comparisons in the gate loops.
CFLAGS = ["-O3", "-march=native", "-fPIC", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
TYPES = {torch.float32: ("float", "_f32", "0", "sgemm_"), torch.float64: ("double", "_f64", "1", "dgemm_")}
# Below this much work per step (B * H * H), one thread beats sharing the step and meeting at a barrier.
MIN_WORK_PER_THREAD = 1 << 16

_P, _I = ctypes.c_void_p, ctypes.c_int
_ARGTYPES = {
    # T, B, H, gi, tok, w_hh, b_hh, hs, G, N, threads
    "gru_forward": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I],
    # T, B, H, dhs, dh_T, tok, w_hh, hs, G, N, dgi, dgh, dh0, threads
    "gru_backward": [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I],
    "gru_set_gemm": [_P],
}


def _cpu() -> str:
    """The CPU's model and feature flags, which -march=native compiles for."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))


def _compile(cc: str, target: Path) -> None:
    """Build gru_cpu.c, once per real type, into the shared library `target`, atomically: jobs may race here."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = []
        for real, suffix, is_double, _ in TYPES.values():
            obj = f"{tmp}/gru{suffix}.o"
            defines = [f"-DREAL={real}", f"-DSUFFIX={suffix}", f"-DIS_DOUBLE={is_double}"]
            subprocess.run([cc, *CFLAGS, *defines, "-c", str(SOURCE), "-o", obj], check=True, capture_output=True)
            objects.append(obj)
        subprocess.run(
            [cc, "-shared", "-fopenmp", *objects, "-lm", "-o", f"{tmp}/lib.so"], check=True, capture_output=True
        )
        os.replace(f"{tmp}/lib.so", target)


def loop_choice() -> str:
    """$GRUEXP_FUSED_CPU: 'c' (the default, the C loop where it can be built), 'ops' (the torch-op loop) or
    'triton' (the Triton kernels, interpreted); see backends.cpu_choice."""
    from gruexp.models.backends import cpu_choice

    return cpu_choice()


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and cached per machine; None (and one warning) where it cannot be."""
    if loop_choice() == "ops":
        return None
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha1("\0".join([SOURCE.read_text(), *CFLAGS, _cpu(), sys.platform]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"gru_cpu-{key[:16]}.so"
    try:
        blas = ctypes.CDLL(next((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*")))
        if not target.exists():
            _compile(cc, target)
        lib = ctypes.CDLL(str(target))
        for _, suffix, _, gemm in TYPES.values():
            for name, argtypes in _ARGTYPES.items():
                fn = getattr(lib, name + suffix)
                fn.argtypes, fn.restype = argtypes, None
            getattr(lib, "gru_set_gemm" + suffix)(ctypes.cast(getattr(blas, gemm), _P))
    except subprocess.CalledProcessError as e:
        why = (e.stderr.decode(errors="replace").strip() or f"exit status {e.returncode}").splitlines()[0]
        log.warning("fused GRU: no C loop, %s failed (%s); using the torch-op loop", e.cmd[0], why)
        return None
    except (OSError, StopIteration, AttributeError) as e:
        log.warning("fused GRU: no C loop on this machine (%s); using the torch-op loop", e or type(e).__name__)
        return None
    return lib


def supports(*tensors: Tensor) -> bool:
    """Whether the kernel takes these tensors: on the CPU, all float32 or all float64, contiguous."""
    dtype = tensors[0].dtype
    return dtype in TYPES and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


def threads_for(B: int, H: int) -> int:
    """torch's thread count, less where a thread would get under 16 hidden units or the step is too small to share."""
    if B * H * H < MIN_WORK_PER_THREAD:
        return 1
    return max(1, min(torch.get_num_threads(), H // 16))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(
    lib: ctypes.CDLL,
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    save: bool,
    tokens: Tensor | None = None,
    threads: int | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """HS = [h0, h1, ..., hT] ([T+1, B, H]) and, if save, (G, N) for backward.

    gi is x W_ih^T + b_ih [T, B, 3H], or with tokens ([T, B] int64) the table [V, 3H] that they index.
    """
    T, B = tokens.shape if tokens is not None else gi.shape[:2]
    H = h0.shape[-1]
    HS = h0.new_empty(T + 1, B, H)
    HS[0] = h0
    G, N = (h0.new_empty(T, B, 3 * H), h0.new_empty(T, B, H)) if save else (None, None)
    fn = lib.gru_forward_f32 if h0.dtype == torch.float32 else lib.gru_forward_f64
    fn(T, B, H, *map(_ptr, (gi, tokens, w_hh, b_hh, HS, G, N)), threads or threads_for(B, H))
    return HS, ((G, N) if save else ())


def backward(
    lib: ctypes.CDLL,
    dhs: Tensor,
    dh_T: Tensor,
    w_hh: Tensor,
    HS: Tensor,
    G: Tensor,
    N: Tensor,
    need_dh0: bool,
    tokens: Tensor | None = None,
    vocab_size: int = 0,
    threads: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dgi, dgh, dh0): the gradients of gi (or, with tokens, of the [vocab_size, 3H] table), of the recurrent
    pre-activations h W_hh^T + b_hh ([T, B, 3H]) and, if need_dh0, of h0.

    dhs is dL/dh_t through the outputs, dh_T the gradient of the final state, which adds to dhs[-1].
    """
    T, B, H = dhs.shape
    dgh = torch.empty_like(G)
    dgi = dgh.new_zeros(vocab_size, 3 * H) if tokens is not None else torch.empty_like(G)
    dh0 = dhs.new_empty(B, H) if need_dh0 else None
    fn = lib.gru_backward_f32 if dhs.dtype == torch.float32 else lib.gru_backward_f64
    args = (dhs, dh_T, tokens, w_hh, HS, G, N, dgi, dgh, dh0)
    fn(T, B, H, *map(_ptr, args), threads or threads_for(B, H))
    return dgi, dgh, dh0
