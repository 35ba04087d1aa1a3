"""scripts/bench.py --framework (CharLM through Lightning's loop vs the bare step) and --repeat (no timings)."""

from __future__ import annotations

import json
import statistics

from test_bench import TINY_BENCH, run_bench


def test_framework_and_repeat_report_each_ratio_and_its_spread(tmp_path):
    out = tmp_path / "bench.json"
    args = [*TINY_BENCH, "--shapes", "4x16", "--variants", "scratch,fused", "--infer-tokens", "0"]
    proc = run_bench(*args, "--framework", "--framework-steps", "20", "--repeat", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["repeat"] == 2 and len(report["runs"]) == 2
    for run in report["runs"]:
        rows = {r["variant"]: r for r in run["framework"]}
        assert sorted(rows) == ["fused", "scratch"]
        for r in rows.values():
            assert r["steps"] == 20 and r["framework_tokens_per_sec"] > 0 and r["bare_tokens_per_sec"] > 0
            assert r["framework/bare"] == r["framework_tokens_per_sec"] / r["bare_tokens_per_sec"]
    summary = report["summary"]
    ratios = [run["ratios"][0]["fused/scratch"] for run in report["runs"]]
    s = summary["train B4 H16 fused/scratch"]
    assert s["runs"] == ratios and s["median"] == statistics.median(ratios)
    assert (s["min"], s["max"]) == (min(ratios), max(ratios))
    fw = summary["framework fused B4 H16 /bare"]
    assert fw["runs"] == [run["framework"][1]["framework/bare"] for run in report["runs"]]
    assert "over 2 runs: median (min-max)" in proc.stdout and "through Lightning" in proc.stdout
    assert "GPU available" not in proc.stdout + proc.stderr  # Lightning's banner is kept out of the table


def test_framework_steps_must_fill_whole_logging_windows():
    proc = run_bench("--framework", "--framework-steps", "25")
    assert proc.returncode == 2 and "--framework-steps must be a positive multiple of 10, got 25" in proc.stderr


def test_repeat_must_be_positive():
    proc = run_bench("--repeat", "0")
    assert proc.returncode == 2 and "--repeat must be positive, got 0" in proc.stderr
