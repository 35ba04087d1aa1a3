"""Reliability, third pass (issue 22): no value silently ignored on resume, no study or cache corrupted."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from helpers import TINY, run_cli
from optuna.trial import TrialState

from gruexp import UserError
from gruexp.data import cache
from gruexp.module import restore_rng_states, rng_states
from gruexp.search import check_journal, open_storage
from gruexp.train import train

SGD = ["model=torch", "trainer.accelerator=cpu", "trainer.max_epochs=1", "optimizer.lr=1.0"]


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _moved(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("net."))


# --- 1. a value changed on resume is used, and said -----------------------------------------------------------


def _resume(make_cfg, tmp_path, caplog, first: list[str], then: list[str]) -> tuple[dict, dict]:
    """Train an epoch with `first`, then resume it for a second epoch with `then` in place of it (caplog: INFO)."""
    before = train(make_cfg(*SGD, *first, out=tmp_path / "a"))
    with caplog.at_level(logging.INFO, logger="gruexp"):
        again = [*SGD, *then, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'a'}"]
        return before, train(make_cfg(*again, out=tmp_path / "b"))


def _group(summary: dict) -> dict:
    """The optimizer's first param group as the run's last.ckpt saved it."""
    return torch.load(summary["last_ckpt"], weights_only=True)["optimizer_states"][0]["param_groups"][0]


@pytest.mark.parametrize(
    "scheduler",
    [
        [],
        [
            "+scheduler._target_=gruexp.schedules.warmup_cosine",
            "+scheduler._partial_=true",
            "+scheduler.warmup_steps=3",
        ],
    ],
)
def test_a_learning_rate_changed_on_resume_is_the_one_trained_with(make_cfg, tmp_path, caplog, scheduler):
    first, resumed = _resume(make_cfg, tmp_path, caplog, scheduler, [*scheduler, "optimizer.lr=1e-6"])
    assert resumed["status"] == "completed" and resumed["lr"] == 1e-6
    assert "resumed with optimizer.lr 1.0 -> 1e-06 from the command line" in caplog.text
    group = _group(resumed)
    assert group.get("initial_lr", group["lr"]) == 1e-6
    # an epoch at lr 1e-6 leaves the weights where they were (at lr 1.0 they move by more than 0.01)
    after = torch.load(resumed["last_ckpt"], weights_only=True)["state_dict"]
    assert _moved(_weights(first["last_ckpt"]), after) < 1e-4


def test_a_momentum_changed_on_resume_is_used(make_cfg, tmp_path, caplog):
    _, resumed = _resume(make_cfg, tmp_path, caplog, ["+optimizer.momentum=0.5"], ["+optimizer.momentum=0.9"])
    assert "resumed with optimizer.momentum 0.5 -> 0.9 from the command line" in caplog.text
    assert _group(resumed)["momentum"] == 0.9


def test_an_unchanged_resume_changes_nothing_and_says_nothing(make_cfg, tmp_path, caplog):
    _resume(make_cfg, tmp_path, caplog, [], [])
    assert "resumed with" not in caplog.text


@pytest.mark.parametrize("key", ["data.val_fraction=0.1", "data.test_fraction=0.1", "data.val_tokens=500"])
def test_resume_with_another_split_is_refused_in_one_line(make_cfg, tmp_path, key):
    from gruexp import UserError

    train(make_cfg(*SGD, out=tmp_path / "a"))
    with pytest.raises(UserError) as e:
        train(make_cfg(*SGD, key, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'a'}", out=tmp_path / "b"))
    name = key.split("=")[0]
    assert f"this run has {key}: give that run's data overrides" in str(e.value)
    assert f"was trained with {name}=" in str(e.value) and "\n" not in str(e.value)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "failed"


def test_a_scheduler_value_changed_on_resume_is_used(make_cfg, tmp_path, caplog):
    cosine = ["+scheduler._target_=torch.optim.lr_scheduler.CosineAnnealingLR", "+scheduler._partial_=true"]
    _, resumed = _resume(make_cfg, tmp_path, caplog, [*cosine, "+scheduler.T_max=10"], [*cosine, "+scheduler.T_max=20"])
    assert "resumed with scheduler.T_max 10 -> 20 from the command line" in caplog.text
    assert torch.load(resumed["last_ckpt"], weights_only=True)["lr_schedulers"][0]["T_max"] == 20


# --- 2. a damaged Optuna journal is never written into; 4. the sweeper's own settings ---------------------------

SEARCH = [
    "hparams_search=optuna",
    "model=torch",
    *TINY,
    "trainer.max_epochs=1",
    "logger=csv",
    "hydra.sweeper.study_name=s",
    "hydra.sweeper.pruner=none",
]


def _errors(r) -> list[str]:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_a_damaged_journal_is_refused_untouched_and_the_line_says_how_to_keep_its_trials(tmp_path, corpus_path):
    first = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stdout + first.stderr  # issue 25: Optuna's INFO lines, the trial's internals, Lightning's tip
    assert "A new study created" not in said and "++hydra" not in said and "smaller than the logging" not in said
    assert "\t#0 : optimizer.lr=" in said and not re.search(r"\d\.\d{8,}", said)  # Optuna's 16 digits: 4
    journal = tmp_path / "outputs" / "train" / "optuna" / "s" / "optuna.journal"
    whole = journal.read_bytes()
    for damaged in (whole[:-25], whole + b'{"op_code": 4, "worker'):  # a crash mid-write; garbage with no newline
        journal.write_bytes(damaged)
        r = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=2", cwd=tmp_path)
        assert r.returncode == 2
        (error,) = _errors(r)
        assert f"{journal} is damaged (its last record is cut off" in error
        cut = len(whole[: whole.rstrip(b"\n").rfind(b"\n") + 1]) if len(damaged) < len(whole) else len(whole)
        assert f"`truncate -s {cut} {journal}`" in error
        assert journal.read_bytes() == damaged  # not a byte written into it
        assert not (journal.parent / "1").exists()
    # what the line says to do works: the whole records are kept and the search goes on from them
    subprocess.run(["truncate", "-s", str(cut), str(journal)], check=True)
    r = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="s", storage=open_storage(str(journal)))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_a_journal_damaged_in_its_middle_is_refused_with_the_records_before_it(tmp_path):
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(b'{"op_code": 0}\n{"op_co\n{"op_code": 1}\n')
    with pytest.raises(UserError) as e:
        check_journal(journal)
    assert "record 2 is not whole at byte 15 of 38" in str(e.value) and f"truncate -s 15 {journal}" in str(e.value)
    journal.write_bytes(b'{"op_code": 0}\n')
    check_journal(journal)  # a whole one passes


@pytest.mark.parametrize(
    "setting, said",
    [
        ("hydra.sweeper.pruner=bogus", "hydra.sweeper.pruner=bogus is not a pruner: use one of median, hyperband"),
        ("hydra.sweeper.pruner={_target_: optuna.pruners.Nope}", "does not build a pruner"),
        ("hydra.sweeper.storage=foo://x", "hydra.sweeper.storage=foo://x is not a storage Optuna can open"),
        ("hydra.sweeper.storage=sqlite:///{tmp}/missing/s.db", "the folder {tmp}/missing does not exist"),
        ("hydra.sweeper.storage=mysql://u@localhost/db", "needs the database driver MySQLdb: pip install it"),
        ("hydra.sweeper.storage={tmp}/missing/s.journal", "the folder {tmp}/missing does not exist"),
        ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials must be an integer >= 1"),
        ("hydra.sweeper.n_trials=-3", "hydra.sweeper.n_trials must be an integer >= 1"),
    ],
)
def test_a_bad_sweeper_setting_is_one_line_before_anything_is_written(tmp_path, setting, said):
    r = run_cli("gruexp.train", *SEARCH, setting.replace("{tmp}", str(tmp_path)), cwd=tmp_path)
    assert r.returncode == 2
    (error,) = _errors(r)
    assert said.replace("{tmp}", str(tmp_path)) in error
    assert not (tmp_path / "outputs").exists()


# --- 3. a damaged token cache is encoded again, and said ------------------------------------------------------

TEXT = "the time traveller for so it will be convenient to speak of him\n" * 50


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.mark.parametrize("damage", ["same-size bytes", "an id past the vocabulary"])
def test_a_damaged_token_cache_is_encoded_again_with_a_line(own_cache, caplog, damage):
    tokens = cache.encoded(own_cache, None, "chars")
    meta = tokens.path.with_suffix(".json")
    if damage == "same-size bytes":  # a disk error, a stray write: the size still fits
        with open(tokens.path, "r+b") as f:
            f.seek(100)
            f.write(bytes([tokens.vocab["e"]]) * 20)
        why = "its bytes differ from those encoded (sha256)"
    else:  # the vocabulary beside it lost a token (the ids' digest still matches)
        m = json.loads(meta.read_text())
        m["vocab"] = m["vocab"][:-1]
        meta.write_text(json.dumps(m))
        why = f"token id {len(m['vocab'])} past its vocabulary of {len(m['vocab'])}"
    with caplog.at_level(logging.INFO, logger="gruexp"):
        again = cache.encoded(own_cache, None, "chars")
    assert f"token cache {tokens.path} is damaged ({why}): encoding {own_cache} again" in caplog.text
    assert again.vocab.decode(again.ids()) == TEXT  # trained on what the corpus says, not on the damage
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gruexp"):
        cache.encoded(own_cache, None, "chars")
    assert "damaged" not in caplog.text and "encoded" not in caplog.text  # whole again: mapped, not re-encoded


# --- tests that must be able to fail: the GPU's generator is in the checkpoint ---------------------------------


def test_a_cuda_models_checkpoint_keeps_and_restores_its_cuda_generator(monkeypatch):
    # no GPU here: a recording stand-in for torch.cuda's generator calls, on a device the module would report
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.arange(4))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append(("set", device, s.tolist())))
    cuda = torch.device("cuda", 0)
    states = rng_states(cuda)
    assert states["cuda_rng"].tolist() == [0, 1, 2, 3] and torch.equal(states["rng"], torch.get_rng_state())
    restore_rng_states(states, cuda)
    assert calls == [("get", cuda), ("set", cuda, [0, 1, 2, 3])]
    assert set(rng_states(torch.device("cpu"))) == {"rng"}
    restore_rng_states({"rng": torch.get_rng_state()}, cuda)  # a CPU run's checkpoint resumed on a GPU
    assert len(calls) == 2


def test_resume_restores_the_cpu_generator_dropout_draws_from(make_cfg, tmp_path):
    run = train(make_cfg(*SGD, "model.num_layers=2", "model.dropout=0.5", out=tmp_path / "a"))
    saved = torch.load(run["last_ckpt"], weights_only=True)["gruexp_resume"]
    assert set(saved) >= {"rng"} and "cuda_rng" not in saved
    torch.manual_seed(12345)
    restore_rng_states(saved, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), saved["rng"])


# --- 8. smaller ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, said",
    [
        (
            "gruexp.evaluate",
            "evaluate reads the checkpoint's own data options, not a data config: give "
            "data.corpus=tinyshakespeare (or data.path=<file>)",
        ),
        ("gruexp.generate", "generate takes its vocabulary from the checkpoint and reads no corpus: leave it out"),
    ],
)
def test_a_data_choice_given_to_evaluate_or_generate_names_what_works(tmp_path, module, said):
    r = run_cli(module, "data=tinyshakespeare", "ckpt_path=x", cwd=tmp_path)
    assert r.returncode == 2
    assert _errors(r) == [f"Error: data=tinyshakespeare: {said}"]


def test_an_unquoted_non_ascii_run_folder_is_told_to_quote_and_the_quoted_one_runs(tmp_path, corpus_path):
    folder = tmp_path / "résumé"
    r = run_cli("gruexp.train", *TINY, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={folder}", cwd=tmp_path)
    assert r.returncode == 2
    (error,) = _errors(r)
    assert error == (
        f"Error: hydra.run.dir={folder}: Hydra reads non-ASCII characters only in a quoted value: write "
        f"'hydra.run.dir=\"{folder}\"' (the shell's quotes around Hydra's)"
    )
    r = run_cli("gruexp.train", *TINY, "trainer.max_epochs=1", "logger=csv", f'hydra.run.dir="{folder}"', cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((folder / "summary.json").read_text())["status"] == "completed"


# --- 6. values Hydra or Lightning reject, a cache that cannot be written --------------------------------------


@pytest.mark.parametrize(
    "override, said",
    [
        ("trainer.precision=bogus", "trainer.precision=bogus is not a precision: choose one of "),
        ("+trainer.foo=1", "trainer: Trainer.__init__() got an unexpected keyword argument 'foo' (check the trainer.*"),
    ],
)
def test_a_value_lightning_refuses_is_one_line_exit_2_and_the_same_line_in_the_summary(tmp_path, override, said):
    run = tmp_path / "run"
    r = run_cli("gruexp.train", *TINY, "logger=csv", override, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 2
    (line,) = [x for x in (r.stdout + r.stderr).splitlines() if said in x]
    assert "Error in call to target" not in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    error = json.loads((run / "summary.json").read_text())["error"]
    assert error.startswith(said) and line.endswith(error)
    if "precision" in said:
        assert "16-mixed, bf16-true, bf16-mixed, 32-true" in error


def test_a_read_only_cache_folder_is_one_line_naming_it_and_the_way_elsewhere(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.decode().strip()}): needs root")
    try:
        monkeypatch.setenv("XDG_CACHE_HOME", str(ro))
        corpus = tmp_path / "c.txt"
        corpus.write_text(TEXT)
        with pytest.raises(UserError) as e:
            cache.encoded(corpus, None, "chars")
        assert str(e.value) == (
            f"cannot write the token cache {ro / 'gruexp' / 'tokens'} (Read-only file system): make it writable, or "
            "point gruexp at another cache folder with XDG_CACHE_HOME=<folder>"
        )
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# --- 5. signals at awkward moments ----------------------------------------------------------------------------


@pytest.fixture
def inject_env(monkeypatch, tmp_path):
    """CLI runs that import tests/helpers/inject.py and encode into their own, empty token cache."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_sigterm_while_the_corpus_is_encoded_ends_interrupted_and_leaves_no_partial_file(
    tmp_path, inject_env, corpus_path
):
    run = tmp_path / "run"
    r = run_cli("gruexp.train", *TINY, "data._target_=helpers.inject.SignalWhileEncoding", f"hydra.run.dir={run}")
    assert r.returncode == 143 and "Traceback" not in r.stdout + r.stderr, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert out.count("SIGTERM while setting up: stopping") == 1
    assert f"INTERRUPTED before training started | {run}" in out
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    tokens = tmp_path / "cache" / "gruexp" / "tokens"
    assert tokens.is_dir() and [p.name for p in tokens.iterdir() if p.suffix in (".part", ".bin")] == []


