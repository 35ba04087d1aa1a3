"""What the model tests compare between two implementations of one GRU (every output and every gradient), and
between two trainings (every weight, bit for bit)."""

from __future__ import annotations

import torch


def outputs_and_grads(net: torch.nn.Module, x: torch.Tensor, h0: torch.Tensor) -> list[torch.Tensor]:
    """logits, state and the gradients of h0 and every parameter, for a loss touching all outputs."""
    net.zero_grad()
    s = h0.clone().requires_grad_()
    logits, state = net(x, s)
    (logits.square().mean() + state.sum()).backward()
    return [logits, state, s.grad, *(p.grad.clone() for p in net.parameters())]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state dicts: the same entries, each torch.equal (the largest difference named where not)."""
    assert a.keys() == b.keys()
    differ = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, f"not bit-identical: {differ}"
