"""One-hot tokens without a host read, so that a training step can be recorded as a CUDA graph (gruexp.graphs).

F.one_hot checks its ids' range with `.item()` on a CPU (min and max read back); scatter checks it in its kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def one_hot(tokens: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """F.one_hot(tokens, num_classes).to(dtype), the same values, with no host sync on any device."""
    out = torch.zeros(*tokens.shape, num_classes, dtype=dtype, device=tokens.device)
    return out.scatter_(-1, tokens.unsqueeze(-1), 1)
