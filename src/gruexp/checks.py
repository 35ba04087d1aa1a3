"""Checks that run before any work: the user's values, keys and checkpoints, the run folder, memory; one line each.

- check_train_config / check_generate_config: type and range of every key a user types, with the key's name.
- check_overrides: a `key=value` naming no key of the config is one line naming the closest real key.
- claim_run_dir: a run folder is taken atomically (O_EXCL) before anything is written into it.
- resolve_ckpt_path + check_checkpoint: what `ckpt_path` means and whether that file fits this run, for train,
  generate and evaluate alike.
- check_memory: the configured model's weights, gradients, optimizer state and activations must fit.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import json
import logging
import math
import os
import pickle
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from gruexp import UserError

log = logging.getLogger(__name__)

LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION  # "last.ckpt"
CLAIM = ".gruexp_run"  # the marker a run creates (O_EXCL) in its folder before anything else is written
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# --- values ---------------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(low: int, also: tuple = (), hint: str = "") -> Callable[[str, Any], str | None]:
    def check(key: str, v: Any) -> str | None:
        if v in also and (v is None or _is_int(v) or isinstance(v, str)):
            return None
        if not _is_int(v) or v < low:
            allowed = f"an integer >= {low}" + "".join(f" or {a}" for a in also if a is not None)
            allowed += " or null" if None in also else ""
            return f"{key} must be {allowed}, got {v!r}{hint}"
        return None

    return check


def _positive_number(null: str = "") -> Callable[[str, Any], str | None]:
    def check(key: str, v: Any) -> str | None:
        if v is None and null:
            return None
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            return f"{key} must be a finite number > 0, got {v!r}{null}"
        return None

    return check


def _non_negative_number(key: str, v: Any) -> str | None:
    if not _is_number(v) or not math.isfinite(v) or v < 0:
        return f"{key} must be a finite number >= 0, got {v!r}"
    return None


def _seed(key: str, v: Any) -> str | None:
    if v is None or (_is_int(v) and 0 <= v <= 2**32 - 1):
        return None
    return f"{key} must be an integer in [0, 4294967295] or null (draw one), got {v!r}"


def _one_of(*choices: Any) -> Callable[[str, Any], str | None]:
    def check(key: str, v: Any) -> str | None:
        return None if v in choices else f"{key} must be one of {', '.join(map(str, choices))}, got {v!r}"

    return check


def _fraction_or_count(key: str, v: Any) -> str | None:  # Lightning's limit_*_batches and val_check_interval
    if v is None or (_is_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1):
        return None
    return f"{key} must be a fraction in (0, 1], a number of batches >= 1, or null, got {v!r}"


def _devices(key: str, v: Any) -> str | None:
    if v == "auto" or (_is_int(v) and (v >= 1 or v == -1)) or (isinstance(v, str) and re.fullmatch(r"[\d,]+", v)):
        return None
    if OmegaConf.is_list(v) or isinstance(v, list):
        return None
    return f"{key} must be a number of devices >= 1, -1 (all), a list of ids or auto, got {v!r}"


def _precisions() -> tuple:
    """The precision values Lightning's Trainer accepts (its own Literal types, so a new release's are known)."""
    try:
        import typing

        from lightning.fabric.connector import _PRECISION_INPUT

        return tuple(v for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group))
    except (ImportError, AttributeError):  # Lightning moved it: leave the value to Lightning's own check
        return ()


def _precision(key: str, v: Any) -> str | None:
    allowed = _precisions()
    if not allowed or v in allowed or v is None:
        return None
    named = ", ".join(str(a) for a in allowed if isinstance(a, str) and "-" in a)
    return f"{key}={v} is not a precision: choose one of {named}"


# Every key of the train config a user sets, with what it must hold. Model sizes are checked by build_model and
# data keys by the data module; these are the ones Lightning or torch would take silently or with a traceback.
TRAIN_CHECKS: dict[str, Callable[[str, Any], str | None]] = {
    "seed": _seed,
    "float32_matmul_precision": _one_of("highest", "high", "medium"),
    "optimizer.lr": _positive_number(),
    "optimizer.momentum": lambda k, v: None if v is None else _non_negative_number(k, v),
    "optimizer.weight_decay": lambda k, v: None if v is None else _non_negative_number(k, v),
    "trainer.max_epochs": _int_at_least(1, also=(-1,), hint=" (-1: no limit, stop at trainer.max_steps)"),
    "trainer.min_epochs": _int_at_least(0, also=(None,)),
    "trainer.max_steps": _int_at_least(1, also=(-1,)),
    "trainer.gradient_clip_val": _positive_number(null=" (null switches clipping off)"),
    "trainer.gradient_clip_algorithm": _one_of("norm", "value"),
    "trainer.accumulate_grad_batches": _int_at_least(1),
    "trainer.check_val_every_n_epoch": _int_at_least(1, also=(None,)),
    "trainer.log_every_n_steps": _int_at_least(1),
    "trainer.num_sanity_val_steps": _int_at_least(0, also=(-1,)),
    "trainer.limit_train_batches": _fraction_or_count,
    "trainer.limit_val_batches": lambda k, v: None if v == 0 else _fraction_or_count(k, v),
    "trainer.val_check_interval": _fraction_or_count,
    "trainer.devices": _devices,
    "trainer.precision": _precision,
    "trainer.num_nodes": _int_at_least(1),
    "trainer.deterministic": _one_of(True, False, "warn"),
    "trainer.enable_progress_bar": _one_of(True, False),
    "trainer.enable_model_summary": _one_of(True, False),
    "trainer.detect_anomaly": _one_of(True, False),
    "trainer.fast_dev_run": lambda k, v: (
        None
        if v in (True, False) or (_is_int(v) and v >= 0)
        else (f"{k} must be true, false or a number of batches, got {v!r}")
    ),
}

GENERATE_CHECKS: dict[str, Callable[[str, Any], str | None]] = {
    "num_chars": _int_at_least(0),
    "temperature": _non_negative_number,
    "seed": _seed,
    "device": lambda k, v: None if isinstance(v, str) and v else f"{k} must be a device name (cpu, cuda), got {v!r}",
}


def _check(cfg: DictConfig, checks: dict[str, Callable[[str, Any], str | None]]) -> None:
    for key, check in checks.items():
        missing = object()
        v = OmegaConf.select(cfg, key, default=missing, throw_on_missing=False)
        if v is missing:
            continue
        problem = check(key, v)
        if problem:
            raise UserError(problem)


def check_train_config(cfg: DictConfig) -> None:
    """Refuse values Lightning or torch would take silently (lr=0, clip<=0, max_epochs=0, nan) or with a traceback."""
    _check(cfg, TRAIN_CHECKS)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        raise UserError(f"ckpt_path must be a path, a run folder or last, got {cfg.ckpt_path!r}")


def check_generate_config(cfg: DictConfig) -> None:
    """The keys of conf/generate.yaml; ckpt_path is required."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path in (None, ""):
        raise UserError(
            "ckpt_path is required: python -m gruexp.generate ckpt_path=last (or a run folder, or a .ckpt file)"
        )
    _check(cfg, GENERATE_CHECKS)


