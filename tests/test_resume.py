"""Resume: an interrupted run resumed is the run uninterrupted, last.ckpt and best.ckpt hold what they say, a
resume of another vocabulary, model or split is refused, and values changed on resume are used and said."""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from helpers import EXACT, SGD, TINY, assert_one_line_error, run_cli, run_main

from gruexp import UserError
from gruexp.module import restore_rng_states, rng_states
from gruexp.train import train

# --- exact resume -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One 3-epoch run per partition, the reference the resumed runs must match."""
    return {}


@pytest.mark.parametrize("partition", ["sequential", "random"])
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_interrupted_then_resumed_run_matches_uninterrupted(make_cfg, tmp_path, uninterrupted, partition, where):
    common = [*EXACT, f"data.partition={partition}"]
    if partition not in uninterrupted:
        uninterrupted[partition] = train(make_cfg(*common, out=tmp_path / "full")), tmp_path / "full"
    full, full_dir = uninterrupted[partition]
    if where == "mid-epoch":  # SIGTERM, as SLURM sends, after step 50: 37 batches an epoch, so inside the second
        kill = ["+callbacks.kill._target_=helpers.inject.SignalAt", "+callbacks.kill.step=50"]
        with pytest.raises(SystemExit) as e:
            train(make_cfg(*common, *kill, out=tmp_path / "a"))
        assert e.value.code == 128 + 15
        cut = json.loads((tmp_path / "a" / "summary.json").read_text())
        # the signal arrives after this batch end's check (callback order): the stop is one batch later
        assert (cut["status"], cut["global_step"]) == ("interrupted", 51)
    else:  # a run that ended after epoch 2 of 3
        assert train(make_cfg(*common, "trainer.max_epochs=2", out=tmp_path / "a"))["global_step"] == 74
    resumed = train(make_cfg(*common, "ckpt_path=last", out=tmp_path / "b"))
    assert resumed["global_step"] == full["global_step"] and resumed["status"] == "completed"
    assert resumed["val_ppl"] == pytest.approx(full["val_ppl"], abs=1e-6)
    assert resumed["train_ppl"] == pytest.approx(full["train_ppl"], abs=1e-6)
    # one metrics.csv from epoch 1: the resumed run's is the uninterrupted run's, timings aside
    assert csv_history(tmp_path / "b") == csv_history(full_dir)


def csv_history(run: Path) -> list[dict[str, str]]:
    """A run's csv/metrics.csv rows without the columns that time it."""
    rows = csv.DictReader((run / "csv" / "metrics.csv").open())
    return [{k: v for k, v in row.items() if "tokens_per_sec" not in k} for row in rows]


# --- last.ckpt is the last epoch, best.ckpt the best ------------------------------------------------------------------


def val_ppl_by_epoch(run: Path) -> list[float]:
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]


def test_last_ckpt_is_the_last_epoch_when_val_ppl_stops_improving(make_cfg, tmp_path, corpus_path):
    # 1,000 characters, hidden 64, Adam: val/ppl is best after epoch 2 and then rises as the model memorises
    overfit = ["model=torch", "model.hidden_size=64", "optimizer=adam", "optimizer.lr=0.05", "data.max_tokens=1000"]
    summary = train(make_cfg(*overfit, "data.batch_size=4", "trainer.max_epochs=5", "logger=csv"))
    val = val_ppl_by_epoch(tmp_path)
    best_epoch = val.index(min(val))
    assert len(val) == 5 and best_epoch < 4, val  # the premise: val/ppl stopped improving before the end
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    best = torch.load(ckpts / "best.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (4, summary["global_step"])
    assert best["epoch"] == best_epoch and best["global_step"] < last["global_step"]
    assert summary["best_val_ppl"] == pytest.approx(min(val))
    assert summary["best_ckpt"] == str(ckpts / "best.ckpt") and summary["last_ckpt"] == str(ckpts / "last.ckpt")


def test_last_ckpt_every_epoch_also_without_validation(make_cfg, tmp_path, corpus_path):
    # experiment=d2l_classic validates every 10th epoch; last.ckpt must still be the last epoch
    summary = train(make_cfg("trainer.max_epochs=3", "trainer.check_val_every_n_epoch=2", "logger=csv"))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, summary["global_step"])


# --- no silent wrong resume -------------------------------------------------------------------------------------------


