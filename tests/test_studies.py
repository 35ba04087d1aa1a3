"""An Optuna study's journal is never written into when damaged (the line says how to keep its trials), and
a bad sweeper setting is one line before anything is written."""

from __future__ import annotations

import re
import subprocess

import optuna
import pytest
from helpers import TINY, run_cli, run_main
from helpers import error_lines as _errors
from optuna.trial import TrialState

from gruexp import UserError
from gruexp.search import check_journal, open_storage

SEARCH = [
    "hparams_search=optuna",
    "model=torch",
    *TINY,
    "trainer.max_epochs=1",
    "logger=csv",
    "hydra.sweeper.study_name=s",
    "hydra.sweeper.pruner=none",
]


@pytest.mark.slow
def test_a_damaged_journal_is_refused_untouched_and_the_line_says_how_to_keep_its_trials(tmp_path, corpus_path):
    first = run_cli("gruexp.train", *SEARCH, "hydra.sweeper.n_trials=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    said = first.stdout + first.stderr  # none of Optuna's INFO lines, the trial's internals, Lightning's tip
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
def test_a_bad_sweeper_setting_is_one_line_before_anything_is_written(capfd, monkeypatch, tmp_path, setting, said):
    monkeypatch.chdir(tmp_path)  # in this process (the CLI's own process: test_bad_input.py), run from tmp_path
    code, out = run_main(capfd, "gruexp.train", *SEARCH, setting.replace("{tmp}", str(tmp_path)))
    assert code == 2 and "Traceback" not in out, out[-3000:]
    (error,) = [line for line in out.splitlines() if line.startswith("Error")]
    assert said.replace("{tmp}", str(tmp_path)) in error
    assert not (tmp_path / "outputs").exists()
