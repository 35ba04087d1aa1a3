"""The three GRU language models behind one constructor: net(tokens [B, T], state) -> (logits, state)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gruexp import UserError
from gruexp.models.backends import choose_backend
from gruexp.models.fused import FusedGRU, GRULayers, GRURecurrence, gru_recurrence
from gruexp.models.scratch import ScratchGRU
from gruexp.models.torch_gru import TorchGRU

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "net_options",
    "forward_flops_per_token",
    "choose_backend",
    "ScratchGRU",
    "TorchGRU",
    "FusedGRU",
    "GRULayers",
    "GRURecurrence",
    "gru_recurrence",
]

MODEL_NAMES = ("scratch", "torch", "fused")


def net_options(hp: Mapping[str, Any]) -> dict[str, Any]:
    """build_model's arguments (but the vocabulary's size) from a model config, CharLM's hyper-parameters or a
    checkpoint's: the one mapping from a config to a model, for training, memory estimates and checkpoint checks.
    `scratch` takes no reset_after (d2l's cell is reset-before); the others' default is nn.GRU's reset-after."""
    name = hp["name"]
    options = {
        "name": name,
        "hidden_size": hp["hidden_size"],
        "num_layers": hp.get("num_layers", 1) or 1,
        "dropout": hp.get("dropout", 0.0) or 0.0,
    }
    if name != "scratch":
        options["reset_after"] = hp.get("reset_after", True) is not False
    return options


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a net's logits [B, T, V] against its targets [B, T], in fp32 whatever the precision (a no-op
    in fp32): bf16 logits would round the loss and the metrics. Padded targets (-100) are not scored."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction=reduction)


def forward_flops_per_token(vocab_size: int, hidden_size: int, num_layers: int = 1) -> int:
    """Forward FLOPs per token of the GRU language model; a training step costs 3x (backward at twice the forward).

    Each layer's three gates cost 2*3H*(in + H), with in = V (the one-hot input) for layer 0 and H above it; the
    output layer 2*H*V. The same for all three variants: they compute the same function (fused reads layer 0's
    product as a table row, which MFU still counts, as it counts the model's math).
    """
    H, V = hidden_size, vocab_size
    return 2 * 3 * H * (V + H) + (num_layers - 1) * 2 * 3 * H * (H + H) + 2 * H * V


def _check_positive(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"model.{option} must be a positive integer, got {value!r}")


def build_model(
    name: str,
    vocab_size: int,
    hidden_size: int,
    num_layers: int = 1,
    dropout: float = 0.0,
    reset_after: bool | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Build model `name`, rejecting options it does not have; reset_after None means the model's own form.
    backend forces one of fused's backends (backends.BACKENDS; None: chosen per call)."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    if backend is not None and name != "fused":
        raise UserError(f"model {name!r} has one implementation: backend={backend!r} is for 'fused' only")
    _check_positive("vocab_size", vocab_size)
    _check_positive("hidden_size", hidden_size)
    _check_positive("num_layers", num_layers)
    if not 0 <= dropout < 1:
        raise UserError(f"model.dropout must be in [0, 1), got {dropout!r}")
    if name == "scratch":
        if num_layers != 1:
            raise UserError(f"model 'scratch' is a single-layer GRU: model.num_layers must be 1, got {num_layers}")
        if dropout != 0:
            raise UserError(f"model 'scratch' has no dropout: model.dropout must be 0, got {dropout}")
        if reset_after is not None:
            raise UserError("model 'scratch' has no model.reset_after option: d2l's cell is reset-before")
        return ScratchGRU(vocab_size, hidden_size)
    if dropout != 0 and num_layers == 1:
        raise UserError(f"model.dropout acts between layers, so with model.num_layers=1 it must be 0, got {dropout}")
    if name == "torch":
        if reset_after is False:
            raise UserError("model 'torch' (nn.GRU) is reset-after only: model.reset_after=false needs 'fused'")
        return TorchGRU(vocab_size, hidden_size, num_layers, dropout)
    # GRULayers reads GRUEXP_FUSED_CPU and GRUEXP_FUSED_GPU: a bad value is refused here, before a run starts
    return FusedGRU(vocab_size, hidden_size, num_layers, dropout, reset_after is not False, backend)