def test_a_partial_token_file_of_a_killed_encoder_is_removed_by_the_next_run(own_cache, caplog):
    tokens = cache.encoded(own_cache, None, "chars")
    tokens.path.with_suffix(".json").unlink()  # as if the encoder was killed (kill -9) before it finished
    tokens.path.unlink()
    stale = tokens.path.with_name(f".{tokens.path.name}.x1y2z3.part")
    stale.write_bytes(b"\\0" * 1000)
    with caplog.at_level(logging.INFO, logger="gruexp"):
        again = cache.encoded(own_cache, None, "chars")
    assert not stale.exists() and f"removing {stale}, left by an encoding that was killed" in caplog.text
    assert again.vocab.decode(again.ids()) == TEXT
    assert [p.name for p in tokens.path.parent.iterdir() if p.name.endswith(".part")] == []


def test_sigterm_during_the_last_validation_ends_interrupted_without_testing(tmp_path, inject_env, corpus_path):
    run = tmp_path / "run"
    kill = ["+callbacks.kill._target_=helpers.inject.SignalInLastValidation"]
    r = run_cli("gruexp.train", *TINY, *kill, "logger=csv", f"hydra.run.dir={run}")
    assert r.returncode == 143, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "test_ppl" not in summary
    assert summary["epochs"] == 2 and (run / "checkpoints" / "last.ckpt").is_file()  # the last epoch, saved
    assert "SIGTERM: finishing the current batch, saving last.ckpt" in r.stdout + r.stderr
    assert "whole test split" not in r.stdout + r.stderr


