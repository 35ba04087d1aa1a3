"""The C inner loop of the fused GRU on the CPU (gru_cpu.c): compiled once per machine, cached, called via ctypes.

Why C and not torch ops: at d2l's shape one step of the recurrence is about ten small ATen calls of a few
microseconds each, forward and backward, and that dispatch costs as much as the step's GEMM. This CPU build of
torch cannot fuse TorchScript (no LLVM), torch.compile takes about a minute per new shape, and a
torch.utils.cpp_extension build compiles the ATen headers for about a minute on every fresh machine. The kernel
needs none of that: plain C, compiled in well under a second by the system's C compiler, calling the BLAS torch
itself links (sgemm_ in libtorch_cpu) through a pointer. Where any of it is missing (no compiler, a torch whose
library exports no sgemm_) `load()` returns None with one warning, and backends.py chooses the torch-op loop
(gru_ops.py), which computes the same function. GRUEXP_FUSED_CPU=ops chooses that loop on purpose.

`forward` and `backward` are fused.GRURecurrence's backend, with gru_ops.py's signature; `kernel_forward` and
`kernel_backward` are the bare calls into the library.
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
    # S, T, B, H, gi, gi_stride, tok, w_hh, b_hh, hs, G, N, threads
    "gru_forward_trials": [_I, _I, _I, _I, _P, ctypes.c_long, _P, _P, _P, _P, _P, _P, _I],
    # S, T, B, H, dhs, dh_T, tok, w_hh, hs, G, N, dgi, gi_stride, dgh, dh0, threads
    "gru_backward_trials": [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_long, _P, _P, _I],
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


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and cached per machine; None (and one warning) where it cannot be."""
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


def refuse_unsupported(*tensors: Tensor) -> None:
    """A ValueError naming the dtypes and devices where the kernel cannot take these tensors (supports): it reads
    them as raw float32 or float64 arrays."""
    if not supports(*tensors):
        dtypes = ", ".join(f"{t.dtype} on {t.device}" for t in tensors)
        raise ValueError(f"the C loop takes all-float32 or all-float64 tensors on the CPU, got {dtypes}")


