"""W&B for real, offline: the mode chooser, what a run records (read back from its .wandb file), one run per job."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
from helpers import SGD, TINY, run_cli

from gruexp import UserError
from gruexp.tracking import logged_in, offline_runs, read_run, wandb_mode
from gruexp.train import train


@pytest.fixture
def logged_out(monkeypatch, tmp_path):
    """No W&B credentials and no WANDB_MODE: the state of a fresh machine."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_mode_online_only_with_credentials(tmp_path):
    netrc = tmp_path / "netrc"
    assert wandb_mode(env={"NETRC": str(netrc)}) == "offline"  # no file at all
    netrc.write_text("machine github.com login x password y\n")
    assert not logged_in({"NETRC": str(netrc)})
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_mode(env={"NETRC": str(netrc)}) == "online"
    # a self-hosted server is looked up under its own host
    assert wandb_mode(env={"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"
    assert wandb_mode(env={"NETRC": str(netrc), "WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode(env={"NETRC": str(netrc), "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("offline", env={"WANDB_API_KEY": "k"}) == "offline"  # the config's choice wins
    with pytest.raises(UserError, match="logger.wandb.mode='cloud' is not a W&B mode: use one of online"):
        wandb_mode("cloud")


def test_offline_run_lives_in_output_folder_with_metrics_and_config(make_cfg, tmp_path, logged_out, caplog):
    cfg = make_cfg("model=torch", "optimizer.lr=2", "trainer.gradient_clip_val=0.01", "tags=[tiny,test]")
    with caplog.at_level(logging.INFO, logger="gruexp.tracking"):
        summary = train(cfg)
    (run_dir,) = offline_runs(tmp_path)  # inside the run's own folder
    sync = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert sync == [f"W&B run saved offline; upload it with: wandb sync {run_dir}"]

    run = read_run(run_dir)
    assert run["run"]["project"] == "gruexp" and run["run"]["name"] == "torch-h16-lr2-clip0.01"
    assert run["run"]["job_type"] == "train" and run["run"]["tags"] == ["tiny", "test"]
    assert run["run"]["group"] == ""  # a single run belongs to no sweep
    # the resolved Hydra config is the run config
    c = run["config"]
    assert (c["model"]["name"], c["model"]["hidden_size"], c["optimizer"]["lr"]) == ("torch", 16, 2.0)
    assert (c["data"]["max_tokens"], c["trainer"]["gradient_clip_val"], c["seed"]) == (3000, 0.01, 42)

    keys = set().union(*run["history"])
    assert {"train/loss", "train/ppl", "val/ppl", "train/tokens_per_sec", "train/grad_norm", "lr-SGD"} <= keys
    vals = [h["val/ppl"] for h in run["history"] if "val/ppl" in h]
    assert len(vals) == 2 and vals[-1] == pytest.approx(summary["val_ppl"])
    # logged before clipping: with clip 0.01 every norm would be <= 0.01 after it
    norms = [h["train/grad_norm"] for h in run["history"] if "train/grad_norm" in h]
    assert norms and min(norms) > 0.01
    assert len(norms) == sum("train/loss" in h for h in run["history"])  # on every step the loggers write
    assert sum(h.get("lr-SGD") == 2.0 for h in run["history"]) == 2

    s = run["summary"]
    assert s["best/val_ppl"] == pytest.approx(summary["best_val_ppl"]) == pytest.approx(min(vals))
    # one definition per name: train/tokens_per_sec is each epoch's (history; the summary keeps the last epoch's),
    # run/tokens_per_sec the run's, summary.json's tokens_per_sec
    epochs = [h["train/tokens_per_sec"] for h in run["history"] if "train/tokens_per_sec" in h]
    assert s["train/tokens_per_sec"] == pytest.approx(epochs[-1])
    assert s["run/tokens_per_sec"] == pytest.approx(summary["tokens_per_sec"])
    assert s["sample"] == summary["sample"]
    # the sample table: one row per validation epoch, greedy sample as in summary.json
    rows = [json.loads(p.read_text())["data"] for p in sorted((run_dir / "files" / "media" / "table").rglob("*.json"))]
    rows = sorted(r for part in rows for r in part)
    assert [r[0] for r in rows] == [1, 2] and rows[-1][3] == summary["sample"]
    assert all(r[3].startswith("time traveller") and r[4].startswith("time traveller") for r in rows)
    # the single run's perplexity curve: in its folder and in the W&B run
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert s["plots/ppl/_type"] == "image-file"


def test_csv_alone_makes_no_wandb_run(make_cfg, tmp_path):
    train(make_cfg("logger=csv", "trainer.max_epochs=1"))
    assert (tmp_path / "csv" / "metrics.csv").is_file() and not (tmp_path / "wandb").exists()
    assert (tmp_path / "ppl.png").is_file()


@pytest.mark.slow
def test_multirun_jobs_are_separate_runs_in_one_group(tmp_path, logged_out):
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY if not a.startswith(("model.hidden_size", "trainer.max_epochs"))]
    r = run_cli(
        "gruexp.train",
        "-m",
        *tiny,
        "model=torch",
        "model.hidden_size=16,24",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {}
    for job, hidden in (("0", 16), ("1", 24)):
        (run_dir,) = offline_runs(sweep / job)  # exactly one W&B run per job, in the job's folder
        runs[job] = read_run(run_dir)
        assert runs[job]["config"]["model"]["hidden_size"] == hidden
        assert runs[job]["run"]["name"] == f"torch-h{hidden}-lr1.0-clip1.0"
        assert runs[job]["run"]["group"] == "sweep"  # the sweep folder: one multirun, one group
        s = json.loads((sweep / job / "summary.json").read_text())
        assert runs[job]["summary"]["best/val_ppl"] == pytest.approx(s["best_val_ppl"])
        assert math.isfinite(s["val_ppl"])
        assert f"wandb sync {run_dir}" in r.stdout + r.stderr
    assert runs["0"]["run"]["id"] != runs["1"]["run"]["id"]


def test_step_metrics_are_one_csv_row_per_logging_step(make_cfg, tmp_path):
    # train/loss and train/grad_norm go to the loggers together, at Lightning's steps (every 5th, counted from 0)
    import csv

    cfg = make_cfg("logger=csv", "trainer.log_every_n_steps=5")
    summary = train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    logged = [r for r in rows if r["train/loss"] or r["train/grad_norm"]]
    assert logged and all(r["train/loss"] and r["train/grad_norm"] and r["epoch"] for r in logged)
    steps = [int(r["step"]) for r in logged]
    assert steps == list(range(4, summary["global_step"], 5))
    assert all(0 < float(r["train/loss"]) < 10 and float(r["train/grad_norm"]) > 0 for r in logged)


def test_step_metrics_reach_csv_every_flush_not_every_logging_step(tmp_path):
    # Lightning's logger connector saves every logger after each call (#4664): metrics.csv was reopened at every
    # logging step. Step metrics now honour CSVLogger's flush_logs_every_n_steps; the run's end writes the rest.
    import functools

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from gruexp.module import CharLM

    csv_file = tmp_path / "run" / "metrics.csv"
    rows_at: dict[int, int] = {}

    class CountRows(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            n = len(csv_file.read_text().splitlines()) - 1 if csv_file.exists() else 0
            rows_at[trainer.fit_loop.epoch_loop._batches_that_stepped] = n

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(4, (2, 5), generator=g), torch.randint(4, (2, 5), generator=g)) for _ in range(12)]
    model = CharLM("fused", 8, list("abcd"), optimizer=functools.partial(torch.optim.SGD, lr=0.1), sample_chars=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="run", version="", flush_logs_every_n_steps=4),
        callbacks=[CountRows()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    # logging steps 1, 3, 5, ...: the file grows at steps 3 and 7 (step + 1 a multiple of 4) and nowhere between
    assert [rows_at[s] for s in range(11)] == [0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4]
    rows = [line.split(",") for line in csv_file.read_text().splitlines()]
    steps = sorted(int(r[rows[0].index("step")]) for r in rows[1:] if r[rows[0].index("train/loss")])
    assert steps == [1, 3, 5, 7, 9, 11]  # none lost: the rest is written when training ends


def test_the_epoch_lines_tokens_per_sec_is_the_epochs_value_in_the_csv(make_cfg, tmp_path, caplog):
    # one name, one value: the console's figure is each epoch's, as CSV and W&B hold it, not the run's so far
    import csv

    with caplog.at_level(logging.INFO, logger="gruexp"):
        train(make_cfg(*SGD, "trainer.max_epochs=2", "logger=csv", "trainer.enable_progress_bar=true", out=tmp_path))
    lines = "\n".join(r.getMessage() for r in caplog.records)
    said = [int(m.replace(",", "")) for m in re.findall(r"^epoch \d/2 .*\| tokens/sec ([\d,]+)$", lines, re.M)]
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    logged = [round(float(r["train/tokens_per_sec"])) for r in rows if r.get("train/tokens_per_sec")]
    assert len(said) == 2 and said == logged
