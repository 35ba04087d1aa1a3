"""The GRU language model on PyTorch's nn.GRU, as d2l's concise RNNModel (section 9.1.2): rnn + linear."""

from __future__ import annotations

from torch import Tensor, nn

from gruexp.models.onehot import one_hot


class TorchGRU(nn.Module):
    """nn.GRU fed one-hot tokens, then a linear layer to vocabulary logits; PyTorch's default init."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.rnn = nn.GRU(vocab_size, hidden_size, num_layers, dropout=dropout, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits [B, T, V] and final state [num_layers, B, H]; state None means zeros."""
        X = one_hot(tokens, self.vocab_size, self.linear.weight.dtype)  # [B, T, V]
        Y, state = self.rnn(X, state)
        return self.linear(Y), state
