"""Reliability, second pass (issue 11): last.ckpt is the last epoch, one run per folder, no silent wrong resume,
no silent no-ops, memory, and every bad input (checkpoints, values, keys, files, a full disk, sweeps) one line.

A full disk is a real one: a small tmpfs mounted for the test (needs root, else those tests skip).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, assert_one_line_error, run_cli, run_main

from gruexp import UserError
from gruexp.checkpoints import AtomicCheckpointIO
from gruexp.train import train

ONE_EPOCH = [*TINY, "trainer.max_epochs=1", "logger=csv"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gruexp.train", *args]


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


def val_ppl_by_epoch(run: Path) -> list[float]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]


# --- 1. last.ckpt is the last epoch, best.ckpt the best -----------------------------------------------------------


def test_last_ckpt_is_the_last_epoch_when_val_ppl_stops_improving(make_cfg, tmp_path, corpus_path):
    # 1,000 characters, hidden 64, Adam: val/ppl is best after epoch 2 and then rises as the model memorises
    overfit = ["model=torch", "model.hidden_size=64", "optimizer=adam", "optimizer.lr=0.05", "data.max_tokens=1000"]
    summary = train(make_cfg(*overfit, "data.batch_size=4", "trainer.max_epochs=5", "logger=csv"))
    val = val_ppl_by_epoch(tmp_path)
    best_epoch = val.index(min(val))
    assert len(val) == 5 and best_epoch < 4, val  # the premise: val/ppl stopped improving before the end
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    best = torch.load(ckpts / "best.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (4, summary["global_step"])
    assert best["epoch"] == best_epoch and best["global_step"] < last["global_step"]
    assert summary["best_val_ppl"] == pytest.approx(min(val))
    assert summary["best_ckpt"] == str(ckpts / "best.ckpt") and summary["last_ckpt"] == str(ckpts / "last.ckpt")


def test_last_ckpt_every_epoch_also_without_validation(make_cfg, tmp_path, corpus_path):
    # experiment=d2l_classic validates every 10th epoch; last.ckpt must still be the last epoch
    summary = train(make_cfg("trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2", "logger=csv"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, summary["global_step"])


# --- 2. one run per folder, claimed before anything is written --------------------------------------------------


def test_two_runs_started_together_in_one_folder(tmp_path, corpus_path):
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            cli(*ONE_EPOCH, f"optimizer.lr={lr}", f"hydra.run.dir={run}"),
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for lr in (0.5, 2.0)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], [o[1][-1500:] for o in outs]
    loser = outs[codes.index(2)][1]
    assert f"Error: {run}" in loser and ("already holds a run" in loser or "just claimed by another run" in loser)
    assert "Traceback" not in loser
    lr = (0.5, 2.0)[codes.index(0)]
    assert json.loads((run / "summary.json").read_text())["lr"] == lr
    assert f"optimizer.lr={lr}" in (run / ".hydra" / "overrides.yaml").read_text()


def test_folder_of_a_run_killed_before_its_first_checkpoint_is_refused(tmp_path, corpus_path):
    run = tmp_path / "run"
    p = subprocess.Popen(
        cli(*TINY, "logger=csv", f"hydra.run.dir={run}"),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (run / "train.log").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "checkpoints" / "last.ckpt").exists()  # killed before its first checkpoint
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    r = run_cli("gruexp.train", *ONE_EPOCH, "model=torch", f"hydra.run.dir={run}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"Error: {run} already holds a run" in r.stderr
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before  # nothing of it touched


def test_empty_run_dir_is_refused(capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_main(capfd, "gruexp.train", *TINY, "hydra.run.dir=")
    assert code == 2 and "hydra.run.dir is empty" in out
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder


# --- 3. no silent wrong resume ----------------------------------------------------------------------------------


@pytest.fixture
def first_run(make_cfg, tmp_path, corpus_path) -> Path:
    train(make_cfg("model=fused", "trainer.max_epochs=1", "logger=csv", out=tmp_path / "runs" / "a"))
    return tmp_path / "runs" / "a"


def swapped_corpus(corpus: Path, folder: Path) -> Path:
    """The same text with 'e' and 't' swapped: a vocabulary of the same size whose order differs."""
    out = folder / "swapped.txt"
    out.write_text(corpus.read_text().translate(str.maketrans("etET", "teTE")))
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.path=SWAPPED"], "was trained on another vocabulary (28 tokens, this corpus has 28; token "),
        (["model.hidden_size=32"], "was trained with model.hidden_size=16, this run has model.hidden_size=32"),
        (["model=scratch"], "was trained with model.name=fused, this run has model.name=scratch"),
        (["model.num_layers=2"], "was trained with model.num_layers=1, this run has model.num_layers=2"),
        (["model.reset_after=false"], "was trained with model.reset_after=True, this run has model.reset_after=False"),
    ],
)
def test_resume_with_another_vocabulary_or_model_is_refused(make_cfg, tmp_path, first_run, corpus_path, args, message):
    args = [a.replace("SWAPPED", str(swapped_corpus(corpus_path, tmp_path))) for a in args]
    with pytest.raises(UserError) as e:
        train(make_cfg("model=fused", "trainer.max_epochs=2", *args, f"ckpt_path={first_run}", out=tmp_path / "b"))
    assert message in str(e.value) and str(first_run) in str(e.value)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "failed" and message in summary["error"]


def test_resuming_a_finished_run_without_more_epochs_is_refused(make_cfg, tmp_path, first_run):
    # Lightning would stop at once: the run ended "completed" with nan perplexities and an empty sample
    for name, args, message in (
        ("b", ["trainer.max_epochs=1"], "has trained 1 epochs and trainer.max_epochs=1: nothing is left to train; set"),
        ("c", ["trainer.max_epochs=3", "trainer.max_steps=5"], "steps and trainer.max_steps=5: nothing is left to"),
    ):
        out = first_run.parent / name
        with pytest.raises(UserError, match=message):
            train(make_cfg("model=fused", *args, "ckpt_path=last", out=out))
        assert json.loads((out / "summary.json").read_text())["status"] == "failed"
        assert not (out / "checkpoints").exists()


def test_ckpt_path_last_skips_a_newer_sibling_of_another_config(make_cfg, tmp_path, first_run, caplog):
    runs = first_run.parent
    train(make_cfg("model=fused", "trainer.max_epochs=1", "model.hidden_size=24", "logger=csv", out=runs / "newer"))
    os.utime(runs / "newer" / "checkpoints" / "last.ckpt", (time.time() + 10,) * 2)
    caplog.set_level("INFO")
    summary = train(make_cfg("model=fused", "trainer.max_epochs=2", "ckpt_path=last", "logger=csv", out=runs / "c"))
    assert f"ckpt_path=last is {first_run / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert summary["status"] == "completed" and summary["epochs"] == 2


def test_generate_takes_last_and_a_run_folder_like_train(capfd, make_cfg, tmp_path, monkeypatch, corpus_path):
    run = tmp_path / "outputs" / "train" / "runs" / "x"
    summary = train(make_cfg("model=torch", "trainer.max_epochs=1", "logger=csv", out=run))
    monkeypatch.chdir(tmp_path)
    for ckpt_path in ("last", str(run)):
        code, out = run_main(capfd, "gruexp.generate", f"ckpt_path={ckpt_path}", "num_chars=20")
        assert code == 0, out
        assert out.rstrip("\n").splitlines()[-1] == summary["sample"][:34]


# --- 4. silent no-ops, and every value a user types ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a finite number > 0, got -1 (null sw"),
        (["trainer.gradient_clip_val=0"], "trainer.gradient_clip_val must be a finite number > 0, got 0"),
        (["optimizer.lr=0"], "optimizer.lr must be a finite number > 0, got 0"),
        (["optimizer.lr=nan"], "optimizer.lr must be a finite number > 0, got nan"),
        (["optimizer.lr=-1"], "optimizer.lr must be a finite number > 0, got -1"),
        (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1 or -1, got 0"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer >= 1 or -1, got 'abc'"),
        (["seed=-1"], "seed must be an integer in [0, 4294967295] or null (draw one), got -1"),
        (["seed=abc"], "seed must be an integer in [0, 4294967295] or null (draw one), got 'abc'"),
        (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
        (["float32_matmul_precision=tf32"], "float32_matmul_precision must be one of highest, high, medium, got 'tf"),
    ],
)
def test_value_that_cannot_mean_what_was_written_is_one_line(capfd, tmp_path, args, message):
    code, out = run_main(capfd, "gruexp.train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2
    assert_one_line_error(code, out, message)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_max_epochs_minus_two_gets_no_device_hint(capfd, tmp_path):
    code, out = run_main(capfd, "gruexp.train", *TINY, "trainer.max_epochs=-2", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(code, out, "trainer.max_epochs must be an integer >= 1 or -1, got -2")
    assert "trainer.accelerator" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ckpt_path=CKPT", "temperature=nan"], "temperature must be a finite number >= 0, got nan"),
        (["ckpt_path=CKPT", "num_chars=abc"], "num_chars must be an integer >= 0, got 'abc'"),
        (["ckpt_path=CKPT", "num_chars=1.5"], "num_chars must be an integer >= 0, got 1.5"),
        ([], "ckpt_path is required: python -m gruexp.generate ckpt_path=last"),
    ],
)
def test_generate_values_are_one_line(capfd, first_run, args, message):
    args = [a.replace("CKPT", str(first_run / "checkpoints" / "last.ckpt")) for a in args]
    code, out = run_main(capfd, "gruexp.generate", *args)
    assert code == 2
    assert_one_line_error(code, out, message)


# --- 5. memory --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scratch", "torch", "fused"])
def test_model_too_large_for_memory_is_refused_before_it_is_built(capfd, tmp_path, name):
    args = [*TINY, f"model={name}", "model.hidden_size=100000000", f"hydra.run.dir={tmp_path / 'r'}"]
    code, out = run_main(capfd, "gruexp.train", *args)
    assert code == 2
    assert_one_line_error(code, out, "model.hidden_size=100000000 needs about")
    assert "available: lower model.hidden_size" in out


# --- checkpoints: one line, exit 2, in train and generate -----------------------------------------------------


def bad_checkpoints(first_run: Path, folder: Path, make_cfg) -> dict[str, tuple[Path, str]]:
    good = first_run / "checkpoints" / "last.ckpt"
    truncated, noise = folder / "truncated.ckpt", folder / "noise.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    noise.write_bytes(os.urandom(5000))
    ckpt = torch.load(good, weights_only=True)
    hp = ckpt["hyper_parameters"]
    mixed = folder / "mixed.ckpt"  # another run's hidden size and vocabulary in its hyper-parameters
    torch.save({**ckpt, "hyper_parameters": {**hp, "hidden_size": 32, "vocab": hp["vocab"][:20]}}, mixed)
    return {
        "truncated": (truncated, "is not a readable gruexp checkpoint (truncated or damaged, 5000 bytes)"),
        "random bytes": (noise, "is not a readable gruexp checkpoint"),
        "mixed": (mixed, "its weights do not fit its vocabulary"),
    }


@pytest.mark.parametrize("what", ["truncated", "random bytes", "mixed"])
@pytest.mark.parametrize("entry", ["gruexp.train", "gruexp.generate"])
def test_bad_checkpoint_is_one_line_in_train_and_generate(capfd, make_cfg, tmp_path, first_run, what, entry):
    path, message = bad_checkpoints(first_run, tmp_path, make_cfg)[what]
    args = ["model=fused", *TINY, f"hydra.run.dir={tmp_path / 'r'}"] if entry == "gruexp.train" else []
    code, out = run_main(capfd, entry, *args, f"ckpt_path={path}")
    assert code == 2
    assert_one_line_error(code, out, message)
    assert "weights_only=False" not in out


def test_scratch_checkpoint_resumed_as_fused_and_other_size_are_one_line(capfd, make_cfg, tmp_path, corpus_path):
    train(make_cfg("model=scratch", "trainer.max_epochs=1", "logger=csv", out=tmp_path / "s"))
    for args, message in (
        (["model=fused"], "was trained with model.name=scratch, this run has model.name=fused"),
        (["model=scratch", "model.hidden_size=32"], "was trained with model.hidden_size=16, this run has model.hid"),
    ):
        run = tmp_path / f"r{len(args)}"
        code, out = run_main(capfd, "gruexp.train", *TINY, *args, f"ckpt_path={tmp_path / 's'}", f"hydra.run.dir={run}")
        assert code == 2
        assert_one_line_error(code, out, message)


# --- keys -------------------------------------------------------------------------------------------------------


def test_documented_and_standard_keys_are_plain_overrides(make_cfg):
    cfg = make_cfg("trainer.accumulate_grad_batches=2", "trainer.max_steps=5", "trainer.limit_val_batches=3")
    assert (cfg.trainer.accumulate_grad_batches, cfg.trainer.max_steps, cfg.trainer.limit_val_batches) == (2, 5, 3)
    assert make_cfg("model=fused", "model.dropout=0.0").model.dropout == 0.0
    assert make_cfg("model=torch", "model.reset_after=true").model.reset_after is True


def test_accumulate_grad_batches_acts(make_cfg, tmp_path, corpus_path):
    one = train(make_cfg("trainer.max_epochs=1", "logger=csv", out=tmp_path / "a"))
    two = train(make_cfg("trainer.max_epochs=1", "trainer.accumulate_grad_batches=2", "logger=csv", out=tmp_path / "b"))
    assert two["global_step"] == (one["global_step"] + 1) // 2


def test_mistyped_key_names_the_closest_real_key(tmp_path):
    r = run_cli("gruexp.train", "model.hidden_sise=64", f"hydra.run.dir={tmp_path / 'r'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "Error: model.hidden_sise is not a key of this config: did you mean model.hidden_size?"
    assert not (tmp_path / "r").exists()


def test_mistyped_key_in_generate_and_a_target_argument_the_yaml_lacks(capsys):
    from gruexp.preflight import check_overrides  # what gruexp.generate and gruexp.train run before Hydra

    for config, args, message in (
        ("generate", ["ckpt_path=last", "num_char=5"], "num_char is not a key of this config: did you mean num_chars?"),
        ("train", ["optimizer.momentum=0.9"], "optimizer.momentum is not a key of this config: add it with +optim"),
    ):
        with pytest.raises(SystemExit) as e:
            check_overrides(args, ROOT / "conf", config)
        assert e.value.code == 2 and message in capsys.readouterr().err


# --- files ------------------------------------------------------------------------------------------------------


def test_unreadable_corpus_names_the_file(tmp_path, corpus_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the time machine\n" * 100)
    corpus.chmod(0)
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0 and setpriv is None:
        pytest.skip("root reads any file and setpriv is missing to drop that capability")
    # root: without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, a mode-000 file is unreadable to root too
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    r = subprocess.run(
        [*prefix, *cli(*TINY, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'r'}")],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"cannot read data.path={corpus}: Permission denied; fix its permissions" in r.stdout + r.stderr


# --- a full disk (a real one: a small tmpfs) --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: room for a run's config and logs and one tiny checkpoint, not for two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}): needs root")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def leftovers(folder: Path) -> list[str]:
    return [str(f) for f in folder.rglob("*") if f.is_file() and (f.stat().st_size == 0 or ".tmp" in f.name)]


def test_disk_full_mid_run_is_one_line_and_a_failed_summary(small_disk, corpus_path):
    run = small_disk / "run"
    r = run_cli("gruexp.train", *TINY, "logger=csv", f"hydra.run.dir={run}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"no space left on device writing {run / 'checkpoints'}" in r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left on device" in summary["error"]
    assert leftovers(small_disk) == []


def test_disk_full_at_the_start_is_one_line(small_disk, corpus_path):
    with open(small_disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError:
            pass
    r = run_cli("gruexp.train", *TINY, f"hydra.run.dir={small_disk / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"Error: cannot write the output folder {small_disk / 'run'} (No space left on device)" in r.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_kill_mid_save_keeps_the_previous_checkpoint_whole_and_leaves_no_temporary_file(tmp_path):
    started = tmp_path / "started"
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "last.ckpt")  # the epoch before
    script = f"""
