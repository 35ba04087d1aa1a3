"""One run per folder, claimed before anything is written: a folder holding a run (or a killed run's files) is
refused untouched, as is an empty or unwritable one and a second sweep in a sweep's folder."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from helpers import ONE_EPOCH, ROOT, TINY, assert_one_line_error, cli, cli_env, run_cli, run_main


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


def test_output_folder_that_holds_a_run_or_cannot_be_written(capfd, tmp_path):
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"precious")
    code, out = run_main(capfd, "gruexp.train", *TINY, f"hydra.run.dir={old}")
    assert_one_line_error(code, out, f"{old} already holds a run")
    assert not (old / ".hydra").exists() and (old / "checkpoints" / "last.ckpt").read_bytes() == b"precious"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out = run_main(capfd, "gruexp.train", *TINY, f"hydra.run.dir={blocker / 'run'}")
    assert_one_line_error(code, out, f"cannot write the output folder {blocker / 'run'}")


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
