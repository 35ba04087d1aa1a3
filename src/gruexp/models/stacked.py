"""Trials of one shape as one model: every trial keeps its own parameters; one forward serves all of them.

- scratch: d2l's cell on the trials' weights stacked along a leading trial dimension, so that each gate's product
  at each time step is one batched matrix product for all trials (the same code as ScratchGRU: d2l_gru).
- fused: the layers' input and output products batched over trials (bmm), and the recurrences
  - on the C loop side by side, a whole trial per thread (gru_cpu.forward_trials): no barrier per step, so small
    trials fill the cores that one small trial cannot;
  - elsewhere (on CUDA, where a lone run's would be cuDNN's or the op loop's) on the op loop batched over trials
    (gru_ops with a trial dimension): one step's few kernels serve every trial, where S trials one after another
    would launch S times as many. A backend forced to cuDNN (model.backend=cudnn) keeps each trial's own call.
  Both in fp32 under mixed precision, as a lone run's recurrence (gruexp.models.amp).
- torch, and fused in the reset-before form: each trial's own net in turn, into one autograd graph; nn.GRU has no
  trial dimension (and `aten::gru` no vmap batching rule, pytorch #134606).
Each trial's dropout draws from its own generators (`rng`), the masks of its lone run.

The trials' results are independent by construction: no operation mixes two trials, so one trial's NaN cannot
reach another's numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gruexp.models import gru_cpu
from gruexp.models.amp import fp32_recurrence
from gruexp.models.fused import FusedGRU, GRURecurrence
from gruexp.models.scratch import PARAMETERS, ScratchGRU, d2l_gru

Result = tuple[Tensor, Tensor]  # a net's (logits [B, T, V], state [layers, B, H])


def batchable(nets: Sequence[nn.Module], tokens: Sequence[Tensor]) -> str | None:
    """How the trials run as one batched model: "scratch", or fused's recurrences on the C loop ("c") or the op
    loop ("ops"); None for each net in turn. Batched: nets of one class and shape on batches of one shape."""
    first = nets[0]
    same = len(nets) > 1 and all(t.shape == tokens[0].shape for t in tokens)
    same = same and all(type(n) is type(first) for n in nets)
    shapes = [p.shape for p in first.parameters()]
    same = same and all([p.shape for p in n.parameters()] == shapes for n in nets)
    if not same:
        return None
    if type(first) is ScratchGRU:
        return "scratch"
    if type(first) is not FusedGRU or not first.rnn.reset_after:
        return None
    loops = {n.rnn.choose() for n in nets}
    if loops == {"c"}:
        return "c"
    if "c" not in loops and all(n.rnn.backend != "cudnn" for n in nets):
        return "ops"
    return None


def forward_all(
    nets: Sequence[nn.Module],
    tokens: Sequence[Tensor],
    states: Sequence[Tensor | None],
    rng: Callable[[int], object] | None = None,
) -> list[Result]:
    """Each net's (logits, state) on its tokens [B, T] from its state (None: zeros), in one autograd graph.

    `rng(i)`, where given, is a context manager making trial i's generators the current ones while its net runs.
    """
    kind = batchable(nets, tokens)
    if kind == "scratch":
        return _scratch(nets, tokens, states)
    if kind is not None:
        return _fused(nets, tokens, states, rng, kind)
    out = []
    for i, (net, x, state) in enumerate(zip(nets, tokens, states, strict=True)):
        if rng is None:
            out.append(net(x, state))
        else:
            with rng(i):
                out.append(net(x, state))
    return out


def _scratch(nets: Sequence[ScratchGRU], tokens: Sequence[Tensor], states: Sequence[Tensor | None]) -> list[Result]:
    """d2l_gru on the trials' stacked weights [N, ...] and biases [N, 1, H]: gradients flow back to each trial's."""
    p = {}
    for name in PARAMETERS:
        w = _stacked(nets, name)
        p[name] = w.unsqueeze(1) if name.startswith("b_") else w
    first = nets[0]
    zeros = first.W_hz.new_zeros(tokens[0].shape[0], first.hidden_size)
    H0 = torch.stack([s[0] if s is not None else zeros for s in states])
    logits, H = d2l_gru(p, torch.stack(list(tokens)), H0, first.vocab_size)
    # unbind, not logits[i]: the gradient of S selections would be S zero-filled [S, ...] tensors
    return list(zip(logits.unbind(0), H.unsqueeze(1).unbind(0), strict=True))


class TrialRecurrences(torch.autograd.Function):
    """fused.GRURecurrence on the C loop for S trials: gi (the tables [S, V, 3H] that tokens [S, T, B] index, or
    the projections [S, T, B, 3H]), h0 [S, B, H], W_hh [S, 3H, H], b_hh [S, 3H] -> hs [S, T, B, H], h_T [S, B, H]."""

    @staticmethod
    def forward(ctx, gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None):
        hs, saved = gru_cpu.forward_trials(gi, h0, w_hh, b_hh, tokens, save=True)
        ctx.vocab_size = gi.shape[1]
        ctx.save_for_backward(*saved)
        return hs, hs[:, -1].clone()

    @staticmethod
    def backward(ctx, dhs: Tensor, dh_T: Tensor):
        grads = gru_cpu.backward_trials(dhs, dh_T, ctx.saved_tensors, ctx.vocab_size, ctx.needs_input_grad[1])
        return *grads, None


def _stacked(modules: Sequence[nn.Module], name: str) -> Tensor:
    """Parameter `name` of each module along a leading trial dimension (the gradient flows back to each)."""
    return torch.stack([m._parameters[name] for m in modules])


@fp32_recurrence
def _recurrences(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None, loop: str) -> Result:
    """fused.gru_recurrence for S trials, the trial dimension leading: gi [S, T, B, 3H] (or the tables [S, V, 3H]
    that tokens [S, T, B] index), h0 [S, B, H], W_hh [S, 3H, H], b_hh [S, 3H] -> hs [S, T, B, H], h_T [S, B, H].
    The C loop takes them so; the op loop steps through time with the trials inside a step ([T, S, ...])."""
    if loop == "c":
        return TrialRecurrences.apply(gi, h0, w_hh, b_hh, tokens)
    if tokens is None:
        gi = gi.transpose(0, 1).contiguous()
    else:
        tokens = tokens.transpose(0, 1).contiguous()
    hs, h_T = GRURecurrence.apply(gi, h0, w_hh, b_hh, tokens, True, "ops")
    return hs.transpose(0, 1), h_T


def _fused(
    nets: Sequence[FusedGRU],
    tokens: Sequence[Tensor],
    states: Sequence[Tensor | None],
    rng: Callable[[int], object] | None,
    loop: str,
) -> list[Result]:
    """FusedGRU.forward for S trials, layer by layer as GRULayers does, with the trial dimension leading; the
    recurrences on `loop` ("c" or "ops")."""
    first = nets[0].rnn
    S, (B, T), L, H = len(nets), tokens[0].shape, first.num_layers, first.hidden_size
    ids = torch.stack(list(tokens)).transpose(1, 2).contiguous()  # [S, T, B]
    h0 = torch.stack([s if s is not None else first.weight_hh_l0.new_zeros(L, B, H) for s in states])
    rnns = [net.rnn for net in nets]
    x, h_n = None, []
    for k, names in enumerate(first.layer_names):
        w_ih, w_hh, b_ih, b_hh = (_stacked(rnns, name) for name in names)
        if k == 0:  # the tables W_ih^T + b_ih whose rows the tokens pick, as GRULayers
            table = (w_ih.transpose(1, 2) + b_ih[:, None]).contiguous()
            x, h_T = _recurrences(table, h0[:, k], w_hh, b_hh, ids, loop)
        else:
            x = _dropout(x, first.dropout, first.training, rng)
            gi = torch.baddbmm(b_ih[:, None], x.reshape(S, T * B, H), w_ih.transpose(1, 2)).view(S, T, B, 3 * H)
            x, h_T = _recurrences(gi, h0[:, k], w_hh, b_hh, None, loop)
        h_n.append(h_T)
    linears = [net.linear for net in nets]
    w, b = _stacked(linears, "weight"), _stacked(linears, "bias")
    logits = torch.baddbmm(b[:, None], x.reshape(S, T * B, H), w.transpose(1, 2)).view(S, T, B, -1).transpose(1, 2)
    state = torch.stack(h_n, dim=1)  # [S, L, B, H]
    return list(zip(logits.unbind(0), state.unbind(0), strict=True))


def _dropout(x: Tensor, p: float, training: bool, rng: Callable[[int], object] | None) -> Tensor:
    """F.dropout of each trial's x[i] with the mask its lone run draws: F.dropout is x * noise, noise drawn from
    the current generator in x's shape, so noise is F.dropout of ones drawn with trial i's generators."""
    if not training or p == 0:
        return x
    noise = []
    for i in range(x.shape[0]):
        with rng(i) if rng is not None else contextlib.nullcontext():
            noise.append(F.dropout(torch.ones_like(x[i]), p, True))
    return x * torch.stack(noise)
