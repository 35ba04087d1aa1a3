"""End to end: train(cfg) for each variant, summary.json, checkpoints, resume, generation and the CLI's errors."""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from helpers import TINY, run_cli, run_main

from gruexp.generate import generate, load
from gruexp.train import train

KEYS = {
    "model",
    "hidden_size",
    "lr",
    "gradient_clip_val",
    "train_ppl",
    "val_ppl",
    "tokens_per_sec",
    "epochs",
    "world_size",
    "wall_time_s",
}


@pytest.mark.parametrize("name", ["scratch", "torch", "fused"])
def test_train_writes_summary_metrics_and_checkpoints(make_cfg, tmp_path, name, corpus_path):
    cfg = make_cfg(f"model={name}", "optimizer.lr=2", "trainer.gradient_clip_val=0.5")
    got = train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert KEYS <= summary.keys() and summary == pytest.approx(got)
    assert (summary["model"], summary["hidden_size"], summary["lr"], summary["gradient_clip_val"]) == (
        name,
        16,
        2,
        0.5,
    )
    assert (summary["epochs"], summary["world_size"], summary["status"]) == (2, 1, "completed")
    assert 1 < summary["val_ppl"] < 28 and 1 < summary["train_ppl"] < 28  # better than uniform over 28 tokens
    assert summary["tokens_per_sec"] > 0 and summary["wall_time_s"] > 0
    assert summary["sample"].startswith("time traveller") and len(summary["sample"]) == 14 + 50
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    val = [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]
    assert len(val) == 2 and val[-1] == pytest.approx(summary["val_ppl"])
    tps = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    # the summary's rate is the whole run's: with equal tokens per epoch, the epochs' harmonic mean
    assert len(tps) == 2 and summary["tokens_per_sec"] == pytest.approx(2 / sum(1 / r for r in tps))
    # over the wall time: the same tokens, set-up, validation and the test included
    from hydra.utils import instantiate

    loader = instantiate(cfg.data, seed=cfg.seed).train_dataloader()
    batches = 0
    for epoch in (0, 1):  # each epoch draws its own offset, so its own number of batches
        loader.sampler.set_epoch(epoch)
        batches += len(loader)
    tokens = batches * cfg.data.batch_size * cfg.data.num_steps
    assert summary["wall_tokens_per_sec"] == pytest.approx(tokens / summary["wall_time_s"], rel=1e-6)


def test_val_ppl_is_exp_of_mean_token_loss(make_cfg, tmp_path, corpus_path):
    cfg = make_cfg("model=torch", "trainer.max_epochs=1")
    summary = train(cfg)
    model = load(tmp_path / "checkpoints" / "last.ckpt")
    from hydra.utils import instantiate

    dm = instantiate(cfg.data, seed=cfg.seed)
    nll, n, state = 0.0, 0, None
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits, state = model(x, state)
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            n += int((y >= 0).sum())  # padding (PAD) is not a token
    assert summary["val_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_resume_continues_from_checkpoint(make_cfg, tmp_path, corpus_path):
    first = train(make_cfg("model=fused", out=tmp_path / "a"))
    resumed = train(
        make_cfg(
            "model=fused",
            "trainer.max_epochs=3",
            f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
            out=tmp_path / "b",
        )
    )
    assert resumed["epochs"] == 3 and resumed["global_step"] == first["global_step"] * 3 // 2


def test_generate_greedy_and_sampled(make_cfg, tmp_path, corpus_path):
    train(make_cfg("model=torch", "trainer.max_epochs=1"))
    model = load(tmp_path / "checkpoints" / "last.ckpt")
    greedy = generate(model, "Time Traveller", 30)
    assert greedy.startswith("time traveller") and len(greedy) == 44
    assert greedy == generate(model, "time traveller", 30)  # greedy is deterministic
    a, b = (generate(model, "time", 30, temperature=1.0, seed=s) for s in (1, 2))
    assert a != b and len(a) == len(b) == 34


def test_generate_keeps_the_case_of_a_vocabulary_with_capitals(make_cfg, tmp_path):
    # tiny Shakespeare's chars vocabulary has "R" and "r": lower-casing "ROMEO:" would prompt another text
    train(make_cfg("data=tinyshakespeare", "model=torch", "trainer.max_epochs=1"))
    model = load(tmp_path / "checkpoints" / "last.ckpt")
    assert "R" in model.vocab.token_to_idx and "r" in model.vocab.token_to_idx
    out = generate(model, "ROMEO:", 20)
    assert out.startswith("ROMEO:") and len(out) == 26


def test_cli_train_then_generate(tmp_path, corpus_path):
    run = tmp_path / "run"
    r = run_cli(
        "gruexp.train",
        "model=scratch",
        *TINY,
        "trainer.max_epochs=1",
        "optimizer.lr=0.5",
        "trainer.gradient_clip_val=1",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "scratch" and summary["lr"] == 0.5
    assert f"val/ppl {summary['val_ppl']:.3f}" in r.stdout + r.stderr
    g = run_cli(
        "gruexp.generate",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "prefix=time traveller",
        "num_chars=20",
    )
    assert g.returncode == 0, g.stderr[-2000:]
    assert g.stdout.splitlines()[-1] == summary["sample"][:34]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=transformer"], "Could not find 'model/transformer'"),
        (["model.hidden_size=0"], "model.hidden_size must be a positive integer, got 0"),
        (["data.num_steps=200000"], "data.num_steps=200000 needs at least 200001 tokens"),
        (["data.batch_size=0"], "data.batch_size must be a positive integer, got 0"),
        (["model=torch", "model.dropout=0.5"], "model.dropout acts between layers"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(capfd, tmp_path, args, message, corpus_path):
    run = tmp_path / "run"  # in this process; the CLI in its own: test_bad_input.py
    code, out = run_main(capfd, "gruexp.train", *TINY, *args, f"hydra.run.dir={run}")
    assert code != 0
    assert message in out
    assert "Traceback" not in out
    summary = run / "summary.json"  # a failed run never claims success
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"


def test_generate_missing_checkpoint(tmp_path):
    r = run_cli("gruexp.generate", f"ckpt_path={tmp_path / 'none.ckpt'}")
    assert r.returncode == 2
    assert "does not exist: pass ckpt_path=" in r.stdout + r.stderr and "Traceback" not in r.stderr


class MatmulPrecisionAtStart(L.Callback):
    """Records torch's float32 matmul precision as training starts (+callbacks.x._target_=test_train....)."""

    seen: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(torch.get_float32_matmul_precision())


def test_float32_matmul_precision_is_the_runs_choice(make_cfg, tmp_path, corpus_path):
    """A config key (Lightning's tip on every GPU run names torch.set_float32_matmul_precision), set for the run."""
    old = torch.get_float32_matmul_precision()
    record = ["+callbacks.record._target_=test_train.MatmulPrecisionAtStart", "trainer.max_epochs=1", "logger=csv"]
    try:
        assert train(make_cfg("float32_matmul_precision=high", *record))["status"] == "completed"
    finally:
        torch.set_float32_matmul_precision(old)
    assert MatmulPrecisionAtStart.seen == ["high"]