# --- keys -----------------------------------------------------------------------------------------------------


def _keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (its lists' items are not keys a user overrides)."""
    out = []
    if OmegaConf.is_dict(node):
        for k in node.keys():
            key = f"{prefix}{k}"
            out.append(key)
            out += _keys(node._get_node(k), key + ".")
    return out


def check_overrides(args: Sequence[str], conf_dir: str | os.PathLike, config_name: str) -> None:
    """`key=value` naming no key of the composed config: one line naming the closest real key, exit 2.

    Hydra's struct mode refuses these too, but with a five-line block and exit 1. This composes the config with the
    command's group choices (as Hydra will) and checks each plain override's key; anything it cannot parse is left
    to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        overrides = parser.parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:
        for arg in args:
            key, eq, value = arg.partition("=")
            if eq and not value.isascii() and value[:1] not in "'\"":
                try:
                    parser.parse_overrides([arg])
                except Exception:
                    # Hydra's grammar reads non-ASCII only in a quoted value; its own error is a lexer dump
                    print(
                        f"Error: {arg}: Hydra reads non-ASCII characters only in a quoted value: write "
                        f"'{key}=\"{value}\"' (the shell's quotes around Hydra's)",
                        file=sys.stderr,
                    )
                    raise SystemExit(2) from None
        return  # Hydra reports its own syntax errors
    conf = Path(conf_dir)
    choices, plain = [], []
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_add() or o.is_force_add() or o.is_delete():
            continue
        if key == "data" and config_name != "train" and (conf / "data").is_dir():
            # evaluate's `data` is the checkpoint's data options, not train's group: `+data=` fails there too
            value = o.value() if isinstance(o.value(), str) else ""
            corpus = f"data.corpus={value}" if (conf / "data" / f"{value}.yaml").is_file() else "data.corpus=<name>"
            fix = (
                f"reads the checkpoint's own data options, not a data config: give {corpus} (or data.path=<file>)"
                if config_name == "evaluate"
                else "takes its vocabulary from the checkpoint and reads no corpus: leave it out"
            )
            print(f"Error: {o.input_line}: {config_name} {fix}", file=sys.stderr)
            raise SystemExit(2)
        if (conf / key.replace(".", "/")).is_dir() and o.is_sweep_override():
            choices.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        elif (conf / key.replace(".", "/")).is_dir():
            choices.append(o.input_line)
        else:
            plain.append(key)
    if not plain:
        return
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(conf.resolve())):
            cfg = compose(config_name, overrides=choices)
    except Exception:
        return
    finally:
        GlobalHydra.instance().clear()
    known = _keys(cfg)
    for key in plain:
        if key in known:
            continue
        parent = key.rpartition(".")[0]
        if parent and parent not in known and parent.split(".")[0] in cfg:
            continue  # under a key that is a value (e.g. a null scheduler being given): Hydra's own message
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if _accepts(OmegaConf.select(cfg, parent) if parent else None, key.rpartition(".")[2]):
            fix = f"add it with +{key}=..."  # an argument of that node's _target_ the YAML does not list
        elif close:
            fix = f"did you mean {close[0]}?"
        else:
            fix = f"add it with +{key}=... if it is new, or see python -m gruexp.{config_name} --cfg job"
        print(f"Error: {key} is not a key of this config: {fix}", file=sys.stderr)
        raise SystemExit(2)


def _accepts(node: Any, name: str) -> bool:
    """Whether the `_target_` of config node `node` (a Trainer, an optimizer...) takes an argument `name`."""
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        return False
    try:
        from hydra.utils import get_object

        return name in inspect.signature(get_object(str(node._target_))).parameters
    except Exception:
        return False


# --- the run folder -------------------------------------------------------------------------------------------

RUN_TRACES = (CLAIM, "summary.json", "checkpoints", ".hydra", "train.log", "csv", "wandb")


def claim_run_dir(out: Path) -> None:
    """Take `out` for this run before anything is written there: refuse a folder holding anything, then O_EXCL.

    Two runs started together with the same folder both see it empty; only one creates the marker. A folder left by
    a run in any state (killed before its first checkpoint included) holds at least that marker or Hydra's files.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write the output folder {out} (a file is in the way): set hydra.run.dir to a folder")
    if out.is_dir():
        entries = sorted(p.name for p in out.iterdir())
        traces = [e for e in entries if e in RUN_TRACES or e.endswith(".log")]
        if traces:
            raise UserError(
                f"{out} already holds a run ({', '.join(traces[:3])}): choose another hydra.run.dir "
                f"(to continue that run in a new folder: ckpt_path={out})"
            )
        if entries:
            raise UserError(
                f"{out} is not empty ({', '.join(entries[:3])}): set hydra.run.dir to a new or empty folder"
            )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UserError(f"{out} was just claimed by another run: choose another hydra.run.dir") from None
    except OSError as e:
        raise UserError(
            f"cannot write the output folder {out} ({e.strerror}): set hydra.run.dir to a writable folder"
        ) from e
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
        os.write(fd, (json.dumps(info) + "\n").encode())  # bytes, not an empty file: a full disk fails here
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        (out / CLAIM).unlink(missing_ok=True)
        if created:
            out.rmdir()
        raise UserError(
            f"cannot write the output folder {out} ({e.strerror}): free space or choose another folder"
        ) from e
    os.close(fd)


def is_child_rank() -> bool:
    """A DDP rank other than 0 (gruexp's launcher, torchrun): it joins the folder rank 0 claimed."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "RANK"))


# --- checkpoints ----------------------------------------------------------------------------------------------


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


def resumed_wandb_id(path: str | os.PathLike) -> str | None:
    """The W&B run a checkpoint's training logged to (CharLM.on_save_checkpoint), for the resumed run to continue."""
    run_id = (_read(Path(path)).get("gruexp_resume") or {}).get("wandb_id")
    return run_id if isinstance(run_id, str) else None


def check_training_left(path: str | os.PathLike, max_epochs: int | None, max_steps: int | None) -> None:
    """A checkpoint to resume must leave something to train: else Lightning stops at once and the run would end
    "completed" with no metrics (nan perplexities, an empty sample). Lightning's own test: epochs whose training
    finished (`epoch_progress.current.processed`) against max_epochs, global_step against max_steps."""
    ckpt = _read(Path(path))
    epochs = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {}).get("processed")
    if max_epochs not in (None, -1) and epochs is not None and epochs >= max_epochs:
        raise UserError(
            f"{path} has trained {epochs} epochs and trainer.max_epochs={max_epochs}: nothing is left to train; "
            f"set trainer.max_epochs above {epochs} to train on"
        )
    steps = ckpt.get("global_step")
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


