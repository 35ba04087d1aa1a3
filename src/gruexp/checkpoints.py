"""Checkpoints: what `ckpt_path` names, whether a file fits this run, and writing one so that a kill leaves the old.

- resolve_ckpt_path + check_checkpoint: what `ckpt_path` means and whether that file fits this run, for train,
  generate and evaluate alike (model_signature, split_signature: what a resumed run must share with its file).
- read_resume, check_training_left: what a checkpoint to resume holds beyond its weights (read once).
- atomic_write, AtomicCheckpointIO: a file (checkpoint, summary.json, best.json) becomes its name only once whole.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from gruexp.errors import UserError, find_no_space

if TYPE_CHECKING:
    from gruexp.steps import StepPlan

log = logging.getLogger(__name__)

LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # "last.ckpt"


# --- reading and checking -------------------------------------------------------------------------------------


def _read(path: Path) -> dict:
    """The checkpoint's content, tensors memory-mapped (nothing large read); any failure is a UserError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in first or "Weights only" in first:
            why = "not a PyTorch checkpoint, or one holding code"  # never suggest weights_only=False
        elif "zip" in first or isinstance(e, (OSError, EOFError)):
            why = f"truncated or damaged, {path.stat().st_size} bytes"
        else:
            why = f"{type(e).__name__}: {first[:120]}"
        raise UserError(f"{path} is not a readable gruexp checkpoint ({why}): use a run's checkpoints/last.ckpt") from e
    if not isinstance(ckpt, dict) or not {"hyper_parameters", "state_dict"} <= ckpt.keys():
        raise UserError(f"{path} is not a gruexp checkpoint (no hyper_parameters/state_dict): use a run's last.ckpt")
    hp = ckpt["hyper_parameters"]
    if not {"name", "hidden_size", "vocab"} <= set(hp):
        raise UserError(f"{path} is not a gruexp checkpoint (its hyper-parameters lack name, hidden_size, vocab)")
    return ckpt


