"""Reliability: exact resume after an interruption, bad input as one line, divergence, no hangs (issue 6).

Faults are injected through the config with tests/inject.py (+callbacks.x._target_=helpers.inject.SignalAt ...).
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, assert_one_line_error, run_cli, run_main

from gruexp.checkpoints import AtomicCheckpointIO, resolve_ckpt_path
from gruexp.train import train

TESTS = str(Path(__file__).resolve().parent)
EXACT = ["model=torch", "trainer.accelerator=cpu", "trainer.deterministic=true", "trainer.max_epochs=3"]


# --- exact resume ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 3-epoch run per partition, the reference the resumed runs must match."""
    return {}


@pytest.mark.parametrize("partition", ["sequential", "random"])
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_interrupted_then_resumed_run_matches_uninterrupted(make_cfg, tmp_path, uninterrupted, partition, where):
    common = [*EXACT, f"data.partition={partition}"]
    if partition not in uninterrupted:
        uninterrupted[partition] = train(make_cfg(*common, out=tmp_path / "full"))
    full = uninterrupted[partition]
    if where == "mid-epoch":  # SIGTERM, as SLURM sends, after step 50: 37 batches an epoch, so inside the second
        kill = ["+callbacks.kill._target_=helpers.inject.SignalAt", "+callbacks.kill.step=50"]
        with pytest.raises(SystemExit) as e:
            train(make_cfg(*common, *kill, out=tmp_path / "a"))
        assert e.value.code == 128 + 15
        cut = json.loads((tmp_path / "a" / "summary.json").read_text())
        # the signal arrives after this batch end's check (callback order): the stop is one batch later
        assert (cut["status"], cut["global_step"]) == ("interrupted", 51)
    else:  # a run that ended after epoch 2 of 3
        assert train(make_cfg(*common, "trainer.max_epochs=2", out=tmp_path / "a"))["global_step"] == 74
    resumed = train(make_cfg(*common, "ckpt_path=last", out=tmp_path / "b"))
    assert resumed["global_step"] == full["global_step"] and resumed["status"] == "completed"
    assert resumed["val_ppl"] == pytest.approx(full["val_ppl"], abs=1e-6)
    assert resumed["train_ppl"] == pytest.approx(full["train_ppl"], abs=1e-6)


