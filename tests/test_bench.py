"""scripts/bench.py: the harness runs every variant at every shape and writes the documented JSON (no timings)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

import benchlib
from helpers import ROOT, TINY_BENCH, run_bench

from gruexp.models import MODEL_NAMES, forward_flops_per_token
from gruexp.module import CharLM


def test_bench_writes_every_variant_and_shape(tmp_path):
    out = tmp_path / "sub" / "bench.json"
    proc = run_bench(*TINY_BENCH, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu: ") and report["device"].endswith("1 thread")
    assert report["gemm_gflops"] > 0 and report["gemm_size"] == 64
    assert report["fused_loop"] == ("c" if shutil.which(os.environ.get("CC", "cc")) else "ops")
    keys = {"variant", "batch", "hidden", "steps", "tokens_per_sec", "ms_per_step"}
    rows = {(r["mode"], r["variant"], r["batch"], r["hidden"]): r for r in report["results"]}
    expected = [("train", v, B, H) for B, H in [(4, 16), (8, 24)] for v in MODEL_NAMES]
    expected += [("infer", v, 1, H) for H in (16, 24) for v in MODEL_NAMES]
    assert sorted(rows) == sorted(expected)
    for key, r in rows.items():
        assert keys <= r.keys(), key
        assert r["tokens_per_sec"] > 0 and r["ms_per_step"] > 0 and r["limit_tokens_per_sec"] > 0, key
        assert r["steps"] == (3 if key[0] == "train" else 6), key
        # tokens/sec and ms/step are the same median: B*T tokens per training step, 1 per generated token
        tokens = r["batch"] * 35 if key[0] == "train" else 1
        assert abs(r["tokens_per_sec"] * r["ms_per_step"] / 1e3 - tokens) < 1e-6 * tokens, key
    ratios = {(q["mode"], q["batch"], q["hidden"]): q for q in report["ratios"]}
    assert sorted(ratios) == [("infer", 1, 16), ("infer", 1, 24), ("train", 4, 16), ("train", 8, 24)]
    q = ratios[("train", 8, 24)]
    rate = {v: rows[("train", v, 8, 24)]["tokens_per_sec"] for v in MODEL_NAMES}
    assert q["fused/torch"] == rate["fused"] / rate["torch"] and q["fused/scratch"] == rate["fused"] / rate["scratch"]
    assert ratios[("infer", 1, 16)]["target fused/torch"] == 1.0  # fused must not be slower at generation
    # the printed table holds every row and the ratios
    table = proc.stdout
    assert "fp32 GEMM 64^2" in table and "fused/torch" in table and f"wrote {out}" in table
    assert sum(line.startswith(("train ", "infer ")) for line in table.splitlines()) == len(expected) + 4


def test_bench_variants_subset(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench(
        *TINY_BENCH,
        *("--variants", "torch,fused", "--shapes", "4x16", "--infer-tokens", "0", "--json", str(out)),
        env={"GRUEXP_FUSED_CPU": "ops"},  # the torch-op loop, on purpose: the report says so
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["fused_loop"] == "ops" and "fused's loop: ops" in proc.stdout
    assert [(r["mode"], r["variant"]) for r in report["results"]] == [("train", "torch"), ("train", "fused")]
    assert [set(q) for q in report["ratios"]] == [{"mode", "batch", "hidden", "fused/torch"}]


def test_bench_refuses_to_overwrite_json_and_bad_shapes(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("an earlier run\n")
    proc = run_bench(*TINY_BENCH, "--json", str(out))
    assert proc.returncode == 2
    assert f"--json {out} exists and would be overwritten: pass a new path" in proc.stderr
    assert "Traceback" not in proc.stderr and "timing" not in proc.stderr and proc.stdout == ""
    assert out.read_text() == "an earlier run\n"
    proc = run_bench("--shapes", "32by256")
    assert proc.returncode == 2 and "'32by256' is not BATCHxHIDDEN: write e.g. 32x256,128x1024" in proc.stderr
    proc = run_bench("--variants", "torch,cudnn")
    assert proc.returncode == 2 and "'cudnn': choose among scratch,torch,fused" in proc.stderr


def test_flops_per_token_matches_charlm():
    vocab = [f"c{i}" for i in range(28)]
    for H in (16, 256, 1024):
        model = CharLM("torch", hidden_size=H, vocab=vocab)
        assert benchlib.train_flops_per_token(28, H) == model.flops_per_token
    # the FLOPs at the d2l shape: forward 2*3H*(H+V) + 2*H*V, training three times that
    assert forward_flops_per_token(28, 256) == 2 * 3 * 256 * 284 + 2 * 256 * 28


def test_repeat_reports_each_ratio_and_its_spread(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY_BENCH, "--shapes", "4x16", "--variants", "scratch,torch,fused", "--infer-tokens", "0"]
    proc = run_bench(*args, "--repeat", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["repeat"] == 2 and len(report["runs"]) == 2
    assert sorted(report["summary"]) == ["train B4 H16 fused/scratch", "train B4 H16 fused/torch"]
    ratios = [run["ratios"][0]["fused/scratch"] for run in report["runs"]]
    s = report["summary"]["train B4 H16 fused/scratch"]
    assert s["runs"] == ratios and s["median"] == statistics.median(ratios)
    assert (s["min"], s["max"]) == (min(ratios), max(ratios))
    assert "over 2 runs: median (min-max)" in proc.stdout and "through Lightning" not in proc.stdout


def test_repeat_must_be_positive():
    proc = run_bench("--repeat", "0")
    assert proc.returncode == 2 and "--repeat must be positive, got 0" in proc.stderr


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    """python scripts/<name> args, from the checkout, its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_profile_step_lists_where_a_step_spends_its_time():
    proc = run_script("profile_step.py", "--shape", "4x16", "--steps", "2", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fused B=4 H=16 T=35, 1 thread: ") and lines[1].split() == [
        "operator", "ms/step", "share", "calls/step"
    ]  # fmt: skip
    rows = [(line[:48].strip(), line[48:].split()) for line in lines[2:]]  # the name column is 48 wide
    assert len(rows) == 15 and all(len(cells) == 3 for _, cells in rows)
    calls = {name: cells[2] for name, cells in rows}
    assert calls["GRURecurrence"] == calls["GRURecurrenceBackward"] == "1.0"  # one call per step: no Python loop


def test_framework_phases_set_each_lightning_phase_against_the_bare_one():
    proc = run_script("framework_phases.py", "--shape", "4x16", "--steps", "20", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "fused B=4 H=16 T=35, 1 thread: ms per step, median of 20"
    rows = {line[:44].strip(): [float(x) for x in line[44:].split()] for line in lines[2:]}  # names: 44 wide
    total = rows.pop("sum of the rows")
    assert len(rows) == 7 and all(len(r) == 3 and r[0] > 0 for r in rows.values())
    assert all(abs(r[0] - r[1] - r[2]) < 2e-3 for r in [*rows.values(), total])  # extra = Lightning - bare
    assert abs(total[0] - sum(r[0] for r in rows.values())) < 5e-3 and total[1] > 0
    assert rows["loop, next batch, batch-start hooks"][1] == 0 and rows["backward"][1] > 0  # bare has no loop
    assert "GPU available" not in proc.stdout + proc.stderr
