"""The GRU from scratch exactly as d2l 0.17 (section 9.1) writes it: one-hot inputs, a loop over time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gruexp.models.onehot import one_hot

PARAMETERS = ("W_xz", "W_hz", "b_z", "W_xr", "W_hr", "b_r", "W_xh", "W_hh", "b_h", "W_hq", "b_q")


def d2l_gru(p: dict[str, Tensor], tokens: Tensor, H: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """d2l's cell over tokens [..., B, T] from H [..., B, H]: logits [..., B, T, V] and the final H.

    The leading dimensions are trials (gruexp.models.stacked): weights [..., V, H] and biases [..., 1, H] make every
    product one batched matrix product for all of them. A single model has none.
    """
    X = one_hot(tokens.movedim(-1, 0), vocab_size, p["W_xz"].dtype)  # [T, ..., B, V]
    outputs = []
    for X_t in X:
        Z = torch.sigmoid((X_t @ p["W_xz"]) + (H @ p["W_hz"]) + p["b_z"])
        R = torch.sigmoid((X_t @ p["W_xr"]) + (H @ p["W_hr"]) + p["b_r"])
        H_tilda = torch.tanh((X_t @ p["W_xh"]) + ((R * H) @ p["W_hh"]) + p["b_h"])
        H = Z * H + (1 - Z) * H_tilda
        Y = H @ p["W_hq"] + p["b_q"]
        outputs.append(Y)
    return torch.stack(outputs, dim=-2), H


class ScratchGRU(nn.Module):
    """d2l's single-layer GRU language model (reset gate applied before W_hh), kept as the reference."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, 1
        V, H = vocab_size, hidden_size

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(shape) * 0.01)

        def zeros(n: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(n))

        self.W_xz, self.W_hz, self.b_z = normal(V, H), normal(H, H), zeros(H)  # update gate
        self.W_xr, self.W_hr, self.b_r = normal(V, H), normal(H, H), zeros(H)  # reset gate
        self.W_xh, self.W_hh, self.b_h = normal(V, H), normal(H, H), zeros(H)  # candidate hidden state
        self.W_hq, self.b_q = normal(H, V), zeros(V)  # output layer

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits [B, T, V] and the final state [1, B, H]; state None means zeros."""
        H = self.W_hz.new_zeros(tokens.shape[0], self.hidden_size) if state is None else state[0]
        logits, H = d2l_gru(self._parameters, tokens, H, self.vocab_size)
        return logits, H.unsqueeze(0)
