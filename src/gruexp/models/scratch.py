"""The GRU from scratch exactly as d2l 0.17 (section 9.1) writes it: one-hot inputs, a loop over time."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gruexp.models.onehot import one_hot


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
        X = one_hot(tokens.T, self.vocab_size, self.W_xz.dtype)  # [T, B, V]
        H = self.W_hz.new_zeros(tokens.shape[0], self.hidden_size) if state is None else state[0]
        outputs = []
        for X_t in X:
            Z = torch.sigmoid((X_t @ self.W_xz) + (H @ self.W_hz) + self.b_z)
            R = torch.sigmoid((X_t @ self.W_xr) + (H @ self.W_hr) + self.b_r)
            H_tilda = torch.tanh((X_t @ self.W_xh) + ((R * H) @ self.W_hh) + self.b_h)
            H = Z * H + (1 - Z) * H_tilda
            Y = H @ self.W_hq + self.b_q
            outputs.append(Y)
        return torch.stack(outputs, dim=1), H.unsqueeze(0)
