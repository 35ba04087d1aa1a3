#!/usr/bin/env python
"""Throughput of the scratch, torch and fused GRU language models, interleaved in one process.

    python scripts/bench.py [--device cpu|cuda] [--threads 2] [--shapes 32x256,128x512,128x1024] [--json PATH]
                            [--repeat N] [--framework]

A training step is what CharLM does each batch: forward (state carried, detached), cross-entropy, backward,
clip the global gradient norm to 1, SGD step (d2l's train_ch8). An inference step is one token of generation
at batch 1, as CharLM.predict runs it. Variants take turns, `--round` steps each, in a rotating order, so a
noisy machine slows all of them alike and the ratios hold; each variant's rate is its median step time.
The fp32 GEMM rate is sampled in the same turns and gives each shape's compute-bound limit in tokens/sec.
Tokens are random ids: the rate of a GRU does not depend on the text.

--repeat N runs all of it N times and reports each ratio's median and spread (min-max) over the runs.
--framework also runs the real CharLM training step through Lightning's loop (Trainer.fit with gruexp's divergence
and interrupt checks, gradient clipping, a CSV logger logging every 10 steps) and, after each of its windows of 10
steps, 10 bare steps, so both are timed under the same load: 200 steps each (--framework-steps), each rate the
median over 10-step windows (a logging step in each), and framework/bare, per variant and shape. A second run
does the same for Lightning's floor, the leanest LightningModule doing the bare step's work (floor/bare), which
splits framework/bare into what Trainer.fit costs any model and what gruexp adds (framework/floor).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gruexp.models import MODEL_NAMES, backends, build_model, forward_flops_per_token, gru_cpu

DEFAULT_SHAPES = "32x256,128x512,128x1024"
# `fused` with one backend forced (docs/fused-backends.md); fused-auto is fused as GRUEXP_FUSED_GPU=auto runs it;
# fused-d2l is fused with d2l's reset-before formula (model.reset_after=false), backend chosen as for fused-auto.
FUSED_VARIANTS = ("fused-cudnn", "fused-triton", "fused-ops", "fused-auto", "fused-d2l")
CUDA_VARIANTS = ("scratch", "torch", "fused-cudnn", "fused-triton", "fused-auto", "fused-d2l")  # cuda's default
FRAMEWORK_TARGET = 0.95  # issue 14: fused through Lightning's loop vs its bare step, CPU, 2 threads, B32 H256
# The framework run logs every LOG_EVERY steps, as gruexp's trainer does; its rate is the median over windows of
# that many steps, so the logging steps count (a median of single steps would leave them out).
LOG_EVERY = 10
# The targets, (mode, device type, batch, hidden) -> {other variant: least fused/other ratio}; a batch or
# hidden of None matches any. The CPU ones are for --threads 2.
TARGETS: dict[tuple[str, str, int | None, int | None], dict[str, float]] = {
    ("train", "cpu", 32, 256): {"torch": 1.5, "scratch": 2.0},
    ("train", "cpu", 128, 1024): {"torch": 1.2},
    ("train", "cuda", 32, 256): {"torch": 1.0, "scratch": 10.0},
    ("infer", "cpu", 1, None): {"torch": 1.0},
    ("infer", "cuda", 1, None): {"torch": 1.0},
}


def train_flops_per_token(vocab_size: int, hidden_size: int) -> int:
    """Training-step FLOPs per token: forward, and backward at twice the forward (as CharLM.flops_per_token)."""
    return 3 * forward_flops_per_token(vocab_size, hidden_size)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'32x256,128x1024' -> [(32, 256), (128, 1024)] as (batch, hidden); argparse type, so errors are one line."""
    shapes = []
    for item in text.split(","):
        try:
            B, H = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not BATCHxHIDDEN: write e.g. 32x256,128x1024") from None
        if B <= 0 or H <= 0:
            raise argparse.ArgumentTypeError(f"{item!r}: batch and hidden must be positive")
        shapes.append((B, H))
    return shapes


