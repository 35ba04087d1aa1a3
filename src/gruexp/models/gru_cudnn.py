"""The fused GRU on cuDNN: torch._VF.gru, nn.GRU's own function, run on fused's parameters (reset-after only).

Unlike the C and op loops, which run one layer's recurrence inside fused.GRURecurrence with a hand-written backward,
cuDNN runs the whole stack, input projections included, and autograd differentiates it as it does nn.GRU. It is
what nn.GRU calls, so fused is never slower than `model=torch` on a GPU; `_VF.gru` also runs on the CPU (ATen's own
loop), which is how the tests hold it against the other backends without a GPU.
"""

from __future__ import annotations

import torch
from torch import _VF, Tensor

from gruexp.models.onehot import one_hot


def forward(
    params: list[Tensor], tokens: Tensor, h0: Tensor, num_layers: int, dropout: float, training: bool
) -> tuple[Tensor, Tensor]:
    """tokens [T, B] -> the last layer's hs [T, B, H] and every layer's final state [num_layers, B, H].

    params are nn.GRU's (weight_ih, weight_hh, bias_ih, bias_hh per layer, in order); the call runs one-hot tokens
    in the parameters' dtype whatever autocast says (no silent fp16/bf16 recurrence: the recurrence is fp32).
    """
    w = params[0]
    x = one_hot(tokens, w.shape[1], w.dtype)
    args = (x, h0.to(w.dtype), params, True, num_layers, dropout, training, False, False)
    # Generation calls this once per token: the autocast context is entered only under autocast.
    if not torch.is_autocast_enabled(w.device.type):
        return _VF.gru(*args)
    with torch.autocast(w.device.type, enabled=False):
        return _VF.gru(*args)


def flatten_parameters(params: list[Tensor], hidden_size: int, num_layers: int) -> None:
    """Make the parameters views of one buffer in cuDNN's layout (nn.RNNBase.flatten_parameters, on fused's
    parameters): otherwise cuDNN copies them together on every call, with a warning. A no-op off CUDA."""
    w = params[0]
    if not (w.is_cuda and torch.backends.cudnn.is_acceptable(w) and torch._use_cudnn_rnn_flatten_weight()):
        return
    if len({p.dtype for p in params}) > 1 or len({p.data_ptr() for p in params}) < len(params):
        return
    import torch.backends.cudnn.rnn as rnn

    with torch.cuda.device_of(w), torch.no_grad():
        mode = rnn.get_cudnn_mode("GRU")
        torch._cudnn_rnn_flatten_weight(params, 4, w.shape[1], mode, hidden_size, 0, num_layers, False, False)
