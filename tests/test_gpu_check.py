"""scripts/gpu_check.sh's checks before any GPU step, on a machine without CUDA: every one of them runs here (the
packages, the corpus), then the script stops with one line and exit 1 and writes nothing. And the key numbers its
report gives (scripts/gpu_check_numbers.py), read from a run and a benchmark made here as the GPU steps make them,
and its graph step (scripts/bench_graphs.py) in the CPU smoke mode the script has for that."""

from __future__ import annotations

import csv
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


GRAPHS_SMOKE = ["--device", "cpu", "--shapes", "4x16", "--variants", "fused", "--steps", "10", "--epochs", "2"]
TINY_DATA = ["data.max_tokens=3000", "data.num_steps=10", "trainer.enable_model_summary=false"]


def test_the_graph_step_in_its_cpu_smoke_mode_trains_twice_and_tables_the_runs_own_rates(tmp_path):
    """bench_graphs.py --device cpu: gruexp's command at K=1 and at K=4 (eagerly: graphs need CUDA), 10 asked steps
    cut to whole chunks (8), each rate the run's own train/tokens_per_sec of its second epoch; gpu_check's line."""
    out, runs = tmp_path / "graphs.json", tmp_path / "runs"
    args = [*GRAPHS_SMOKE, "--steps-per-call", "4", "--runs-dir", str(runs), "--json", str(out), *TINY_DATA]
    proc = run_bench(*args, script="bench_graphs.py")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["cuda"] is False and report["graph_label"] == "chunked" and report["steps_per_call"] == 4
    eager, chunked = report["runs"]
    assert (eager["mode"], eager["steps_per_call"], chunked["mode"], chunked["steps_per_call"]) == (
        "eager", 1, "chunked", 4
    )  # fmt: skip
    for r, settings in ((eager, ["steps_per_call=1", "cuda_graph=false"]), (chunked, ["steps_per_call=4"])):
        assert r["status"] == "completed" and r["global_step"] == 16 and r["epochs_timed"] == 1, r
        assert set(settings + ["cuda_graph=false", "model=fused", "trainer.limit_train_batches=8"]) <= set(
            r["overrides"]
        )
        with (runs / f"{r['mode']}_fused_B4_H16" / "csv" / "metrics.csv").open() as f:
            [second] = [row for row in csv.DictReader(f) if row["train/tokens_per_sec"] and row["epoch"] == "1"]
        assert r["tokens_per_sec"] == pytest.approx(float(second["train/tokens_per_sec"]), rel=1e-12)
        assert r["mfu"] is None  # no peak FLOP/s known for a CPU
    [q] = report["ratios"]
    assert q["graph/eager"] == chunked["tokens_per_sec"] / eager["tokens_per_sec"] and "target graph/eager" not in q
    lines = proc.stdout.splitlines()
    header = (
        "| variant | B x H | steps | eager tok/s | eager MFU | chunked tok/s | chunked MFU | chunked/eager | target |"
    )
    row = lines[lines.index(header) + 2].split(" | ")
    assert row[:3] == ["| fused", "4 x 16", "8"] and row[4] == row[6] == "-" and row[8] == "- |"
    assert row[7] == f"{q['graph/eager']:.2f}x" and f"wrote {out}" in proc.stdout
    line = numbers("graphs", str(out)).stdout
    eager_rate, chunked_rate = f"{eager['tokens_per_sec']:,.0f}", f"{chunked['tokens_per_sec']:,.0f}"
    assert line == f"fused B4 H16: {eager_rate} -> {chunked_rate} tokens/sec, chunked/eager {q['graph/eager']:.2f}\n"


