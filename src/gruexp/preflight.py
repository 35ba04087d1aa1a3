"""Preflight: every check that runs before any work, each refusal one line naming the fix (UserError or exit 2).

- check_train_config / check_generate_config: type and range of every key a user types, with the key's name.
- check_choices / check_overrides: the command line, before Hydra reads it (a group option or key that does not
  exist: one line naming the choices or the closest real key).
- check_devices / check_memory: more CPU processes than cores, a model whose training does not fit in memory.
- claim_run_dir / ProtectOutputDir: a run folder is taken atomically (O_EXCL) before anything is written into it.

One module for the whole phase, as checkpoints.py and guards.py are one each for theirs: the value table and the
command-line checks make it longer than the others.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from gruexp.errors import UserError

CLAIM = ".gruexp_run"  # the marker a run creates (O_EXCL) in its folder before anything else is written


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


# --- the command line -----------------------------------------------------------------------------------------


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


def check_stacking(args: Sequence[str]) -> None:
    """hydra/launcher=stacked where it has nothing to stack (one run, not a sweep), or its `trials` key without it:
    one line, exit 2. Hydra would run the single job alone, or stop at its struct check with a five-line block."""
    stacked = "hydra/launcher=stacked" in args
    sweep = {"-m", "--multirun"} & set(args) or any(a.startswith("hparams_search=") for a in args)
    if stacked and not sweep:
        print(
            "Error: hydra/launcher=stacked trains a sweep's jobs together, and this is one run: add -m and the values "
            "to sweep, e.g. -m hydra/launcher=stacked optimizer.lr=0.5,1,2",
            file=sys.stderr,
        )
        raise SystemExit(2)
    trials = next((a for a in args if a.lstrip("+").startswith("hydra.launcher.trials=")), None)
    if trials and not stacked:
        print(f"Error: {trials} is hydra/launcher=stacked's: add hydra/launcher=stacked to stack", file=sys.stderr)
        raise SystemExit(2)


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


# --- devices and memory ---------------------------------------------------------------------------------------


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


def check_memory(cfg: DictConfig, vocab_size: int, trials: int = 1) -> int:
    """Refuse, naming model.hidden_size, a model whose training memory exceeds what is available; return the estimate.
    `trials`: a stack's (hydra/launcher=stacked), which holds them all at once.

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
    copies *= trials
    have = available_memory(on_gpu)
    if need * copies > have and trials > 1:
        raise UserError(
            f"a stack of {trials} trials of model.hidden_size={H} needs about {_gb(need * copies)} to train "
            f"({params:,} parameters each, their gradients and activations) but "
            f"{'the GPU' if on_gpu else 'this machine'} has {_gb(have)} available: lower hydra.launcher.trials"
            f" (to {max(1, int(have // need))} or fewer) or model.hidden_size"
        )
    if need * copies > have:
        raise UserError(
            f"model.hidden_size={H} needs about {_gb(need * copies)} to train ({params:,} parameters, their gradients"
            f"{' and optimizer state' if states else ''}) but {'the GPU' if on_gpu else 'this machine'} has "
            f"{_gb(have)} available: lower model.hidden_size"
        )
    return need * copies


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


class ProtectOutputDir(HydraCallback):
    """Before Hydra writes anything: claim the run folder (claim_run_dir), or refuse it in one line."""

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
