"""A full disk, a real one (a small tmpfs mounted for the test: needs root, else these tests skip): one line,
a failed summary, no empty or temporary file left."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import TINY, run_cli


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
