"""Which implementation runs the fused GRU's recurrence, and the first-use timing that decides it on a GPU.

Backends: "c" (gru_cpu.c, the CPU), "ops" (the torch-op loop, anywhere), "cudnn" (torch._VF.gru, nn.GRU's own
function, on fused's parameters; reset-after only) and "triton" (gru_triton.py's persistent kernels, both forms).
`choose_backend` is the one pure rule; the environment picks among them:

    GRUEXP_FUSED_CPU=c|ops|triton      (triton only under TRITON_INTERPRET=1: Triton's CPU interpreter)
    GRUEXP_FUSED_GPU=auto|cudnn|triton|ops

On CUDA, auto runs whichever of Triton and the reference is faster on this GPU at this shape, the reference being
cuDNN for reset-after and the op loop for reset-before (cuDNN has no such form): `Autotuner` times both for a few
steps on first use, as cudnn.benchmark does, and keeps the decision in gruexp's cache folder for later processes.
A Triton failure or a result that disagrees with the reference on that first use falls back to the reference with
one warning: auto never fails where cuDNN works.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from gruexp import UserError, cache_dir

log = logging.getLogger(__name__)

BACKENDS = ("c", "ops", "cudnn", "triton")
GPU_CHOICES = ("auto", "cudnn", "triton", "ops")
CPU_CHOICES = ("c", "ops", "triton")


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1), the only way it runs on a CPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@cache
def triton_available() -> bool:
    """Whether the triton package imports (Linux wheels; torch's CUDA builds bring it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_choice() -> str:
    """$GRUEXP_FUSED_CPU: 'c' (default: the C loop where it can be built), 'ops', or 'triton' (interpreted)."""
    choice = os.environ.get("GRUEXP_FUSED_CPU", "c")
    if choice not in CPU_CHOICES:
        raise UserError(
            f"GRUEXP_FUSED_CPU must be 'c' (the C loop), 'ops' (the torch-op loop) or 'triton' (Triton's interpreter),"
            f" got {choice!r}"
        )
    if choice == "triton" and not triton_interpreted():
        raise UserError("GRUEXP_FUSED_CPU=triton runs the Triton kernels interpreted: set TRITON_INTERPRET=1 too")
    if choice == "triton" and not triton_available():
        raise UserError("GRUEXP_FUSED_CPU=triton needs the triton package: pip install triton==3.7.1")
    return choice


def gpu_choice() -> str:
    """$GRUEXP_FUSED_GPU: 'auto' (default: timed on first use), 'cudnn', 'triton' or 'ops'."""
    choice = os.environ.get("GRUEXP_FUSED_GPU", "auto")
    if choice not in GPU_CHOICES:
        raise UserError(f"GRUEXP_FUSED_GPU must be one of {', '.join(GPU_CHOICES)}, got {choice!r}")
    if choice == "triton" and not triton_available():
        raise UserError("GRUEXP_FUSED_GPU=triton needs the triton package: pip install triton==3.7.1")
    return choice


def choose_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    reset_after: bool,
    needs_grad: bool,
    T: int,
    B: int,
    H: int,
    layers: int,
    *,
    cpu: str = "c",
    gpu: str = "auto",
    tuned: str | None = None,
) -> str:
    """The backend for one call: "c", "ops", "cudnn" or "triton".

    cpu and gpu are the environment's choices; tuned is the Autotuner's first-use decision for this shape (auto on
    CUDA), None before there is one. needs_grad, H and layers do not change the rule today: they are part of the
    shape the Autotuner times. Float64 never goes to Triton (its kernels compute in float32); an empty batch or
    sequence never to a kernel.
    """
    device = torch.device(device)
    empty = T == 0 or B == 0
    if device.type == "cpu":
        if cpu == "triton" and dtype != torch.float64 and not empty:
            return "triton"
        return "c" if cpu == "c" and reset_after and dtype in (torch.float32, torch.float64) else "ops"
    if device.type != "cuda" or gpu == "ops":
        return "ops"
    if gpu == "cudnn" or dtype == torch.float64 or empty:
        return "cudnn" if reset_after else "ops"  # cuDNN has no reset-before form
    if gpu == "triton":
        return "triton"
    if tuned is not None:
        return tuned
    return "cudnn" if reset_after else "triton"


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU's model: what the autotune cache is keyed on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cuda_timer(fn: Callable[[], object], steps: int) -> float:
    """Median seconds of one call of fn over `steps` calls, from CUDA events (no host sync inside a timed call)."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)


@cache
def _kernel_version() -> str:
    """A hash of the Triton kernels' source and Triton's version: a decision timed on other kernels is not reused."""
    import triton

    from gruexp.models import gru_triton

    text = Path(gru_triton.__file__).read_text() + triton.__version__ + torch.__version__
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _max_rel_err(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| over max(1, max |ref|): one number for values and gradients of any scale."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1))


class Autotuner:
    """First-use decisions between two backends at one shape, remembered in memory and in a JSON file.

    `decide` runs the reference and the candidate once and compares what they return (outputs and gradients);
    only if the candidate runs and agrees, and `timed` is set, both are timed for `steps` calls by `timer` (CUDA
    events by default; the one part a test must fake on a machine without a GPU) and the faster one wins.
    """

    def __init__(
        self,
        path: Path | str | None = None,
        timer: Callable[[Callable[[], object], int], float] = cuda_timer,
        steps: int = 5,
    ) -> None:
        self._path, self.timer, self.steps = (Path(path) if path else None), timer, steps
        self.decisions: dict[str, dict] = {}

    @property
    def path(self) -> Path:
        """The cache file: the given path, or fused_autotune.json in gruexp's cache folder as it is now."""
        return self._path or cache_dir() / "fused_autotune.json"

    def key(self, device: torch.device, reset_after: bool, dtype: torch.dtype, needs_grad: bool, *shape: int) -> str:
        """The cache key: device name, form, dtype, train/infer, (T, B, H, layers), TF32, kernels' version."""
        T, B, H, layers = shape
        return "|".join(
            [
                device_name(device),
                "reset_after" if reset_after else "reset_before",
                str(dtype).removeprefix("torch."),
                "train" if needs_grad else "infer",
                f"T{T} B{B} H{H} L{layers}",
                f"tf32={torch.backends.cuda.matmul.allow_tf32}",
                _kernel_version(),
            ]
        )

    def _read(self) -> dict[str, dict]:
        """The cache file's decisions; a file that is not valid JSON of the right shape is ignored with a warning."""
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or not all(isinstance(v, dict) and "backend" in v for v in data.values()):
                raise ValueError("not a {key: {backend: ...}} object")
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("fused GRU: ignoring the autotune cache %s (%s); timing again", self.path, e)
            return {}

    def _write(self, key: str, decision: dict) -> None:
        """Add one decision to the file: read, add and replace under a lock on `<file>.lock`, so that jobs timing
        side by side (a sweep) keep each other's decisions; the rename keeps the file whole for lock-free readers."""
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = self._read()
                data[key] = decision
                with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as f:
                    tmp = f.name
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache folder costs a re-timing next process, never the run
            log.warning("fused GRU: cannot write the autotune cache %s (%s)", self.path, e)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def decide(
        self,
        key: str,
        reference: tuple[str, Callable[[], Sequence[Tensor]]],
        candidate: tuple[str, Callable[[], Sequence[Tensor]]],
        timed: bool,
        tolerance: float,
    ) -> str:
        """The backend to use for `key`: the cached decision, or the candidate if it runs, agrees with the reference
        within `tolerance` (max relative error of every returned tensor) and, when `timed`, is faster."""
        if key in self.decisions:
            return self.decisions[key]["backend"]
        cached = self._read().get(key)
        if cached is not None:
            if "fallback" in cached:
                log.warning(
                    "fused GRU: %s; using %s for %s (cached in %s)",
                    cached["fallback"],
                    cached["backend"],
                    key,
                    self.path,
                )
            else:
                log.info("fused GRU: %s (cached in %s for %s)", cached["backend"], self.path, key)
            self.decisions[key] = cached
            return cached["backend"]
        (ref_name, ref_fn), (cand_name, cand_fn) = reference, candidate
        expected = [t.detach().clone() for t in ref_fn()]
        decision: dict = {"backend": ref_name}
        try:
            got = cand_fn()
            errors = [_max_rel_err(g, e) for g, e in zip(got, expected, strict=True)]
        except Exception as e:  # any compile or launch error: the reference works, so the run goes on with it
            first_line = (str(e).strip().splitlines() or [""])[0]
            decision["fallback"] = f"{cand_name} failed on first use ({type(e).__name__}: {first_line})"
        else:
            worst = max(errors, default=0.0)
            if not worst <= tolerance:  # also catches NaN
                why = f"max relative error {worst:.2e} > {tolerance:g}"
                decision["fallback"] = f"{cand_name} disagrees with {ref_name} on first use ({why})"
        if "fallback" in decision:
            log.warning("fused GRU: %s; using %s for %s", decision["fallback"], ref_name, key)
        elif not timed:
            decision["backend"] = cand_name
        else:
            seconds = {name: self.timer(fn, self.steps) for name, fn in (reference, candidate)}
            decision.update(backend=min(seconds, key=seconds.get), seconds=seconds)
            loser = cand_name if decision["backend"] == ref_name else ref_name
            log.info(
                "fused GRU: %s won, %.2fx faster than %s (%.3f vs %.3f ms per step) for %s; cached in %s",
                decision["backend"],
                seconds[loser] / seconds[decision["backend"]],
                loser,
                seconds[decision["backend"]] * 1e3,
                seconds[loser] * 1e3,
                key,
                self.path,
            )
        self.decisions[key] = decision
        self._write(key, decision)
        return decision["backend"]


AUTOTUNER = Autotuner()
