"""Throughput over the whole run, MFU, bits per character, the test split's metrics, pinned loaders."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from gruexp.module import CharLM, pin_memory
from gruexp.throughput import Throughput, compute_dtype
from gruexp.train import train


def test_whole_run_throughput_is_all_tokens_over_all_training_time():
    t = Throughput()
    assert t.add(1000, 1.0) == 1000
    assert t.add(1000, 3.0) == pytest.approx(1000 / 3)  # a busy epoch
    # 2000 tokens in 4 s: not the last epoch's 333, not the mean of the epochs' rates 667
    assert t.tokens_per_sec == 500
    assert t.epochs == [(1000, 1.0), (1000, 3.0)]
    assert math.isnan(Throughput().tokens_per_sec)


def read_csv_metrics(run) -> list[dict[str, str]]:
    (path,) = run.glob("**/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_run_summary_uses_the_whole_run_and_the_log_keeps_each_epoch(make_cfg, tmp_path, monkeypatch, corpus_path):
    # this CPU has no known peak FLOP/s; a GPU's (what Lightning's get_available_flops gives there) stands in
    monkeypatch.setattr("gruexp.throughput.get_available_flops", lambda device, dtype: 1e12)
    cfg = make_cfg("model=fused", "logger=csv", "trainer.max_epochs=3")
    summary = train(cfg)
    rows = [r for r in read_csv_metrics(tmp_path) if r.get("train/tokens_per_sec")]
    assert len(rows) == 3  # one per epoch, for plots
    steps_per_epoch = summary["global_step"] // 3
    tokens = steps_per_epoch * cfg.data.batch_size * cfg.data.num_steps  # every epoch's, B x T per step
    rates = [float(r["train/tokens_per_sec"]) for r in rows]
    seconds = sum(tokens / rate for rate in rates)
    assert summary["tokens_per_sec"] == pytest.approx(3 * tokens / seconds, rel=1e-6)
    for r, rate in zip(rows, rates, strict=True):
        assert float(r["train/bpc"]) == pytest.approx(math.log2(float(r["train/ppl"])), rel=1e-5)
        flops = 3 * (2 * 3 * 16 * (28 + 16) + 2 * 16 * 28)  # hidden 16, d2l's 28 characters, one layer
        assert float(r["train/mfu"]) == pytest.approx(rate * flops / 1e12, rel=1e-5)
    val = [r for r in read_csv_metrics(tmp_path) if r.get("val/ppl")]
    assert float(val[-1]["val/bpc"]) == pytest.approx(math.log2(float(val[-1]["val/ppl"])), rel=1e-5)


def test_flops_per_token_counts_every_layer():
    H, V = 32, 28
    one = CharLM("fused", hidden_size=H, vocab=[chr(97 + i) for i in range(V)])
    two = CharLM("fused", hidden_size=H, vocab=[chr(97 + i) for i in range(V)], num_layers=2)
    layer0, output = 2 * 3 * H * (V + H), 2 * H * V
    assert one.flops_per_token == 3 * (layer0 + output)
    assert two.flops_per_token == 3 * (layer0 + 2 * 3 * H * (H + H) + output)  # layer 1 reads H inputs, not V


def test_test_step_logs_test_ppl_and_bpc_like_validation(make_cfg, corpus_path):
    cfg = make_cfg()
    dm = instantiate(cfg.data, seed=cfg.seed)
    model = CharLM("torch", hidden_size=16, vocab=dm.vocab.idx_to_token)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    val = trainer.validate(model, datamodule=dm, verbose=False)[0]
    test = trainer.test(model, dataloaders=dm.val_dataloader(), verbose=False)[0]
    assert set(test) == {"test/ppl", "test/bpc"}
    assert test["test/ppl"] == pytest.approx(val["val/ppl"], rel=1e-6)
    assert test["test/bpc"] == pytest.approx(math.log2(test["test/ppl"]), rel=1e-6)


def test_loaders_are_pinned_on_cuda_only():
    loaders = [DataLoader(range(4)), DataLoader(range(4))]
    pin_memory(loaders, torch.device("cpu"))
    assert not any(loader.pin_memory for loader in loaders)
    pin_memory(loaders, torch.device("cuda", 0))  # sets the flag the loader's next iterator reads
    assert all(loader.pin_memory for loader in loaders)


@pytest.mark.parametrize(
    "dtype, matmul, expected",
    [(torch.bfloat16, "highest", 989.4e12), (torch.float32, "highest", 66.9e12), (torch.float32, "high", 494.7e12)],
)
def test_an_h200_has_a_peak_for_mfu_by_the_name_cuda_reports(monkeypatch, dtype, matmul, expected):
    """CUDA names an H200 "NVIDIA H200", a name Lightning's table does not know: no train/mfu without gruexp's. The
    name is what a GPU gives; this machine has none, so fakes stand in for it and for the capability (Lightning's
    TF32 rule)."""
    from gruexp.throughput import peak_flops

    names = {0: "NVIDIA H200"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[torch.device(device).index or 0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul)
    try:
        assert peak_flops(torch.device("cuda", 0), dtype) == expected
        names[0] = "NVIDIA H100 80GB HBM3"  # Lightning's own table, the same chip's numbers
        assert peak_flops(torch.device("cuda", 0), dtype) == expected
    finally:
        torch.set_float32_matmul_precision(old)
    assert peak_flops(torch.device("cpu"), dtype) is None


def test_mfu_is_measured_against_the_peak_of_the_precision_the_trainer_computes_in():
    # Lightning's own mapping (fabric's _plugin_to_compute_dtype) reads a Trainer's bf16 and 16-bit plugins as fp32
    expect = {
        "32-true": torch.float32,
        "bf16-mixed": torch.bfloat16,
        "bf16-true": torch.bfloat16,
        "64-true": torch.float64,
    }
    for precision, dtype in expect.items():
        trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
        assert compute_dtype(str(trainer.precision)) is dtype, precision
    assert compute_dtype("16-mixed") is torch.float16
