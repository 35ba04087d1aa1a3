#!/usr/bin/env python
"""Where one variant's training step spends its time: torch.profiler over the harness's own training step.

    python scripts/profile_step.py [--variant fused] [--shape 32x256] [--steps 20] [--threads 2] [--rows 15]

The step is benchlib's TrainStep, the one bench.py times (forward, cross-entropy, backward, clipping, SGD). The
table lists operators by self CPU time per step. fused's C loop is one call that the profiler cannot see into: its
time is the self time of GRURecurrence (forward) and GRURecurrenceBackward. The harness measures speed; this says
why.
"""

from __future__ import annotations

import torch
from benchlib import TrainStep, one_shape_parser, parse_one_shape
from torch.profiler import ProfilerActivity, profile


def main(argv: list[str] | None = None) -> None:
    p = one_shape_parser(__doc__.split("\n\n")[0], 20, "profiled steps, after 5 untimed ones (default 20)")
    p.add_argument("--rows", type=int, default=15, help="operators to list (default 15)")
    args = parse_one_shape(p, argv)
    (B, H), T = args.shape[0], 35
    torch.set_num_threads(args.threads)
    step = TrainStep(args.variant, 28, B, T, H, torch.device("cpu"), seed=0)
    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    threads = f"{args.threads} thread{'s' * (args.threads != 1)}"
    print(f"{args.variant} B={B} H={H} T={T}, {threads}: {total:.2f} ms of operator time per step")
    print(f"{'operator':<48}{'ms/step':>10}{'share':>8}{'calls/step':>12}")
    for e in events[: args.rows]:
        ms = e.self_cpu_time_total / args.steps / 1e3
        print(f"{e.key[:47]:<48}{ms:>10.3f}{ms / total:>8.1%}{e.count / args.steps:>12.1f}")


if __name__ == "__main__":
    main()
