"""A diverging run stops with the step it diverged at and keeps its last good checkpoint; in a sweep, the
other jobs finish and the sweep fails."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, run_cli, run_main


def test_divergence_stops_with_the_step_keeps_last_good_checkpoint(capfd, tmp_path, corpus_path):
    run = tmp_path / "run"
    # epoch 0 trains at lr 1; a StepLR then multiplies it by 1e6 and epoch 1 diverges
    sched = "scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 1e6}"
    code, out = run_main(capfd, "gruexp.train", *TINY, sched, "trainer.gradient_clip_val=null", f"hydra.run.dir={run}")
    assert code == 3
    assert "training diverged: loss is" in out and "at step 38 (epoch 1)" in out
    assert "; lower optimizer.lr or clip gradients (trainer.gradient_clip_val=1.0)" in out
    assert "Traceback" not in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 38" in summary["error"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(w).all() for w in last["state_dict"].values())


@pytest.mark.parametrize("k", [1, 4])
def test_a_run_that_clipped_and_diverged_is_told_to_clip_harder(capfd, tmp_path, corpus_path, k):
    """The advice names the clipping the run had (the Trainer's at K = 1, the step engine's at K > 1)."""
    sched = "scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 1e8}"
    args = [*TINY, sched, "trainer.gradient_clip_val=0.5", f"steps_per_call={k}", f"hydra.run.dir={tmp_path}/run"]
    code, out = run_main(capfd, "gruexp.train", *args)
    assert code == 3
    assert "(epoch 1); lower optimizer.lr or clip harder (trainer.gradient_clip_val is 0.5)" in out


@pytest.mark.slow
def test_sweep_with_a_diverging_job_finishes_the_others_and_fails(tmp_path, corpus_path):
    sweep = tmp_path / "sweep"
    r = run_cli(
        "gruexp.train",
        "-m",
        *TINY,
        "trainer.max_epochs=1",
        "trainer.gradient_clip_val=null",
        "optimizer.lr=1e6,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode != 0
    assert "Error executing job with overrides" in r.stderr and "optimizer.lr=1000000.0" in r.stderr
    statuses = [json.loads((sweep / str(i) / "summary.json").read_text())["status"] for i in (0, 1)]
    assert statuses == ["diverged", "completed"]
