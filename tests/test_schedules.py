"""The per-step warmup + cosine schedule: its shape, and a real run spanning it from first step to last."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gruexp.schedules import warmup_cosine
from gruexp.train import train


def test_warmup_cosine_rises_linearly_then_decays_to_its_floor():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:2] == [1.0, 2.0]  # the first step at half the rate, the peak at the warmup's end
    cosine = [0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert lrs[2:11] == pytest.approx(cosine)  # from the peak at step 2 down to 10 % of it at step 10
    assert lrs[10] == lrs[11] == lrs[12] == pytest.approx(0.2)  # held at the floor past total_steps


def test_a_warmup_as_long_as_the_run_is_one_line_naming_the_key(tmp_path):
    from helpers import TINY, run_cli

    sched = "scheduler={_target_: gruexp.schedules.warmup_cosine, _partial_: true, warmup_steps: 100000}"
    r = run_cli("gruexp.train", *TINY, "logger=csv", sched, f"hydra.run.dir={tmp_path / 'run'}")
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-2000:]
    assert "FAILED:" not in out and "sample:" not in out  # no result line for a run that never trained
    assert (
        "scheduler.warmup_steps=100000 must be >= 0 and below the run's 74 optimizer steps: lower it (or train longer)"
        in out
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_a_run_with_total_steps_left_out_decays_over_its_own_steps(tmp_path, make_cfg, corpus_path):
    sched = "scheduler={_target_: gruexp.schedules.warmup_cosine, _partial_: true, warmup_steps: 3, min_lr_ratio: 0.1}"
    cfg = make_cfg("logger=csv", "optimizer.lr=0.5", sched)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    (state,) = ckpt["lr_schedulers"]
    steps = ckpt["global_step"]
    assert steps > 3 and state["last_epoch"] == steps  # stepped once per optimizer step, not per epoch
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.05)  # at the floor at the end