def test_help_is_printed_without_importing_torch_or_lightning(tmp_path):
    # issue 25: `--help` took 8 s of CPU, importing torch and Lightning (also through Hydra's plugin scan)
    r = run_cli("gruexp.train", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "== Configuration groups ==" in r.stdout and "model: fused, scratch, torch" in r.stdout
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gruexp.train", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not {"torch", "lightning"} & imported


def test_the_data_options_table_in_usage_md_gives_the_configs_defaults():
    # issue 25: the table said 10 % validation while the config holds 5 % + 5 % test
    import re

    from helpers import CONF, ROOT
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train")
    GlobalHydra.instance().clear()
    rows = re.findall(r"^\| `data\.(\w+)` \| ([^|]+?) \|", (ROOT / "docs" / "usage.md").read_text(), re.MULTILINE)
    assert {k for k, _ in rows} >= {"batch_size", "num_steps", "max_tokens", "val_fraction", "test_fraction"}
    for key, documented in rows:
        value = cfg.data[key]
        assert documented == ("null" if value is None else str(value)), f"docs/usage.md: data.{key}"


def test_a_run_on_a_busy_machine_says_so_once_with_the_slowdown(make_cfg, tmp_path, caplog, monkeypatch):
    from gruexp import threads

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert threads.busy_machine(threads=1) is None  # idle
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 2.5, 2.0))  # three runnable processes on 2 cores already
    assert threads.busy_machine(threads=1) == (
        "this machine is busy: load average 3.0 on 2 cores before this run started; expect it to run about 2.0x "
        "slower than on an idle machine"
    )
    with caplog.at_level(logging.INFO, logger="gruexp"):
        summary = train(make_cfg(*SGD, out=tmp_path / "a"))
    assert caplog.text.count("this machine is busy: load average 3.0 on 2 cores") == 1
    assert summary["load_at_start"] == 3.0


