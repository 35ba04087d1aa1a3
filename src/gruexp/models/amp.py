"""Mixed precision for the fused recurrence: state and gate arithmetic in fp32 whatever the autocast or weights.

torch.amp.custom_fwd(cast_inputs=torch.float32) does this for one device type fixed when it decorates; the
recurrence runs on the CPU (the C loop) and on CUDA alike, so this wrapper does the same for the device its input
is on, and also for bf16/fp16 weights without autocast (Lightning's bf16-true, 16-true), where custom_fwd does
nothing. Its outputs are in the dtype of the recurrent weights: fp32 under *-mixed (the weights stay fp32 there),
bf16 under bf16-true, so the next layer's product takes them as they come.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

LOW = (torch.float16, torch.bfloat16)


def fp32_recurrence(fn: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    """Wrap fn(gi, h0, w_hh, b_hh, ...) -> (hs, h_T): run it in fp32 under autocast or on bf16/fp16 inputs."""

    @functools.wraps(fn)
    def wrapper(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        device = gi.device.type
        autocast = torch.is_autocast_enabled(device) if device in ("cpu", "cuda") else False
        if not autocast and not any(t.dtype in LOW for t in (gi, h0, w_hh, b_hh)):
            return fn(gi, h0, w_hh, b_hh, *args, **kwargs)  # fp32/fp64 without autocast: as it was
        with torch.autocast(device, enabled=False):
            hs, h_T = fn(gi.float(), h0.float(), w_hh.float(), b_hh.float(), *args, **kwargs)
        return hs.to(w_hh.dtype), h_T.to(w_hh.dtype)

    return wrapper
