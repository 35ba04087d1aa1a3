"""Mixed precision on the CPU: every variant trains and validates under bf16-mixed, 16-mixed and bf16-true, fused's
recurrence runs in fp32 whatever the autocast, and the perplexity metrics sum in fp32 (docs/precision.md)."""

from __future__ import annotations

import functools
import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from gruexp.guards import DivergenceDetector
from gruexp.models import backends, gru_recurrence
from gruexp.module import CharLM
from gruexp.train import train

PRECISIONS = ["bf16-mixed", "16-mixed", "bf16-true"]
# (variant, layers, fused's CPU loop)
CASES = [
    ("scratch", 1, "c"),
    ("torch", 1, "c"),
    ("torch", 2, "c"),
    ("fused", 1, "c"),
    ("fused", 2, "c"),
    ("fused", 1, "ops"),
    ("fused", 2, "ops"),
]


@pytest.fixture
def datamodule(make_cfg, corpus_path):
    cfg = make_cfg()
    return instantiate(cfg.data, seed=cfg.seed)


def fused_loop(monkeypatch, loop: str) -> None:
    """GRUEXP_FUSED_CPU=loop for this test: the models it builds run that loop on the CPU in fp32."""
    monkeypatch.setenv("GRUEXP_FUSED_CPU", loop)
    assert backends.choose("cpu", torch.float32, True) == loop


def fit(dm, name: str, layers: int, precision: str, train_batches: int = 3, val_batches: int | float = 2):
    model = CharLM(
        name,
        hidden_size=16,
        vocab=dm.vocab.idx_to_token,
        num_layers=layers,
        optimizer=functools.partial(torch.optim.SGD, lr=1.0),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        precision=precision,
        max_epochs=1,
        limit_train_batches=train_batches,
        limit_val_batches=val_batches,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DivergenceDetector()],
    )
    trainer.fit(model, datamodule=dm)
    return trainer, model


# on a CPU Lightning runs 16-mixed as bf16-mixed and says so: the test asks for 16-mixed on purpose
@pytest.mark.filterwarnings("ignore:You passed `Trainer\\(accelerator='cpu', precision='16-mixed'\\)`")
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("name", "layers", "loop"), CASES)
def test_every_variant_trains_and_validates(datamodule, monkeypatch, name, layers, loop, precision):
    fused_loop(monkeypatch, loop)
    trainer, model = fit(datamodule, name, layers, precision)
    m = trainer.callback_metrics
    for key in ("train/ppl", "train/bpc", "val/ppl", "val/bpc"):
        assert key in m and math.isfinite(float(m[key])) and float(m[key]) > 0, key
    assert float(m["val/bpc"]) == pytest.approx(math.log2(float(m["val/ppl"])), rel=1e-5)
    weights = {p.dtype for p in model.net.parameters()}
    assert weights == {torch.bfloat16 if precision == "bf16-true" else torch.float32}
    # the metric sums stay fp32 (and the count int64) even where Lightning converts the module to bf16
    assert model.val_nll.total_log_probs.dtype == torch.float32 and model.val_nll.count.dtype == torch.int64


def fp32_val_ppl(model: CharLM, dm) -> float:
    """exp(mean token NLL) over the validation tail in fp32, state carried as validation carries it."""
    net = model.net.float()
    nll, count, state = 0.0, 0, None
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logits, state = net(x, state)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += int((y >= 0).sum())  # padding (PAD) is not a token
    return math.exp(nll / count)


@pytest.mark.parametrize(("precision", "rel"), [("bf16-mixed", 1e-3), ("bf16-true", 1e-2)])
def test_metrics_match_an_fp32_evaluation_of_the_same_weights(datamodule, precision, rel):
    trainer, model = fit(datamodule, "fused", 1, precision, train_batches=10, val_batches=1.0)
    val = float(trainer.callback_metrics["val/ppl"])
    test = float(trainer.test(model, dataloaders=datamodule.val_dataloader(), verbose=False)[0]["test/ppl"])
    want = fp32_val_ppl(model, datamodule)
    assert val == pytest.approx(want, rel=rel)
    assert test == pytest.approx(want, rel=rel)


@pytest.mark.parametrize("backend", ["c", "ops"])
def test_fused_recurrence_keeps_state_and_gates_in_fp32(backend):
    g = torch.Generator().manual_seed(0)
    T, B, H = 5, 3, 8
    gi, h0 = torch.randn(T, B, 3 * H, generator=g), torch.randn(B, H, generator=g).tanh()
    w_hh, b_hh = torch.randn(3 * H, H, generator=g) / 3, torch.randn(3 * H, generator=g) / 3
    # under autocast a bf16 input (what F.linear gives layer 2) is computed on in fp32, and comes out fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hs, h_T = gru_recurrence(gi.bfloat16(), h0, w_hh, b_hh, backend=backend)
    ref_hs, ref_h_T = gru_recurrence(gi.bfloat16().float(), h0, w_hh, b_hh, backend=backend)
    assert hs.dtype == h_T.dtype == torch.float32
    torch.testing.assert_close(hs, ref_hs, rtol=0, atol=0)
    torch.testing.assert_close(h_T, ref_h_T, rtol=0, atol=0)
    # bf16 weights without autocast (bf16-true): computed in fp32 from the bf16 values, returned as bf16
    low = [t.bfloat16() for t in (gi, h0, w_hh, b_hh)]
    hs, _ = gru_recurrence(*low, backend=backend)
    ref_hs, _ = gru_recurrence(*(t.float() for t in low), backend=backend)
    assert hs.dtype == torch.bfloat16
    torch.testing.assert_close(hs, ref_hs.bfloat16(), rtol=0, atol=0)
    # and gradients flow back in the inputs' dtypes
    gi_low = gi.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gru_recurrence(gi_low, h0, w_hh.requires_grad_(), b_hh, backend=backend)[0].sum().backward()
    assert gi_low.grad.dtype == torch.bfloat16 and w_hh.grad.dtype == torch.float32
    assert torch.isfinite(gi_low.grad.float()).all()


@pytest.mark.parametrize("name", ["scratch", "torch", "fused"])
def test_fp16_autocast_forward_and_backward(name):
    # what 16-mixed does on CUDA (on the CPU Lightning turns 16-mixed into bf16-mixed): fp16 autocast
    torch.manual_seed(0)
    model = CharLM(name, hidden_size=16, vocab=list("abcdefgh"), num_layers=1 if name == "scratch" else 2)
    X, Y = torch.randint(8, (4, 12)), torch.randint(8, (4, 12))
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = model._step((X, Y), carry=False)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(float(loss.detach()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.net.parameters())


def test_precision_is_a_trainer_key(make_cfg, tmp_path, corpus_path):
    assert make_cfg().trainer.precision == "32-true"
    cfg = make_cfg("model=fused", "model.num_layers=2", "trainer.precision=bf16-mixed", "logger=csv")
    summary = train(cfg)
    assert summary["status"] == "completed" and math.isfinite(summary["val_ppl"])
    assert json.loads((tmp_path / "summary.json").read_text())["val_ppl"] == summary["val_ppl"]
