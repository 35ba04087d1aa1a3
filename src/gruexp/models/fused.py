"""Our own GRU: nn.GRU's parameters and math, with the recurrence as a hand-written autograd Function.

Only the recurrence h_{t-1} -> h_t is sequential. Layer 0's input projection is a lookup: a one-hot token picks a
row of the table W_ih^T + b_ih, which the loop reads by token id; later layers' is one GEMM before the loop, the
output layer one GEMM after it.

Three backends compute the same function, one file each (backends.py chooses; docs/fused-backends.md): the C loop
(gru_cpu.py, the CPU's default) and the torch-op loop (gru_ops.py, anywhere: the reference) run GRURecurrence with
one forward/backward signature; cuDNN (gru_cudnn.py, CUDA's default for reset-after) runs the whole stack.
`GRULayers(..., backend=None)` chooses per call; a backend's name forces it.

Gates are stacked r, z, n as in nn.GRU. reset_after=True is nn.GRU's (and cuDNN's) form,
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),
reset_after=False is d2l's, n = tanh(x W_in^T + b_in + (r * h) W_hn^T + b_hn), on the same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from gruexp.models import backends, gru_cpu, gru_cudnn, gru_ops
from gruexp.models.amp import fp32_recurrence

# the backends GRURecurrence runs: modules with forward(gi, h0, w_hh, b_hh, tokens, reset_after, save) and
# backward(dhs, dh_T, saved, reset_after, vocab_size, need_dh0)
LOOPS = {"c": gru_cpu, "ops": gru_ops}


def _loop(backend: str):
    """The module running the recurrence for `backend`; any other name is refused."""
    loop = LOOPS.get(backend) if isinstance(backend, str) else None
    if loop is None:
        where = " (cuDNN runs the whole stack: GRULayers(backend='cudnn'))" if backend == "cudnn" else ""
        raise ValueError(f"the recurrence runs on backend 'c' or 'ops', got {backend!r}{where}")
    return loop


class GRURecurrence(torch.autograd.Function):
    """(hs [T, B, H], h_T [B, H]) = the GRU recurrence from h0 [B, H] over gi = x W_ih^T + b_ih.

    gi is [T, B, 3H]; or, with tokens [T, B], the table [V, 3H] whose rows the tokens pick (layer 0: a one-hot x
    picks a row of W_ih^T + b_ih), and its gradient is then the table's. h_T is hs[-1] as an output of its own, so
    that its gradient arrives as [B, H] and not as a [T, B, H] tensor of zeros but for the last step. The
    backward is by hand. backend: "c" (the C loop; an error where it cannot run) or "ops" (the torch-op loop).
    """

    @staticmethod
    def forward(
        ctx,
        gi: Tensor,
        h0: Tensor,
        w_hh: Tensor,
        b_hh: Tensor,
        tokens: Tensor | None,
        reset_after: bool,
        backend: str,
    ) -> tuple[Tensor, Tensor]:
        loop = _loop(backend)
        hs, saved = loop.forward(gi, h0, w_hh, b_hh, tokens, reset_after, save=True)
        ctx.loop, ctx.reset_after, ctx.vocab_size = loop, reset_after, gi.shape[-2]  # the table's rows, or unused
        ctx.save_for_backward(*saved)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs: Tensor, dh_T: Tensor):
        saved = ctx.saved_tensors
        grads = ctx.loop.backward(dhs, dh_T, saved, ctx.reset_after, ctx.vocab_size, ctx.needs_input_grad[1])
        return *grads, None, None, None


@fp32_recurrence  # mixed precision: state and gates in fp32 (gruexp.models.amp, docs/precision.md)
def gru_recurrence(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    reset_after: bool = True,
    backend: str | None = None,
    tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(hs, h_T): GRURecurrence when a gradient is needed; otherwise the bare loop, which saves nothing.

    backend: "c" or "ops", as GRURecurrence; None: the C loop where backends.choose would run it, else the op loop.
    """
    if backend is None:
        backend = backends.choose(gi.device, w_hh.dtype, reset_after, gpu="ops")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (gi, h0, w_hh, b_hh)):
        return GRURecurrence.apply(gi, h0, w_hh, b_hh, tokens, reset_after, backend)
    hs = _loop(backend).forward(gi, h0, w_hh, b_hh, tokens, reset_after, save=False)[0]
    return hs, hs[-1]


