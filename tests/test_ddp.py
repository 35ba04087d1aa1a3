"""DDP on CPU (gloo, 2 processes): contiguous per-rank streams, reduced metrics, one folder written by rank 0."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import EXACT, TINY, rank_lines, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gruexp.data import StreamSampler
from gruexp.generate import load
from gruexp.train import train


def test_rank_streams_are_contiguous_and_split_the_global_batch():
    n, T, B = 1000, 7, 8
    whole = StreamSampler(n, T, B, world_size=1, seed=3)
    ranks = [StreamSampler(n, T, B, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for s in (whole, *ranks):
        s.set_epoch(1)
    per_rank = [list(s) for s in ranks]
    assert [len(p) for p in per_rank] == [len(list(whole)) // 2] * 2
    batches = [[p[i : i + 4] for i in range(0, len(p), 4)] for p in per_rank]  # 4 rows per rank per step
    for rank_batches in batches:
        for t in range(len(rank_batches) - 1):
            # row i of a rank's batch t+1 starts exactly where row i of its batch t ended
            assert [s + T for s in rank_batches[t]] == rank_batches[t + 1]
    # the two ranks' rows of step t are the global batch t a single process sees, rank 0 first
    assert [b0 + b1 for b0, b1 in zip(*batches, strict=True)] == whole.batches()


def _val_ppl(model, dm) -> float:
    """exp(mean token NLL) over the validation tail, one process, state carried as in training."""
    nll, count, state = 0.0, 0, None
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits, state = model(x, state)
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += int((y >= 0).sum())  # padding (PAD) is not a token
    return math.exp(nll / count)


@pytest.mark.slow
def test_two_processes_train_like_one_and_rank_zero_writes(tmp_path, make_cfg, corpus_path):
    r = run_cli("gruexp.train", "model=torch", *TINY, "trainer.devices=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert said.count("Seed set to 42") == 1 and said.count(" data: timemachine: ") == 1  # rank 0's, not rank 1's
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1  # no second folder for rank 1
    job = runs[0]
    assert {p.name for p in job.iterdir()} == {
        ".gruexp_run",  # the run's claim on its folder (preflight.claim_run_dir)
        ".hydra",
        "checkpoints",
        "csv",
        "summary.json",
        "train.log",
        "train_rank1.log",
        "wandb",
        "ppl.png",
    }
    assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # rank 0 alone logs to W&B
    hydra_cfg = OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra
    assert hydra_cfg.job.name == "train"  # rank 1 did not overwrite rank 0's record of the run
    lines = rank_lines(job)
    assert set(lines) == {0, 1} and lines[0] == lines[1]  # both ranks trained the same resolved config
    summary = json.loads((job / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"

    # val/ppl of the 2-process run = a 1-process evaluation of its checkpoint (each rank saw half the rows)
    cfg = make_cfg("model=torch", out=tmp_path / "one")
    model = load(job / "checkpoints" / "last.ckpt")
    assert summary["val_ppl"] == pytest.approx(_val_ppl(model, instantiate(cfg.data, seed=cfg.seed)), rel=1e-5)

    # data.batch_size is global: one process with the same seed takes the same steps to the same model
    one = train(cfg)
    assert one["global_step"] == summary["global_step"]
    assert one["val_ppl"] == pytest.approx(summary["val_ppl"], rel=1e-4)
    assert one["train_ppl"] == pytest.approx(summary["train_ppl"], rel=1e-4)  # reduced over both ranks


# --- faults: no hang, bad input said once -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_rank_that_raises_ends_the_whole_job(tmp_path, inject_path, corpus_path):
    r = run_cli(
        "gruexp.train",
        *TINY,
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "+callbacks.fail._target_=helpers.inject.RaiseAt",
        "+callbacks.fail.step=3",
        "+callbacks.fail.rank=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=180,
    )  # a hang would be a TimeoutExpired
    assert r.returncode != 0
    assert "injected failure in rank 1 at step 3" in r.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_stops_both_and_resumes_exactly(tmp_path, inject_path, corpus_path):
    ddp = [*TINY, *EXACT, "trainer.max_epochs=2", "trainer.devices=2", "+trainer.strategy=ddp"]
    runs = tmp_path / "runs"
    assert run_cli("gruexp.train", *ddp, f"hydra.run.dir={runs / 'full'}", timeout=180).returncode == 0
    kill = ["+callbacks.kill._target_=helpers.inject.SignalAt", "+callbacks.kill.step=20"]  # rank 0 only
    r = run_cli("gruexp.train", *ddp, *kill, f"hydra.run.dir={runs / 'a'}", timeout=180)
    assert r.returncode == 128 + 15, r.stderr[-2000:]
    r = run_cli("gruexp.train", *ddp, f"ckpt_path={runs / 'a'}", f"hydra.run.dir={runs / 'b'}", timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    full, cut, resumed = (json.loads((runs / n / "summary.json").read_text()) for n in ("full", "a", "b"))
    assert (cut["status"], cut["global_step"], cut["world_size"]) == ("interrupted", 21, 2)
    assert resumed["val_ppl"] == pytest.approx(full["val_ppl"], abs=1e-6)
    assert resumed["train_ppl"] == pytest.approx(full["train_ppl"], abs=1e-6)


@pytest.mark.slow
def test_ddp_bad_input_is_said_once(tmp_path, corpus_path):
    r = run_cli(
        "gruexp.train",
        *TINY,
        "data.batch_size=3",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'r'}",
        timeout=180,
    )
    assert r.returncode == 2
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "data.batch_size=3" in line and "ERROR" in line]
    assert len(lines) == 1, r.stdout + r.stderr