def model_signature(model_cfg: Any, vocab: Sequence[str]) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it: model name, sizes, layers, form, vocabulary."""
    from gruexp.models import net_options

    options = net_options(model_cfg)
    sig = {f"model.{k}": v for k, v in options.items() if k != "dropout"}  # dropout changes no weight
    sig["vocab"] = [str(t) for t in vocab]
    return sig


SPLIT_KEYS = {"val_fraction": 0.05, "test_fraction": 0.05, "val_tokens": None}  # the data module's defaults


def split_signature(data_cfg: Any) -> dict[str, Any]:
    """The keys that choose the validation and test splits: a resumed run must keep them, or best.ckpt would be
    chosen across two validation sets and the test split would overlap what was trained on."""
    return {f"data.{k}": data_cfg.get(k, default) for k, default in SPLIT_KEYS.items()}


def vocab_difference(theirs: Sequence[str], mine: Sequence[str]) -> str:
    """Where two unequal vocabularies part, for an error line: `token 3 is 'a', here 'b'`, or their sizes."""
    at = next((i for i, (a, b) in enumerate(zip(theirs, mine, strict=False)) if a != b), None)
    return f"token {at} is {theirs[at]!r}, here {mine[at]!r}" if at is not None else "sizes"


def _differs(path: Path, hp: dict, expect: dict[str, Any], data: dict | None = None) -> str | None:
    """The first way the checkpoint's hyper-parameters differ from the run's signature, as a sentence, or None."""
    theirs = model_signature(hp, hp["vocab"])
    if data is not None:  # the data module's hyper-parameters (a checkpoint without them is not compared)
        theirs |= split_signature(data)
    for key, mine in expect.items():
        if key == "vocab":
            if theirs["vocab"] != mine:
                return (
                    f"was trained on another vocabulary ({len(theirs['vocab'])} tokens, this corpus has {len(mine)}; "
                    f"{vocab_difference(theirs['vocab'], mine)}): resume with that run's corpus (data.path)"
                )
        elif key in theirs and theirs[key] != mine:
            group = key.split(".")[0]
            why = " (a new split would change what best.ckpt is chosen on)" if group == "data" else ""
            return (
                f"was trained with {key}={theirs[key]}, this run has {key}={mine}: give that run's {group} "
                f"overrides{why}"
            )
    return None


def _shape_mismatch(path: Path, hp: dict, state_dict: dict) -> str | None:
    """Name a weight whose shape or name disagrees with the model the hyper-parameters describe (built on meta)."""
    from gruexp.module import CharLM

    kwargs = {k: hp[k] for k in ("name", "hidden_size", "vocab", "num_layers", "dropout", "reset_after") if k in hp}
    try:
        with torch.device("meta"):
            expected = CharLM(**kwargs).state_dict()
    except UserError as e:
        return f"its hyper-parameters do not build a model ({e})"
    V, H = len(hp["vocab"]), hp["hidden_size"]
    for k, w in state_dict.items():
        if k in expected and expected[k].shape != w.shape:
            dims = set(w.shape)
            which = "vocabulary" if V not in dims else "hidden size" if H not in dims else "shape"
            return (
                f"its weights do not fit its {which} (vocabulary of {V} tokens, hidden size {H}): {k} is "
                f"{list(w.shape)}, expected {list(expected[k].shape)}; the file mixes two runs"
            )
    missing = [k for k in expected if k.startswith("net.") and k not in state_dict]
    if missing:
        return f"its weights lack {missing[0]} for model {hp['name']!r}; the file mixes two runs"
    return None


def check_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint and check it, for train (resume), generate and evaluate alike; return its hyper-parameters.

    Refused in one line (UserError): a file torch cannot read (truncated, random bytes, not a checkpoint), weights
    that do not fit the model its hyper-parameters describe, and, given `expect` (model_signature of the run), a
    checkpoint of another model, size, layer count or vocabulary (content, not only size).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"checkpoint {p} does not exist: pass ckpt_path=last, a run folder or its checkpoints/last.ckpt"
        )
    ckpt = _read(p)
    hp = dict(ckpt["hyper_parameters"])
    why = _shape_mismatch(p, hp, ckpt["state_dict"])
    if why:
        raise UserError(f"{p}: {why}; use the run's own checkpoints/last.ckpt")
    if expect is not None:
        why = _differs(p, hp, expect, ckpt.get("datamodule_hyper_parameters"))
        if why:
            raise UserError(f"checkpoint {p} {why}")
    return hp


@dataclass(frozen=True)
class Resume:
    """What a checkpoint to resume holds beyond its weights, read once: how far it trained, where its logging goes
    on from, and the W&B run it logged to (CharLM's `gruexp_resume`)."""

    path: str
    epochs: int | None  # epochs whose training finished (`epoch_progress.current.processed`)
    global_step: int | None
    log_step: int  # the logging step it resumes at: what its run logged before that step is its history
    wandb_id: str | None
    steps_per_call: int  # the K it trained with (1 before steps_per_call existed)
    manual: bool = False  # trained by gruexp's step engine (Lightning's manual optimization), not Lightning's loop


def read_resume(path: str | os.PathLike) -> Resume:
    """The Resume of a checkpoint that resolve_ckpt_path has found (and checked)."""
    from gruexp.compat import checkpoint_batches_that_stepped

    ckpt = _read(Path(path))
    saved = ckpt.get("gruexp_resume") or {}
    run_id = saved.get("wandb_id")
    return Resume(
        path=str(path),
        epochs=ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed"),
        global_step=ckpt.get("global_step"),
        log_step=checkpoint_batches_that_stepped(ckpt),
        wandb_id=run_id if isinstance(run_id, str) else None,
        steps_per_call=int(saved.get("steps_per_call", 1)),
        manual=bool(saved.get("manual", int(saved.get("steps_per_call", 1)) > 1)),
    )


def check_steps_per_call(resume: Resume, plan: StepPlan) -> StepPlan:
    """The plan a run resumes with: the steps_per_call it trained with (Lightning's loops count training-step
    calls, and its automatic and manual optimization count steps apart, so another K would restart or misplace
    them), and at K = 1 the engine if the engine trained it (a stacked trial resumed alone)."""
    if resume.steps_per_call != plan.steps_per_call:
        raise UserError(
            f"{resume.path} was trained with steps_per_call={resume.steps_per_call}, this run has "
            f"steps_per_call={plan.steps_per_call}: resume with steps_per_call={resume.steps_per_call}"
        )
    if resume.manual and not plan.manual:
        return replace(plan, engine=True)
    if plan.manual and not resume.manual:
        raise UserError(
            f"{resume.path} was trained by Lightning's own loop (steps_per_call=1, no CUDA graph, not stacked), which "
            "counts its steps apart from gruexp's step engine: resume it so (cuda_graph=false, not stacked)"
        )
    return plan


def check_training_left(resume: Resume, max_epochs: int | None, max_steps: int | None) -> None:
    """A checkpoint to resume must leave something to train: else Lightning stops at once and the run would end
    "completed" with no metrics (nan perplexities, an empty sample). Lightning's own test: epochs whose training
    finished against max_epochs, global_step against max_steps."""
    path, epochs, steps = resume.path, resume.epochs, resume.global_step
    if max_epochs not in (None, -1) and epochs is not None and epochs >= max_epochs:
        raise UserError(
            f"{path} has trained {epochs} epochs and trainer.max_epochs={max_epochs}: nothing is left to train; "
            f"set trainer.max_epochs above {epochs} to train on"
        )
    if max_steps not in (None, -1) and steps is not None and steps >= max_steps:
        raise UserError(
            f"{path} has trained {steps} steps and trainer.max_steps={max_steps}: nothing is left to train; "
            f"set trainer.max_steps above {steps} to train on"
        )


def _candidates(output_dir: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    """last.ckpt of the sibling run folders of `output_dir` (newest first); without any, those under ./outputs."""
    if output_dir is not None:
        out = Path(output_dir).resolve()
        root = out.parent
        found = [p for p in root.glob(f"*/checkpoints/{LAST}") if out not in p.parents]
        if found:
            return root, sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    root = Path("outputs").resolve()
    found = [*root.glob(f"*/runs/*/checkpoints/{LAST}"), *root.glob(f"*/multirun/*/*/checkpoints/{LAST}")]
    if output_dir is not None:
        found = [p for p in found if Path(output_dir).resolve() not in p.parents]
        root = Path(output_dir).resolve().parent if not found else root
    return root, sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


# overrides that resume a sweep's job rather than name it
_NOT_THE_JOB = ("ckpt_path=", "trainer.max_epochs=", "trainer.max_steps=", "trainer.max_time=")


def _same_job(output_dir: str | os.PathLike, overrides: Sequence[str]) -> tuple[Path, list[Path]]:
    """last.ckpt of the earlier sweeps' jobs (folders beside this job's sweep folder) that had this job's overrides
    (but for ckpt_path and how long to train), newest first: what a sweep job's `ckpt_path=last` resumes."""
    import yaml

    def key(items: Sequence[str]) -> list[str]:
        return sorted(str(o) for o in items if not str(o).lstrip("+~").startswith(_NOT_THE_JOB))

    out = Path(output_dir).resolve()
    root, mine = out.parent.parent, key(overrides)
    found = []
    for p in root.glob(f"*/*/checkpoints/{LAST}"):
        job = p.parent.parent
        if out.parent in job.parents or not (job / ".hydra" / "overrides.yaml").is_file():
            continue
        if key(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []) == mine:
            found.append(p)
    return root, sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_ckpt_path(
    ckpt_path: str | os.PathLike | None,
    output_dir: str | os.PathLike | None = None,
    expect: dict | None = None,
    job_overrides: Sequence[str] | None = None,
) -> str | None:
    """What `ckpt_path` names, for train, generate and evaluate: a file, a run folder (its last.ckpt), or `last`.

    `last`: the newest last.ckpt among the sibling run folders of `output_dir` (the current run's own excluded), or
    among ./outputs/*/runs/* when there are none (generate, evaluate); for a sweep's job (`job_overrides`, its
    overrides), that of the newest earlier sweep's job with the same overrides, so that every job of a sweep
    resumes its own run. With `expect` (model_signature of the run), `last` skips checkpoints of another model or
    vocabulary, and the chosen file is checked (check_checkpoint).
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        if job_overrides is not None and output_dir is not None:
            root, found = _same_job(output_dir, job_overrides)
            none = (
                f"no earlier sweep under {root} with a job of these overrides ({' '.join(job_overrides)}) and a "
                f"checkpoints/{LAST}: give the job's folder, ckpt_path=<job folder>"
            )
        else:
            root, found = _candidates(output_dir)
            none = f"no */checkpoints/{LAST} under {root}: give the file or run folder, "
            none += f"ckpt_path=<run>/checkpoints/{LAST}"
        if not found:
            raise UserError(f"ckpt_path=last found {none}")
        reasons = []
        for p in found:
            try:
                if expect is not None:
                    check_checkpoint(p, expect)
            except UserError as e:
                reasons.append(str(e))
                continue
            log.info("ckpt_path=last is %s", p)
            return str(p)
        raise UserError(
            f"ckpt_path=last: none of the {len(found)} {LAST} under {root} fits this run; newest: {reasons[0]}"
        )
    p = Path(ckpt_path).expanduser()
    if p.is_dir():
        for candidate in (p / "checkpoints" / LAST, p / LAST):
            if candidate.is_file():
                p = candidate
                break
        else:
            raise UserError(f"ckpt_path={ckpt_path} is a folder without checkpoints/{LAST}: give a run folder or file")
    elif not p.is_file():
        raise UserError(
            f"ckpt_path={ckpt_path} is not a checkpoint file: it does not exist: pass ckpt_path=last, a run folder "
            "or <run>/checkpoints/last.ckpt"
        )
    if expect is not None:
        check_checkpoint(p, expect)
    return str(p)


def best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that keeps best.ckpt (the one with a monitor; the other writes last.ckpt every epoch)."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)


# --- writing --------------------------------------------------------------------------------------------------


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
        if find_no_space(e) is not None:
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
