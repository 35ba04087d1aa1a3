"""The recorded K-step body (gruexp.graphs) proven on a CPU: a make_fx trace taken once and replayed on later chunks
trains exactly as the eager body and as Lightning's own steps, and no host read hides inside it.

What a CUDA graph replays is what was recorded; what Python did at record time is not redone. A make_fx trace is
the same kind of recording (the ops, not the Python), so a body whose trace replays bit-identical to eager is one
whose capture replays right, and NoHostSync fails any op that would stall or could not be captured.
"""

from __future__ import annotations

import copy
import csv
import functools
import logging
import shutil

import lightning as L
import pytest
import torch
from helpers import assert_same_weights
from lightning.pytorch.loggers import CSVLogger

from gruexp import graphs
from gruexp.data.datamodule import CharDataModule
from gruexp.graphs import HostSync, KSteps, NoHostSync, Recorded
from gruexp.guards import DivergenceDetector, InterruptCheckpoint
from gruexp.models import build_model
from gruexp.module import CharLM
from gruexp.schedules import warmup_cosine

SGD = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9, weight_decay=1e-4)
ADAM = functools.partial(torch.optim.Adam, lr=0.01, weight_decay=1e-4)
V, H, B, T, K = 12, 16, 4, 8, 3

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on PATH: no C loop")


@pytest.fixture
def op_loop(monkeypatch):
    """fused on its torch-op loop: the CPU backend a trace can see (the C loop runs outside torch's ops)."""
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "ops")


def fit(
    name: str,
    optimizer,
    k: int,
    graph: bool,
    steps: int,
    num_layers: int = 1,
    logger=False,
    change_net=None,
    accelerator: str = "cpu",
    precision: str = "32-true",
):
    """A tiny CharLM trained `steps` optimizer steps (on a CPU unless told), k steps per call, recorded (graph) or
    eager; `change_net(net)` first, if given."""
    L.seed_everything(0, verbose=False)
    data = CharDataModule(batch_size=B, num_steps=T, max_tokens=600, steps_per_call=k)  # 18 batches an epoch
    dropout = {"dropout": 0.2} if num_layers > 1 else {}
    model = CharLM(
        name,
        H,
        data.vocab.idx_to_token,
        num_layers=num_layers,
        optimizer=optimizer,
        scheduler=functools.partial(warmup_cosine, warmup_steps=3),
        steps_per_call=k,
        cuda_graph=graph,
        gradient_clip_val=0.5 if k > 1 or graph else None,
        **dropout,
    )
    if change_net is not None:
        change_net(model.net)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        max_epochs=5,
        gradient_clip_val=None if k > 1 or graph else 0.5,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[DivergenceDetector(), InterruptCheckpoint()],
    )
    trainer.fit(model, data)
    assert trainer.global_step == steps
    return model


@pytest.mark.parametrize(
    ("name", "num_layers", "optimizer"),
    [("fused", 2, SGD), ("fused", 1, ADAM), ("torch", 2, ADAM), ("scratch", 1, SGD)],
    ids=["fused-2L-sgd", "fused-adam", "torch-2L-adam", "scratch-sgd"],
)
def test_replayed_steps_train_the_weights_of_lightnings_own_steps(op_loop, name, num_layers, optimizer):
    """cuda_graph's K = 4 (the trace replayed: SGD momentum and Adam, warmup+cosine, clipping, dropout, across an
    epoch's end and its short last chunk) leaves the weights of K = 1 through Lightning's automatic optimization."""
    graphed = fit(name, optimizer, 4, True, steps=30, num_layers=num_layers)
    assert isinstance(graphed.graph_steps, graphs.GraphSteps) and graphed.graph_steps.replays >= 3
    lightnings = fit(name, optimizer, 1, False, steps=30, num_layers=num_layers)
    assert_same_weights(graphed.state_dict(), lightnings.state_dict())


def test_replayed_steps_log_the_rows_of_eager_steps(op_loop, tmp_path):
    """train/loss and train/grad_norm reach metrics.csv at the same steps with the same values, replayed or not."""

    def rows(graph: bool) -> list[dict[str, str]]:
        logger = CSVLogger(tmp_path, name=str(graph), version=0)
        fit("fused", ADAM, 4, graph, steps=14, logger=logger)
        with open(tmp_path / str(graph) / "version_0" / "metrics.csv") as f:
            return [
                {k: v for k, v in r.items() if k in ("step", "epoch", "train/loss", "train/grad_norm")}
                for r in csv.DictReader(f)
            ]

    graphed = rows(True)
    assert [r["step"] for r in graphed if r["train/loss"]] == [str(s) for s in range(14)]
    assert graphed == rows(False)


def body_pair(name: str, optimizer, seed: int = 0):
    """Two identical nets with their optimizers, each past one eager step (which makes the optimizer's state)."""
    torch.manual_seed(seed)
    net = build_model(name=name, vocab_size=V, hidden_size=H)
    twin = copy.deepcopy(net)
    pairs = []
    for n in (net, twin):
        opt = optimizer(n.parameters())
        torch.manual_seed(seed)
        logits, _ = n(torch.randint(V, (B, T)))
        logits.sum().backward()
        opt.step()
        pairs.append((n, opt))
    return pairs


def chunks(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(V, (K, B, T), generator=g), torch.randint(V, (K, B, T), generator=g)) for _ in range(count)]