class GRULayers(nn.Module):
    """A stack of GRU layers on token ids with nn.GRU's parameter names, shapes and initialisation.

    backend: None chooses per call (backends.choose, with the environment read here); "c", "ops" or "cudnn" forces
    that backend, and a call it cannot run fails saying why.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        reset_after: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.dropout, self.reset_after = dropout, reset_after
        self._backend = backends.check_forced(backend, reset_after)
        # the environment's choices, read once here (a bad value is refused now, and a step does not pay for it)
        self.cpu_choice, self.gpu_choice = backends.cpu_choice(), backends.gpu_choice()
        H = hidden_size
        self.layer_names = []
        for k in range(num_layers):
            names = (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}")
            shapes = ((3 * H, vocab_size if k == 0 else H), (3 * H, H), (3 * H,), (3 * H,))
            for name, shape in zip(names, shapes, strict=True):
                setattr(self, name, nn.Parameter(torch.empty(shape)))
            self.layer_names.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ±1/sqrt(H), as nn.GRU."""
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @property
    def backend(self) -> str | None:
        """The backend forced at construction, or None where it is chosen per call."""
        return self._backend

    def _params(self) -> list[Tensor]:
        # from _parameters, not the Module's slower getattr: generation calls the model once per token
        return [self._parameters[name] for names in self.layer_names for name in names]

    def _apply(self, fn, recurse=True):
        """After .to(device) or .half(): on CUDA, put the weights in one flat buffer again, as nn.GRU does."""
        ret = super()._apply(fn, recurse)
        gru_cudnn.flatten_parameters(self._params(), self.hidden_size, self.num_layers)
        return ret

    def choose(self) -> str:
        """The backend the next call runs: the forced one (or a UserError where it cannot run on these parameters),
        else backends.choose with the environment's choices as the model was built."""
        w = self.weight_hh_l0
        return backends.choose(
            w.device, w.dtype, self.reset_after, cpu=self.cpu_choice, gpu=self.gpu_choice, forced=self._backend
        )

    def forward(self, tokens: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [T, B] -> the last layer's hs [T, B, H] and every layer's final state [num_layers, B, H]."""
        backend = self.choose()
        if h0 is None:
            h0 = self.weight_hh_l0.new_zeros(self.num_layers, tokens.shape[1], self.hidden_size)
        if backend == "cudnn":
            return gru_cudnn.forward(self._params(), tokens, h0, self.num_layers, self.dropout, self.training)
        x, h_n = tokens, []
        for k, names in enumerate(self.layer_names):
            w_ih, w_hh, b_ih, b_hh = (getattr(self, name) for name in names)
            ids = None
            if k == 0 and x.numel() > w_ih.shape[1]:
                # one_hot(x) W_ih^T + b_ih is row x of the table W_ih^T + b_ih: the recurrence reads its rows
                gi, ids = (w_ih.t() + b_ih).contiguous(), x.contiguous()
            elif k == 0:  # a few tokens (generation): gather them from the transposed view, no table
                gi = F.embedding(x, w_ih.t()) + b_ih
            else:
                gi = F.linear(F.dropout(x, self.dropout, self.training), w_ih, b_ih)
            x, h_T = gru_recurrence(gi, h0[k], w_hh, b_hh, self.reset_after, backend, ids)
            h_n.append(h_T)
        return x, torch.stack(h_n)


class FusedGRU(nn.Module):
    """GRU language model on GRULayers; its state_dict is interchangeable with TorchGRU's. backend: as GRULayers."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        reset_after: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.rnn = GRULayers(vocab_size, hidden_size, num_layers, dropout, reset_after, backend)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits [B, T, V] and final state [num_layers, B, H]; state None means zeros."""
        hs, state = self.rnn(tokens.T, state)
        return self.linear(hs).transpose(0, 1), state  # the output layer on [T, B, H] as it lies: no copy
