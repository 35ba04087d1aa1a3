"""Sweeps: grid multirun, multirun x DDP, Optuna (journal, resume, DDP), the bounded local launcher, SLURM config."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from helpers import CONF, TINY, rank_lines, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from gruexp.console import brief_overrides

ONE_EPOCH = [*TINY, "trainer.max_epochs=1"]


def sweep_folder(root: Path, kind: str = "multirun") -> Path:
    """The one sweep folder a command made under root/outputs/train/<kind>."""
    folders = list((root / "outputs" / "train" / kind).iterdir())
    assert len(folders) == 1, folders  # no second sweep started by a DDP child
    return folders[0]


def jobs_of(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def check_winner(sweep: Path, output: str) -> None:
    """best.json and the printed winner name the job with the lowest val/ppl."""
    jobs = jobs_of(sweep)
    lowest = min(j["val_ppl"] for j in jobs.values())
    got = json.loads((sweep / "best.json").read_text())
    # torch and fused compute the same function from the same seed, so two jobs may tie: either may win
    assert jobs[got["job"]]["val_ppl"] == got["val_ppl"] == lowest
    assert f"best of {len(jobs)} jobs: job {got['job']} " in output


def check_one_wandb_run_per_job(sweep: Path, jobs: dict[str, dict]) -> None:
    """Each job logged its own W&B run (W&B is the default logger; offline in tests), in its own folder."""
    run_ids = set()
    for name in jobs:
        runs = list((sweep / name / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        run_ids.add(runs[0].name.rsplit("-", 1)[-1])
    assert len(run_ids) == len(jobs)


def check_ranks_agree(job: Path, summary: dict) -> None:
    """Both ranks logged the same config digest, and it is the job's own lr and clip."""
    lines = rank_lines(job)
    assert set(lines) == {0, 1} and lines[0] == lines[1], lines
    shown = brief_overrides([f"lr={summary['lr']}", f"gradient_clip_val={summary['gradient_clip_val']}"])
    assert shown in lines[1][1]  # Optuna's floats as the console shows them (4 digits)


@pytest.mark.slow
def test_grid_multirun_runs_every_combination(tmp_path, corpus_path):
    r = run_cli("gruexp.train", "-m", "model=torch,fused", "optimizer.lr=0.5,2", *ONE_EPOCH, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    jobs = jobs_of(sweep)
    assert sorted((j["model"], j["lr"]) for j in jobs.values()) == [
        ("fused", 0.5),
        ("fused", 2),
        ("torch", 0.5),
        ("torch", 2),
    ]
    check_winner(sweep, r.stdout + r.stderr)


@pytest.mark.slow
def test_multirun_with_two_processes_and_one_wandb_run_per_job(tmp_path, corpus_path):
    wandb = ["logger=wandb", "logger.wandb.mode=offline", "logger.wandb.project=gruexp-test"]
    r = run_cli(
        "gruexp.train", "-m", "model=torch", "optimizer.lr=0.5,2", "trainer.devices=2", *wandb, *ONE_EPOCH, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    jobs = jobs_of(sweep)
    assert sorted(j["lr"] for j in jobs.values()) == [0.5, 2] and {j["world_size"] for j in jobs.values()} == {2}
    for name, summary in jobs.items():
        check_ranks_agree(sweep / name, summary)
    check_one_wandb_run_per_job(sweep, jobs)
    check_winner(sweep, r.stdout + r.stderr)


@pytest.mark.slow
def test_optuna_with_two_processes_then_resume(tmp_path, corpus_path):
    search = ["hparams_search=optuna", "model=torch", "model.hidden_size=16", *ONE_EPOCH]
    first = run_cli("gruexp.train", *search, "hydra.sweeper.n_trials=2", "trainer.devices=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = sweep_folder(tmp_path, "optuna")
    # the study is named after its fixed overrides and space (trainer.devices left out), kept in a journal file
    assert sweep.name.startswith("gruexp-") and (sweep / "optuna.journal").is_file()
    before = jobs_of(sweep)
    assert set(before) == {"0", "1"}
    for name, summary in before.items():
        check_ranks_agree(sweep / name, summary)  # every rank trained the trial's params, not its own draw

    # n_trials counts the whole study: running again with 3 adds one trial, in a new folder
    again = run_cli("gruexp.train", *search, "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 trials finished, 1 to go" in again.stdout + again.stderr
    after = jobs_of(sweep)
    assert set(after) == {"0", "1", "2"} and {k: after[k] for k in before} == before  # nothing overwritten
    assert (after["2"]["lr"], after["2"]["gradient_clip_val"]) not in {
        (j["lr"], j["gradient_clip_val"]) for j in before.values()
    }
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep / "optuna.journal")))
    study = optuna.load_study(study_name=sweep.name, storage=storage)
    values = {t.number: t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert values == pytest.approx({int(k): j["val_ppl"] for k, j in after.items()})
    check_one_wandb_run_per_job(sweep, after)
    check_winner(sweep, again.stdout + again.stderr)


@pytest.mark.slow
def test_local_launcher_runs_ddp_jobs_one_at_a_time(tmp_path, corpus_path):
    r = run_cli(
        "gruexp.train",
        "-m",
        "hydra/launcher=local",
        "hydra.launcher.array_parallelism=1",
        "model=torch",
        "optimizer.lr=0.5,2",
        "trainer.devices=2",
        *ONE_EPOCH,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = sweep_folder(tmp_path)
    jobs = jobs_of(sweep)
    assert sorted(j["lr"] for j in jobs.values()) == [0.5, 2]
    for name, summary in jobs.items():
        check_ranks_agree(sweep / name, summary)
    check_one_wandb_run_per_job(sweep, jobs)
    # parallelism 1: job 1 logged its first line after job 0 had written its summary
    first_line = (sweep / "1" / "train.log").read_text().splitlines()[0]
    started = datetime.strptime(first_line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert started >= (sweep / "0" / "summary.json").stat().st_mtime - 0.01
    check_winner(sweep, r.stdout + r.stderr)


def test_slurm_launcher_takes_its_resources_from_the_trainer():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (2, 4, 4, "gpu")
