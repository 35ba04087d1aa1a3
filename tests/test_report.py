"""scripts/report.py on a real sweep folder: the table's order and values, failed and diverged jobs, plots, W&B."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import matplotlib.image
import pytest
from helpers import ROOT, TINY, run_cli

from gruexp.tracking import offline_runs, read_run
from gruexp.train import train

spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, corpus_path):
    """A sweep folder as Hydra lays one out: three trained jobs, one that diverged, one that failed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    root = tmp_path_factory.mktemp("multirun") / "2026-01-01_00-00-00-000000"
    jobs = [("16", "1"), ("16", "4"), ("24", "1"), ("24", "4")]
    for num, (hidden, lr) in enumerate(jobs):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
            cfg = compose(
                "train",
                [*TINY, "model=torch", f"model.hidden_size={hidden}", f"optimizer.lr={lr}", "trainer.max_epochs=2"],
                return_hydra_config=True,
            )
        out = root / str(num)
        with open_dict(cfg):
            cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = num
        HydraConfig.instance().set_config(cfg)
        (out / ".hydra").mkdir(parents=True)
        OmegaConf.save({k: v for k, v in cfg.items() if k != "hydra"}, out / ".hydra" / "config.yaml")
        train(cfg)
    GlobalHydra.instance().clear()
    # job 1 diverged: its summary says so (as a NaN-guarding run would write it)
    s = json.loads((root / "1" / "summary.json").read_text())
    (root / "1" / "summary.json").write_text(json.dumps({**s, "status": "diverged", "val_ppl": math.nan}))
    # job 4 failed for real before training: Hydra wrote its config, train() raised, its summary.json says failed
    r = run_cli("gruexp.train", *TINY, "model=fused", "data.num_steps=200000", f"hydra.run.dir={root / '4'}")
    assert r.returncode != 0 and json.loads((root / "4" / "summary.json").read_text())["status"] == "failed"
    return root


def test_report_table_sorted_by_val_ppl_with_failures_last(sweep):
    path = report.report(sweep, use_wandb=False)
    assert path == sweep / "report.md"
    rows = [line.split(" | ") for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert header[0] == "| job" and header[5:8] == ["val/ppl", "train/ppl", "tokens/sec"]
    summaries = {j: json.loads((sweep / j / "summary.json").read_text()) for j in ("0", "2", "3")}
    good = sorted(summaries, key=lambda j: summaries[j]["val_ppl"])
    assert [r[0].strip("| ") for r in body] == [*good, "1", "4"]
    for r in body[:3]:
        s = summaries[r[0].strip("| ")]
        assert r[1:5] == ["torch", str(s["hidden_size"]), f"{s['lr']:g}", "1"]
        assert (r[5], r[6], r[7]) == (f"{s['val_ppl']:.3f}", f"{s['train_ppl']:.3f}", f"{s['tokens_per_sec']:,.0f}")
        assert r[-1].strip(" |") == "completed"
    assert body[3][5] == "—" and body[3][-1].strip(" |") == "**diverged**"
    assert body[4][1:5] == ["fused", "16", "1", "1"] and body[4][-1].strip(" |") == "**failed**"


def test_report_plots_are_pngs_with_the_jobs(sweep):
    report.report(sweep, use_wandb=False)
    for name in report.PLOTS:
        img = matplotlib.image.imread(sweep / name)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.05  # a drawn figure, not blank
    jobs = report.find_jobs(sweep)
    assert [len(j["history"]["val/ppl"]) for j in jobs] == [2, 2, 2, 2, 0]
    assert jobs[0]["history"]["val/ppl"][-1] == (2, pytest.approx(jobs[0]["val/ppl"]))


def test_report_logs_to_the_sweeps_wandb_group(sweep, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = offline_runs(sweep)
    assert f"wandb sync {run_dir}" in r.stderr
    run = read_run(run_dir)
    assert run["run"]["group"] == sweep.name and run["run"]["job_type"] == "report"
    logged = set().union(*run["history"])
    assert {f"report/{p.removesuffix('.png')}/_type" for p in report.PLOTS} | {"report/jobs/_type"} <= logged


def test_report_bad_folder_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip() == f"error: {tmp_path} holds no job folders (none has summary.json or .hydra/config.yaml):"
        " is it a sweep?"
    )
