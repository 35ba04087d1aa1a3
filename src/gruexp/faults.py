"""What Lightning and Hydra leave to us when things go wrong: interruption, divergence, bad input, atomic saves.

- InterruptCheckpoint: SIGTERM or SIGINT stop every rank after the same batch and save last.ckpt there, so a
  preempted run resumes exactly; crashes and divergence save nothing.
- DivergenceDetector: a non-finite loss stops the run, naming the step, before any checkpoint takes its weights.
- StepChecks: both decisions in one small tensor on the module's device: one collective per DDP step at most,
  none and no host sync on one process but every `log_every_n_steps` batches and where a checkpoint is written.
- AtomicCheckpointIO: checkpoints are written to a temporary file beside the target, then renamed.
- check_devices, user_error, check_choices, ProtectOutputDir: bad input as one clear line (with gruexp.checks,
  whose resolve_ckpt_path and check_checkpoint are re-exported here).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from gruexp import UserError
from gruexp.checks import LAST, NO_SPACE, check_checkpoint, claim_run_dir, is_child_rank, resolve_ckpt_path

__all__ = ["resolve_ckpt_path", "check_checkpoint"]  # one resolver and one check for train, generate, evaluate

log = logging.getLogger(__name__)

INTERRUPT_EXIT = 130  # the shell's code for a run stopped by Ctrl+C (128 + SIGINT)
DIVERGED_EXIT = 3


class Diverged(RuntimeError):
    """The training loss became non-finite; raised before any checkpoint could take the weights that followed it."""

    def __init__(self, step: int, epoch: int, loss: float):
        self.step, self.epoch, self.loss = step, epoch, loss
        super().__init__(
            f"training diverged: loss is {loss:.4g} (perplexity exp(loss) is not finite) at step {step} "
            f"(epoch {epoch}); "
            "lower optimizer.lr or clip gradients (trainer.gradient_clip_val=1.0)"
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
        self.losses: list[tuple[int, torch.Tensor]] = []  # (global step, loss) since the last check
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
        steps = [float(s) for s, _ in self.losses]
        # one host-to-device copy of what the host knows, then device ops only
        known = torch.tensor([float(self.signum), *steps], device=device)
        if self.losses:
            losses = torch.stack([loss for _, loss in self.losses]).float()
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
        mine, self.losses = dict(self.losses), []
        self.stop = self.stop or int(signum)
        if neg_step != -math.inf:
            step = int(-neg_step)
            loss = float(mine[step]) if step in mine else math.nan
            if math.isfinite(loss) and loss < 88:
                loss = math.nan  # another rank's loss was the bad one: this rank cannot name it
            raise Diverged(step, trainer.current_epoch, loss)

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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(f)` on a file that becomes `path` only once whole (fsync, then os.replace): a kill leaves the old.

    Where Linux's O_TMPFILE works the file has no name until it is whole, so a kill -9 mid-write leaves nothing
    behind; elsewhere a `.<name>.<pid>.tmp` beside the target, removed on any error. A full disk is an OSError
    naming the target.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            fd = os.open(path.parent, os.O_TMPFILE | os.O_WRONLY, 0o644)
            named = False
        except (AttributeError, OSError):  # not Linux, or a filesystem without O_TMPFILE
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            named = True
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if not named:  # linkat(AT_SYMLINK_FOLLOW), which Python uses only given a dir_fd
                tmp.unlink(missing_ok=True)
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.link(f"/proc/self/fd/{f.fileno()}", tmp.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                finally:
                    os.close(dir_fd)
        os.replace(tmp, path)
    except Exception as e:
        if _find_no_space(e) is not None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written with atomic_write: a kill, even kill -9 mid-save, leaves the previous file and no other.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system temp folder;
    when that is another filesystem the final move is a copy, which a kill can truncate.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_devices(accelerator: str, devices: Any) -> None:
    """Refuse more CPU processes than cores (Lightning would start them all); GPU counts Lightning checks itself."""
    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if cpu and isinstance(devices, int) and not isinstance(devices, bool):
        cores = os.cpu_count() or 1
        if devices > cores:
            raise UserError(
                f"trainer.devices={devices} but this machine has {cores} CPU cores: "
                f"use trainer.devices={cores} or fewer"
            )


def user_error(exc: BaseException) -> UserError | None:
    """The user's mistake inside `exc` (Hydra wraps whatever a _target_ raises), or None for a real bug.

    A full disk is the user's to fix too: one line naming the folder, not the chain of tracebacks it causes.
    """
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, UserError):
            return e
        if isinstance(e, MisconfigurationException):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            about_devices = re.search(r"accelerator|device|gpu|cuda|mps|tpu|hpu|strategy", first, re.IGNORECASE)
            return UserError(
                f"trainer: {first}" + (" (check trainer.accelerator and trainer.devices)" if about_devices else "")
            )
        if no_space(e):
            return UserError(no_space(e))
        called = _library_refused(e)
        if called is not None:
            return called
        if isinstance(e, OSError) and e.filename and e.errno in (errno.EACCES, errno.EPERM):
            return UserError(f"cannot open {e.filename} ({e.strerror}): fix its permissions or give another file")
        e = e.__cause__  # Hydra raises InstantiationException(...) from the error
    return None


def _library_refused(e: BaseException) -> UserError | None:
    """Hydra's `Error in call to target ...` when the target (Lightning, torch) refused a config value with a
    ValueError or TypeError of its own: one line naming the config node. Raised inside gruexp it stays a bug."""
    from hydra.errors import InstantiationException

    cause = e.__cause__
    if not isinstance(e, InstantiationException) or not isinstance(cause, (ValueError, TypeError)):
        return None
    frames = traceback.extract_tb(cause.__traceback__)
    if frames and f"{os.sep}gruexp{os.sep}" in frames[-1].filename:
        return None
    key = re.search(r"^full_key: (\S+)$", str(e), re.MULTILINE)
    node = key[1] if key else "the config"
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return UserError(f"{node}: {first} (check the {node}.* values given)")


def no_space(e: BaseException) -> str | None:
    """'no space left on device writing <file>: ...' when `e` is (or was caused by) a full disk or quota, else None."""
    full = _find_no_space(e)
    if full is None:
        return None
    where = f" writing {full.filename}" if full.filename else ""
    return f"no space left on device{where}: free space there or set hydra.run.dir to another disk"


def _find_no_space(e: BaseException | None) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return e
        e = e.__cause__ or e.__context__  # torch.save's RuntimeError carries the OSError as its context
    return None


def check_choices(args: Sequence[str], conf_dir: str | os.PathLike) -> None:
    """`group=option` overrides naming no conf/<group>/<option>.yaml: one line listing the choices, exit 2.

    Hydra reports these itself, but as a multi-line dump of its search path; this runs before Hydra does.
    """
    conf = Path(conf_dir)
    for arg in args:
        m = re.fullmatch(r"[+~]?([A-Za-z_]\w*)=([\w,.-]+)", arg)
        if not m or not (conf / m[1]).is_dir() or m[1] in ("hydra", "experiment"):
            continue
        group, values = m[1], m[2].split(",")
        choices = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        bad = [v for v in values if v not in choices and v != "null"]
        if bad:
            print(f"Error: Could not find '{group}/{bad[0]}': choose one of {', '.join(choices)}", file=sys.stderr)
            raise SystemExit(2)


class ProtectOutputDir(HydraCallback):
    """Before Hydra writes anything: claim the run folder (gruexp.checks.claim_run_dir), or refuse it in one line."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_child_rank():
            return  # a DDP rank started by rank 0 joins the folder rank 0 claimed
        raw = str(config.hydra.run.dir or "").strip()
        if not raw:
            _fail("hydra.run.dir is empty: give a folder, or leave it out for outputs/<task_name>/runs/<time>")
        try:
            claim_run_dir(Path(raw).expanduser().absolute())
        except UserError as e:
            _fail(str(e))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        raw = str(config.hydra.sweep.dir or "").strip()
        if not raw:
            _fail("hydra.sweep.dir is empty: give a folder, or leave it out for outputs/<task_name>/multirun/<time>")
        out = Path(raw).expanduser().absolute()
        _check_writable(out, "hydra.sweep.dir")
        # A grid sweep's job k writes into folder k: a second sweep in the same folder would overwrite the first's
        # jobs (Hydra saves a job's .hydra/ before any job callback runs, so the folder is refused here, not per
        # job). gruexp's Optuna sweeper resumes its study in its folder on purpose: trial k, folder k, never reused.
        resumable = str(config.hydra.sweeper.get("_target_", "")).endswith(".GruexpOptunaSweeper")
        if not resumable and out.is_dir() and (entries := sorted(p.name for p in out.iterdir())):
            _fail(
                f"hydra.sweep.dir {out} already holds {', '.join(entries[:3])}: a sweep there would overwrite its "
                "jobs' folders; choose a new or empty folder, or leave it out for outputs/<task_name>/multirun/<time>"
            )