@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd", "adam"])
@pytest.mark.parametrize("name", ["scratch", "torch", "fused"])
def test_a_trace_taken_once_replays_later_chunks_as_the_eager_body(op_loop, name, optimizer):
    """Record the K-step body on chunk 0, replay it on chunks 1 and 2: weights, losses, norms and the carried state
    equal the eager body's on the same chunks, bit for bit, and the eager body reads nothing back to the host."""
    (net, opt), (twin, twin_opt) = body_pair(name, optimizer)
    state = torch.zeros(1, B, H)
    recorded = KSteps(net, opt, *chunks(1)[0], state, clip=0.5)
    eager = KSteps(twin, twin_opt, *chunks(1)[0], state, clip=0.5)
    trace = Recorded(recorded.run, recorded.tensors())
    for i, (X, Y) in enumerate(chunks(3)):
        lrs = [0.5 / (i * K + j + 1) for j in range(K)]  # a schedule: a new rate every step
        for body in (recorded, eager):
            body.fill(X, Y, None if i == 0 else body.h.clone(), lrs, first_step=i * K + 2)
        torch.manual_seed(i)
        trace.record() if i == 0 else trace.replay()
        torch.manual_seed(i)
        with NoHostSync():
            eager.run()
        assert_same_weights(net.state_dict(), twin.state_dict())
        for a, b in ((recorded.losses, eager.losses), (recorded.norms, eager.norms), (recorded.h, eager.h)):
            assert torch.equal(a, b)
    assert not torch.equal(recorded.losses, torch.zeros(K))


@needs_cc
def test_the_c_loop_cannot_be_recorded_and_trains_eagerly_with_one_line(monkeypatch, caplog):
    """fused's C loop runs in ctypes, outside torch's ops, and reads its ids back to check their range: a trace
    refuses it, so on a CPU cuda_graph trains it eagerly and says why, once."""
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "c")
    (net, opt), _ = body_pair("fused", SGD)
    body = KSteps(net, opt, *chunks(1)[0], torch.zeros(1, B, H))
    body.fill(*chunks(1)[0], None, [0.1] * K, first_step=2)
    with pytest.raises(RuntimeError, match="_local_scalar_dense"):
        Recorded(body.run, body.tensors()).record()

    with caplog.at_level(logging.WARNING, logger="gruexp.steps"):
        model = fit("fused", SGD, 4, True, steps=10)
    assert model.graph_steps is False
    lines = [r.getMessage() for r in caplog.records if "cuda_graph" in r.getMessage()]
    assert lines == [
        "cuda_graph: the C loop runs outside torch's ops, where a trace cannot see it (GRUEXP_FUSED_CPU=ops can be);"
        " training eagerly, 4 steps per call"
    ]


def item_in_forward(net: torch.nn.Module) -> None:
    """Make `net` read its first logit back to the host every forward (a backend that syncs)."""
    forward = net.forward

    def syncing(*args, **kwargs):
        logits, state = forward(*args, **kwargs)
        if logits[0, 0, 0].item() > 1e9:
            raise AssertionError("never")
        return logits, state

    net.forward = syncing


@pytest.mark.parametrize(
    ("optimizer", "sync", "reason"),
    [
        (functools.partial(torch.optim.Adam, lr=0.01, amsgrad=True), False, "only torch.optim.SGD and Adam"),
        (torch.optim.AdamW, False, "only torch.optim.SGD and Adam"),
        (SGD, True, "aten._local_scalar_dense.default reads a tensor back to the host"),
    ],
    ids=["amsgrad", "adamw", "item"],
)
def test_what_cannot_be_recorded_trains_eagerly_with_one_line(op_loop, caplog, optimizer, sync, reason):
    """An optimizer without a recordable update, or a body that reads a tensor back, falls back to eager K-step
    training (the weights of K = 4 without graphs) with one log line, never a crash or a replay gone wrong."""
    change_net = item_in_forward if sync else None
    with caplog.at_level(logging.WARNING, logger="gruexp.steps"):
        graphed = fit("torch", optimizer, 4, True, steps=10, change_net=change_net)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cuda_graph:")]
    assert len(lines) == 1 and reason in lines[0] and lines[0].endswith("; training eagerly, 4 steps per call")
    assert graphed.graph_steps is False
    eager = fit("torch", optimizer, 4, False, steps=10, change_net=change_net)
    assert_same_weights(graphed.state_dict(), eager.state_dict())


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum() > 0),
        lambda t: t.nonzero(),
        lambda t: t[t > 0],
        lambda t: t.unique(),
        lambda t: torch.empty(3, device="meta").cpu(),  # a copy from a device to the host
    ],
    ids=["item", "bool", "nonzero", "mask-index", "unique", "to-host"],
)
def test_no_host_sync_fails_every_kind_of_host_read(read):
    """Each way a step can read a tensor back to the host raises HostSync; device-side ops pass."""
    t = torch.randn(4)
    with NoHostSync():
        (t * 2 + 1).clamp(max=1.0).sum()
        with pytest.raises(HostSync, match="host"):
            read(t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(
    ("name", "backend"), [("scratch", None), ("torch", None), ("fused", "cudnn"), ("fused", "ops")], ids=str
)
def test_on_cuda_the_captured_graph_replays_and_trains_as_eager_steps(monkeypatch, name, backend, precision):
    """A CUDA graph captured once and replayed (no fallback) trains the weights of eager K = 4 to rounding: torch's
    eager optimizers run their foreach kernels on CUDA, the graph torch's single-tensor formulas."""
    if backend:
        monkeypatch.setenv("GRUEXP_FUSED_GPU", backend)
    runs = [fit(name, ADAM, 4, graph, steps=20, accelerator="gpu", precision=precision) for graph in (True, False)]
    assert isinstance(runs[0].graph_steps, graphs.GraphSteps) and runs[0].graph_steps.replays >= 2
    assert runs[0].graph_steps.recorded.cuda and runs[0].graph_steps.recorded.failed is None
    eager = runs[1].state_dict()
    for key, value in runs[0].state_dict().items():
        torch.testing.assert_close(value, eager[key], rtol=1e-3, atol=1e-4, msg=key)
