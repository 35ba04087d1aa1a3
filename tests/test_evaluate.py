"""A run ends testing its best checkpoint; gruexp.evaluate reproduces that number and refuses a foreign corpus."""

from __future__ import annotations

import json
import math

import pytest
from helpers import run_cli

from gruexp import UserError
from gruexp.evaluate import evaluate
from gruexp.train import train

SHAKESPEARE_LIKE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 60


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny chars-tokenized run on a Shakespeare-like file, with its own token cache."""
    root = tmp_path_factory.mktemp("evaluate")
    text = root / "shakespeare_like.txt"
    text.write_text(SHAKESPEARE_LIKE)
    return root, text


@pytest.fixture
def trained(run, make_cfg, monkeypatch):
    root, text = run
    monkeypatch.setenv("XDG_CACHE_HOME", str(root / "cache"))
    out = root / "runs" / "a"
    if not (out / "summary.json").exists():
        train(make_cfg("data=file", f"data.path={text}", "logger=csv", out=out))
    return out, json.loads((out / "summary.json").read_text()), text


def test_run_ends_with_test_metrics_of_its_best_checkpoint(trained):
    out, summary, _ = trained
    assert summary["status"] == "completed"
    assert summary["test_bpc"] == pytest.approx(math.log2(summary["test_ppl"]), rel=1e-6)
    # evaluate() on the best checkpoint reads the same whole test split and gets the same number
    again = evaluate(summary["best_ckpt"], "test")
    assert again["ppl"] == pytest.approx(summary["test_ppl"], rel=1e-5)
    assert again["bpc"] == pytest.approx(summary["test_bpc"], rel=1e-5)
    # and its validation number is the run's best val/ppl (the whole split, as validation read it)
    assert evaluate(summary["best_ckpt"], "val")["ppl"] == pytest.approx(summary["best_val_ppl"], rel=1e-5)
    # a run folder means its last.ckpt, as on the command line
    assert evaluate(out, "test") == evaluate(out / "checkpoints" / "last.ckpt", "test")


def test_evaluate_cli_prints_ppl_and_bpc_for_a_run_folder_and_last(trained):
    out, summary, _ = trained
    r = run_cli("gruexp.evaluate", f"ckpt_path={out}", "split=val")
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("val: ppl ")]
    assert line and f"| {out}/checkpoints/last.ckpt" in line[0]
    r = run_cli("gruexp.evaluate", "ckpt_path=last", f"runs_dir={out.parent}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"test: ppl {evaluate(out / 'checkpoints' / 'last.ckpt', 'test')['ppl']:.4f}" in r.stdout


def test_evaluate_refuses_a_corpus_with_another_vocabulary_in_one_line(trained, tmp_path):
    out, summary, _ = trained
    other = tmp_path / "other.txt"
    other.write_text("zyx wvu " * 500)
    with pytest.raises(UserError, match="was trained on a vocabulary of .* tokens that is not this corpus's"):
        evaluate(summary["best_ckpt"], "test", path=str(other))
    r = run_cli("gruexp.evaluate", f"ckpt_path={summary['best_ckpt']}", f"data.path={other}")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "was trained on a vocabulary of" in r.stdout + r.stderr


def test_evaluate_on_nanogpt_split_reads_the_whole_held_out_tenth(trained):
    out, summary, text = trained
    r = evaluate(summary["best_ckpt"], "val", val_fraction=0.1, test_fraction=0.0)
    n = len(SHAKESPEARE_LIKE)
    held_out = n - int(n * 0.9)
    assert r["tokens"] == held_out - 1  # every token of the held-out tenth after its first
    with pytest.raises(UserError, match="split=dev is unknown"):
        evaluate(summary["best_ckpt"], "dev")


def test_bad_split_and_missing_checkpoint_are_one_line(tmp_path):
    r = run_cli("gruexp.evaluate", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    assert "is not a checkpoint file" in r.stdout + r.stderr


def test_evaluate_last_is_the_newest_run_of_any_experiment_as_for_generate(trained, tmp_path):
    # an experiment's runs live in outputs/<task_name>/runs: `last` once looked in outputs/train/runs only and
    # evaluated an older default run there instead of the newer shakespeare_quick one
    import os
    import shutil

    out, _, _ = trained
    old = tmp_path / "outputs" / "train" / "runs" / "old" / "checkpoints" / "last.ckpt"
    new = tmp_path / "outputs" / "shakespeare_quick" / "runs" / "new" / "checkpoints" / "last.ckpt"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        shutil.copy(out / "checkpoints" / "last.ckpt", p)
    os.utime(old, (1e9, 1e9))
    r = run_cli("gruexp.evaluate", "ckpt_path=last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"ckpt_path=last is {new}\n" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("test: ppl ") and r.stdout.endswith(f"| {new}\n")
    r = run_cli("gruexp.evaluate", "ckpt_path=last", f"runs_dir={old.parents[2]}", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.endswith(f"| {old}\n")  # runs_dir narrows the search
