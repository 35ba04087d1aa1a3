"""scripts/report.py chooses its plots from the data a sweep has, and tracking.plot_ppl_curves draws ppl.png."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import matplotlib.image
import pytest
from helpers import ROOT

spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def write_sweep(root, jobs):
    """A sweep folder as train() leaves it: per job summary.json and the CSV logger's metrics.csv (epoch 0-based)."""
    for num, (model, hidden, lr, val, tokens) in enumerate(jobs):
        job = root / str(num)
        (job / "csv").mkdir(parents=True)
        summary = {
            "model": model,
            "hidden_size": hidden,
            "lr": lr,
            "gradient_clip_val": 1.0,
            "val_ppl": val[-1],
            "train_ppl": val[-1] + 1,
            "tokens_per_sec": tokens,
            "epochs": len(val),
            "status": "completed",
        }
        (job / "summary.json").write_text(json.dumps(summary))
        with (job / "csv" / "metrics.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "train/ppl", "val/ppl"])
            for e, v in enumerate(val):
                w.writerow([e, 10 * e + 9, v + 1, ""])
                w.writerow([e, 10 * e + 9, "", v])
    return root


def test_one_epoch_per_job_draws_no_curves_and_no_one_cell_heat_map(tmp_path):
    sweep = write_sweep(tmp_path, [("torch", 32, 1.0, [17.255], 31562.0), ("fused", 32, 1.0, [17.255], 82179.0)])
    (sweep / "val_ppl_heatmap.png").write_bytes(b"stale")  # from an earlier report of another shape
    path = report.report(sweep, use_wandb=False)
    assert not (sweep / "val_ppl_curves.png").exists() and not (sweep / "val_ppl_heatmap.png").exists()
    text = path.read_text()
    assert "![tokens_per_sec.png](tokens_per_sec.png)" in text and "val_ppl_curves.png" not in text
    assert "No perplexity curves: no job validated on 2 or more epochs" in text
    assert "No heat map: no model and clip value was run on a grid of >= 2 hidden sizes x >= 2 lrs." in text
    assert "| 82,179 |" in text  # thousands separators in the table too
    assert "Each rate is measured while its job ran" in text and "busy machine" not in text
    img = matplotlib.image.imread(sweep / "tokens_per_sec.png")
    assert img.shape[0] > 300 and img.std() > 0.05


def test_identical_curves_share_one_labelled_line_best_first():
    jobs = [
        {
            "job": "0",
            "model": "torch",
            "hidden": 32,
            "lr": 1.0,
            "clip": 1.0,
            "history": {"val/ppl": [(1, 12.0), (2, 10.0)]},
        },
        {
            "job": "1",
            "model": "fused",
            "hidden": 32,
            "lr": 1.0,
            "clip": 1.0,
            "history": {"val/ppl": [(1, 12.0), (2, 10.00001)]},
        },
        {
            "job": "2",
            "model": "torch",
            "hidden": 64,
            "lr": 1.0,
            "clip": 1.0,
            "history": {"val/ppl": [(1, 11.0), (2, 9.0)]},
        },
        {"job": "3", "model": "torch", "hidden": 64, "lr": 9.0, "clip": 1.0, "history": {"val/ppl": [(1, math.nan)]}},
    ]
    lines = report.curve_lines(jobs)
    assert list(lines) == [
        "#2 torch h64 lr1 clip1: 9.000",
        "#0 torch h32 lr1 clip1 = #1 fused h32 lr1 clip1 (identical): 10.000",
    ]
    assert lines["#2 torch h64 lr1 clip1: 9.000"] == [(1, 11.0), (2, 9.0)]
    assert report.curve_lines([{**j, "history": {"val/ppl": j["history"]["val/ppl"][:1]}} for j in jobs]) == {}


def test_heat_map_only_for_grids(tmp_path):
    def job(model, hidden, lr):
        return {
            "model": model,
            "clip": 1.0,
            "hidden": hidden,
            "lr": lr,
            "val/ppl": 10.0 + hidden / lr,
            "status": "completed",
        }

    line = [job("torch", 32, lr) for lr in (0.5, 1.0, 2.0)]  # one hidden size: a row, not a grid
    assert report._grid_panels(line) == {}
    assert report.plot_heatmap(line, tmp_path / "h.png") is None and not (tmp_path / "h.png").exists()
    grid = [job(m, h, lr) for m in ("torch", "fused") for h in (16, 32) for lr in (0.5, 1.0, 2.0)]
    assert sorted(report._grid_panels([*grid, *line[:1], job("scratch", 16, 1.0)])) == [("fused", 1.0), ("torch", 1.0)]
    assert report.plot_heatmap(grid, tmp_path / "h.png") == tmp_path / "h.png"
    img = matplotlib.image.imread(tmp_path / "h.png")
    assert img.shape[1] > img.shape[0] > 300  # two panels side by side


def test_throughput_whiskers_only_for_variants_with_several_jobs(tmp_path):
    single = report.throughput_bars([{"model": "fused", "hidden": 32, "tokens/sec": 82179.0}])
    assert single == [("fused\nh32", 82179.0, None)]
    several = report.throughput_bars(
        [
            {"model": "fused", "hidden": 32, "tokens/sec": 80000.0},
            {"model": "fused", "hidden": 32, "tokens/sec": 90000.0},
            {"model": "torch", "hidden": 32, "tokens/sec": 30000.0},
            {"model": "torch", "hidden": 32, "tokens/sec": math.nan},
        ]
    )
    assert several == [("fused\nh32\n2 jobs", 85000.0, (80000.0, 90000.0)), ("torch\nh32\n1 job", 30000.0, None)]
    assert report.thousands(1234567.0, None) == "1,234,567"


def test_ppl_png_marks_the_best_epoch(tmp_path):
    from gruexp.tracking import best_point, plot_ppl_curves

    curves = {"train/ppl": [(1, 12.0), (2, 9.0), (3, 7.0)], "val/ppl": [(1, 11.0), (2, 8.5), (3, 8.9)]}
    assert best_point(curves["val/ppl"]) == (2, 8.5)
    path = plot_ppl_curves({"": curves}, tmp_path / "ppl.png", "fused, hidden 16, lr 1, clip 1", mark_best=True)
    assert matplotlib.image.imread(path).std() > 0.05
    with pytest.raises(ValueError):
        best_point([(1, math.nan)])


def test_the_throughput_plot_says_which_jobs_started_on_a_busy_machine(tmp_path):
    sweep = write_sweep(tmp_path, [("torch", 32, 1.0, [17.2], 31562.0), ("fused", 32, 1.0, [17.2], 82179.0)])
    summary = json.loads((sweep / "1" / "summary.json").read_text())
    (sweep / "1" / "summary.json").write_text(json.dumps({**summary, "load_at_start": 5.04}))  # as record.py adds
    text = report.report(sweep, use_wandb=False).read_text()
    assert "1 of 2 jobs started on a busy machine (load average up to 5.0), slower for it." in text