def parse_variants(text: str) -> list[str]:
    """'torch,fused' -> ['torch', 'fused'], each one of MODEL_NAMES or FUSED_VARIANTS."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in MODEL_NAMES + FUSED_VARIANTS]
    if bad or not names:
        choices = ",".join(MODEL_NAMES + FUSED_VARIANTS)
        raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose among {choices}")
    return names


def one_shape_parser(description: str, steps: int, steps_help: str) -> argparse.ArgumentParser:
    """The options profile_step.py and framework_phases.py share: --variant, --shape (one), --steps, --threads."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--variant", choices=MODEL_NAMES, default="fused")
    p.add_argument("--shape", type=parse_shapes, default=parse_shapes("32x256"), help="BATCHxHIDDEN")
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--threads", type=int, default=2)
    return p


def parse_one_shape(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """p's arguments, refused in one line (exit 2) unless one shape and --steps, --threads of at least 1."""
    args = p.parse_args(argv)
    if len(args.shape) != 1 or args.steps < 1 or args.threads < 1:
        p.error("give one --shape, and --steps and --threads of at least 1")
    return args


def make_model(name: str, V: int, H: int):
    """build_model(name), or for fused-<backend> the fused model with that backend forced (auto: left to choose)."""
    if not name.startswith("fused-"):
        return build_model(name, V, H)
    if name == "fused-d2l":
        return build_model("fused", V, H, reset_after=False)
    net = build_model("fused", V, H)
    backend = name.removeprefix("fused-")
    net.rnn.backend = None if backend == "auto" else backend
    return net


def time_calls(fn: Callable[[], object], k: int, device: torch.device) -> list[float]:
    """Seconds each of k calls of fn takes; on CUDA from events, so no host sync sits inside the timed span."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(k)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    seconds = []
    for _ in range(k):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


class TrainStep:
    """One variant's model, SGD optimizer and fixed batch; calling it runs one training step like CharLM's."""

    def __init__(self, name: str, V: int, B: int, T: int, H: int, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = make_model(name, V, H).to(device).train()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1.0)
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randint(V, (B, T), generator=g).to(device)
        self.Y = torch.randint(V, (B, T), generator=g).to(device)
        self.state: torch.Tensor | None = None

    def __call__(self) -> None:
        logits, state = self.net(self.X, self.state)
        self.state = state.detach()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.Y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)  # what Lightning's gradient_clip_val=1 calls
        self.opt.step()


class InferStep:
    """One variant's model in eval mode; calling it generates `chunk` tokens at batch 1 as CharLM.predict does."""

    def __init__(self, name: str, V: int, H: int, chunk: int, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = make_model(name, V, H).to(device).eval()
        self.chunk, self.device = chunk, device
        self.x = torch.tensor([[1]], device=device)
        self.state: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self) -> None:
        for _ in range(self.chunk):
            logits, self.state = self.net(self.x, self.state)
            y = int(logits[0, -1].argmax())
            self.x = torch.tensor([[y]], device=self.device)


def windows(seconds: list[float], n: int) -> list[float]:
    """The sums of consecutive n-step windows: each holds the periodic work (logging) once."""
    return [sum(seconds[i : i + n]) for i in range(0, len(seconds) - n + 1, n)]


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


def window_rate(seconds: list[float], tokens_per_step: int) -> float:
    """Tokens/sec from per-step seconds: over the median LOG_EVERY-step window, so the logging steps count."""
    return tokens_per_step * LOG_EVERY / statistics.median(windows(seconds, LOG_EVERY))


def fit_through_lightning(
    model, batches: list, timer, device: torch.device, max_steps: int = -1, floor: bool = False
) -> None:
    """Train `model` (a CharLM) on `batches` with Trainer.fit as the framework runs are timed: gruexp's divergence and
    interrupt checks, then the `timer` callback, clipping at 1, a CSV logger every LOG_EVERY steps, no validation.
    With `floor` (a floor_module), the same clipping and loop with no logger and no callback but the timer."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from gruexp.guards import DivergenceDetector, InterruptCheckpoint

    previous = signal.getsignal(signal.SIGTERM)  # Lightning leaves its SIGTERM handler behind after fit
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_epochs=1,
            max_steps=max_steps,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            log_every_n_steps=LOG_EVERY,
            logger=False if floor else CSVLogger(tmp, name="bench"),
            callbacks=[timer] if floor else [DivergenceDetector(), InterruptCheckpoint(), timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        try:
            trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        finally:
            signal.signal(signal.SIGTERM, previous)


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
    net = make_model(name, V, H)
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


def interleave(
    steps: dict[str, Callable[[], None]],
    samples: int,
    warmup: int,
    per_round: int,
    device: torch.device,
    gemm: Callable[[], None],
    gemm_seconds: list[float],
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Warm each callable up, then time `samples` calls of each in rounds of `per_round`, rotating the order.

    Returns the seconds of every timed call per name and each name's first (cold) call; one GEMM is timed per
    round into gemm_seconds, so the machine's rate is sampled under the same load as the variants.
    """
    first: dict[str, float] = {}
    for name, fn in steps.items():
        first[name] = time_calls(fn, 1, device)[0]
        time_calls(fn, max(warmup - 1, 0), device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    r = 0
    while any(len(t) < samples for t in times.values()):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name] += time_calls(steps[name], min(per_round, samples - len(times[name])), device)
        gemm_seconds += time_calls(gemm, 1, device)
        r += 1
    return times, first


def device_description(device: torch.device, threads: int) -> str:
    """'cuda: NVIDIA H100 80GB HBM3' or 'cpu: AMD EPYC, 2 threads': what a table's numbers were measured on."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model}, {threads} thread{'s' * (threads != 1)}"


def ratio_row(rows: list[dict], mode: str, batch: int, hidden: int, device_type: str) -> dict | None:
    """fused/torch and fused/scratch tokens/sec at one shape, with the issue's target where it sets one."""
    rate = {
        r["variant"]: r["tokens_per_sec"] for r in rows if (r["mode"], r["batch"], r["hidden"]) == (mode, batch, hidden)
    }
    if "fused" not in rate and "fused-auto" in rate:
        rate["fused"] = rate["fused-auto"]  # fused as users get it on a GPU
    extra = {}
    for a, b in (("fused-triton", "fused-cudnn"), ("fused-d2l", "scratch")):  # the GPU targets
        if a in rate and b in rate:
            extra[f"{a}/{b}"] = rate[a] / rate[b]
    if "fused" not in rate:
        return {"mode": mode, "batch": batch, "hidden": hidden, **extra} if extra else None
    out: dict = {"mode": mode, "batch": batch, "hidden": hidden, **extra}
    targets = {}
    for key, value in TARGETS.items():
        if key[:2] == (mode, device_type) and key[2] in (None, batch) and key[3] in (None, hidden):
            targets.update(value)
    for other in ("torch", "scratch"):
        if other in rate:
            out[f"fused/{other}"] = rate["fused"] / rate[other]
            if other in targets:
                out[f"target fused/{other}"] = targets[other]
    return out if len(out) > 3 + len(extra) else None


def format_report(report: dict) -> str:
    """The table a person reads: one row per (mode, shape, variant), then the ratios against the targets."""
    tf32 = ""
    if "tf32" in report:
        tf32 = f"; TF32 {'on' if report['tf32'] else 'off'} for every variant (cuBLAS, cuDNN, Triton's tl.dot)"
    lines = [
        f"device: {report['device']}, torch {report['torch']}; fused's loop: {report['fused_loop']}{tf32}",
        f"fp32 GEMM {report['gemm_size']}^2: {report['gemm_gflops']:.1f} GFLOP/s (median of {report['gemm_samples']});"
        f" T={report['num_steps']}, V={report['vocab_size']}",
        "",
        f"{'mode':<6}{'variant':<13}{'B':>5}{'H':>6}{'steps':>7}{'ms/step':>10}{'tokens/s':>12}"
        f"{'limit tok/s':>13}{'share':>7}{'1st step s':>11}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['mode']:<6}{r['variant']:<13}{r['batch']:>5}{r['hidden']:>6}{r['steps']:>7}{r['ms_per_step']:>10.3f}"
            f"{r['tokens_per_sec']:>12,.0f}{r['limit_tokens_per_sec']:>13,.0f}{r['share_of_limit']:>7.1%}"
            f"{r['first_step_s']:>11.3f}"
        )
    if report["ratios"]:
        lines += ["", f"{'ratio of tokens/s':<22}{'fused/torch':>20}{'fused/scratch':>22}"]
    for q in report["ratios"]:
        cells = []
        for other in ("torch", "scratch"):
            if f"fused/{other}" not in q:
                cells.append("-")
                continue
            cell = f"{q[f'fused/{other}']:.2f}x"
            target = q.get(f"target fused/{other}")
            if target is not None:
                cell += f" ({'ok' if q[f'fused/{other}'] >= target else 'below'} {target:g}x)"
            cells.append(cell)
        lines.append(f"{q['mode']:<6}B{q['batch']:<5} H{q['hidden']:<8}{cells[0]:>20}{cells[1]:>22}")
        for pair in ("fused-triton/fused-cudnn", "fused-d2l/scratch"):
            if pair in q:
                lines.append(f"{'':<22}{pair} {q[pair]:.2f}x")
    for key, backend in report.get("fused_auto_decisions", {}).items():
        lines.append(f"fused-auto chose {backend} for {key}")
    if report.get("framework"):
        lines += [
            "",
            f"{'through Lightning':<18}{'B':>5}{'H':>6}{'framework tok/s':>17}{'bare tok/s':>12}"
            f"{'framework/bare':>22}{'floor/bare':>12}{'framework/floor':>17}",
        ]
    for r in report.get("framework", []):
        cell = f"{r['framework/bare']:.3f}"
        if "target framework/bare" in r:
            target = r["target framework/bare"]
            cell += f" ({'ok' if r['framework/bare'] >= target else 'below'} {target:g})"
        lines.append(
            f"{r['variant']:<18}{r['batch']:>5}{r['hidden']:>6}{r['framework_tokens_per_sec']:>17,.0f}"
            f"{r['bare_tokens_per_sec']:>12,.0f}{cell:>22}{r['floor/bare']:>12.3f}{r['framework/floor']:>17.3f}"
        )
    if report.get("framework"):
        lines += [
            "floor: the leanest LightningModule around the same net (forward, loss, SGD), same loop and clipping,",
            "no logger, no callback: what Trainer.fit itself costs; framework/floor: what gruexp costs above it",
        ]
    return "\n".join(lines)


def repeat_summary(reports: list[dict]) -> dict[str, dict]:
    """Each ratio over the runs: its median, min and max ('train B32 H256 fused/scratch' -> {...})."""
    series: dict[str, list[float]] = {}
    for report in reports:
        for q in report["ratios"]:
            for key in ("fused/torch", "fused/scratch"):
                if key in q:
                    series.setdefault(f"{q['mode']} B{q['batch']} H{q['hidden']} {key}", []).append(q[key])
        for r in report.get("framework", []):
            for key in ("framework/bare", "floor/bare", "framework/floor"):
                head, tail = key.split("/")
                series.setdefault(f"{head} {r['variant']} B{r['batch']} H{r['hidden']} /{tail}", []).append(r[key])
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in series.items()}


