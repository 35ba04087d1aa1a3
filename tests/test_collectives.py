"""Collectives and host syncs of the divergence/interrupt checks (gruexp.guards.StepChecks) and of CharLM.

NCCL cannot run here, so the DDP path is driven with the module on the `meta` device and a recording strategy
that stands in for DDP over NCCL: it asserts that every tensor handed to a collective lives on the module's device
(what NCCL requires and gloo does not) and answers as the other rank would. The one-process path runs for real.
"""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.loops.progress import _BatchProgress
from lightning.pytorch.trainer.states import TrainerFn

from gruexp.guards import Diverged, DivergenceDetector, InterruptCheckpoint, Interrupted, StepChecks
from gruexp.module import CharLM
from gruexp.throughput import gather_epoch
from gruexp.train import train

META = torch.device("meta")
NOTHING = [0.0, -math.inf]  # [signal, -(first non-finite step)]: no signal, every loss finite


class RecordingStrategy:
    """Stands in for Lightning's DDPStrategy over NCCL: records collectives, refuses tensors off `device`."""

    def __init__(self, device: torch.device, answers: list[list[float]] | None = None) -> None:
        self.device, self.answers, self.calls = device, list(answers or []), []

    def _record(self, name: str, tensor: torch.Tensor, **kw) -> None:
        assert isinstance(tensor, torch.Tensor), f"{name} of a {type(tensor).__name__}, not a tensor"
        assert tensor.device == self.device, f"{name} of a tensor on {tensor.device}: NCCL needs {self.device}"
        self.calls.append((name, tuple(tensor.shape), kw))

    def reduce(self, tensor, group=None, reduce_op="mean"):
        self._record("reduce", tensor, reduce_op=reduce_op)
        return torch.tensor(self.answers.pop(0) if self.answers else NOTHING)  # the reduced value, as read back

    def all_gather(self, tensor, group=None, sync_grads=False):
        self._record("all_gather", tensor)
        return torch.zeros(2, *tensor.shape, dtype=tensor.dtype)

    def broadcast(self, obj, src=0):
        self._record("broadcast", obj)
        return obj

    def reduce_boolean_decision(self, decision, all=True):
        self._record("reduce_boolean_decision", decision)
        return decision


class DDPTrainer(SimpleNamespace):
    """The attributes of a 2-rank Trainer the callbacks read (a class: StepChecks keys a weak map by trainer)."""

    __hash__ = object.__hash__


def ddp_trainer(strategy: RecordingStrategy, batches: int = 100) -> DDPTrainer:
    """A 2-rank trainer's state, with Lightning's own batch-progress counter."""
    progress = _BatchProgress()
    loop = SimpleNamespace(batch_progress=progress, total_batch_idx=0)
    return DDPTrainer(
        world_size=2,
        global_rank=0,
        strategy=strategy,
        fit_loop=SimpleNamespace(epoch_loop=loop),
        log_every_n_steps=10,
        global_step=0,
        current_epoch=0,
        should_stop=False,
        validating=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        num_training_batches=batches,
        loggers=[],
    )


def meta_module() -> CharLM:
    model = CharLM("fused", hidden_size=8, vocab=list("abcdef")).to(META)
    assert model.device == META
    return model


def run_batches(trainer, module, callbacks, losses, last: int | None = None) -> None:
    """Drive the callbacks' training-batch hooks as Lightning's loop calls them, one loss per batch."""
    for cb in callbacks:
        cb.on_train_start(trainer, module)
    try:
        for i, loss in enumerate(losses):
            trainer.fit_loop.epoch_loop.batch_progress.increment_ready()
            trainer.fit_loop.epoch_loop.batch_progress.is_last_batch = last is not None and i == last
            for cb in callbacks:
                cb.on_train_batch_start(trainer, module, None, i)
            trainer.global_step += 1  # the optimizer stepped
            for cb in callbacks:
                cb.on_train_batch_end(trainer, module, {"loss": loss}, None, i)
    finally:
        for cb in callbacks:
            cb.teardown(trainer, module, "fit")  # InterruptCheckpoint gives the signal handlers back


def test_ddp_checks_are_one_collective_per_step_on_the_module_device():
    module, strategy = meta_module(), RecordingStrategy(META)
    trainer = ddp_trainer(strategy)
    callbacks = [DivergenceDetector(), InterruptCheckpoint()]
    run_batches(trainer, module, callbacks, [torch.ones((), device=META)] * 12)
    # one merged [signal, first bad step] per step, both callbacks together, reduced with max
    assert strategy.calls == [("reduce", (2,), {"reduce_op": "max"})] * 12
    assert StepChecks.of(trainer).collectives == 12


def test_ddp_interrupt_checks_without_divergence_detector_stay_on_the_module_device():
    # callbacks=none + InterruptCheckpoint: no loss is recorded, so the decision is built without one
    module, strategy = meta_module(), RecordingStrategy(META)
    trainer = ddp_trainer(strategy)
    run_batches(trainer, module, [InterruptCheckpoint()], [torch.ones((), device=META)] * 3)
    assert strategy.calls == [("reduce", (2,), {"reduce_op": "max"})] * 3


