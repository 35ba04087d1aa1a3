"""SIGINT and SIGTERM at every moment of a run (training, set-up, the corpus's encoding, the last validation,
the final test): the run stops, says so, and leaves an interrupted summary and what resume needs."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from helpers import TINY, run_cli


def test_sigint_from_cli_saves_last_and_ckpt_path_last_resumes_in_a_new_folder(tmp_path, inject_path, corpus_path):
    runs = tmp_path / "runs"
    kill = [
        "+callbacks.kill._target_=helpers.inject.SignalAt",
        "+callbacks.kill.step=20",
        "+callbacks.kill.signum=SIGINT",
    ]
    r = run_cli("gruexp.train", *TINY, *kill, f"hydra.run.dir={runs / 'a'}")
    assert r.returncode == 130, r.stderr[-2000:]
    assert "SIGINT: finishing the current batch, saving last.ckpt" in r.stdout + r.stderr
    first = runs / "a" / "checkpoints" / "last.ckpt"
    assert json.loads((runs / "a" / "summary.json").read_text())["status"] == "interrupted"
    assert torch.load(first, weights_only=True)["global_step"] == 21
    before = first.read_bytes()
    r = run_cli("gruexp.train", *TINY, "ckpt_path=last", f"hydra.run.dir={runs / 'b'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ckpt_path=last is {first}" in r.stdout + r.stderr
    assert "Restoring states from the checkpoint" not in r.stdout + r.stderr  # that line said, once
    assert json.loads((runs / "b" / "summary.json").read_text())["status"] == "completed"
    assert first.read_bytes() == before  # the interrupted run's files are untouched


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_best_checkpoint_is_tested_ends_interrupted_with_a_summary(
    tmp_path, inject_path, corpus_path, signum
):
    # Lightning turns Ctrl+C during trainer.test into sys.exit(1): the run left no summary.json, and exited 1
    kill = ["+callbacks.kill._target_=helpers.inject.SignalInTest", f"+callbacks.kill.signum={signum}"]
    r = run_cli("gruexp.train", *TINY, *kill, f"hydra.run.dir={tmp_path / 'a'}")
    assert r.returncode == 128 + getattr(signal, signum), r.stderr[-2000:]
    assert (r.stdout + r.stderr).count(f"{signum} while testing the best checkpoint: stopping") == 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "test_ppl" not in summary
    assert summary["global_step"] > 0 and math.isfinite(summary["val_ppl"])  # what training measured is kept
    assert (tmp_path / "a" / "checkpoints" / "best.ckpt").is_file()
    assert "INTERRUPTED: val/ppl" in r.stdout + r.stderr


def test_sigint_while_a_run_sets_up_ends_interrupted_with_a_summary(tmp_path, inject_path, corpus_path):
    # before the trainer exists (the corpus being encoded): the run left no summary.json and a traceback
    r = run_cli("gruexp.train", *TINY, "data._target_=helpers.inject.SignalOnSetup", f"hydra.run.dir={tmp_path / 'a'}")
    assert r.returncode == 130 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "error" not in summary and "val_ppl" not in summary
    assert f"INTERRUPTED before training started | {tmp_path / 'a'}" in r.stdout + r.stderr


def test_sigterm_while_the_corpus_is_encoded_ends_interrupted_and_leaves_no_partial_file(
    tmp_path, inject_env, corpus_path
):
    run = tmp_path / "run"
    r = run_cli("gruexp.train", *TINY, "data._target_=helpers.inject.SignalWhileEncoding", f"hydra.run.dir={run}")
    assert r.returncode == 143 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("SIGTERM while setting up: stopping") == 1
    assert f"INTERRUPTED before training started | {run}" in out
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    tokens = tmp_path / "cache" / "gruexp" / "tokens"
    assert tokens.is_dir() and [p.name for p in tokens.iterdir() if p.suffix in (".part", ".bin")] == []


def test_sigterm_during_the_last_validation_ends_interrupted_without_testing(tmp_path, inject_env, corpus_path):
    run = tmp_path / "run"
    kill = ["+callbacks.kill._target_=helpers.inject.SignalInLastValidation"]
    r = run_cli("gruexp.train", *TINY, *kill, "logger=csv", f"hydra.run.dir={run}")
    assert r.returncode == 143, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "test_ppl" not in summary
    assert summary["epochs"] == 2 and (run / "checkpoints" / "last.ckpt").is_file()  # the last epoch, saved
    assert "SIGTERM: finishing the current batch, saving last.ckpt" in r.stdout + r.stderr
    assert "whole test split" not in r.stdout + r.stderr