def format_summary(summary: dict[str, dict], n: int) -> str:
    lines = [f"over {n} runs: median (min-max)"]
    for key, s in summary.items():
        lines.append(f"  {key:<38}{s['median']:>7.3f}  ({s['min']:.3f}-{s['max']:.3f})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: the CPU targets')")
    p.add_argument(
        "--shapes", type=parse_shapes, default=parse_shapes(DEFAULT_SHAPES), help=f"BxH list ({DEFAULT_SHAPES})"
    )
    p.add_argument(
        "--variants",
        type=parse_variants,
        default=None,
        help=f"scratch,torch,fused and {','.join(FUSED_VARIANTS)} (default cpu: scratch,torch,fused;"
        f" cuda: {','.join(CUDA_VARIANTS)})",
    )
    p.add_argument("--tf32", action="store_true", help="cuda: allow TF32 in cuBLAS, cuDNN and the Triton kernels alike")
    p.add_argument("--num-steps", type=int, default=35, help="T, time steps per sequence (d2l: 35)")
    p.add_argument("--vocab-size", type=int, default=28, help="V (d2l's character vocabulary: 28)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per variant and shape (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant and shape first (default 5)")
    p.add_argument("--round", type=int, default=5, help="steps a variant runs per turn (default 5)")
    p.add_argument(
        "--infer-tokens",
        type=int,
        default=400,
        help="timed generated tokens per variant and hidden size, batch 1 (default 400; 0 skips inference)",
    )
    p.add_argument("--infer-chunk", type=int, default=20, help="tokens per timed inference sample (default 20)")
    p.add_argument("--gemm-size", type=int, default=None, help="n of the n x n fp32 GEMM (default cpu 1024, cuda 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat", type=int, default=1, help="run everything N times; report each ratio's median and spread"
    )
    p.add_argument(
        "--framework",
        action="store_true",
        help="also time the real CharLM step through Lightning's loop against the bare step, interleaved",
    )
    p.add_argument(
        "--framework-steps",
        type=int,
        default=200,
        help=f"timed steps of each in --framework, a multiple of its {LOG_EVERY}-step windows (default 200)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file (never overwritten)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Time every variant at every shape (and at batch 1 for inference); return the report as --json writes it."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.variants is None:
        args.variants = list(CUDA_VARIANTS if device.type == "cuda" else MODEL_NAMES)
    # one TF32 setting for every variant: torch's matmuls, cuDNN, and the Triton kernels (which follow matmul's)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    V, T, n = args.vocab_size, args.num_steps, args.gemm_size or (4096 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    gemm_out = torch.empty(n, n, device=device)
    gemm_seconds: list[float] = []

    def gemm() -> None:
        torch.mm(a, b, out=gemm_out)

    time_calls(gemm, 3, device)  # warm-up: thread pool, cuBLAS handle
    results = []
    jobs = [("train", B, H) for B, H in args.shapes]
    if args.infer_tokens > 0:
        jobs += [("infer", 1, H) for H in dict.fromkeys(H for _, H in args.shapes)]
    for mode, B, H in jobs:
        print(f"timing {mode} B={B} H={H} ...", file=sys.stderr, flush=True)
        if mode == "train":
            steps = {v: TrainStep(v, V, B, T, H, device, args.seed) for v in args.variants}
            samples, warmup, per_round = args.steps, args.warmup, args.round
        else:
            steps = {v: InferStep(v, V, H, args.infer_chunk, device, args.seed) for v in args.variants}
            samples = -(-args.infer_tokens // args.infer_chunk)
            warmup, per_round = 1, 1
        times, first = interleave(steps, samples, warmup, per_round, device, gemm, gemm_seconds)
        flops = (train_flops_per_token if mode == "train" else forward_flops_per_token)(V, H)
        for v in args.variants:
            # a training call is one step of B*T tokens; an inference call is `chunk` one-token steps
            sec = statistics.median(times[v]) / (1 if mode == "train" else args.infer_chunk)
            rate = (B * T if mode == "train" else 1) / sec
            results.append(
                {
                    "mode": mode,
                    "variant": v,
                    "batch": B,
                    "hidden": H,
                    "steps": len(times[v]) * (1 if mode == "train" else args.infer_chunk),
                    "tokens_per_sec": rate,
                    "ms_per_step": sec * 1e3,
                    "first_step_s": first[v],
                    "flops_per_token": flops,
                }
            )
        del steps
    gflops = 2 * n**3 / statistics.median(gemm_seconds) / 1e9
    for r in results:
        r["limit_tokens_per_sec"] = gflops * 1e9 / r["flops_per_token"]
        r["share_of_limit"] = r["tokens_per_sec"] / r["limit_tokens_per_sec"]
    ratios = [ratio_row(results, mode, B, H, device.type) for mode, B, H in jobs]
    framework = []
    if args.framework:
        import lightning  # noqa: F401  (it sets its loggers' levels on import: set them after)

        for name in ("lightning.pytorch", "lightning.fabric"):  # its banner lines, once per Trainer
            logging.getLogger(name).setLevel(logging.WARNING)
        for B, H in args.shapes:
            for v in args.variants:
                print(f"timing framework {v} B={B} H={H} ...", file=sys.stderr, flush=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals
                    timed = [
                        framework_vs_bare(
                            v, V, B, T, H, device, args.framework_steps, args.warmup, LOG_EVERY, args.seed, floor
                        )
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
    report = {
        "device": device_description(device, args.threads),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": args.threads,
        "num_steps": T,
        "vocab_size": V,
        "gemm_size": n,
        "gemm_samples": len(gemm_seconds),
        "gemm_gflops": gflops,
        # which implementation of the recurrence `fused` ran: "c" (gru_cpu.c) or "ops" (the torch-op loop)
        "fused_loop": "c" if device.type == "cpu" and gru_cpu.load() is not None else "ops",
        "results": results,
        "ratios": [q for q in ratios if q],
    }
    if args.framework:
        report["framework"] = framework
    if device.type == "cuda":
        report["tf32"] = args.tf32
        report["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        report["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        report["fused_auto_decisions"] = {k: d["backend"] for k, d in backends.AUTOTUNER.decisions.items()}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in (
        "threads", "num_steps", "vocab_size", "steps", "warmup", "round", "infer_chunk", "gemm_size", "repeat"
    ):  # fmt: skip
        value = getattr(args, option)
        if value is not None and value < (0 if option == "warmup" else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")
    if args.framework_steps < LOG_EVERY or args.framework_steps % LOG_EVERY:
        parser.error(f"--framework-steps must be a positive multiple of {LOG_EVERY}, got {args.framework_steps}")
    if args.infer_tokens < 0:
        parser.error(f"--infer-tokens must be >= 0 (0 skips inference), got {args.infer_tokens}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA device; use --device cpu")
    variants = args.variants or []
    if {"fused-auto", "fused-d2l"} & set(variants) and os.environ.get("GRUEXP_FUSED_GPU", "auto") != "auto":
        parser.error("--variants fused-auto/fused-d2l run fused as GRUEXP_FUSED_GPU=auto does: unset GRUEXP_FUSED_GPU")
    if args.device == "cpu" and "fused-triton" in variants and not backends.triton_interpreted():
        parser.error("--variants fused-triton on --device cpu runs Triton's interpreter: set TRITON_INTERPRET=1")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists and would be overwritten: pass a new path")
    reports = []
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"run {i + 1}/{args.repeat}", file=sys.stderr, flush=True)
        reports.append(run(args))
        print(format_report(reports[-1]) + "\n")
    report = reports[0]
    if args.repeat > 1:
        summary = repeat_summary(reports)
        print(format_summary(summary, args.repeat))
        report = {"repeat": args.repeat, "summary": summary, "runs": reports}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