def test_a_sweep_jobs_line_hides_hydras_overrides_and_rounds_optunas_floats():
    from gruexp.console import brief_overrides

    overrides = [
        "optimizer.lr=1.815188036606585",
        "trainer.gradient_clip_val=1",
        "model=torch",
        "hydra.sweeper.study_name=s",
        '++hydra.job.env_set.GRUEXP_OPTUNA_TRIAL=\'{"study":"s"}\'',
    ]
    assert brief_overrides(overrides) == "optimizer.lr=1.815 trainer.gradient_clip_val=1 model=torch"


# --- issue 25.2: one record per run across resume ---------------------------------------------------------------


def test_an_interrupted_run_draws_its_plot_and_the_resumed_run_continues_its_curve_and_wandb_run(
    tmp_path, inject_env, corpus_path
):
    kill = ["+callbacks.kill._target_=helpers.inject.SignalAt", "+callbacks.kill.step=50"]  # in epoch 2 of TINY's 37-batch
    a, b = tmp_path / "a", tmp_path / "b"
    r = run_cli("gruexp.train", *TINY, *kill, f"hydra.run.dir={a}")
    assert r.returncode == 143, r.stderr[-2000:]
    assert (a / "ppl.png").stat().st_size > 1000  # what it has: epoch 1
    (first_run,) = (a / "wandb").glob("offline-run-*")
    r = run_cli("gruexp.train", *TINY, "trainer.max_epochs=3", f"ckpt_path={a}", f"hydra.run.dir={b}")
    assert r.returncode == 0, r.stderr[-2000:]
    curves = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PerplexityCurve"]["curves"]
    assert [e for e, _ in curves["train/ppl"]] == [1, 2, 3] and [e for e, _ in curves["val/ppl"]] == [1, 2, 3]
    (second_run,) = (b / "wandb").glob("offline-run-*")
    run_id = first_run.name.rsplit("-", 1)[1]
    assert second_run.name.endswith(f"-{run_id}")  # the same W&B run, resumed ("resume": "allow")


def test_the_epoch_lines_tokens_per_sec_is_the_epochs_value_in_the_csv(make_cfg, tmp_path, caplog):
    # issue 25: the console's figure was the run's so far while CSV and W&B held each epoch's, under one name
    import csv

    with caplog.at_level(logging.INFO, logger="gruexp"):
        train(make_cfg(*SGD, "trainer.max_epochs=2", "logger=csv", "trainer.enable_progress_bar=true", out=tmp_path))
    lines = "\n".join(r.getMessage() for r in caplog.records)
    said = [int(m.replace(",", "")) for m in re.findall(r"^epoch \d/2 .*\| tokens/sec ([\d,]+)$", lines, re.M)]
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    logged = [round(float(r["train/tokens_per_sec"])) for r in rows if r.get("train/tokens_per_sec")]
    assert len(said) == 2 and said == logged
