"""Learning-rate schedules stepped every optimizer step over the whole run (nanoGPT's warmup + cosine).

torch's CosineAnnealingLR stepped per epoch leaves a 4-epoch run at 15 % of its rate for its whole last epoch; a
short run learns most when the rate decays smoothly to its end. CharLM.configure_optimizers steps any scheduler
that takes `total_steps` (this one, torch's OneCycleLR) every optimizer step and, when the config leaves
`total_steps` out, gives it the run's total from Lightning (`trainer.estimated_stepping_batches`).
"""

from __future__ import annotations

import math

import torch

from gruexp import UserError


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the optimizer's lr over `warmup_steps`, then cosine decay to `min_lr_ratio` × lr."""
    # UserError: the values come from the config, so a bad one is one line naming its key (exit 2)
    if total_steps < 1:
        raise UserError(f"scheduler.total_steps={total_steps}: a run needs at least 1 optimizer step")
    if not 0 <= warmup_steps < total_steps:
        raise UserError(
            f"scheduler.warmup_steps={warmup_steps} must be >= 0 and below the run's {total_steps} optimizer steps:"
            " lower it (or train longer)"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"scheduler.min_lr_ratio={min_lr_ratio} must be between 0 and 1 (a fraction of the lr)")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
