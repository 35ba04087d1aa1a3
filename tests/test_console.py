"""What a user's console shows: no Lightning noise, one epoch numbering (from 1), a bar that fits 120 columns."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
from helpers import SGD, TINY, run_cli
from hydra.utils import instantiate

from gruexp.callbacks import MetricsBar
from gruexp.console import quiet
from gruexp.train import train

# Lines a run must not print, each a fragment of the message Lightning or torch writes.
NOISE = [
    "GPU available",
    "TPU available",
    "litlogger",
    "LeafSpec",  # torch's _pytree deprecation, from lightning's utilities
    "all_gather is deprecated",
    "FLOPs",  # the model summary table
    "Total params",
    "log_every_n_steps",
    "The dirpath has changed",
    "sync_dist",
    "Trainer.fit` stopped",
    "Initializing distributed",
    "Restored all states",
    "distributed_backend=",
    "estimate number of stepping batches",  # a per-step schedule asking Lightning for the run's total steps
    "with manual optimization and every_n_train_steps",  # steps_per_call > 1 with a step checkpoint
]
# The d2l_classic shape (8 batches an epoch, log_every_n_steps must fit), tiny hidden size, validation every epoch.
D2L_TINY = [
    "experiment=d2l_classic",
    "model.hidden_size=16",
    "trainer.max_epochs=1",
    "trainer.check_val_every_n_epoch=1",
    "logger=csv",
    "scheduler={_target_: gruexp.schedules.warmup_cosine, _partial_: true}",  # per step: asks for the total
]
RESULT = re.compile(r"^\d\d:\d\d:\d\d val/ppl \d+\.\d{3} \| train/ppl \d+\.\d{3} \| ", re.M)


def _assert_quiet(output: str) -> None:
    noisy = [line for line in output.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "console noise:\n" + "\n".join(noisy)


def test_run_and_resume_print_only_config_epochs_and_result(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    r = run_cli("gruexp.train", *D2L_TINY, f"hydra.run.dir={first}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    _assert_quiet(out)
    assert re.search(r"^\d\d:\d\d:\d\d rank 0/1 config [0-9a-f]+ model=fused hidden_size=16 lr=1.0", out, re.M)
    assert re.search(r"^\d\d:\d\d:\d\d model fused: 2,684 parameters$", out, re.M)  # nn.GRU 16x28 + Linear
    assert re.search(
        r"^\d\d:\d\d:\d\d epoch 1/1 \| train/ppl \d+\.\d{3} \| val/ppl \d+\.\d{3} \| tokens/sec ", out, re.M
    )
    assert re.search(r"^\d\d:\d\d:\d\d epoch 1 sample: time traveller", out, re.M)
    assert len(RESULT.findall(out)) == 1
    # the end-of-run test on best.ckpt: its result line, once, without Lightning's loading lines or a 2nd config line
    assert re.search(r"^\d\d:\d\d:\d\d test/ppl \d+\.\d{3} \| test/bpc \d+\.\d{3} ", out, re.M)
    assert "Restoring states" not in out and "Loaded model weights" not in out and out.count(" config ") == 1

    # the resumed run writes into its own folder: Lightning's warning about the checkpoint's other folder is noise
    r = run_cli("gruexp.train", *D2L_TINY, "trainer.max_epochs=2", f"ckpt_path={first}", f"hydra.run.dir={second}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    _assert_quiet(out)
    assert "epoch 1/2" not in out and re.search(r"^\d\d:\d\d:\d\d epoch 2/2 \| train/ppl", out, re.M)
    assert out.count(f"resuming {first}") == 1 and "Restoring states" not in out
    assert len(RESULT.findall(out)) == 1


def test_steps_per_call_with_a_step_checkpoint_prints_no_manual_optimization_advice(tmp_path):
    """At K > 1 (Lightning's manual optimization) a ModelCheckpoint every N steps saves the weights after the step,
    as at K = 1: Lightning's advice to save the state before it is noise."""
    every = [
        "+callbacks.every._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.every.dirpath=${paths.output_dir}/every",
        "+callbacks.every.every_n_train_steps=4",
    ]
    r = run_cli("gruexp.train", *TINY, "trainer.max_epochs=1", "steps_per_call=4", *every, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_quiet(r.stdout + r.stderr)
    assert list((tmp_path / "every").glob("*.ckpt"))


@pytest.mark.slow
def test_ddp_run_prints_no_distributed_chatter(tmp_path):
    r = run_cli("gruexp.train", *TINY, "trainer.max_epochs=1", "trainer.devices=2", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    _assert_quiet(out)
    assert "rank 0/2 config" in out and "rank 1/2 config" in out
    assert len(RESULT.findall(out)) == 1


def test_quiet_keeps_other_warnings():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet()
        warnings.warn("The dirpath has changed from 'a' to 'b'", UserWarning, stacklevel=1)
        warnings.warn("It is recommended to use `self.log('val/ppl', ..., sync_dist=True)`", UserWarning, stacklevel=1)
        warnings.warn("torch.distributed.nn.functional.all_gather is deprecated, use x instead.", FutureWarning, 1)
        warnings.warn("The dirpath has changed", DeprecationWarning, stacklevel=1)  # another category: kept
        warnings.warn(  # every GPU run on a machine of more than 2 cores
            "The 'train_dataloader' does not have many workers which may be a bottleneck. Consider ...", UserWarning, 1
        )
    assert [str(w.message) for w in seen] == [
        "It is recommended to use `self.log('val/ppl', ..., sync_dist=True)`",  # another metric: a real hint
        "The dirpath has changed",
    ]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [
        logging.getLogger("lightning.pytorch.utilities.rank_zero"),
        logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector"),
    ]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        loggers[0].info("GPU available: False, used: False")
        loggers[0].info("You are using a CUDA device ('NVIDIA H200') that has Tensor Cores. To properly utilize them")
        loggers[0].info("Seed set to 3")
        loggers[1].info("`weights_only` was not set, defaulting to `False`.")
        loggers[1].info("Restoring states from the checkpoint path at x.ckpt")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    # a resume is said by gruexp (`resuming <file>`, or `ckpt_path=last is <file>`), once, on rank 0
    assert [r.getMessage() for r in records] == ["Seed set to 3"]


def test_epochs_count_from_one_and_val_only_when_validated(make_cfg, tmp_path, caplog):
    cfg = make_cfg(
        "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2", "trainer.enable_progress_bar=true", "logger=csv"
    )
    with caplog.at_level(logging.INFO):
        summary = train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name in ("gruexp.callbacks", "gruexp.module")]
    epochs = [line for line in lines if line.startswith("epoch ")]
    heads = [line.split(" |")[0].split(" sample")[0] for line in epochs]
    assert heads == ["epoch 1/3", "epoch 2", "epoch 2/3", "epoch 3/3"]
    assert [("val/ppl" in line) for line in epochs if "/3" in line] == [False, True, False]  # no stale val/ppl
    assert all(re.search(r"\| tokens/sec \d{1,3}(,\d{3})*$", line) for line in epochs if "/3" in line)
    val = float(epochs[2].split("val/ppl ")[1].split(" |")[0])
    assert val == pytest.approx(summary["val_ppl"], abs=1e-3)
    assert epochs[1] == f"epoch 2 sample: {summary['sample']}"
    # the CSV history that scripts/report.py plots reads with the same numbers (Lightning writes epoch 0-based)
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        val_epochs = [int(row["epoch"]) + 1 for row in csv.DictReader(f) if row["val/ppl"]]
    assert val_epochs == [2]


def test_bar_fits_120_columns_with_epoch_step_ppl_and_tokens(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_epochs=2")
    bar = MetricsBar()  # what progress() picks on a terminal; here on a forced 120-column one
    buf = io.StringIO()
    bar._console_kwargs = {"force_terminal": True, "width": 120, "file": buf, "color_system": None}
    data = instantiate(cfg.data, seed=0)
    model = instantiate(cfg.model, vocab=data.vocab.idx_to_token, optimizer=instantiate(cfg.optimizer))
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    out = buf.getvalue()
    frames = [f.rstrip() for f in re.split(r"\x1b\[[0-9;?]*[A-Za-z]|[\r\n]", out) if f.startswith("Epoch")]
    assert frames and max(len(f) for f in frames) <= 120
    assert "Validation" not in out and not any(f.startswith("Epoch 0") for f in frames)
    assert re.fullmatch(
        r"Epoch 2/2 ━+ \d+/\d+ [\d:]+ • [\d:]+ train_ppl: \d+\.\d{3} val_ppl: \d+\.\d{3} tok/s: \d{1,3}(,\d{3})+",
        frames[-1],
    )


def test_help_is_printed_without_importing_torch_or_lightning(tmp_path):
    # `--help` must not pay for importing torch and Lightning, which Hydra's plugin scan reaches too
    r = run_cli("gruexp.train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "== Configuration groups ==" in r.stdout and "model: fused, scratch, torch" in r.stdout
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gruexp.train", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not {"torch", "lightning"} & imported


def test_a_run_on_a_busy_machine_says_so_once_with_the_slowdown(make_cfg, tmp_path, caplog, monkeypatch):
    from gruexp import threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert threads.busy_machine(threads=1) is None  # idle
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 2.5, 2.0))  # three runnable processes on 2 cores already
    assert threads.busy_machine(threads=1) == (
        "this machine is busy: load average 3.0 on 2 cores before this run started; expect it to run about 2.0x "
        "slower than on an idle machine"
    )
    with caplog.at_level(logging.INFO, logger="gruexp"):
        summary = train(make_cfg(*SGD, out=tmp_path / "a"))
    assert caplog.text.count("this machine is busy: load average 3.0 on 2 cores") == 1
    assert summary["load_at_start"] == 3.0


def test_a_sweep_jobs_line_hides_hydras_overrides_and_rounds_optunas_floats():
    from gruexp.console import brief_overrides

    overrides = [
        "optimizer.lr=1.815188036606585",
        "trainer.gradient_clip_val=1",
        "model=torch",
        "hydra.sweeper.study_name=s",
        '++hydra.job.env_set.GRUEXP_OPTUNA_TRIAL=\'{"study":"s"}\'',
    ]
    assert brief_overrides(overrides) == "optimizer.lr=1.815 trainer.gradient_clip_val=1 model=torch"
