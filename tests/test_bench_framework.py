"""scripts/bench_framework.py (CharLM through Lightning's loop vs the bare step) and its --repeat (no timings)."""

from __future__ import annotations

import json
import statistics

import bench_framework
import benchlib
import pytest
import torch
from helpers import run_bench
from lightning.pytorch.callbacks import Callback

from gruexp.module import CharLM


@pytest.mark.parametrize("name", ["scratch", "fused"])
def test_charlm_the_floor_and_the_bare_step_do_the_same_work(name):
    """framework/bare and floor/bare compare like with like: from the same weights and batches, two steps of CharLM
    and of the floor module through Trainer.fit leave the weights two bare steps leave (carried state, clip, SGD)."""
    V, B, T, H, seed = 28, 4, 35, 16, 3
    bare = benchlib.TrainStep(name, V, B, T, H, torch.device("cpu"), seed)
    batches = [(bare.X, bare.Y), (bare.X, bare.Y)]
    for _ in batches:
        bare()
    torch.manual_seed(seed)
    floor = bench_framework.floor_module(benchlib.make_net(name, V, H, torch.device("cpu")))
    benchlib.fit_through_lightning(floor, batches, Callback(), torch.device("cpu"), max_steps=2, floor=True)
    torch.manual_seed(seed)
    charlm = CharLM(name, H, [f"c{i}" for i in range(V)], sample_chars=0)  # SGD at lr 1, as bench's
    benchlib.fit_through_lightning(charlm, batches, Callback(), torch.device("cpu"), max_steps=2)
    want = bare.net.state_dict()
    for model in (floor, charlm):
        got = model.net.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)


def test_framework_and_repeat_report_each_ratio_and_its_spread(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--shapes", "4x16", "--variants", "scratch,fused,fused-ops", "--warmup", "1", "--threads", "1"]
    proc = run_bench(*args, "--steps", "20", "--repeat", "2", "--json", str(out), script="bench_framework.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["repeat"] == 2 and len(report["runs"]) == 2
    for run in report["runs"]:
        rows = {r["variant"]: r for r in run["framework"]}
        assert sorted(rows) == ["fused", "fused-ops", "scratch"]  # a forced backend too (it once raised)
        for r in rows.values():
            assert r["steps"] == 20 and r["framework_tokens_per_sec"] > 0 and r["bare_tokens_per_sec"] > 0
            assert r["framework/bare"] == r["framework_tokens_per_sec"] / r["bare_tokens_per_sec"]
            assert r["floor/bare"] > 0 and r["framework/floor"] == r["framework/bare"] / r["floor/bare"]
    summary = report["summary"]
    assert len(summary) == 9  # three ratios of three variants
    fw = summary["framework fused B4 H16 /bare"]
    ratios = [run["framework"][1]["framework/bare"] for run in report["runs"]]
    assert fw["runs"] == ratios and fw["median"] == statistics.median(ratios)
    assert (fw["min"], fw["max"]) == (min(ratios), max(ratios))
    own = summary["framework fused B4 H16 /floor"]
    assert own["runs"] == [run["framework"][1]["framework/floor"] for run in report["runs"]]
    lightning_own = summary["floor scratch B4 H16 /bare"]
    assert lightning_own["runs"] == [run["framework"][0]["floor/bare"] for run in report["runs"]]
    assert "over 2 runs: median (min-max)" in proc.stdout and "through Lightning" in proc.stdout
    assert "framework/floor: what gruexp costs above it" in proc.stdout
    assert "GPU available" not in proc.stdout + proc.stderr  # Lightning's banner is kept out of the table


def test_steps_must_fill_whole_logging_windows():
    proc = run_bench("--steps", "25", script="bench_framework.py")
    assert proc.returncode == 2 and "--steps must be a positive multiple of 10, got 25" in proc.stderr
