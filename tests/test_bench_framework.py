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


@pytest.mark.parametrize("name", ["scratch", "fused"])
def test_with_steps_per_call_charlm_and_the_floor_still_do_the_bare_steps_work(name):
    """--steps-per-call 2: one chunk of two batches through bench_framework's CharLM(steps_per_call=2), which
    clips itself (the Trainer's clipping is off), and through the floor's manual steps leaves the weights of two
    bare steps."""
    V, B, T, H, seed = 28, 4, 35, 16, 3
    cpu = torch.device("cpu")
    bare = benchlib.TrainStep(name, V, B, T, H, cpu, seed)
    for p in bare.net.parameters():  # gradient norms of 12 and 250, so that a step left unclipped shows
        p.data.mul_({"scratch": 100, "fused": 10}[name])
    start = {k: v.clone() for k, v in bare.net.state_dict().items()}
    chunk = [(torch.stack([bare.X, bare.X]), torch.stack([bare.Y, bare.Y]))]
    bare()
    bare()
    floor, charlm = (
        bench_framework.lightning_model(name, V, H, benchlib.make_net(name, V, H, cpu), 2, floor=f)
        for f in (True, False)
    )
    for model in (floor, charlm):
        model.net.load_state_dict(start)
        benchlib.fit_through_lightning(
            model, chunk, Callback(), cpu, max_steps=2, floor=model is floor, gradient_clip_val=None
        )
    want = bare.net.state_dict()
    for model in (floor, charlm):
        got = model.net.state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_with_steps_per_call_the_loss_is_still_logged_every_10_optimizer_steps(monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    logged: list[int] = []

    def log_metrics(self, metrics, step=None):
        if "train/loss" in metrics:
            logged.append(step)

    monkeypatch.setattr(CSVLogger, "log_metrics", log_metrics)
    V, B, T, H, K = 28, 2, 5, 8, 4
    X, Y = torch.randint(V, (10, K, B, T)), torch.randint(V, (10, K, B, T))
    charlm = CharLM("fused", H, [f"c{i}" for i in range(V)], sample_chars=0, steps_per_call=K, gradient_clip_val=1.0)
    benchlib.fit_through_lightning(
        charlm, list(zip(X, Y, strict=True)), Callback(), torch.device("cpu"), max_steps=40, gradient_clip_val=None
    )
    assert charlm.trainer.global_step == 40 and logged == [9, 19, 29, 39]  # K=1's steps


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


def test_steps_per_call_counts_optimizer_steps_in_whole_windows(tmp_path):
    """K=4: each timed window is lcm(4, 10) = 20 optimizer steps, 30 asked steps become 40 (two windows), and the
    report and its table name K; through bench.py --framework as through bench_framework.py."""
    out = tmp_path / "bench.json"
    args = ["--shapes", "4x16", "--variants", "fused", "--warmup", "1", "--threads", "1", "--steps", "30"]
    proc = run_bench("--framework", *args, "--steps-per-call", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps_per_call"] == 4 and report["window_steps"] == 20
    [row] = report["framework"]
    assert row["steps"] == 40 and row["steps_per_call"] == 4 and row["framework/bare"] > 0
    assert "4 optimizer steps per training-step call (--steps-per-call)" in proc.stdout
    # two windows of 5 calls, 5 and 10 s: 20 steps of 10 tokens over their median, 7.5 s
    assert bench_framework.window_rate([1.0] * 5 + [2.0] * 5, 10, window=20, steps_per_call=4) == 10 * 20 / 7.5


def test_steps_per_call_must_be_positive():
    for script in ("bench_framework.py", "bench.py"):
        extra = ["--framework"] if script == "bench.py" else []
        proc = run_bench(*extra, "--steps-per-call", "0", script=script)
        assert proc.returncode == 2 and "--steps-per-call must be positive, got 0" in proc.stderr, script
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = run_bench("--steps-per-call", "4")  # bench.py's own timing has no Lightning loop
    assert proc.returncode == 2
    assert "--steps-per-call K is a setting of Lightning's loop: give it with --framework" in proc.stderr
