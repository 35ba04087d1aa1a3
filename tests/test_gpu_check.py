"""scripts/gpu_check.sh's checks before any GPU step, on a machine without CUDA: every one of them runs here (the
packages, the corpus), then the script stops with one line and exit 1 and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real (gpu_check)")


def gpu_check(out, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_without_cuda_it_checks_the_corpus_then_says_nothing_gpu_side_was_checked(tmp_path, corpus_path):
    proc = gpu_check(tmp_path / "report", GRUEXP_DATA_DIR=str(corpus_path.parent))
    assert proc.returncode == 1
    assert proc.stderr.startswith("gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch ")
    assert proc.stderr.endswith("nothing GPU-side was checked\n") and proc.stdout == ""
    assert not (tmp_path / "report").exists()


def test_a_missing_corpus_is_one_line_naming_where_to_put_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = gpu_check(tmp_path / "report", GRUEXP_DATA_DIR=str(empty), XDG_CACHE_HOME=str(empty))
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("gpu_check: no corpus: gruexp.UserError: no timemachine.txt")
    assert f"put it in {empty}/" in line
    assert not (tmp_path / "report").exists()