def test_ddp_signal_on_another_rank_stops_this_one_after_the_same_batch():
    module = meta_module()
    strategy = RecordingStrategy(META, answers=[NOTHING, NOTHING, [15.0, -math.inf]])  # rank 1 got SIGTERM
    trainer = ddp_trainer(strategy)
    callbacks = [DivergenceDetector(), InterruptCheckpoint()]
    with pytest.raises(Interrupted) as e:
        run_batches(trainer, module, callbacks, [torch.ones((), device=META)] * 5)
    assert (e.value.signum, e.value.step, e.value.code) == (15, 3, 128 + 15)
    assert len(strategy.calls) == 3


@pytest.mark.parametrize("bad_here", [False, True])
def test_ddp_non_finite_loss_on_any_rank_stops_as_diverged_with_its_step(bad_here):
    # on the CPU: the message reads this rank's loss back, which a meta tensor does not hold
    module = CharLM("fused", hidden_size=8, vocab=list("abcdef"))
    strategy = RecordingStrategy(torch.device("cpu"), answers=[NOTHING, [0.0, -1.0]])  # step 1 was not finite
    trainer = ddp_trainer(strategy)
    losses = [torch.tensor(2.0), torch.tensor(math.inf if bad_here else 2.0), torch.tensor(2.0)]
    with pytest.raises(Diverged, match=r"at step 1 \(epoch 0\)") as e:
        run_batches(trainer, module, [DivergenceDetector()], losses)
    assert len(strategy.calls) == 2
    assert e.value.loss == math.inf if bad_here else math.isnan(e.value.loss)


def test_ddp_checkpoint_and_epoch_collectives_of_the_module_are_on_its_device():
    module, strategy = meta_module(), RecordingStrategy(META)
    trainer = ddp_trainer(strategy)
    module.trainer = trainer
    module.state = torch.zeros(1, 4, 8, device=META)
    module.train_nll.update(torch.ones((), device=META), 10)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)  # gathers every rank's carried state and train metric
    tokens, seconds = gather_epoch(module, tokens=350, seconds=0.5)  # all ranks' tokens, the slowest time
    assert [c[0] for c in strategy.calls] == ["all_gather"] * 4
    assert (tokens, seconds) == (0, 0.0)  # what the recording strategy's zeros gathered
    assert checkpoint["gruexp_resume"]["world_size"] == 2


def test_one_process_checks_only_every_log_every_n_steps_and_at_epoch_ends(make_cfg, corpus_path):
    cfg = make_cfg("model=fused", "logger=none", "trainer.log_every_n_steps=4")
    dm = instantiate(cfg.data, seed=cfg.seed)
    model = instantiate(cfg.model, vocab=dm.vocab.idx_to_token)
    trainer = instantiate(cfg.trainer, callbacks=[DivergenceDetector(), InterruptCheckpoint()], logger=False)
    trainer.fit(model, datamodule=dm)
    checks = StepChecks.of(trainer)
    n = trainer.num_training_batches
    # batch counts (1-based, across epochs) at which a check reads the device: every 4th and each epoch's last
    due = {b for b in range(1, 2 * n + 1) if b % 4 == 0} | {n, 2 * n}
    assert checks.collectives == 0
    assert checks.host_reads == len(due) < 2 * n
    assert checks.losses == []


@pytest.mark.parametrize("every", [1, 1000])
def test_divergence_inside_a_check_window_names_its_step_and_saves_nothing_bad(tmp_path, make_cfg, every, corpus_path):
    # epoch 0 trains at lr 1, then StepLR multiplies it by 1e6 and epoch 1 diverges at step 38 (see
    # test_divergence): with a check every step and with one window spanning the whole epoch alike
    sched = "scheduler={_target_: torch.optim.lr_scheduler.StepLR, _partial_: true, step_size: 1, gamma: 1e6}"
    cfg = make_cfg("logger=csv", sched, "trainer.gradient_clip_val=null", f"trainer.log_every_n_steps={every}")
    with pytest.raises(Diverged, match=r"at step 38 \(epoch 1\)"):
        train(cfg)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        saved = torch.load(ckpt, weights_only=True)
        assert saved["epoch"] == 0 and all(torch.isfinite(w).all() for w in saved["state_dict"].values()), ckpt


def test_ddp_wraps_the_model_on_the_stream_its_steps_run_on(monkeypatch):
    """Lightning 2.6 wraps a GPU model in DDP inside a new CUDA stream; torch then warns, every run, that
    DDP's AccumulateGrad nodes sit on another stream than the backward. gruexp's `ddp` wraps it where it stands. No
    GPU here: fakes record the stream calls and DDP's arguments (NCCL and CUDA streams cannot run on this machine)."""
    from lightning.pytorch.strategies import ddp as lightning_ddp

    from gruexp import launch

    streams, wrapped = [], []
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: streams.append("Stream") or object())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: streams.append("stream") or contextlib.nullcontext())
    fake_ddp = lambda **kw: wrapped.append(kw) or "ddp-model"  # noqa: E731
    monkeypatch.setattr(launch, "DistributedDataParallel", fake_ddp, raising=False)
    monkeypatch.setattr(lightning_ddp, "DistributedDataParallel", fake_ddp)  # Lightning's own _setup_model's
    launch.register_strategies()
    strategy = launch.JobDDPStrategy(find_unused_parameters=False)
    monkeypatch.setattr(strategy, "determine_ddp_device_ids", lambda: [0])  # a GPU rank's device ids
    model = torch.nn.Linear(2, 2)
    assert strategy._setup_model(model) == "ddp-model"
    assert wrapped == [{"module": model, "device_ids": [0], "find_unused_parameters": False}]
    assert streams == []
