"""The callbacks CharLM brings (Throughput, StepMetrics) and the resume point it writes into every checkpoint."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from gruexp.callbacks import StepMetrics
from gruexp.module import RESUME_KEY, CharLM
from gruexp.throughput import Throughput

VOCAB, BATCHES, B, T = list("abcdef"), 4, 2, 5


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    X, Y = (torch.randint(len(VOCAB), (BATCHES * B, T), generator=g) for _ in range(2))
    return DataLoader(TensorDataset(X, Y), batch_size=B)


def fit(tmp_path, **trainer_args) -> tuple[L.Trainer, CharLM]:
    model = CharLM("torch", hidden_size=8, vocab=VOCAB, sample_chars=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_args,
    )
    trainer.fit(model, loader(), loader())
    return trainer, model


def test_charlm_brings_its_callbacks_once_before_the_checkpoints(tmp_path, caplog):
    checkpoint = ModelCheckpoint(dirpath=tmp_path)
    trainer, model = fit(tmp_path, callbacks=[checkpoint])
    assert trainer.callbacks[-3:] == [model.throughput, model.step_metrics, checkpoint]
    with caplog.at_level(logging.INFO):
        trainer.test(model, loader(), verbose=False)  # the same trainer again, as train() tests after fit
    assert [type(c) for c in trainer.callbacks].count(Throughput) == 1
    assert [type(c) for c in trainer.callbacks].count(StepMetrics) == 1
    assert not [r for r in caplog.records if "override" in r.getMessage()]


def test_throughput_counts_every_training_token_and_logs_each_epoch(tmp_path):
    trainer, model = fit(tmp_path)
    assert model.throughput.tokens == 2 * BATCHES * B * T
    assert [tokens for tokens, _ in model.throughput.epochs] == [BATCHES * B * T] * 2
    assert float(trainer.callback_metrics["train/tokens_per_sec"]) > 0
    assert "train/ppl" in trainer.callback_metrics and "train/mfu" not in trainer.callback_metrics  # no CPU peak


def test_a_weights_only_checkpoint_holds_the_resume_point_too(tmp_path):
    # the module's hook writes it: Lightning calls callbacks' on_save_checkpoint for full checkpoints only
    trainer, _ = fit(tmp_path)
    trainer.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=True)[RESUME_KEY]
    assert {"epoch", "batch", "world_size", "state", "train_ppl", "rng", "wandb_id"} <= set(saved)
    assert saved["world_size"] == 1 and saved["state"].shape == (1, B, 8)
