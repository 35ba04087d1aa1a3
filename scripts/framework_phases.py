#!/usr/bin/env python
"""Where the framework's extra time per step goes: CharLM through Trainer.fit, cut at Lightning's hooks, phase by
phase against the bare step, one bare step after each Lightning step in one process.

    python scripts/framework_phases.py [--variant fused] [--shape 32x256] [--steps 300] [--threads 2]

`bench_framework.py` says how much the framework costs; this says where. The Lightning step is cut where its
hooks run (the last callback and CharLM's own hooks mark the time), the bare step (benchlib's TrainStep) where its
code does the same work; each phase's figure is its median over the steps, so the rows need not add up exactly.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from benchlib import TrainStep, fit_through_lightning, one_shape_parser, parse_one_shape, quiet_lightning

# (phase, its first and last mark in a Lightning step, the bare step's phase doing that work or None)
PHASES = (
    ("loop, next batch, batch-start hooks", "prev_end", "on_train_batch_start", None),
    ("closure and optimizer_step set-up", "on_train_batch_start", "training_step", None),
    ("training_step | forward + loss", "training_step", "training_step_end", "forward"),
    ("zero_grad and its hooks | zero_grad", "training_step_end", "on_before_backward", "zero_grad"),
    ("backward", "on_before_backward", "on_after_backward", "backward"),
    ("clip + SGD and their hooks | clip + SGD", "on_after_backward", "optimizer_step_end", "step"),
    ("batch-end hooks", "optimizer_step_end", "on_train_batch_end", None),
)


def phases(name: str, B: int, H: int, steps: int, warmup: int, seed: int) -> tuple[dict, dict]:
    """Per phase, the seconds of each Lightning step and of each bare step, interleaved one to one."""
    from lightning.pytorch.callbacks import Callback

    from gruexp.module import CharLM

    V, T, clock = 28, 35, time.perf_counter
    marks: dict[str, float] = {}
    framework: dict[str, list[float]] = {p[0]: [] for p in PHASES}
    bare_s: dict[str, list[float]] = {"forward": [], "zero_grad": [], "backward": [], "step": []}
    bare = TrainStep(name, V, B, T, H, torch.device("cpu"), seed)
    done = 0

    def bare_step() -> None:
        t0 = clock()
        logits, state = bare.net(bare.X, bare.state)
        bare.state = state.detach()
        loss = F.cross_entropy(logits.reshape(-1, V), bare.Y.reshape(-1))
        t1 = clock()
        bare.opt.zero_grad(set_to_none=True)
        t2 = clock()
        loss.backward()
        t3 = clock()
        torch.nn.utils.clip_grad_norm_(bare.net.parameters(), 1.0)
        bare.opt.step()
        t4 = clock()
        if done > warmup:
            for key, s in zip(bare_s, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                bare_s[key].append(s)

    class Marks(Callback):
        def on_train_batch_start(self, *args) -> None:
            marks["on_train_batch_start"] = clock()

        def on_before_backward(self, *args) -> None:
            marks["on_before_backward"] = clock()

        def on_after_backward(self, *args) -> None:
            marks["on_after_backward"] = clock()

        def on_train_batch_end(self, *args) -> None:
            nonlocal done
            marks["on_train_batch_end"] = clock()
            done += 1
            if done > warmup:
                for phase, first, last, _ in PHASES:
                    framework[phase].append(marks[last] - marks[first])
            bare_step()
            marks["prev_end"] = clock()  # the next Lightning step starts once the bare step is done

    class Marked(CharLM):
        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            marks["training_step"] = clock()
            loss = super().training_step(batch, batch_idx)
            marks["training_step_end"] = clock()
            return loss

        def optimizer_step(self, *args, **kwargs) -> None:
            super().optimizer_step(*args, **kwargs)
            marks["optimizer_step_end"] = clock()

    torch.manual_seed(seed)
    model = Marked(name, H, [f"c{i}" for i in range(V)], optimizer=functools.partial(torch.optim.SGD, lr=1.0))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)) for _ in range(steps)]
    fit_through_lightning(model, batches, Marks(), torch.device("cpu"))
    return framework, bare_s


def main(argv: list[str] | None = None) -> None:
    p = one_shape_parser(__doc__.split("\n\n")[0], 300, "timed steps of each, after 30 untimed (default 300)")
    args = parse_one_shape(p, argv)
    torch.set_num_threads(args.threads)
    (B, H), warmup = args.shape[0], 30
    quiet_lightning()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
        framework, bare = phases(args.variant, B, H, args.steps + warmup + 1, warmup, seed=0)
    ms = {key: 1e3 * statistics.median(s) for key, s in (framework | bare).items()}
    threads = f"{args.threads} thread{'s' * (args.threads != 1)}"
    print(f"{args.variant} B={B} H={H} T=35, {threads}: ms per step, median of {args.steps}")
    print(f"{'phase (Lightning | bare)':<44}{'Lightning':>10}{'bare':>8}{'extra':>8}")
    for phase, _, _, bare_phase in PHASES:
        b = ms[bare_phase] if bare_phase else 0.0
        print(f"{phase:<44}{ms[phase]:>10.3f}{b:>8.3f}{ms[phase] - b:>8.3f}")
    total, bare_total = sum(ms[p[0]] for p in PHASES), sum(ms[k] for k in bare)
    print(f"{'sum of the rows':<44}{total:>10.3f}{bare_total:>8.3f}{total - bare_total:>8.3f}")


if __name__ == "__main__":
    main()