import pathlib, time, torch
from gruexp.checkpoints import AtomicCheckpointIO

class Slow:  # pickled after the tensor bytes began to be written: the save is under way when the kill comes
    def __reduce__(self):
        pathlib.Path({str(started)!r}).touch()
        time.sleep(60)
        return (int, ())

AtomicCheckpointIO().save_checkpoint({{"w": torch.zeros(100_000), "slow": Slow()}}, {str(tmp_path / "last.ckpt")!r})
"""
    p = subprocess.Popen([sys.executable, "-c", script], env=cli_env())
    deadline = time.monotonic() + 60
    while not started.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists(), "the save never started"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["last.ckpt", "started"]
    assert torch.equal(torch.load(tmp_path / "last.ckpt", weights_only=True)["w"], torch.ones(3))


def test_a_save_puts_the_new_checkpoint_in_by_rename_not_by_rewriting_the_old(tmp_path):
    # a rewrite in place (a copy over the old file) is what a kill mid-copy truncates: the old inode must go whole
    path, io = tmp_path / "last.ckpt", AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(3)}, path)
    reader = open(path, "rb")  # a reader (evaluate, rsync) holding the old file keeps reading the old file
    old = os.fstat(reader.fileno()).st_ino
    io.save_checkpoint({"w": torch.zeros(3)}, path)
    assert path.stat().st_ino != old
    assert torch.equal(torch.load(reader, weights_only=True)["w"], torch.ones(3))
    reader.close()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(3))


# --- sweeps -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_job_with_bad_input_gets_a_summary_and_the_others_a_best(tmp_path, corpus_path):
    sweep = tmp_path / "sweep"
    r = run_cli("gruexp.train", "-m", *ONE_EPOCH, "optimizer.lr=-1,1", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 1
    bad = json.loads((sweep / "0" / "summary.json").read_text())
    assert bad["status"] == "failed" and bad["error"].startswith("optimizer.lr must be a finite number > 0, got -1")
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"
    assert json.loads((sweep / "best.json").read_text())["job"] == "1"
    out = r.stdout + r.stderr
    (winner,) = [line for line in out.splitlines() if "best of 1 of 2 jobs: job 1" in line]
    assert winner.endswith(": optimizer.lr=1")  # what it was given, though the other job has no result
    assert "Error executing job with overrides: [" in out and "optimizer.lr=-1" in out and "Traceback" not in out


@pytest.mark.slow
def test_a_second_sweep_in_the_same_folder_is_refused_before_it_overwrites_a_job(tmp_path, corpus_path):
    sweep = tmp_path / "sweep"
    r = run_cli("gruexp.train", "-m", *ONE_EPOCH, "optimizer.lr=0.5,1", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}
    r = run_cli("gruexp.train", "-m", *ONE_EPOCH, "optimizer.lr=2", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert f"Error: hydra.sweep.dir {sweep} already holds 0, 1, best.json: a sweep there would overwrite" in r.stderr
    assert {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()} == before  # not a byte changed


@pytest.mark.slow
def test_ddp_bad_input_is_said_once(tmp_path, corpus_path):
    r = run_cli(
        "gruexp.train",
        *TINY,
        "data.batch_size=3",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'r'}",
        timeout=180,
    )
    assert r.returncode == 2
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "data.batch_size=3" in line and "ERROR" in line]
    assert len(lines) == 1, r.stdout + r.stderr