class SweepOutcome(HydraCallback):
    """When a sweep ends (after PrintBestRun wrote best.json for the jobs that finished): name each job that failed
    on bad input or diverged, and exit 1.

    Such a job is an outcome, recorded in its summary.json, so train.main lets the sweep go on (Hydra's sweepers
    stop at the first job that raises, before any on_multirun_end); bugs still raise as before.
    """

    OK = ("completed", "pruned")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()  # a resumed Optuna study's folder holds earlier invocations' jobs too

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_")):
            return  # a search (Optuna) records failed trials in its study and decides its own exit (train.main)
        failed = []
        for summary in sorted(Path(str(config.hydra.sweep.dir)).glob("*/summary.json")):
            try:
                if summary.stat().st_mtime < getattr(self, "_started", 0) - 1:
                    continue
                s = json.loads(summary.read_text())
            except (OSError, ValueError):
                continue
            if s.get("status") not in self.OK:
                overrides = summary.parent / ".hydra" / "overrides.yaml"
                args = OmegaConf.to_container(OmegaConf.load(overrides)) if overrides.is_file() else []
                failed.append(
                    f"Error executing job with overrides: {args} (job {summary.parent.name} "
                    f"{s.get('status')}: {s.get('error', '')})"
                )
        if failed:
            print("\n".join(failed), file=sys.stderr)
            raise SystemExit(1)


def _check_writable(out: Path, key: str) -> None:
    """The nearest existing folder of `out` must take a few bytes (Hydra creates the rest); nothing is left behind."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory")
        with tempfile.TemporaryFile(dir=parent) as f:
            f.write(b"gruexp" * 700)  # a block's worth: a full disk refuses it, an empty file would pass
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _fail(f"cannot write the output folder {out} ({e.strerror}): set {key} to a writable folder")


def _fail(message: str) -> None:
    # a Hydra callback's exception would be wrapped in Hydra's own multi-line report; SystemExit passes through
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)