def resolve_ckpt_path(
    ckpt_path: str | os.PathLike | None, output_dir: str | os.PathLike | None = None, expect: dict | None = None
) -> str | None:
    """What `ckpt_path` names, for train, generate and evaluate: a file, a run folder (its last.ckpt), or `last`.

    `last`: the newest last.ckpt among the sibling run folders of `output_dir` (the current run's own excluded), or
    among ./outputs/*/runs/* when there are none (generate, evaluate). With `expect` (model_signature of the run),
    `last` skips checkpoints of another model or vocabulary, and the chosen file is checked (check_checkpoint).
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == "last":
        root, found = _candidates(output_dir)
        if not found:
            raise UserError(
                f"ckpt_path=last found no */checkpoints/{LAST} under {root}: give the file or run folder, "
                "ckpt_path=<run>/checkpoints/last.ckpt"
            )
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


# --- memory ---------------------------------------------------------------------------------------------------


def available_memory(on_gpu: bool) -> int:
    """Bytes this process can still allocate: free GPU memory, or the smaller of MemAvailable and the cgroup limit."""
    if on_gpu and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    avail = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    if not avail:
        try:
            avail.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return sys.maxsize
    return max(min(avail), 0)


def _gb(n: float) -> str:
    for unit, size in (("GB", 1e9), ("TB", 1e12), ("PB", 1e15)):
        if n < size * 1000:
            return f"{n / size:,.1f} {unit}"
    return f"{n / 1e15:,.0f} PB"


def check_memory(cfg: DictConfig, vocab_size: int) -> int:
    """Refuse, naming model.hidden_size, a model whose training memory exceeds what is available; return the estimate.

    The parameter count is exact (the model is built on the meta device, which allocates nothing); gradients and the
    optimizer's state follow from it; activations are an estimate of what backward keeps per token.
    """
    from gruexp.models import build_model, net_options

    m = cfg.model
    with torch.device("meta"):
        net = build_model(vocab_size=vocab_size, **net_options(m))
    params = sum(p.numel() for p in net.parameters())
    target = str(cfg.optimizer.get("_target_", ""))
    states = 2 if "Adam" in target else 1 if (cfg.optimizer.get("momentum") or 0) > 0 else 0
    H, L = m.hidden_size, m.get("num_layers", 1) or 1
    tokens = cfg.data.batch_size * cfg.data.num_steps
    activations = tokens * (L * 12 * H + 3 * vocab_size)  # gates and states per layer, logits and their grads
    need = 4 * (params * (2 + states) + activations)  # float32
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    devices = cfg.trainer.get("devices", 1)
    copies = devices if (not on_gpu and _is_int(devices) and devices > 1) else 1  # CPU DDP: a copy per process
    have = available_memory(on_gpu)
    if need * copies > have:
        raise UserError(
            f"model.hidden_size={H} needs about {_gb(need * copies)} to train ({params:,} parameters, their gradients"
            f"{' and optimizer state' if states else ''}) but {'the GPU' if on_gpu else 'this machine'} has "
            f"{_gb(have)} available: lower model.hidden_size"
        )
    return need * copies