def test_the_graph_steps_numbers_set_each_ratio_against_the_issues_targets(tmp_path):
    """On CUDA (made up here): graph/eager >= 5 for torch and fused, >= 10 for scratch at B32 H256, none at B128
    H512; a graph run that fell back to eager is named, in the table and in gpu_check's line."""
    import bench_graphs

    runs = []
    for v, eager, graph in (("scratch", 20e3, 150e3), ("torch", 150e3, 900e3), ("fused", 160e3, 640e3)):
        for mode, rate in (("eager", eager), ("graph", graph)):
            r = {"mode": mode, "variant": v, "batch": 32, "hidden": 256, "steps": 128, "tokens_per_sec": rate}
            runs.append(r | {"mfu": rate * 1e-8, "fallback": None, "status": "completed", "log": f"{mode}_{v}.log"})
    runs[-1]["fallback"] = "cuda_graph: a host sync; training eagerly, 16 steps per call"
    report = {"device": "cuda: made up", "torch": "x", "cuda": True, "graph_label": "graph", "steps_per_call": 16}
    report |= {"epochs": 3, "runs": runs, "ratios": bench_graphs.ratio_rows(runs, cuda=True)}
    table = bench_graphs.format_table(report)
    assert "| scratch | 32 x 256 | 128 | 20,000 | 0.0002 | 150,000 | 0.0015 | 7.50x | below 10x |" in table
    assert "| torch | 32 x 256 | 128 | 150,000 | 0.0015 | 900,000 | 0.0090 | 6.00x | ok 5x |" in table
    assert "| fused | 32 x 256 | 128 | 160,000 | 0.0016 | 640,000 | 0.0064 | 4.00x | below 5x |" in table
    assert "graph fused B32 H256: completed: cuda_graph: a host sync; training eagerly" in table
    path = tmp_path / "graphs.json"
    path.write_text(json.dumps(report))
    parts = numbers("graphs", str(path)).stdout.rstrip("\n").split("; ")
    assert parts[1] == "torch B32 H256: 150,000 -> 900,000 tokens/sec, graph/eager 6.00 (ok 5), MFU 0.0015 -> 0.0090"
    assert parts[0].endswith("graph/eager 7.50 (below 10), MFU 0.0002 -> 0.0015")
    assert parts[3] == "eager fallback in: fused B32 H256"
    assert bench_graphs.TARGETS == {(32, 256): {"torch": 5.0, "fused": 5.0, "scratch": 10.0}}


def test_the_graph_step_refuses_what_cannot_run_in_one_line(tmp_path):
    cases = [
        (["--steps-per-call", "0"], "--steps-per-call must be positive, got 0"),
        (["--steps", "8", "--steps-per-call", "16"], "--steps 8 must be at least --steps-per-call 16 (whole chunks)"),
        (["--epochs", "1"], "--epochs must be at least 2 (the first is untimed), got 1"),
        (["model=torch"], "model=torch: the script sets these itself"),
        (["--variants", "fused-cudnn"], "'fused-cudnn': choose among scratch,torch,fused"),
    ]
    if not torch.cuda.is_available():
        cases.append(([], "--device cuda: this torch build or machine has no CUDA device; --device cpu is the smoke"))
    for extra, message in cases:
        device = [] if not extra else ["--device", "cpu"]
        proc = run_bench(*device, *extra, "--runs-dir", str(tmp_path / "runs"), script="bench_graphs.py")
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr and "training" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_gpu_check_runs_the_graph_step_at_both_shapes_for_every_variant():
    """The step is in the script (a CPU machine stops before the GPU steps): bench_graphs.py on CUDA at B32 H256
    and B128 H512 for scratch, torch and fused, its JSON read into a row of the report."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    command = script[script.index('"$PY" scripts/bench_graphs.py') :].split(">")[0]
    assert "--device cuda --shapes 32x256,128x512 --variants scratch,torch,fused" in command
    assert '--json "$WORK/bench-graphs.json"' in command
    assert 'gpu_check_numbers.py graphs "$WORK/bench-graphs.json"' in script
    assert script.count('record "bench_graphs.py --device cuda"') == 2  # its pass or FAIL row, and the FAIL row
    assert "scripts/bench_graphs.py (every variant at B32 H256 and B128 H512" in script  # the header's step list
