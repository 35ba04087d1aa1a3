#!/usr/bin/env python
"""What Lightning's loop costs: the real CharLM training step through Trainer.fit against the bare step, interleaved.

    python scripts/bench_framework.py [--device cpu|cuda] [--threads 2] [--shapes 32x256] [--variants ...]
                                      [--steps 200] [--repeat N] [--json PATH]

The Lightning run is Trainer.fit with gruexp's divergence and interrupt checks, gradient clipping and a CSV logger
logging every 10 steps; after each of its windows of 10 steps, 10 bare steps (bench.py's training step) run, so
both are timed under the same load: 200 steps each (--steps), each rate the median over 10-step windows (a logging
step in each), and framework/bare, per variant and shape. A second run does the same for Lightning's floor, the
leanest LightningModule doing the bare step's work (floor/bare), which splits framework/bare into what Trainer.fit
costs any model and what gruexp adds (framework/floor). --repeat N reports each ratio's median and spread.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from benchlib import (
    FRAMEWORK_TARGET,
    LOG_EVERY,
    TrainStep,
    add_common_options,
    check_common_options,
    check_device_options,
    fit_through_lightning,
    make_net,
    quiet_lightning,
    report_head,
    run_and_report,
    set_up,
)


def windows(seconds: list[float], n: int) -> list[float]:
    """The sums of consecutive n-step windows: each holds the periodic work (logging) once."""
    return [sum(seconds[i : i + n]) for i in range(0, len(seconds) - n + 1, n)]


def window_rate(seconds: list[float], tokens_per_step: int) -> float:
    """Tokens/sec from per-step seconds: over the median LOG_EVERY-step window, so the logging steps count."""
    return tokens_per_step * LOG_EVERY / statistics.median(windows(seconds, LOG_EVERY))


def floor_module(net: torch.nn.Module):
    """Lightning's floor: the leanest LightningModule around `net`, doing TrainStep's work and nothing else
    (state carried, cross-entropy, SGD at lr 1); what any model trained by Trainer.fit pays, gruexp or not."""
    import lightning as L

    class Floor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.state: torch.Tensor | None = None

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            X, Y = batch
            logits, state = self.net(X, self.state)
            self.state = state.detach()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1.0)

    return Floor()


def framework_vs_bare(
    name: str,
    V: int,
    B: int,
    T: int,
    H: int,
    device: torch.device,
    samples: int,
    warmup: int,
    per_round: int,
    seed: int,
    floor: bool = False,
) -> tuple[list[float], list[float]]:
    """Seconds per step of CharLM (with `floor`, of floor_module) under Trainer.fit and of the bare TrainStep,
    interleaved in one process.

    A callback times each Lightning step from one on_train_batch_end to the next (data fetch, hooks, step, clip,
    optimizer, logging: all of it) and runs `per_round` bare steps after every `per_round` Lightning steps.
    """
    from lightning.pytorch.callbacks import Callback

    from gruexp.module import CharLM

    bare = TrainStep(name, V, B, T, H, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n = warmup + samples + per_round + 2
    batches = [(torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)) for _ in range(n)]
    lightning_s: list[float] = []
    bare_s: list[float] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Interleave(Callback):
        def __init__(self) -> None:
            self.t: float | None = None
            self.done = 0

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            sync()
            now = time.perf_counter()
            if self.t is not None and self.done >= warmup:
                lightning_s.append(now - self.t)
            self.done += 1
            if self.done > warmup and (self.done - warmup) % per_round == 0:
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    bare()
                    sync()
                    bare_s.append(time.perf_counter() - t0)
            if self.done == warmup:
                for _ in range(warmup):
                    bare()
            self.t = time.perf_counter()

    torch.manual_seed(seed)  # TrainStep's net and weights, a fused-<backend> variant's forced backend included
    net = make_net(name, V, H, device)
    if floor:
        model = floor_module(net)
    else:
        vocab = [f"c{i}" for i in range(V)]
        model = CharLM(
            name.split("-")[0], H, vocab, optimizer=functools.partial(torch.optim.SGD, lr=1.0), sample_chars=0
        )
        model.net = net
    fit_through_lightning(model, batches, Interleave(), device, max_steps=warmup + samples + 1, floor=floor)
    return lightning_s[:samples], bare_s[:samples]


def format_report(report: dict) -> str:
    """The table a person reads: one row per (variant, shape), framework/bare against its target, and its split."""
    lines = [
        f"device: {report['device']}, torch {report['torch']}; T={report['num_steps']}, V={report['vocab_size']}",
        "",
        f"{'through Lightning':<18}{'B':>5}{'H':>6}{'framework tok/s':>17}{'bare tok/s':>12}"
        f"{'framework/bare':>22}{'floor/bare':>12}{'framework/floor':>17}",
    ]
    for r in report["framework"]:
        cell = f"{r['framework/bare']:.3f}"
        if "target framework/bare" in r:
            target = r["target framework/bare"]
            cell += f" ({'ok' if r['framework/bare'] >= target else 'below'} {target:g})"
        lines.append(
            f"{r['variant']:<18}{r['batch']:>5}{r['hidden']:>6}{r['framework_tokens_per_sec']:>17,.0f}"
            f"{r['bare_tokens_per_sec']:>12,.0f}{cell:>22}{r['floor/bare']:>12.3f}{r['framework/floor']:>17.3f}"
        )
    lines += [
        "floor: the leanest LightningModule around the same net (forward, loss, SGD), same loop and clipping,",
        "no logger, no callback: what Trainer.fit itself costs; framework/floor: what gruexp costs above it",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Time every variant at every shape through Lightning and bare, then its floor; return the report --json writes."""
    device = set_up(args)
    V, T = args.vocab_size, args.num_steps
    quiet_lightning()
    framework = []
    for B, H in args.shapes:
        for v in args.variants:
            print(f"timing framework {v} B={B} H={H} ...", file=sys.stderr, flush=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
                timed = [
                    framework_vs_bare(v, V, B, T, H, device, args.steps, args.warmup, LOG_EVERY, args.seed, floor)
                    for floor in (False, True)
                ]
            fw, bare, floor, floor_bare = (window_rate(t, B * T) for pair in timed for t in pair)
            row = {"variant": v, "batch": B, "hidden": H, "steps": len(timed[0][0])}
            row |= {"framework_tokens_per_sec": fw, "bare_tokens_per_sec": bare, "framework/bare": fw / bare}
            # Lightning's own cost (floor_module in the same loop), and gruexp's above it: the part gruexp owns
            row["floor/bare"] = floor / floor_bare
            row["framework/floor"] = row["framework/bare"] / row["floor/bare"]
            if (device.type, B, H, v) == ("cpu", 32, 256, "fused"):
                row["target framework/bare"] = FRAMEWORK_TARGET
            framework.append(row)
    report = report_head(args, device) | {"framework": framework}
    if device.type == "cuda":
        report["tf32"] = args.tf32
    return report


def ratios(report: dict) -> Iterable[tuple[str, float]]:
    """Each run's framework/bare, floor/bare and framework/floor, named for --repeat's summary."""
    for r in report["framework"]:
        for key in ("framework/bare", "floor/bare", "framework/floor"):
            head, tail = key.split("/")
            yield f"{head} {r['variant']} B{r['batch']} H{r['hidden']} /{tail}", r[key]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_options(p, "32x256")
    p.add_argument(
        "--steps",
        type=int,
        default=200,
        help=f"timed steps of each, a multiple of its {LOG_EVERY}-step windows (default 200)",
    )
    args = p.parse_args(argv)
    check_common_options(p, args, ())
    if args.steps < LOG_EVERY or args.steps % LOG_EVERY:
        p.error(f"--steps must be a positive multiple of {LOG_EVERY}, got {args.steps}")
    check_device_options(p, args)
    run_and_report(args, run, format_report, ratios)


if __name__ == "__main__":
    main()
