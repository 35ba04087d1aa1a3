"""Checkpoints: ckpt_path resolved as documented, a bad checkpoint one line in train and generate, and a save
that is atomic (a failed or killed save keeps the previous file whole, a new one goes in by rename)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_one_line_error, cli_env, run_main

from gruexp.checkpoints import AtomicCheckpointIO, resolve_ckpt_path
from gruexp.train import train


def test_resolve_ckpt_path_picks_the_newest_sibling_run(tmp_path):
    for name, mtime in (("old", 1000), ("new", 2000), ("mine", 3000)):
        p = tmp_path / name / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (mtime, mtime))
    assert resolve_ckpt_path("last", tmp_path / "mine") == str(tmp_path / "new" / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(tmp_path / "old"), tmp_path / "x") == str(tmp_path / "old/checkpoints/last.ckpt")


def test_generate_takes_last_and_a_run_folder_like_train(capfd, make_cfg, tmp_path, monkeypatch, corpus_path):
    run = tmp_path / "outputs" / "train" / "runs" / "x"
    summary = train(make_cfg("model=torch", "trainer.max_epochs=1", "logger=csv", out=run))
    monkeypatch.chdir(tmp_path)
    for ckpt_path in ("last", str(run)):
        code, out = run_main(capfd, "gruexp.generate", f"ckpt_path={ckpt_path}", "num_chars=20")
        assert code == 0, out
        assert out.rstrip("\n").splitlines()[-1] == summary["sample"][:34]


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
