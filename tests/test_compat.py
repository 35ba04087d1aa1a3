"""Each private Lightning name gruexp uses (gruexp.compat, and launch.py's and preflight.py's), on real Lightning.

A test here fails where a Lightning release moves, renames or stops calling one of them: run this file before
lifting the `lightning<2.7` pin in pyproject.toml.
"""

from __future__ import annotations

import inspect
import typing

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from gruexp import compat

BATCHES = 4


class Probe(L.LightningModule):
    """A one-layer model that records, at each step, what gruexp.compat reads from its trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: dict[str, list] = {"should_update_logs": [], "batches_that_stepped": [], "hook": [], "trainer": []}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.seen["should_update_logs"].append(compat.should_update_logs(self.trainer))
        self.seen["hook"].append(getattr(self, compat.CURRENT_HOOK))
        self.seen["trainer"].append(compat.attached_trainer(self))
        return self.layer(batch[0]).pow(2).mean()

    def on_before_optimizer_step(self, optimizer) -> None:
        self.seen["batches_that_stepped"].append(compat.batches_that_stepped(self.trainer))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingBar(compat.RichBar):
    """A RichBar that notes which of its public methods Lightning's private ones reached."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def start_bar(self, trainer: L.Trainer) -> None:
        self.calls.append("start_bar")
        super().start_bar(trainer)

    def stop_bar(self) -> None:
        self.calls.append("stop_bar")
        super().stop_bar()

    def train_description(self, current_epoch: int) -> str:
        self.calls.append(f"train_description {current_epoch}")
        return super().train_description(current_epoch)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(BATCHES * 2, 2)), batch_size=2)


@pytest.fixture(scope="module")
def fitted() -> tuple[L.Trainer, Probe, RecordingBar]:
    model, bar = Probe(), RecordingBar()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
    )
    trainer.fit(model, loader())
    return trainer, model, bar


def test_should_update_logs_follows_log_every_n_steps(fitted):
    _, model, _ = fitted
    assert model.seen["should_update_logs"] == [False, True, False, True]  # steps 1-4, every 2nd


def test_batches_that_stepped_counts_optimizer_steps_from_zero(fitted):
    trainer, model, _ = fitted
    assert model.seen["batches_that_stepped"] == list(range(BATCHES))
    assert compat.batches_that_stepped(trainer) == BATCHES == trainer.global_step


def test_a_checkpoint_keeps_batches_that_stepped_where_compat_reads_it(fitted, tmp_path):
    trainer, _, _ = fitted
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    saved = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert compat.checkpoint_batches_that_stepped(saved) == BATCHES
    assert compat.checkpoint_batches_that_stepped({}) == 0


def test_attached_trainer_is_none_outside_a_trainer(fitted):
    trainer, model, _ = fitted
    assert model.seen["trainer"] == [trainer] * BATCHES
    assert compat.attached_trainer(Probe()) is None
    with pytest.raises(RuntimeError):
        _ = Probe().trainer  # the public property raises, which is why attached_trainer exists


def test_current_hook_names_the_running_hook(fitted):
    _, model, _ = fitted
    assert model.seen["hook"] == ["training_step"] * BATCHES
    assert getattr(model, compat.CURRENT_HOOK) is None  # between hooks


def test_rich_bar_private_methods_reach_the_public_ones(fitted):
    _, _, bar = fitted
    assert bar.calls[0] == "start_bar" and "stop_bar" in bar.calls
    assert "train_description 0" in bar.calls


class ManualSteps(Probe):
    """Manual optimization whose every call counts two optimizer steps it took itself (as a replayed graph does)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx: int) -> None:
        for _ in range(2):
            compat.advance_optimizer_step(self.trainer)


def test_advance_optimizer_step_counts_steps_for_global_step_and_max_steps():
    trainer = L.Trainer(accelerator="cpu", max_steps=6, max_epochs=1, logger=False, barebones=True)
    trainer.fit(ManualSteps(), loader())
    assert trainer.global_step == 6 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3


class Position(DataLoader):
    """A loader with a saved position (as gruexp's StreamLoader): the batches it handed out; what it was given."""

    def __init__(self) -> None:
        super().__init__(TensorDataset(torch.randn(BATCHES * 2, 2)), batch_size=2)
        self.handed, self.loaded = 0, []

    def __iter__(self):
        for batch in super().__iter__():
            self.handed += 1
            yield batch

    def state_dict(self) -> dict:
        return {"handed": self.handed}

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(state)


class EstimatesItsSteps(Probe):
    """configure_optimizers reads estimated_stepping_batches (a schedule's total), which sets the loader up early."""

    def __init__(self, forget: bool) -> None:
        super().__init__()
        self.forget = forget

    def configure_optimizers(self):
        assert self.trainer.estimated_stepping_batches == BATCHES
        if self.forget:
            compat.forget_train_loader(self.trainer)
        return super().configure_optimizers()


@pytest.mark.parametrize("forget", [True, False])
def test_forget_train_loader_lets_a_resume_load_the_loaders_position(tmp_path, forget):
    """Without it the early loader is the one trained and never hears of the saved position (the bug it fixes)."""
    quiet = {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_progress_bar": False}
    mid = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    L.Trainer(callbacks=[mid], enable_model_summary=False, **quiet).fit(Probe(), Position())
    data = Position()
    resumed = L.Trainer(enable_checkpointing=False, enable_model_summary=False, **quiet)
    resumed.fit(EstimatesItsSteps(forget), data, ckpt_path=tmp_path / "step=2.ckpt")
    assert data.loaded == ([{"handed": 2}] if forget else [])


def test_launch_py_private_names_exist():
    """gruexp.launch subclasses Lightning's subprocess launcher and DDPStrategy through private names."""
    from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    command = _basic_subprocess_cmd()
    assert command and all(isinstance(part, str) for part in command)
    # the methods JobScriptLauncher and JobDDPStrategy override are still Lightning's and still called
    assert "self._call_children_scripts()" in inspect.getsource(_SubprocessScriptLauncher.launch)
    assert callable(_SubprocessScriptLauncher._check_can_spawn_children)
    assert "_setup_model" in vars(DDPStrategy) and "_configure_launcher" in vars(DDPStrategy)
    trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)  # builds, launches nothing
    strategy = trainer.strategy
    assert strategy._start_method == "popen" and isinstance(strategy._ddp_kwargs, dict)
    launcher = strategy._launcher
    assert isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs == []
    assert launcher.cluster_environment is strategy.cluster_environment


def test_preflights_precision_list_holds_the_trainer_precisions():
    from lightning.fabric.connector import _PRECISION_INPUT

    values = {v for group in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(group)}
    assert {"32-true", "bf16-mixed", "16-mixed", 32} <= values