def swapped_corpus(corpus: Path, folder: Path) -> Path:
    """The same text with 'e' and 't' swapped: a vocabulary of the same size whose order differs."""
    out = folder / "swapped.txt"
    out.write_text(corpus.read_text().translate(str.maketrans("etET", "teTE")))
    return out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.path=SWAPPED"], "was trained on another vocabulary (28 tokens, this corpus has 28; token "),
        (["model.hidden_size=32"], "was trained with model.hidden_size=16, this run has model.hidden_size=32"),
        (["model=scratch"], "was trained with model.name=fused, this run has model.name=scratch"),
        (["model.num_layers=2"], "was trained with model.num_layers=1, this run has model.num_layers=2"),
        (["model.reset_after=false"], "was trained with model.reset_after=True, this run has model.reset_after=False"),
    ],
)
def test_resume_with_another_vocabulary_or_model_is_refused(make_cfg, tmp_path, first_run, corpus_path, args, message):
    args = [a.replace("SWAPPED", str(swapped_corpus(corpus_path, tmp_path))) for a in args]
    with pytest.raises(UserError) as e:
        train(make_cfg("model=fused", "trainer.max_epochs=2", *args, f"ckpt_path={first_run}", out=tmp_path / "b"))
    assert message in str(e.value) and str(first_run) in str(e.value)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "failed" and message in summary["error"]


def test_resuming_a_finished_run_without_more_epochs_is_refused(make_cfg, tmp_path, first_run):
    # Lightning would stop at once: the run ended "completed" with nan perplexities and an empty sample
    for name, args, message in (
        ("b", ["trainer.max_epochs=1"], "has trained 1 epochs and trainer.max_epochs=1: nothing is left to train; set"),
        ("c", ["trainer.max_epochs=3", "trainer.max_steps=5"], "steps and trainer.max_steps=5: nothing is left to"),
    ):
        out = first_run.parent / name
        with pytest.raises(UserError, match=message):
            train(make_cfg("model=fused", *args, "ckpt_path=last", out=out))
        assert json.loads((out / "summary.json").read_text())["status"] == "failed"
        assert not (out / "checkpoints").exists()


def test_ckpt_path_last_skips_a_newer_sibling_of_another_config(make_cfg, tmp_path, first_run, caplog):
    runs = first_run.parent
    train(make_cfg("model=fused", "trainer.max_epochs=1", "model.hidden_size=24", "logger=csv", out=runs / "newer"))
    os.utime(runs / "newer" / "checkpoints" / "last.ckpt", (time.time() + 10,) * 2)
    caplog.set_level("INFO")
    summary = train(make_cfg("model=fused", "trainer.max_epochs=2", "ckpt_path=last", "logger=csv", out=runs / "c"))
    assert f"ckpt_path=last is {first_run / 'checkpoints' / 'last.ckpt'}" in caplog.text
    assert summary["status"] == "completed" and summary["epochs"] == 2


def test_scratch_checkpoint_resumed_as_fused_and_other_size_are_one_line(capfd, make_cfg, tmp_path, corpus_path):
    train(make_cfg("model=scratch", "trainer.max_epochs=1", "logger=csv", out=tmp_path / "s"))
    for args, message in (
        (["model=fused"], "was trained with model.name=scratch, this run has model.name=fused"),
        (["model=scratch", "model.hidden_size=32"], "was trained with model.hidden_size=16, this run has model.hid"),
    ):
        run = tmp_path / f"r{len(args)}"
        code, out = run_main(capfd, "gruexp.train", *TINY, *args, f"ckpt_path={tmp_path / 's'}", f"hydra.run.dir={run}")
        assert code == 2
        assert_one_line_error(code, out, message)


# --- a value changed on resume is used, and said ----------------------------------------------------------------------


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _moved(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("net."))


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


# --- the random generators are in the checkpoint ----------------------------------------------------------------------


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


# --- one record per run across resume ---------------------------------------------------------------------------------


def test_an_interrupted_run_draws_its_plot_and_the_resumed_run_continues_its_curve_and_wandb_run(
    tmp_path, inject_env, corpus_path
):
    kill = [
        "+callbacks.kill._target_=helpers.inject.SignalAt",
        "+callbacks.kill.step=50",
    ]  # in epoch 2 of TINY's 37-batch epochs
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
