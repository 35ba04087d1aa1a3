"""The fused GRU's Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).

Held against an independent float64 reference (the GRU formulas with autograd's gradients) and against the op loop,
in both forms, at shapes that leave partial tiles (B, H not multiples of 16 and 32), T = 1, B = 1, the token table,
1 and 2 layers, and float32 and bfloat16 inputs (which the kernels upcast after each load). Small shapes: the
interpreter runs each program's loop in Python.
"""

from __future__ import annotations

import pytest
import torch
from conftest import outputs_and_grads

pytest.importorskip("triton")  # the kernels' tests; the package is in the dev extra (Linux)
import torch.nn.functional as F
from torch import Tensor

from gruexp.models import build_model, gru_triton
from gruexp.models.backends import triton_interpreted
from gruexp.models.fused import GRURecurrence

pytestmark = pytest.mark.skipif(not triton_interpreted(), reason="runs Triton's interpreter: set TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def reference(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None, reset_after: bool):
    """hs and h_T from the textbook formulas, step by step in autograd: nothing shared with the kernels."""
    x = gi if tokens is None else F.embedding(tokens, gi)
    H = h0.shape[-1]
    h, hs = h0, []
    for t in range(x.shape[0]):
        x_r, x_z, x_n = x[t].split(H, dim=-1)
        w_r, w_z, w_n = w_hh.split(H)
        b_r, b_z, b_n = b_hh.split(H)
        r = torch.sigmoid(x_r + h @ w_r.T + b_r)
        z = torch.sigmoid(x_z + h @ w_z.T + b_z)
        if reset_after:
            n = torch.tanh(x_n + r * (h @ w_n.T + b_n))
        else:
            n = torch.tanh(x_n + (r * h) @ w_n.T + b_n)
        h = (1 - z) * n + z * h
        hs.append(h)
    return torch.stack(hs), h


def inputs(T: int, B: int, H: int, V: int | None, dtype: torch.dtype) -> list:
    """gi [T, B, 3H] (or, with V, a table [V, 3H]), h0, W_hh (nn.GRU's scale), b_hh, tokens or None."""
    gi = torch.randn(V, 3 * H) if V else torch.randn(T, B, 3 * H)
    w_hh = torch.randn(3 * H, H) / H**0.5
    leaves = [t.to(dtype) for t in (gi, torch.randn(B, H), w_hh, torch.randn(3 * H))]
    return [*leaves, torch.randint(0, V, (T, B)) if V else None]


def values_and_grads(fn, args: list, reset_after: bool, dtype: torch.dtype | None = None) -> list[Tensor]:
    """hs, h_T and the gradients of gi (or the table), h0, W_hh, b_hh of a loss weighing every output differently;
    with dtype, the float inputs are cast to it first (float64: the reference's precision)."""
    *floats, tokens = args
    leaves = [(x.to(dtype) if dtype else x.clone()).requires_grad_() for x in floats]
    hs, h_T = fn(*leaves, tokens, reset_after)
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(hs.shape, generator=g), torch.randn(h_T.shape, generator=g)
    ((hs.double() * w1).sum() + (h_T.double() * w2).sum()).backward()
    return [hs.detach(), h_T.detach(), *(x.grad for x in leaves)]


def triton_apply(*args):
    return GRURecurrence.apply(*args, "triton")


def ops_apply(*args):
    return GRURecurrence.apply(*args, "ops")


NAMES = ["hs", "h_T", "d gi", "d h0", "d W_hh", "d b_hh"]
# (T, B, H, V): partial batch tiles (B 3, 17) and hidden tiles (H 20, 40: one and two 32-unit tiles, the second
# partial), T = 1, B = 1, and the token table (V) as layer 0 reads it.
SHAPES = [(5, 3, 20, None), (4, 17, 40, None), (3, 5, 24, 7), (1, 2, 16, None), (4, 1, 8, 5)]


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset-after", "reset-before"])
@pytest.mark.parametrize("T, B, H, V", SHAPES)
def test_kernels_equal_fp64_reference_and_op_loop(T, B, H, V, reset_after):
    args = inputs(T, B, H, V, torch.float32)
    expected = values_and_grads(reference, args, reset_after, torch.float64)
    got = values_and_grads(triton_apply, args, reset_after)
    op_loop = values_and_grads(ops_apply, args, reset_after)
    for name, e, g, o in zip(NAMES, expected, got, op_loop, strict=True):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(g, o, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset-after", "reset-before"])
@pytest.mark.parametrize("V", [None, 6], ids=["dense", "table"])
def test_bf16_inputs_are_upcast_and_computed_in_float32(V, reset_after):
    """bf16 in, float32 arithmetic inside (the kernels upcast each load): equal to the fp64 reference run on the
    same bf16 values to fp32 rounding, far closer than bf16 arithmetic could be; outputs and grads come back bf16."""
    args = inputs(4, 5, 20, V, torch.bfloat16)
    expected = values_and_grads(reference, args, reset_after, torch.float64)
    got = values_and_grads(triton_apply, args, reset_after)
    HS, _ = gru_triton.forward(*args[:4], args[4], reset_after)  # the kernels' own float32 state, before the cast
    torch.testing.assert_close(HS[1:].double(), expected[0], atol=2e-6, rtol=1e-5)
    for name, e, g in zip(NAMES, expected, got, strict=True):
        assert g.dtype == torch.bfloat16, name
        torch.testing.assert_close(g.double(), e, atol=1e-2, rtol=1e-2, msg=name)  # bf16's 8 bits, rounded once


def test_token_ids_outside_the_table_are_refused():
    gi, h0, w_hh, b_hh, tokens = inputs(2, 3, 16, 5, torch.float32)
    with pytest.raises(IndexError, match=r"token ids must lie in \[0, 5\)"):
        GRURecurrence.apply(gi, h0, w_hh, b_hh, tokens + 5, True, "triton")


@pytest.mark.parametrize(
    "num_layers, reset_after",
    [(1, True), (2, True), (1, False), (2, False)],
    ids=["1-after", "2-after", "1-before", "2-before"],
)
def test_gruexp_fused_cpu_triton_runs_the_model_on_the_kernels(monkeypatch, num_layers, reset_after):
    """GRUEXP_FUSED_CPU=triton: FusedGRU's logits, state and every parameter's gradient equal the op loop's."""
    V, H, B, T = 9, 20, 3, 4
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "triton")
    net = build_model("fused", V, H, num_layers=num_layers, reset_after=reset_after)
    assert net.rnn.choose(torch.zeros(T, B, dtype=torch.long), None, True) == "triton"
    x, h0 = torch.randint(0, V, (B, T)), torch.randn(num_layers, B, H)
    outs = []
    for backend in (None, "ops"):  # None: the environment's choice
        net.rnn.backend = backend
        outs.append(outputs_and_grads(net, x, h0))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_generation_path_without_grad_runs_the_kernels(monkeypatch):
    """Inference (no grad, T = 1, B = 1, tokens gathered without the table) through the kernels equals the op loop."""
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "triton")
    net = build_model("fused", 9, 20, num_layers=2, reset_after=False).eval()
    x = torch.tensor([[3]])
    with torch.no_grad():
        a = net(x)
        net.rnn.backend = "ops"
        b = net(x)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=1e-6, rtol=1e-5)


def test_the_tile_chooser_only_picks_configurations_the_compile_check_covers():
    for B in (1, 15, 16, 17, 32, 128, 4096):
        for H in (1, 16, 31, 256, 1024):
            assert gru_triton.tile_config(B, H) in gru_triton.CONFIGS