def threads_for(B: int, H: int) -> int:
    """torch's thread count, less where a thread would get under 16 hidden units or the step is too small to share."""
    if B * H * H < MIN_WORK_PER_THREAD:
        return 1
    return max(1, min(torch.get_num_threads(), H // 16))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None, reset_after: bool, save: bool
) -> tuple[Tensor, tuple]:
    """hs [T, B, H] and, if save, what backward needs; with tokens [T, B], gi is the table [V, 3H] they index.

    Refuses what it cannot compute (no library here, the reset-before form, other devices or dtypes) with a clear
    error: backends.choose picks the op loop for those, and a backend forced on them should fail, not fall back.
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the C loop could not be built on this machine (the warning above says why)")
    if not reset_after:
        raise ValueError("the C loop computes the reset-after form only")
    gi, h0, w_hh, b_hh = (t.contiguous() for t in (gi, h0, w_hh, b_hh))
    refuse_unsupported(gi, h0, w_hh, b_hh)
    if tokens is not None:
        tokens = tokens.to(torch.int64).contiguous()
        check_ids(tokens, gi.shape[0])
    HS, buffers = kernel_forward(lib, gi, h0, w_hh, b_hh, save, tokens)
    return HS[1:], ((tokens, w_hh, HS, *buffers) if save else ())


def backward(
    dhs: Tensor, dh_T: Tensor, saved: tuple, reset_after: bool, vocab_size: int, need_dh0: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Gradients of gi (with tokens: of the [vocab_size, 3H] table), h0 (None unless need_dh0), W_hh and b_hh; the
    C loop computes the first two, and the weight gradients are one GEMM and one sum here."""
    tokens, w_hh, HS, G, N = saved
    T, B, H = dhs.shape
    dgi, dG_h, dh0 = kernel_backward(
        load(), dhs.contiguous(), dh_T.contiguous(), w_hh, HS, G, N, need_dh0, tokens, vocab_size
    )
    dG_h = dG_h.view(T * B, 3 * H)
    return dgi, dh0, dG_h.t() @ HS[:-1].reshape(T * B, H), dG_h.sum(0)


def check_ids(tokens: Tensor, vocab_size: int) -> None:
    """The C loop reads table rows by id unchecked: refuse what F.embedding refuses."""
    lo, hi = torch.aminmax(tokens)  # one pass over the ids, not a min() and a max()
    if not 0 <= int(lo) <= int(hi) < vocab_size:
        raise IndexError(f"token ids must lie in [0, {vocab_size}): the vocabulary has {vocab_size} tokens")


def kernel_forward(
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
    if T and B:  # an empty batch or sequence: nothing to compute, no call into the library
        fn(T, B, H, *map(_ptr, (gi, tokens, w_hh, b_hh, HS, G, N)), threads or threads_for(B, H))
    return HS, ((G, N) if save else ())


def kernel_backward(
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
    if T and B:
        fn(T, B, H, *map(_ptr, args), threads or threads_for(B, H))
    return dgi, dgh, dh0


def forward_trials(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None, save: bool
) -> tuple[Tensor, tuple]:
    """`forward` for S trials of one shape, every argument with a leading trial dimension (gruexp.models.stacked):
    hs [S, T, B, H] and what backward_trials needs. The trials run side by side, each on one thread."""
    lib = load()
    if lib is None:
        raise RuntimeError("the C loop could not be built on this machine (the warning above says why)")
    gi, h0, w_hh, b_hh = (t.contiguous() for t in (gi, h0, w_hh, b_hh))
    refuse_unsupported(gi, h0, w_hh, b_hh)
    S, B, H = h0.shape
    if tokens is not None:
        tokens = tokens.to(torch.int64).contiguous()
        check_ids(tokens, gi.shape[1])
    T = tokens.shape[1] if tokens is not None else gi.shape[1]
    HS = h0.new_empty(S, T + 1, B, H)
    HS[:, 0] = h0
    G, N = (h0.new_empty(S, T, B, 3 * H), h0.new_empty(S, T, B, H)) if save else (None, None)
    fn = lib.gru_forward_trials_f32 if h0.dtype == torch.float32 else lib.gru_forward_trials_f64
    if S and T and B:
        args = (gi, gi[0].numel(), tokens, w_hh, b_hh, HS, G, N)
        fn(S, T, B, H, *(a if isinstance(a, int) else _ptr(a) for a in args), _trial_threads(S))
    return HS[:, 1:], ((tokens, w_hh, HS, G, N) if save else ())


def backward_trials(
    dhs: Tensor, dh_T: Tensor, saved: tuple, vocab_size: int, need_dh0: bool
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """`backward` for forward_trials: the gradients of gi, h0 (None unless need_dh0), W_hh and b_hh, each [S, ...]."""
    tokens, w_hh, HS, G, N = saved
    S, T, B, H = dhs.shape
    dhs, dh_T = dhs.contiguous(), dh_T.contiguous()
    dgh = torch.empty_like(G)
    dgi = dgh.new_zeros(S, vocab_size, 3 * H) if tokens is not None else torch.empty_like(G)
    dh0 = dhs.new_empty(S, B, H) if need_dh0 else None
    fn = load().gru_backward_trials_f32 if dhs.dtype == torch.float32 else load().gru_backward_trials_f64
    if S and T and B:
        args = (dhs, dh_T, tokens, w_hh, HS, G, N, dgi, dgi[0].numel(), dgh, dh0)
        fn(S, T, B, H, *(a if isinstance(a, int) else _ptr(a) for a in args), _trial_threads(S))
    dG_h = dgh.view(S, T * B, 3 * H)
    dw_hh = torch.bmm(dG_h.transpose(1, 2), HS[:, :-1].reshape(S, T * B, H))
    return dgi, dh0, dw_hh, dG_h.sum(1)


def _trial_threads(trials: int) -> int:
    return max(1, min(torch.get_num_threads(), trials))
