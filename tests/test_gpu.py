"""On a CUDA device: fused equals cuDNN's nn.GRU in values and gradients, and a short training run works.

Skipped where there is no GPU (CI has none); run them on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from gruexp.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_fused_matches_cudnn_gru(num_layers):
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    V, H, B, T = 28, 64, 8, 12
    ref = build_model("torch", V, H, num_layers=num_layers).cuda()
    net = build_model("fused", V, H, num_layers=num_layers).cuda()
    net.load_state_dict(ref.state_dict())
    x = torch.randint(0, V, (B, T), device="cuda")
    h0 = torch.randn(num_layers, B, H, device="cuda")
    outs = []
    for m in (ref, net):
        s = h0.clone().requires_grad_()
        logits, state = m(x, s)
        (logits.square().mean() + state.sum()).backward()
        outs.append((logits, state, s.grad, {k: p.grad for k, p in m.named_parameters()}))
    (la, sa, ga, pa), (lb, sb, gb, pb) = outs
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sb, sa, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], atol=1e-5, rtol=1e-4, msg=k)


def test_train_on_gpu(make_cfg, tmp_path, corpus_path):
    from gruexp.train import train

    summary = train(make_cfg("model=fused", "trainer.accelerator=gpu", "trainer.devices=1", "logger=csv"))
    assert summary["status"] == "completed" and 1 < summary["val_ppl"] < 28


@pytest.mark.parametrize("num_layers", [1, 2])
def test_stacked_fused_trials_on_the_batched_op_loop_match_each_alone_on_cudnn(num_layers):
    """A stack's fused trials on CUDA run the op loop batched over trials; each trial's logits, state and
    gradients are its own net's (cuDNN, as a lone run on a GPU), to cuDNN's rounding."""
    from gruexp.models.stacked import batchable, forward_all

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    V, H, B, T, S = 28, 64, 8, 12, 3
    nets = [build_model("fused", V, H, num_layers=num_layers).cuda() for _ in range(S)]
    tokens = [torch.randint(0, V, (B, T), device="cuda") for _ in range(S)]
    states = [None, torch.randn(num_layers, B, H, device="cuda"), None]
    assert batchable(nets, tokens) == "ops"
    together = forward_all(nets, tokens, states)
    torch.autograd.backward([logits.square().mean() for logits, _ in together])
    grads = [[p.grad.clone() for p in net.parameters()] for net in nets]
    for i, net in enumerate(nets):
        net.zero_grad()
        logits, state = net(tokens[i], states[i])
        logits.square().mean().backward()
        torch.testing.assert_close(together[i][0], logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(together[i][1], state, atol=1e-5, rtol=1e-4)
        for p, g in zip(net.parameters(), grads[i], strict=True):
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
