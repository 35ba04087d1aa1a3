"""A quiet console: only what a user reads (the config line, the progress, warnings about their run, the result).

Lightning prints tips, device lines and library deprecations on every run (and every sweep job). `quiet()` drops
exactly those known messages, each by its source (a logging filter on the Lightning logger that emits it, a warnings
filter on its text and category), so every other warning still shows. Hydra calls it at each job's start
(`QuietConsole` in conf/hydra/default.yaml); DDP ranks and submitit jobs start jobs of their own, so they run it too.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

# Lightning's info lines that say nothing about the user's run (the trainer's setup, a product tip, the normal end
# of fit, DDP start-up); matched at the start of the message, on the loggers that emit them.
NOISY_INFO = (
    "GPU available: ",  # lightning/pytorch/trainer/setup.py: the device choice is in the config line
    "TPU available: ",
    "💡 Tip: For seamless cloud logging",  # logger_connector.py: litlogger advertisement
    "`Trainer.fit` stopped: `max_epochs=",  # fit_loop.py: the normal end; the result line follows
    "Trainer already configured with model summary callbacks",  # gruexp's one-line ParameterCount replaces the table
    # fabric/utilities/distributed.py: DDP start-up chatter; every rank's `rank r/W config` line says it better
    "Initializing distributed: GLOBAL_RANK",
    "-" * 100 + "\ndistributed_backend=",
    # checkpoint_connector.py, on resume: train() says `resuming <checkpoint>` once, on rank 0 only
    "Restoring states from the checkpoint path at ",
    "Restored all states from the checkpoint at ",
    # checkpoint_connector.py: on every trainer.save_checkpoint() without weights_only (the interrupt's last.ckpt)
    "`weights_only` was not set, defaulting to `False`.",
    # fabric/accelerators/cuda.py, every GPU run: the choice is the config key float32_matmul_precision (README)
    "You are using a CUDA device (",
    # trainer.py: a per-step schedule (gruexp.schedules) asks for the run's total steps before fit starts
    "Loading `train_dataloader` to estimate number of stepping batches.",
)

# (category, message regex) of warnings that are not about the user's run.
NOISY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch 2.13 deprecates LeafSpec, which lightning 2.6's utilities/_pytree.py still uses
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # lightning's all_gather (CharLM's checkpoint under DDP) calls torch.distributed.nn.functional.all_gather
    (FutureWarning, r"torch\.distributed\.nn\.functional\.all_gather is deprecated"),
    # a resumed run writes into its own new folder by design: its checkpoints' dirpath always differs
    (UserWarning, r"The dirpath has changed from "),
    # data_connector.py, on machines with more than 2 cores: gruexp's loaders gather a batch with one slice of a
    # memory-mapped file in the main process (a small share of a step: docs/corpora.md, scripts/bench_data.py); workers
    # would only add their start-up to every epoch. Lightning's own docs (advanced/warnings.rst) filter it this way.
    (Warning, r"The '\w+' does not have many workers which may be a bottleneck"),
    # fit_loop.py, in every short trial: gruexp logs each epoch's figures at its end whatever log_every_n_steps is
    (Warning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    # model_checkpoint.py, at steps_per_call > 1 (manual optimization) with every_n_train_steps: a step's checkpoint
    # holds the weights after that step, as Lightning's automatic optimization saves them at K = 1
    (Warning, r"Using ModelCheckpoint with manual optimization and every_n_train_steps"),
    # configuration_validator.py: a run with data.val_fraction=0 has no validation split by the user's choice
    (Warning, r"You defined a `validation_step` but have no `val_dataloader`\. Skipping val loop\."),
)


def brief_overrides(overrides: Sequence[str]) -> str:
    """A sweep job's overrides as a console shows them: without Hydra's own (`hydra.*`, `++hydra.job.env_set...`,
    which carry the job's internals) and with floats at 4 significant digits (Optuna draws 16)."""
    shown = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if key.lstrip("+~").startswith("hydra."):
            continue
        try:
            if eq and "." in value and len(value) > 7:
                value = f"{float(value):.4g}"
        except ValueError:
            pass
        shown.append(f"{key}{eq}{value}")
    return " ".join(shown)


class _BriefLaunchLines(logging.Filter):
    """Hydra's basic launcher logs each job as `\t#k : <overrides>`: shorten them (brief_overrides)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("\t#") and " : " in text:
            head, _, rest = text.partition(" : ")
            record.msg, record.args = f"{head} : {brief_overrides(rest.split(' '))}", ()
        return True


class _DropMessages(logging.Filter):
    """Drop records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_FILTER = _DropMessages(NOISY_INFO)
_BRIEF = _BriefLaunchLines()


_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.distributed",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)


@contextmanager
def quiet_restore() -> Iterator[None]:
    """Around trainer.test(ckpt_path=best) at a run's end: Lightning's two lines on loading the checkpoint say
    nothing the test result line does not."""
    drop = _DropMessages(("Restoring states from the checkpoint path at ", "Loaded model weights from the checkpoint"))
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def quiet() -> None:
    """Silence Lightning's known noise for this process (idempotent); every other message and warning still shows."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    launcher = logging.getLogger("hydra._internal.core_plugins.basic_launcher")
    if _BRIEF not in launcher.filters:
        launcher.addFilter(_BRIEF)
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class QuietConsole(HydraCallback):
    """Hydra callback: `quiet()` at the start of every run and sweep job, in the process that runs it."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        quiet()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        quiet()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        quiet()


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message` for INFO and below, `HH:MM:SS WARNING message` above: the console's 120 columns go to the
    message (train.log keeps Hydra's full format with the logger name)."""

    def __init__(self, datefmt: str = "%H:%M:%S") -> None:
        super().__init__(datefmt=datefmt)

    def format(self, record: logging.LogRecord) -> str:
        level = f" {record.levelname}" if record.levelno >= logging.WARNING else ""
        text = f"{time.strftime(self.datefmt, self.converter(record.created))}{level} {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
