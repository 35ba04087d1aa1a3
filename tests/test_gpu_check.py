"""scripts/gpu_check.sh's checks before any GPU step, on a machine without CUDA: every one of them runs here (the
packages, the corpus), then the script stops with one line and exit 1 and writes nothing. And the key numbers its
report gives (scripts/gpu_check_numbers.py), read from a run and a benchmark made here as the GPU steps make them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, TINY_BENCH, run_bench

from gruexp.train import train

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real (gpu_check)")


def gpu_check(out, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@cpu_only
def test_without_cuda_it_checks_the_corpus_then_says_nothing_gpu_side_was_checked(tmp_path, corpus_path):
    proc = gpu_check(tmp_path / "report", GRUEXP_DATA_DIR=str(corpus_path.parent))
    assert proc.returncode == 1
    assert proc.stderr.startswith("gpu_check: no CUDA device here (torch.cuda.is_available() is False, torch ")
    assert proc.stderr.endswith("nothing GPU-side was checked\n") and proc.stdout == ""
    assert not (tmp_path / "report").exists()


@cpu_only
def test_a_missing_corpus_is_one_line_naming_where_to_put_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = gpu_check(tmp_path / "report", GRUEXP_DATA_DIR=str(empty), XDG_CACHE_HOME=str(empty))
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith("gpu_check: no corpus: gruexp.UserError: no timemachine.txt")
    assert f"put it in {empty}/" in line
    assert not (tmp_path / "report").exists()


def numbers(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check_numbers.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_runs_numbers_are_its_summarys(make_cfg, tmp_path):
    run = tmp_path / "run"
    summary = train(make_cfg("trainer.max_epochs=1", out=run))
    line = numbers("run", str(run)).stdout
    rate = f"{summary['tokens_per_sec']:,.0f}"
    assert line == f"completed: val/ppl {summary['val_ppl']:.3f}, {rate} tokens/sec, world_size 1\n"
    assert numbers("run", str(tmp_path)).stdout == "no summary.json\n"  # a run that wrote nothing


def test_the_benchmarks_numbers_are_its_reports(tmp_path):
    out, framework = tmp_path / "bench.json", tmp_path / "bench-framework.json"
    args = ["--shapes", "8x24,4x16", "--variants", "scratch,fused"]
    proc = run_bench(*TINY_BENCH, *args, "--infer-tokens", "0", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_bench(
        *args, "--threads", "1", "--warmup", "1", "--steps", "10", "--json", str(framework), script="bench_framework.py"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    train_rows = {(r["variant"], r["batch"]): r["tokens_per_sec"] for r in report["results"] if r["mode"] == "train"}
    rates = f"scratch {train_rows['scratch', 4]:,.0f}, fused {train_rows['fused', 4]:,.0f}"  # the smallest shape
    gemm = f"{report['gemm_gflops']:,.0f}"
    assert numbers("bench", str(out)).stdout == f"train B4 H16 tokens/sec: {rates}; GEMM {gemm} GFLOP/s\n"
    rows = json.loads(framework.read_text())["framework"]
    parts = numbers("framework", str(framework)).stdout.rstrip("\n").split("; ")
    assert len(parts) == 4 == len(rows)
    for part, r in zip(parts, rows, strict=True):
        assert part == (
            f"{r['variant']} B{r['batch']} H{r['hidden']}: framework/bare {r['framework/bare']:.3f} "
            f"(floor/bare {r['floor/bare']:.3f}, framework/floor {r['framework/floor']:.3f})"
        )
    proc = numbers("frameworks", str(framework))
    assert proc.returncode == 2 and proc.stderr.startswith("usage: gpu_check_numbers.py run RUN_DIR")
