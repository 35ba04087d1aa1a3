"""Reliability, third pass (issue 22): no value silently ignored on resume, no study or cache corrupted."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from gruexp.train import train

SGD = ["model=torch", "trainer.accelerator=cpu", "trainer.max_epochs=1", "optimizer.lr=1.0"]


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _moved(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("net."))


# --- 1. a value changed on resume is used, and said -----------------------------------------------------------


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
    first = train(make_cfg(*SGD, *scheduler, out=tmp_path / "a"))
    before = _weights(first["last_ckpt"])
    with caplog.at_level(logging.INFO, logger="gruexp"):
        resumed = train(
            make_cfg(
                *SGD,
                *scheduler,
                "trainer.max_epochs=2",
                "optimizer.lr=1e-6",
                f"ckpt_path={tmp_path / 'a'}",
                out=tmp_path / "b",
            )
        )
    assert resumed["status"] == "completed" and resumed["lr"] == 1e-6
    assert "resumed with optimizer.lr 1.0 -> 1e-06 from the command line" in caplog.text
    after = torch.load(resumed["last_ckpt"], weights_only=True)
    group = after["optimizer_states"][0]["param_groups"][0]
    assert group.get("initial_lr", group["lr"]) == 1e-6
    # an epoch at lr 1e-6 leaves the weights where they were (at lr 1.0 they move by more than 0.01)
    assert _moved(before, after["state_dict"]) < 1e-4


def test_a_momentum_changed_on_resume_is_used(make_cfg, tmp_path, caplog):
    train(make_cfg(*SGD, "+optimizer.momentum=0.5", out=tmp_path / "a"))
    with caplog.at_level(logging.INFO, logger="gruexp"):
        resumed = train(
            make_cfg(
                *SGD,
                "+optimizer.momentum=0.9",
                "trainer.max_epochs=2",
                f"ckpt_path={tmp_path / 'a'}",
                out=tmp_path / "b",
            )
        )
    assert "resumed with optimizer.momentum 0.5 -> 0.9 from the command line" in caplog.text
    group = torch.load(resumed["last_ckpt"], weights_only=True)["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.9


def test_an_unchanged_resume_changes_nothing_and_says_nothing(make_cfg, tmp_path, caplog):
    train(make_cfg(*SGD, out=tmp_path / "a"))
    with caplog.at_level(logging.INFO, logger="gruexp"):
        train(make_cfg(*SGD, "trainer.max_epochs=2", f"ckpt_path={tmp_path / 'a'}", out=tmp_path / "b"))
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
    train(make_cfg(*SGD, *cosine, "+scheduler.T_max=10", out=tmp_path / "a"))
    with caplog.at_level(logging.INFO, logger="gruexp"):
        resumed = train(
            make_cfg(
                *SGD,
                *cosine,
                "+scheduler.T_max=20",
                "trainer.max_epochs=2",
                f"ckpt_path={tmp_path / 'a'}",
                out=tmp_path / "b",
            )
        )
    assert "resumed with scheduler.T_max 10 -> 20 from the command line" in caplog.text
    assert torch.load(resumed["last_ckpt"], weights_only=True)["lr_schedulers"][0]["T_max"] == 20
