#!/usr/bin/env python
"""What Lightning's loop costs: the real CharLM training step through Trainer.fit against the bare step, interleaved.

    python scripts/bench_framework.py [--device cpu|cuda] [--threads 2] [--shapes 32x256] [--variants ...]
                                      [--steps 200] [--steps-per-call K] [--repeat N] [--json PATH]
    python scripts/bench.py --framework [the same options]

The Lightning run is Trainer.fit with gruexp's divergence and interrupt checks, gradient clipping and a CSV logger
logging every 10 steps; after each of its windows of 10 steps, 10 bare steps (bench.py's training step) run, so
both are timed under the same load: 200 steps each (--steps), each rate the median over 10-step windows (a logging
step in each), and framework/bare, per variant and shape. A second run does the same for Lightning's floor, the
leanest LightningModule doing the bare step's work (floor/bare), which splits framework/bare into what Trainer.fit
costs any model and what gruexp adds (framework/floor). --repeat N reports each ratio's median and spread.

--steps-per-call K: each call of the training step runs K optimizer steps (CharLM(steps_per_call=K), fed chunks
of K batches shaped as CharDataModule(steps_per_call=K) hands them out; the module clips, eagerly: CUDA graphs are
bench_graphs.py's), and the floor does the same. Counts stay in optimizer steps: a window is lcm(K, 10) steps
(whole calls, whole logging periods), --steps is rounded up to whole windows (default: 200, or 10 windows where
that is more), logging is every 10 steps, and the bare steps catch up after the fewest calls of 10 steps or more.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from benchlib import (
    FRAMEWORK_TARGET,
    FRAMEWORK_TARGET_CHUNKED,
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


def window_steps(steps_per_call: int) -> int:
    """Optimizer steps per timing window: whole calls of K steps and whole LOG_EVERY-step logging periods."""
    return math.lcm(steps_per_call, LOG_EVERY)


def window_rate(seconds: list[float], tokens_per_step: int, window: int = LOG_EVERY, steps_per_call: int = 1) -> float:
    """Tokens/sec from the seconds of each call (`steps_per_call` steps each): over the median window of `window`
    steps, so the logging steps count."""
    return tokens_per_step * window / statistics.median(windows(seconds, window // steps_per_call))


def floor_module(net: torch.nn.Module, steps_per_call: int = 1):
    """Lightning's floor: the leanest LightningModule around `net`, doing TrainStep's work and nothing else
    (state carried, cross-entropy, SGD at lr 1); what any model trained by Trainer.fit pays, gruexp or not. With
    K > 1 steps per call, each call takes a chunk of K batches and steps K times (manual optimization, clipping
    itself at 1)."""
    import lightning as L

    class Floor(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.state: torch.Tensor | None = None
            self.automatic_optimization = steps_per_call == 1

        def loss(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
            logits, state = self.net(X, self.state)
            self.state = state.detach()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))

        def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
            if self.automatic_optimization:
                return self.loss(*batch)
            opt = self.optimizers()
            for X, Y in zip(*batch, strict=True):
                loss = self.loss(X, Y)
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
                opt.step()
            return None

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1.0)

    return Floor()


def lightning_model(name: str, V: int, H: int, net: torch.nn.Module, steps_per_call: int = 1, floor: bool = False):
    """What framework_vs_bare trains through Lightning: CharLM around `net` (SGD at lr 1, K steps per call, clipping
    itself at 1 when K > 1, as train() sets it up) or, with `floor`, floor_module."""
    from gruexp.module import CharLM

    if floor:
        return floor_module(net, steps_per_call)
    K = steps_per_call
    clip = {"steps_per_call": K, "gradient_clip_val": 1.0} if K > 1 else {}  # K = 1: the Trainer clips
    sgd = functools.partial(torch.optim.SGD, lr=1.0)
    model = CharLM(name.split("-")[0], H, [f"c{i}" for i in range(V)], optimizer=sgd, sample_chars=0, **clip)
    model.net = net
    return model


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
    steps_per_call: int = 1,
) -> tuple[list[float], list[float]]:
    """Seconds per call of CharLM's training step (K = `steps_per_call` optimizer steps each; with `floor`, of
    floor_module's) under Trainer.fit, and per step of the bare TrainStep, interleaved in one process.

    A callback times each Lightning call from one on_train_batch_end to the next (data fetch, hooks, steps, clip,
    optimizer, logging: all of it) and, every `per_round` Lightning optimizer steps or more (whole calls), runs as
    many bare steps as Lightning has timed. `warmup` and `samples` count optimizer steps.
    """
    from lightning.pytorch.callbacks import Callback

    K = steps_per_call
    bare = TrainStep(name, V, B, T, H, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    warm_calls = -(-warmup // K)
    calls = warm_calls + samples // K + 1  # one more: with no warm-up, the first call has no start to time from
    n = calls + 1
    batches = [(torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)) for _ in range(n * K)]
    if K > 1:  # chunks [K, B, T], as CharDataModule(steps_per_call=K) hands them to the training step
        batches = [tuple(torch.stack(t) for t in zip(*batches[i : i + K], strict=True)) for i in range(0, n * K, K)]
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
            if self.t is not None and self.done >= warm_calls:
                lightning_s.append(now - self.t)
            self.done += 1
            timed_steps = (self.done - warm_calls) * K
            calls_per_round = -(-per_round // K)
            last = timed_steps == samples
            if self.done > warm_calls and ((self.done - warm_calls) % calls_per_round == 0 or last):
                for _ in range(timed_steps - len(bare_s)):
                    t0 = time.perf_counter()
                    bare()
                    sync()
                    bare_s.append(time.perf_counter() - t0)
            if self.done == warm_calls:
                for _ in range(warmup):
                    bare()
            self.t = time.perf_counter()

    torch.manual_seed(seed)  # TrainStep's net and weights, a fused-<backend> variant's forced backend included
    model = lightning_model(name, V, H, make_net(name, V, H, device), K, floor)
    fit_through_lightning(
        model,
        batches,
        Interleave(),
        device,
        max_steps=calls * K,
        floor=floor,
        gradient_clip_val=1.0 if K == 1 else None,
    )
    return lightning_s[: samples // K], bare_s[:samples]


def format_report(report: dict) -> str:
    """The table a person reads: one row per (variant, shape), framework/bare against its target, and its split."""
    K = report.get("steps_per_call", 1)
    lines = [
        f"device: {report['device']}, torch {report['torch']}; T={report['num_steps']}, V={report['vocab_size']};"
        f" {K} optimizer step{'s' * (K != 1)} per training-step call (--steps-per-call)",
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
    V, T, K = args.vocab_size, args.num_steps, args.steps_per_call
    window = window_steps(K)
    steps = args.steps if args.steps is not None else max(200, 10 * window)
    samples = -(-steps // window) * window  # whole windows
    quiet_lightning()
    framework = []
    for B, H in args.shapes:
        for v in args.variants:
            print(f"timing framework {v} B={B} H={H} ...", file=sys.stderr, flush=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
                timed = [
                    framework_vs_bare(v, V, B, T, H, device, samples, args.warmup, LOG_EVERY, args.seed, floor, K)
                    for floor in (False, True)
                ]
            (fw_s, bare_s), (floor_s, floor_bare_s) = timed
            # Lightning's seconds are per call of K steps, the bare ones per step; the same windows for both
            fw, floor = (window_rate(t, B * T, window, K) for t in (fw_s, floor_s))
            bare, floor_bare = (window_rate(t, B * T, window) for t in (bare_s, floor_bare_s))
            row = {"variant": v, "batch": B, "hidden": H, "steps": len(fw_s) * K, "steps_per_call": K}
            row |= {"framework_tokens_per_sec": fw, "bare_tokens_per_sec": bare, "framework/bare": fw / bare}
            # Lightning's own cost (floor_module in the same loop), and gruexp's above it: the part gruexp owns
            row["floor/bare"] = floor / floor_bare
            row["framework/floor"] = row["framework/bare"] / row["floor/bare"]
            if (device.type, B, H, v) == ("cpu", 32, 256, "fused"):
                row["target framework/bare"] = FRAMEWORK_TARGET if K == 1 else FRAMEWORK_TARGET_CHUNKED
            framework.append(row)
    report = report_head(args, device) | {"steps_per_call": K, "window_steps": window, "framework": framework}
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
        default=None,
        help=f"timed optimizer steps of each, a multiple of its {LOG_EVERY}-step windows (default 200; with"
        f" --steps-per-call K rounded up to whole lcm(K, {LOG_EVERY})-step windows, default 10 of them or 200)",
    )
    p.add_argument(
        "--steps-per-call",
        type=int,
        default=1,
        help="K, optimizer steps per call of the training step (top-level steps_per_call; default 1)",
    )
    args = p.parse_args(argv)
    check_common_options(p, args, ("steps_per_call",))
    if args.steps is not None and (args.steps < LOG_EVERY or args.steps % LOG_EVERY):
        p.error(f"--steps must be a positive multiple of {LOG_EVERY}, got {args.steps}")
    check_device_options(p, args)
    run_and_report(args, run, format_report, ratios)


if __name__ == "__main__":
    main()
