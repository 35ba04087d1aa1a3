"""build_model's contract; fused equals nn.GRU and d2l's scratch cell in values and gradients."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from gruexp.models import MODEL_NAMES, FusedGRU, GRURecurrence, ScratchGRU, TorchGRU, build_model

V, H, B, T = 11, 8, 3, 6
VARIANTS = [
    ("scratch", 1, {}),
    ("torch", 1, {}),
    ("torch", 2, {}),
    ("fused", 1, {}),
    ("fused", 2, {}),
    ("fused", 2, {"reset_after": False}),
]


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def tokens(b: int = B, t: int = T) -> Tensor:
    return torch.randint(0, V, (b, t))


def test_model_names():
    assert MODEL_NAMES == ("scratch", "torch", "fused")


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match=re.escape("unknown model 'x': choose one of scratch, torch, fused")):
        build_model("x", vocab_size=V, hidden_size=H)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("option", ["vocab_size", "hidden_size", "num_layers"])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_sizes_are_rejected(name, option, value):
    kwargs = {"vocab_size": V, "hidden_size": H, "num_layers": 1, option: value}
    message = f"model.{option} must be a positive integer, got {value}"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(name, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, option",
    [
        ("scratch", {"num_layers": 2}, "model.num_layers"),
        ("scratch", {"dropout": 0.1}, "model.dropout"),
        ("scratch", {"reset_after": True}, "model.reset_after"),
        ("scratch", {"reset_after": False}, "model.reset_after"),
        ("torch", {"reset_after": False}, "model.reset_after"),
        ("torch", {"dropout": 0.1}, "model.dropout"),
        ("fused", {"dropout": 0.1}, "model.dropout"),
        ("fused", {"num_layers": 2, "dropout": 1.0}, "model.dropout"),
    ],
)
def test_options_that_do_not_apply_are_rejected(name, kwargs, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        build_model(name, vocab_size=V, hidden_size=H, **kwargs)


def test_applicable_options_are_accepted():
    assert isinstance(build_model("scratch", vocab_size=V, hidden_size=H), ScratchGRU)
    assert isinstance(build_model("torch", vocab_size=V, hidden_size=H, num_layers=2, dropout=0.5), TorchGRU)
    net = build_model("fused", vocab_size=V, hidden_size=H, num_layers=2, dropout=0.5, reset_after=False)
    assert isinstance(net, FusedGRU) and net.rnn.dropout == 0.5 and net.rnn.reset_after is False
    assert build_model("fused", vocab_size=V, hidden_size=H).rnn.reset_after is True


@pytest.mark.parametrize("name, L, kwargs", VARIANTS)
def test_shapes_attributes_and_state_carry(name, L, kwargs):
    net = build_model(name, vocab_size=V, hidden_size=H, num_layers=L, **kwargs)
    assert (net.vocab_size, net.hidden_size, net.num_layers) == (V, H, L)
    x = tokens()
    logits, state = net(x)
    assert logits.shape == (B, T, V) and state.shape == (L, B, H)
    # Running T steps at once equals running two halves with the state carried over.
    first, s = net(x[:, :2])
    second, s = net(x[:, 2:], s)
    torch.testing.assert_close(torch.cat((first, second), dim=1), logits)
    torch.testing.assert_close(s, state)
    # state None means zeros.
    torch.testing.assert_close(net(x, torch.zeros(L, B, H))[0], logits)


def run(net: torch.nn.Module, x: Tensor, h0: Tensor, w_logits: Tensor, w_state: Tensor):
    """Forward, and backward of a loss that weighs every logit and every final state entry differently."""
    net.zero_grad()
    h0 = h0.clone().requires_grad_()
    logits, state = net(x, h0)
    ((logits * w_logits).sum() + (state * w_state).sum()).backward()
    return logits, state, h0.grad


@pytest.mark.parametrize("backend", ["c", "ops", "cudnn"])  # cudnn: torch._VF.gru, which runs on the CPU too
@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("b, t", [(B, T), (1, 3)])  # more and fewer tokens than V: both ways of gathering
def test_fused_equals_torch_in_values_and_gradients(L, b, t, backend):
    torch_net, fused = TorchGRU(V, H, L), FusedGRU(V, H, L, backend=backend)
    fused.load_state_dict(torch_net.state_dict(), strict=True)
    assert fused.rnn.choose() == backend
    x, h0 = tokens(b, t), torch.randn(L, b, H)
    w_logits, w_state = torch.randn(b, t, V), torch.randn(L, b, H)
    expected, got = run(torch_net, x, h0, w_logits, w_state), run(fused, x, h0, w_logits, w_state)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    fused_params = dict(fused.named_parameters())
    for key, p in torch_net.named_parameters():
        torch.testing.assert_close(fused_params[key].grad, p.grad, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("L", [1, 2])
def test_state_dicts_are_interchangeable(L):
    torch_net, fused = TorchGRU(V, H, L), FusedGRU(V, H, L)
    a, b = torch_net.state_dict(), fused.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    torch_net.load_state_dict(b, strict=True)
    x = tokens()
    torch.testing.assert_close(torch_net(x)[0], fused(x)[0], atol=1e-5, rtol=1e-4)


def test_fused_initialises_like_nn_gru():
    fused = FusedGRU(V, 64, 2)
    bound = 64**-0.5
    for key, p in fused.rnn.named_parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, key


def test_fused_without_grad_matches_with_grad():
    for reset_after in (True, False):
        net, x, h0 = FusedGRU(V, H, 2, reset_after=reset_after), tokens(), torch.randn(2, B, H)
        logits, state = net(x, h0)
        with torch.no_grad():
            logits_ng, state_ng = net(x, h0)
        torch.testing.assert_close(logits_ng, logits.detach())
        torch.testing.assert_close(state_ng, state.detach())


def test_fused_dropout_acts_between_layers_in_training_only():
    torch_net, fused = TorchGRU(V, H, 2, dropout=0.5), FusedGRU(V, H, 2, dropout=0.5)
    fused.load_state_dict(torch_net.state_dict())
    x = tokens()
    torch_net.eval(), fused.eval()
    evaluated = fused(x)[0]
    torch.testing.assert_close(evaluated, torch_net(x)[0], atol=1e-5, rtol=1e-4)
    fused.train()
    assert not torch.allclose(fused(x)[0], evaluated)


def scratch_as_fused(scratch: ScratchGRU) -> FusedGRU:
    """A reset-before FusedGRU computing the same function as `scratch` (gates stacked r, z, n)."""
    fused = FusedGRU(V, H, reset_after=False)
    s = scratch
    with torch.no_grad():
        fused.rnn.weight_ih_l0.copy_(torch.cat((s.W_xr.T, s.W_xz.T, s.W_xh.T)))
        fused.rnn.weight_hh_l0.copy_(torch.cat((s.W_hr.T, s.W_hz.T, s.W_hh.T)))
        fused.rnn.bias_ih_l0.copy_(torch.cat((s.b_r, s.b_z, s.b_h)))
        fused.rnn.bias_hh_l0.zero_()
        fused.linear.weight.copy_(s.W_hq.T)
        fused.linear.bias.copy_(s.b_q)
    return fused


def test_fused_reset_before_equals_scratch_in_values_and_gradients():
    scratch = ScratchGRU(V, H)
    with torch.no_grad():  # d2l's 0.01-scale weights barely exercise the gates
        for p in scratch.parameters():
            p.normal_(0, 0.5)
    fused = scratch_as_fused(scratch)
    x, h0 = tokens(), torch.randn(1, B, H)
    w_logits, w_state = torch.randn(B, T, V), torch.randn(1, B, H)
    expected, got = run(scratch, x, h0, w_logits, w_state), run(fused, x, h0, w_logits, w_state)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    s, f = scratch, fused.rnn
    grads = {
        "weight_ih_l0": torch.cat((s.W_xr.grad.T, s.W_xz.grad.T, s.W_xh.grad.T)),
        "weight_hh_l0": torch.cat((s.W_hr.grad.T, s.W_hz.grad.T, s.W_hh.grad.T)),
        "bias_ih_l0": torch.cat((s.b_r.grad, s.b_z.grad, s.b_h.grad)),
        # b_hh adds to the same pre-activations as b_ih in the reset-before form: same gradient.
        "bias_hh_l0": torch.cat((s.b_r.grad, s.b_z.grad, s.b_h.grad)),
    }
    for key, expected_grad in grads.items():
        torch.testing.assert_close(getattr(f, key).grad, expected_grad, atol=1e-5, rtol=1e-4, msg=key)
    torch.testing.assert_close(fused.linear.weight.grad, s.W_hq.grad.T, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.linear.bias.grad, s.b_q.grad, atol=1e-5, rtol=1e-4)


def test_fused_reset_after_differs_from_reset_before():
    net, x = FusedGRU(V, H), tokens()
    before = FusedGRU(V, H, reset_after=False)
    before.load_state_dict(net.state_dict())
    assert not torch.allclose(net(x)[0], before(x)[0])


# the C loop computes the reset-after form only
@pytest.mark.parametrize("backend, reset_after", [("c", True), ("ops", True), ("ops", False)])
def test_recurrence_gradcheck(backend, reset_after):
    t, b, h = 4, 3, 5

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    inputs = (leaf(t, b, 3 * h), leaf(b, h), leaf(3 * h, h), leaf(3 * h))
    assert torch.autograd.gradcheck(lambda *a: GRURecurrence.apply(*a, None, reset_after, backend), inputs)


@pytest.mark.parametrize("name", ["scratch", "torch"])
def test_backend_is_refused_for_models_without_backends(name):
    with pytest.raises(ValueError, match=re.escape(f"model {name!r} has one implementation: backend='ops'")):
        build_model(name, vocab_size=V, hidden_size=H, backend="ops")