@pytest.fixture
def inject_path(monkeypatch):
    """Let the CLI processes a test starts import tests/helpers/inject.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


def test_sigint_from_cli_saves_last_and_ckpt_path_last_resumes_in_a_new_folder(tmp_path, inject_path, corpus_path):
    runs = tmp_path / "runs"
    kill = ["+callbacks.kill._target_=helpers.inject.SignalAt", "+callbacks.kill.step=20", "+callbacks.kill.signum=SIGINT"]
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


def test_resolve_ckpt_path_picks_the_newest_sibling_run(tmp_path):
    for name, mtime in (("old", 1000), ("new", 2000), ("mine", 3000)):
        p = tmp_path / name / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (mtime, mtime))
    assert resolve_ckpt_path("last", tmp_path / "mine") == str(tmp_path / "new" / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(tmp_path / "old"), tmp_path / "x") == str(tmp_path / "old/checkpoints/last.ckpt")


def test_checkpoint_write_is_atomic(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"w": torch.zeros(100_000), "late": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


# --- bad input: one line, non-zero exit, no traceback ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.hidden_size=-3"], "model.hidden_size must be a positive integer, got -3"),
        (["data.batch_size=-1"], "data.batch_size must be a positive integer, got -1"),
        (["data.num_steps=0"], "data.num_steps must be a positive integer, got 0"),
        (["data.num_steps=5000"], "data.num_steps=5000 needs at least 5001 tokens"),
        (["trainer.accelerator=cpu", "trainer.devices=4096"], "trainer.devices=4096 but this machine has"),
        (
            ["trainer.accelerator=gpu"] if not torch.cuda.is_available() else ["trainer.devices=4096"],
            "(check trainer.accelerator and trainer.devices)",
        ),
        (["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path=/nonexistent/last.ckpt is not a checkpoint file"),
    ],
)
def test_bad_config_is_one_line(capfd, tmp_path, args, message, corpus_path):
    code, out = run_main(capfd, "gruexp.train", *TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(code, out, message)
    summary = tmp_path / "run" / "summary.json"  # a failed run never claims success
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "has no letters after d2l's cleaning"),
        (b"12345 !!! 678\n", "has no letters after d2l's cleaning"),
        (b"time\x00machine" * 10, "looks binary"),
        ("la machine à explorer le temps".encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_bad_corpus_is_one_line(capfd, tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    code, out = run_main(capfd, "gruexp.train", *TINY, f"data.path={corpus}", f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(code, out, message)


def test_corpus_with_wrong_sha1_is_one_line(capfd, tmp_path, monkeypatch):
    (tmp_path / "timemachine.txt").write_text("not the time machine\n")
    monkeypatch.setenv("GRUEXP_DATA_DIR", str(tmp_path))
    code, out = run_main(capfd, "gruexp.train", *TINY, f"hydra.run.dir={tmp_path / 'r'}")
    assert_one_line_error(code, out, "expected d2l's 090b5e7e70c295757f55df93cb0a180b9691891a")


@pytest.mark.parametrize("group", ["model", "data", "logger"])
def test_unknown_group_option_lists_the_choices(tmp_path, group):
    r = run_cli("gruexp.train", f"{group}=nope", f"hydra.run.dir={tmp_path / 'r'}") if group == "model" else None
    if r is None:  # the check runs before Hydra: call it directly for the other groups
        from gruexp.preflight import check_choices

        with pytest.raises(SystemExit) as e:
            check_choices([f"{group}=nope"], ROOT / "conf")
        assert e.value.code == 2
        return
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "Error: Could not find 'model/nope': choose one of fused, scratch, torch"


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


def test_generate_bad_checkpoint_and_prefix(capfd, make_cfg, tmp_path, corpus_path):
    train(make_cfg("model=torch", "trainer.max_epochs=1", "callbacks.learning_rate_monitor=null"))
    good = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(good, weights_only=False)
    hp = ckpt["hyper_parameters"]
    for what, edit in (("hidden size", {"hidden_size": 32}), ("vocabulary", {"vocab": hp["vocab"][:20]})):
        bad = tmp_path / f"{what}.ckpt"
        torch.save({**ckpt, "hyper_parameters": {**hp, **edit}}, bad)
        code, out = run_main(capfd, "gruexp.generate", f"ckpt_path={bad}")
        assert_one_line_error(code, out, f"its weights do not fit its {what}")
    code, out = run_main(capfd, "gruexp.generate", f"ckpt_path={good}", "prefix=1234")
    assert_one_line_error(code, out, "has no character of the vocabulary")


# --- numerical faults -----------------------------------------------------------------------------------------


def test_divergence_stops_with_the_step_keeps_last_good_checkpoint(capfd, tmp_path, corpus_path):
    run = tmp_path / "run"
    # epoch 0 trains at lr 1; a StepLR then multiplies it by 1e6 and epoch 1 diverges
    sched = "scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 1e6}"
    code, out = run_main(capfd, "gruexp.train", *TINY, sched, "trainer.gradient_clip_val=null", f"hydra.run.dir={run}")
    assert code == 3
    assert "training diverged: loss is" in out and "at step 38 (epoch 1)" in out and "gradient_clip_val" in out
    assert "Traceback" not in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 38" in summary["error"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(w).all() for w in last["state_dict"].values())


@pytest.mark.slow
def test_sweep_with_a_diverging_job_finishes_the_others_and_fails(tmp_path, corpus_path):
    sweep = tmp_path / "sweep"
    r = run_cli(
        "gruexp.train",
        "-m",
        *TINY,
        "trainer.max_epochs=1",
        "trainer.gradient_clip_val=null",
        "optimizer.lr=1e6,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode != 0
    assert "Error executing job with overrides" in r.stderr and "optimizer.lr=1000000.0" in r.stderr
    statuses = [json.loads((sweep / str(i) / "summary.json").read_text())["status"] for i in (0, 1)]
    assert statuses == ["diverged", "completed"]


# --- no hangs -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_rank_that_raises_ends_the_whole_job(tmp_path, inject_path, corpus_path):
    r = run_cli(
        "gruexp.train",
        *TINY,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "+callbacks.fail._target_=helpers.inject.RaiseAt",
        "+callbacks.fail.step=3",
        "+callbacks.fail.rank=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=180,
    )  # a hang would be a TimeoutExpired
    assert r.returncode != 0
    assert "injected failure in rank 1 at step 3" in r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_stops_both_and_resumes_exactly(tmp_path, inject_path, corpus_path):
    ddp = [*TINY, *EXACT, "trainer.max_epochs=2", "trainer.devices=2", "+trainer.strategy=ddp"]
    runs = tmp_path / "runs"
    assert run_cli("gruexp.train", *ddp, f"hydra.run.dir={runs / 'full'}", timeout=180).returncode == 0
    kill = ["+callbacks.kill._target_=helpers.inject.SignalAt", "+callbacks.kill.step=20"]  # rank 0 only
    r = run_cli("gruexp.train", *ddp, *kill, f"hydra.run.dir={runs / 'a'}", timeout=180)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    r = run_cli("gruexp.train", *ddp, f"ckpt_path={runs / 'a'}", f"hydra.run.dir={runs / 'b'}", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    full, cut, resumed = (json.loads((runs / n / "summary.json").read_text()) for n in ("full", "a", "b"))
    assert (cut["status"], cut["global_step"], cut["world_size"]) == ("interrupted", 21, 2)
    assert resumed["val_ppl"] == pytest.approx(full["val_ppl"], abs=1e-6)
    assert resumed["train_ppl"] == pytest.approx(full["train_ppl"], abs=1e-6)
