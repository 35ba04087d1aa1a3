"""hparams_search=optuna on Optuna >= 4: real studies in real journal files, real jobs (tiny), pruning under DDP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import matplotlib.image
import optuna
import pytest
from helpers import CONF, ROOT, TINY, run_cli
from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, RunMode
from optuna.trial import TrialState
from packaging.requirements import Requirement
from packaging.version import Version

from gruexp.search import open_storage
from hydra_plugins.gruexp_plugins.optuna_sweeper import identity_hash, search_space, study_identity

SEARCH = ["hparams_search=optuna", "model=torch", *TINY, "logger=csv"]
PRUNED_LINE = re.compile(r"rank (\d): trial (\d+) pruned at validation (\d+) \(epoch (\d+), step (\d+)\)")


def study_folder(root: Path) -> Path:
    folders = list((root / "outputs" / "train" / "optuna").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def load(folder: Path) -> optuna.Study:
    """The study of a sweep folder, read from its journal file."""
    return optuna.load_study(study_name=folder.name, storage=open_storage(str(folder / "optuna.journal")))


def summaries(folder: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in folder.glob("*/summary.json")}


# --- dependencies ------------------------------------------------------------------------------------------------


def test_project_requires_optuna_4_and_sqlalchemy_2_not_the_old_sweeper():
    """pyproject's ranges and constraints.txt's pins exclude optuna<4 and SQLAlchemy<2; the installed ones agree."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    deps = {
        r.name.lower(): r
        for r in map(Requirement, tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    }
    assert "hydra-optuna-sweeper" not in deps and "alembic" not in deps
    assert not deps["optuna"].specifier.contains("3.6.1") and deps["optuna"].specifier.contains("5.0.0")
    assert not deps["sqlalchemy"].specifier.contains("1.4.54") and deps["sqlalchemy"].specifier.contains("2.1.0")
    pins = dict(line.lower().split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    assert "hydra-optuna-sweeper" not in pins
    assert Version(pins["optuna"]) >= Version("4") and Version(pins["sqlalchemy"]) >= Version("2")
    assert deps["optuna"].specifier.contains(pins["optuna"]) and deps["sqlalchemy"].specifier.contains(
        pins["sqlalchemy"]
    )
    assert Version(optuna.__version__) >= Version("4")
    assert Version(metadata.version("sqlalchemy")) >= Version("2")


# --- study identity (no jobs) ------------------------------------------------------------------------------------


def test_study_name_follows_fixed_overrides_and_space_not_devices():
    params = ["optimizer.lr=tag(log, interval(0.05, 5.0))", "model.hidden_size=choice(32, 64)"]

    def name(*args: str) -> str:
        space, fixed = search_space([*params, *args])
        return identity_hash(study_identity(space, fixed, "minimize", ["trainer.devices"]))

    base = name("model=torch")
    assert name("model=torch") == base and name("model=torch", "trainer.devices=2") == base
    assert name("model=fused") != base
    assert name("model=torch", "model.hidden_size=16") != base  # fixed: no longer searched
    assert name("model=torch", "optimizer.lr=interval(0.05, 5.0)") != base  # same key, linear scale
    space, fixed = search_space([*params, "model.hidden_size=16"])
    assert set(space) == {"optimizer.lr"} and fixed == {"model.hidden_size": "16"}
    assert space["optimizer.lr"].log and (space["optimizer.lr"].low, space["optimizer.lr"].high) == (0.05, 5.0)
    parsed = OverridesParser.create().parse_overrides(["x=range(1, 9, 2)"])
    assert parsed[0].is_range_sweep()
    assert search_space(["x=range(1, 9, 2)"])[0]["x"] == optuna.distributions.IntDistribution(1, 9, step=2)


@pytest.mark.slow
def test_named_study_with_another_space_is_refused(tmp_path, corpus_path):
    named = ["hydra.sweeper.study_name=mine", "hydra.sweeper.n_trials=1", "trainer.max_epochs=1"]
    first = run_cli("gruexp.train", *SEARCH, *named, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    other = run_cli("gruexp.train", *SEARCH, *named, "model=scratch", cwd=tmp_path)
    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "study mine" in errors[0] and "hydra.sweeper.study_name" in errors[0], other.stderr
    assert "model=scratch" in errors[0] and "model=torch" in errors[0]
    folder = tmp_path / "outputs" / "train" / "optuna" / "mine"
    assert len(load(folder).trials) == 1 and sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["0"]


def test_slurm_launcher_gets_the_study_folder_and_batches_of_its_array_size(tmp_path, monkeypatch):
    """The sweeper names the study before the launcher resolves its folders (submitit's logs go under the study)."""
    monkeypatch.chdir(tmp_path)
    overrides = ["hparams_search=optuna", "model=torch", "hydra/launcher=slurm", "hydra.launcher.array_parallelism=3"]
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    cfg = loader.load_configuration("train", overrides, run_mode=RunMode.MULTIRUN)
    HydraConfig.instance().set_config(cfg)
    sweeper = Plugins.instance().instantiate_sweeper(
        config=cfg, hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(cfg)), task_function=print
    )
    assert cfg.hydra.sweeper.study_name == sweeper.name and sweeper.name.startswith("gruexp-")
    assert Path(cfg.hydra.sweep.dir) == Path("outputs/train/optuna") / sweeper.name
    assert sweeper.launcher.params["submitit_folder"] == f"outputs/train/optuna/{sweeper.name}/.submitit/%j"
    assert type(sweeper.launcher).__name__ == "SlurmLauncher" and sweeper.batch_size == 3
    assert sweeper.fixed == {"hparams_search": "optuna", "model": "torch"}
    assert set(sweeper.space) == {"model.hidden_size", "optimizer.lr", "trainer.gradient_clip_val"}


# --- searches ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_writes_its_best_then_resumes_to_n_trials(tmp_path, corpus_path):
    first = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = study_folder(tmp_path)
    assert folder.name.startswith("gruexp-") and (folder / "optuna.journal").is_file()
    before = summaries(folder)
    assert set(before) == {0, 1}

    again = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 trials finished, 1 to go" in again.stdout + again.stderr
    assert study_folder(tmp_path) == folder  # the same command names the same study
    after = summaries(folder)
    assert set(after) == {0, 1, 2} and {k: after[k] for k in before} == before  # nothing overwritten
    study = load(folder)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    # trial k ran in folder k with the trial's params, and told the value its job wrote
    for t in study.trials:
        s = after[t.number]
        assert (s["lr"], s["gradient_clip_val"]) == (t.params["optimizer.lr"], t.params["trainer.gradient_clip_val"])
        assert t.value == pytest.approx(s["val_ppl"])
    assert len({(t.params["optimizer.lr"], t.params["trainer.gradient_clip_val"]) for t in study.trials}) == 3
    best = json.loads((folder / "best.json").read_text())
    assert int(best["job"]) == study.best_trial.number and best["val_ppl"] == pytest.approx(study.best_value)
    results = (folder / "optimization_results.yaml").read_text()
    assert f"best_trial: {study.best_trial.number}" in results
    assert f"best of 3 jobs: job {study.best_trial.number} " in again.stdout + again.stderr

    # report.py adds Optuna's own views of the study
    r = subprocess.run([sys.executable, ROOT / "scripts" / "report.py", folder, "--no-wandb"], capture_output=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for png in ("optuna_history.png", "optuna_importances.png"):
        assert matplotlib.image.imread(folder / png).shape[0] > 100
        assert f"![{png}]({png})" in (folder / "report.md").read_text()
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    said = f"Parameter importances from {complete} complete trials only: with fewer than 20, these importances are"
    assert said in (folder / "report.md").read_text()

    # the same folder with a storage that lacks its trials (a new database, a lost journal): refused, not overwritten
    files = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    other = tmp_path / "other.journal"
    r = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={other}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    said = f"Error: {folder} holds the runs of trials 0, 1, 2 but study {folder.name} in {other} has 0 trials"
    assert said in r.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


@pytest.mark.slow
def test_local_launcher_runs_a_batch_of_trials_side_by_side(tmp_path, corpus_path):
    r = run_cli(
        "gruexp.train",
        *SEARCH,
        "hydra/launcher=local",
        "hydra.launcher.array_parallelism=2",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    folder = study_folder(tmp_path)
    trials = load(folder).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert max(t.datetime_start for t in trials) < min(t.datetime_complete for t in trials)  # asked together
    jobs = summaries(folder)
    assert {k: j["lr"] for k, j in jobs.items()} == {t.number: t.params["optimizer.lr"] for t in trials}


@pytest.mark.slow
def test_failing_trial_is_failed_and_the_search_goes_on(tmp_path, corpus_path):
    # a negative learning rate is bad input (gruexp.preflight refuses it in one line): a failed trial
    r = run_cli(
        "gruexp.train",
        *SEARCH,
        "optimizer.lr=choice(0.5, -1.0)",
        "trainer.gradient_clip_val=1.0",
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=1",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    study = load(study_folder(tmp_path))
    states = {t.number: (t.state, t.params["optimizer.lr"]) for t in study.trials}
    assert len(states) == 4
    assert all((lr < 0) == (state == TrialState.FAIL) for state, lr in states.values()), states
    assert {lr for _, lr in states.values()} == {0.5, -1.0}, states  # the seeded sampler drew both
    assert re.search(r"trial \d failed: .*optimizer\.lr", r.stdout + r.stderr), r.stdout[-3000:]


@pytest.mark.slow
def test_killed_sweep_running_trial_is_failed_and_retried(tmp_path, corpus_path):
    search = [*SEARCH, "hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=killed"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gruexp.train", *search, "trainer.max_epochs=4"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    folder = tmp_path / "outputs" / "train" / "optuna" / "killed"
    try:
        deadline = time.monotonic() + 120
        while not (folder / "0" / "csv").exists():  # the job is training
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep never started its trial"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (killed,) = load(folder).trials
    assert killed.state == TrialState.RUNNING

    again = run_cli("gruexp.train", *search, "trainer.max_epochs=4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "trial 0 was left running by a sweep that ended: failed, retried with the same params"
        in again.stdout + again.stderr
    )
    first, retry = load(folder).trials
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.params == killed.params and retry.system_attrs["failed_trial"] == 0
    assert json.loads((folder / "1" / "summary.json").read_text())["lr"] == killed.params["optimizer.lr"]


@pytest.mark.slow
def test_a_trial_at_four_steps_per_call_reports_and_is_pruned_as_at_one(tmp_path, corpus_path):
    """steps_per_call=4 changes nothing Optuna sees: the same val/ppl at each validation, pruned at the same one
    (ThresholdPruner after one warm-up validation: at the second of 3) and the same step."""
    pruner = "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, upper: 1.0, n_warmup_steps: 2}"
    seen = []
    for k in (1, 4):
        (tmp_path / str(k)).mkdir()
        args = [*SEARCH, pruner, "hydra.sweeper.n_trials=1", "trainer.max_epochs=3", f"steps_per_call={k}"]
        r = run_cli("gruexp.train", *args, "trainer.accelerator=cpu", cwd=tmp_path / str(k))
        assert r.returncode == 0, r.stderr[-3000:]
        folder = study_folder(tmp_path / str(k))
        (trial,) = load(folder).trials
        summary = summaries(folder)[0]
        assert trial.state == TrialState.PRUNED and (summary["status"], summary["pruned_epoch"]) == ("pruned", 2)
        seen.append((trial.params, trial.intermediate_values, summary["global_step"]))
    assert seen[0] == seen[1] and list(seen[0][1]) == [1, 2]


@pytest.mark.slow
def test_pruned_trial_stops_both_ddp_ranks_at_the_same_step(tmp_path, corpus_path):
    # ThresholdPruner: any val/ppl above 1 prunes, so the trial stops after its first validation of 3
    pruner = "hydra.sweeper.pruner={_target_: optuna.pruners.ThresholdPruner, upper: 1.0}"
    r = run_cli(
        "gruexp.train",
        *SEARCH,
        pruner,
        "hydra.sweeper.n_trials=1",
        "trainer.max_epochs=3",
        "trainer.devices=2",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    folder = study_folder(tmp_path)
    (trial,) = load(folder).trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    summary = summaries(folder)[0]
    assert (summary["status"], summary["pruned_epoch"], summary["epochs"], summary["world_size"]) == ("pruned", 1, 1, 2)
    assert trial.intermediate_values[1] == pytest.approx(summary["val_ppl"])
    lines = {}
    for log in (folder / "0").glob("*.log"):
        for rank, number, validation, epoch, step in PRUNED_LINE.findall(log.read_text()):
            lines[int(rank)] = (int(number), int(validation), int(epoch), int(step))
    assert set(lines) == {0, 1} and lines[0] == lines[1] == (0, 1, 1, summary["global_step"]), lines
    assert "1 jobs pruned, not ranked: job 0 at epoch 1" in r.stdout + r.stderr
