"""The fused GRU's backends side by side: the chooser's rule, the environment's switches, the `backend=` argument,
what really runs where the C loop cannot, and cuDNN's function on fused's parameters (torch._VF.gru runs on the
CPU too). The GPU tests at the end (`pytest -m gpu`) hold each backend against float64 on CUDA.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import outputs_and_grads

from gruexp import UserError
from gruexp.models import FusedGRU, GRURecurrence, build_model, choose_backend, gru_cpu, gru_ops
from gruexp.models.backends import choose

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
F32, F64, BF16, I64 = torch.float32, torch.float64, torch.bfloat16, torch.int64
V, H, B, T = 11, 24, 5, 7


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "device, dtype, reset_after, env, expected",
    [
        (CPU, F32, True, {}, "c"),
        (CPU, F64, True, {}, "c"),
        (CPU, BF16, True, {}, "c"),  # a bf16 recurrence runs upcast to float32 (amp.fp32_recurrence)
        (CPU, I64, True, {}, "ops"),  # the C loop computes in float32 or float64
        (CPU, F32, False, {}, "ops"),  # the C loop is reset-after only
        (CPU, F32, True, {"cpu": "ops"}, "ops"),
        (CPU, F32, True, {"c_loadable": False}, "ops"),  # no C compiler here
        (CPU, F32, True, {"gpu": "cudnn"}, "c"),  # GRUEXP_FUSED_GPU is for CUDA only
        (CPU, F32, True, {"gpu": "ops"}, "c"),
        (CUDA, F32, True, {}, "cudnn"),
        (CUDA, F64, True, {}, "cudnn"),
        (CUDA, BF16, True, {}, "cudnn"),
        (CUDA, F32, False, {}, "ops"),  # cuDNN has no reset-before form
        (CUDA, F32, True, {"gpu": "cudnn"}, "cudnn"),
        (CUDA, F32, False, {"gpu": "cudnn"}, "ops"),
        (CUDA, F32, True, {"gpu": "ops"}, "ops"),
        (CUDA, F32, True, {"cpu": "ops"}, "cudnn"),  # GRUEXP_FUSED_CPU is for the CPU only
        (CUDA, F32, True, {"cpu": "c"}, "cudnn"),  # never the C loop off the CPU
        (MPS, F32, True, {}, "ops"),
    ],
)
def test_choose_backend(device, dtype, reset_after, env, expected):
    assert choose_backend(device, dtype, reset_after, **env) == expected


def test_a_bad_gruexp_fused_gpu_is_refused_at_model_build_in_one_line(monkeypatch):
    monkeypatch.setenv("GRUEXP_FUSED_GPU", "triton")
    with pytest.raises(UserError, match="^GRUEXP_FUSED_GPU must be one of auto, cudnn, ops, got 'triton'$"):
        build_model("fused", 28, 8)


def test_a_bad_gruexp_fused_cpu_is_refused_at_model_build_in_one_line(monkeypatch):
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "triton")
    message = "^GRUEXP_FUSED_CPU must be 'c' \\(the C loop\\) or 'ops' \\(the torch-op loop\\), got 'triton'$"
    with pytest.raises(UserError, match=message):
        build_model("fused", 28, 8)


@pytest.mark.parametrize("backend", [True, False, "triton", "auto", ""])
def test_unknown_backend_names_are_refused_at_construction(backend):
    with pytest.raises(
        UserError, match=re.escape(f"backend must be one of c, ops, cudnn (or None: chosen per call), got {backend!r}")
    ):
        build_model("fused", V, H, backend=backend)


@pytest.mark.parametrize("backend", ["c", "cudnn"])
def test_a_reset_after_backend_is_refused_for_reset_before_at_construction(backend):
    with pytest.raises(UserError, match=f"^backend='{backend}' computes the reset-after form only"):
        FusedGRU(V, H, reset_after=False, backend=backend)


@pytest.mark.parametrize("backend", [True, "cudnn", "triton"])
def test_the_recurrence_runs_only_the_loops(backend):
    gi, h0, w_hh, b_hh = torch.randn(T, B, 3 * H), torch.randn(B, H), torch.randn(3 * H, H), torch.randn(3 * H)
    with pytest.raises(ValueError, match=re.escape(f"the recurrence runs on backend 'c' or 'ops', got {backend!r}")):
        GRURecurrence.apply(gi, h0, w_hh, b_hh, None, True, backend)


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """The loops that really run a recurrence, in call order: gru_cpu.forward and gru_ops.forward, recorded."""
    calls: list[str] = []
    for name, module in (("c", gru_cpu), ("ops", gru_ops)):

        def spy(*args, _forward=module.forward, _name=name, **kwargs):
            calls.append(_name)
            return _forward(*args, **kwargs)

        monkeypatch.setattr(module, "forward", spy)
    return calls


def train_step(net: torch.nn.Module) -> None:
    logits, state = net(torch.randint(0, V, (B, T)))
    (logits.sum() + state.sum()).backward()


@pytest.mark.parametrize("num_layers", [1, 2])
def test_the_chooser_says_what_runs_c_where_it_can(ran, num_layers):
    net = FusedGRU(V, H, num_layers)
    assert net.rnn.choose() == "c"
    train_step(net)
    assert ran == ["c"] * num_layers


def test_the_chooser_says_ops_for_reset_before_on_the_cpu_and_the_op_loop_runs(ran):
    net = FusedGRU(V, H, 2, reset_after=False)
    assert net.rnn.choose() == "ops"
    train_step(net)
    assert ran == ["ops", "ops"]


def test_the_chooser_says_ops_without_a_c_loop_and_the_op_loop_runs(ran, monkeypatch):
    monkeypatch.setattr(gru_cpu, "load", lambda: None)
    net = FusedGRU(V, H, 2)
    assert net.rnn.choose() == "ops"
    train_step(net)
    assert ran == ["ops", "ops"]


def test_gruexp_fused_cpu_ops_runs_the_op_loop(ran, monkeypatch):
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "ops")
    net = FusedGRU(V, H)
    assert net.rnn.choose() == "ops"
    train_step(net)
    assert ran == ["ops"]


def test_a_forced_backend_runs_whatever_the_environment_says(ran, monkeypatch):
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "ops")
    net = FusedGRU(V, H, backend="c")
    assert net.rnn.backend == net.rnn.choose() == "c"
    train_step(net)
    assert ran == ["c"]


def test_forcing_c_where_it_cannot_be_built_is_an_error_not_a_fallback(ran, monkeypatch):
    monkeypatch.setattr(gru_cpu, "load", lambda: None)
    net = FusedGRU(V, H, backend="c")
    message = "fused GRU: backend='c' cannot run here: the C loop could not be built on this machine"
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        train_step(net)
    with pytest.raises(RuntimeError, match="the C loop could not be built"):  # the recurrence on its own too
        GRURecurrence.apply(torch.randn(T, B, 3 * H), torch.randn(B, H), torch.randn(3 * H, H), torch.randn(3 * H),
                            None, True, "c")  # fmt: skip
    assert ran == ["c"]


def test_forcing_c_off_the_cpu_is_an_error():
    with pytest.raises(UserError, match="^fused GRU: backend='c' cannot run here: the C loop runs on the CPU"):
        choose(CUDA, F32, True, forced="c")


def test_the_backend_is_fixed_at_construction():
    net = FusedGRU(V, H)
    with pytest.raises(AttributeError):
        net.rnn.backend = "ops"


@pytest.mark.parametrize("backend", ["c", "ops", "cudnn"])
def test_an_empty_batch_runs_on_every_backend(backend):
    net = FusedGRU(V, H, 2, backend=backend)
    logits, state = net(torch.zeros(0, T, dtype=torch.long))
    assert logits.shape == (0, T, V) and state.shape == (2, 0, H)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_cudnn_backend_equals_fused_and_nn_gru_on_the_same_state_dict(num_layers):
    """_VF.gru on fused's own parameters: fused's C loop, its op loop and nn.GRU (same state_dict) to 1e-6."""
    nets = {b: build_model("fused", V, H, num_layers=num_layers, backend=b) for b in ("cudnn", "c", "ops")}
    ref = build_model("torch", V, H, num_layers=num_layers)
    for net in nets.values():
        net.load_state_dict(ref.state_dict())
    x, h0 = torch.randint(0, V, (B, T)), torch.randn(num_layers, B, H)
    got = outputs_and_grads(nets["cudnn"], x, h0)
    for other in (nets["c"], nets["ops"], ref):
        for a, b in zip(got, outputs_and_grads(other, x, h0), strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


# On a CUDA device. Tolerances: TF32 off (torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False) and
# float32 against float64: atol 2e-5, rtol 1e-4. With TF32 on: atol = rtol = 2e-2.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GV, GH, GB, GT = 28, 48, 19, 9


@pytest.fixture
def tf32(request):
    on = getattr(request, "param", False)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    yield on
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


CASES = [
    ("cudnn", True, 1),
    ("cudnn", True, 2),
    ("ops", True, 1),
    ("ops", True, 2),
    ("ops", False, 1),
    ("ops", False, 2),
]
CASES += [(None, True, 2), (None, False, 2)]  # chosen: cuDNN for reset-after, the op loop for reset-before


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tf32", [False, True], indirect=True, ids=["ieee", "tf32"])
@pytest.mark.parametrize("backend, reset_after, num_layers", CASES)
def test_gpu_backend_matches_float64_reference(backend, reset_after, num_layers, tf32):
    ref = build_model("fused", GV, GH, num_layers=num_layers, reset_after=reset_after, backend="ops").double()
    net = build_model("fused", GV, GH, num_layers=num_layers, reset_after=reset_after, backend=backend).cuda()
    net.load_state_dict(ref.state_dict())
    assert net.rnn.choose() == (backend or ("cudnn" if reset_after else "ops"))
    x, h0 = torch.randint(0, GV, (GB, GT)), torch.randn(num_layers, GB, GH)
    expected = outputs_and_grads(ref, x, h0.double())
    got = outputs_and_grads(net, x.cuda(), h0.cuda())
    tol = dict(atol=2e-2, rtol=2e-2) if tf32 else dict(atol=2e-5, rtol=1e-4)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g.double().cpu(), e, **tol, msg=f"tensor {i}")


@pytest.mark.gpu
@needs_cuda
def test_cudnn_backend_keeps_float32_under_bf16_autocast_and_flat_weights(tf32):
    net = build_model("fused", GV, GH, num_layers=2, backend="cudnn").cuda()
    x = torch.randint(0, GV, (GT, GB), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN warns when the weights are not one contiguous chunk
        expected, _ = net.rnn(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, _ = net.rnn(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
