#!/usr/bin/env python
"""Throughput of the scratch, torch and fused GRU language models, interleaved in one process.

    python scripts/bench.py [--device cpu|cuda] [--threads 2] [--shapes 32x256,128x512,128x1024] [--json PATH]
                            [--repeat N]
    python scripts/bench.py --framework [--steps-per-call K] [bench_framework.py's options]

A training step is what CharLM does each batch: forward (state carried, detached), cross-entropy, backward,
clip the global gradient norm to 1, SGD step (d2l's train_ch8). An inference step is one token of generation
at batch 1, as CharLM.predict runs it. Variants take turns, `--round` steps each, in a rotating order, so a
noisy machine slows all of them alike and the ratios hold; each variant's rate is its median step time.
The fp32 GEMM rate is sampled in the same turns and gives each shape's compute-bound limit in tokens/sec.
Tokens are random ids: the rate of a GRU does not depend on the text.

--repeat N runs all of it N times and reports each ratio's median and spread (min-max) over the runs.
What Lightning's loop costs over the same training step is bench_framework.py's to measure: --framework runs it
with the other options (its --help lists them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Iterable

import bench_framework
import torch
from benchlib import (
    DEFAULT_SHAPES,
    TARGETS,
    TrainStep,
    add_common_options,
    check_common_options,
    check_device_options,
    make_net,
    report_head,
    run_and_report,
    set_up,
    time_calls,
    train_flops_per_token,
)

from gruexp.models import backends, forward_flops_per_token


class InferStep:
    """One variant's model in eval mode; calling it generates `chunk` tokens at batch 1 as CharLM.predict does."""

    def __init__(self, name: str, V: int, H: int, chunk: int, device: torch.device, seed: int) -> None:
        torch.manual_seed(seed)
        self.net = make_net(name, V, H, device).eval()
        self.chunk, self.device = chunk, device
        self.x = torch.tensor([[1]], device=device)
        self.state: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self) -> None:
        for _ in range(self.chunk):
            logits, self.state = self.net(self.x, self.state)
            y = int(logits[0, -1].argmax())
            self.x = torch.tensor([[y]], device=self.device)


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


def ratio_row(rows: list[dict], mode: str, batch: int, hidden: int, device_type: str) -> dict | None:
    """fused/torch and fused/scratch tokens/sec at one shape, with the issue's target where it sets one."""
    rate = {
        r["variant"]: r["tokens_per_sec"] for r in rows if (r["mode"], r["batch"], r["hidden"]) == (mode, batch, hidden)
    }
    if "fused" not in rate and "fused-auto" in rate:
        rate["fused"] = rate["fused-auto"]  # fused as users get it on a GPU
    extra = {}
    for a, b in (("fused-d2l", "scratch"),):  # the GPU target
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
        tf32 = f"; TF32 {'on' if report['tf32'] else 'off'} for every variant (cuBLAS, cuDNN)"
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
        for pair in ("fused-d2l/scratch",):
            if pair in q:
                lines.append(f"{'':<22}{pair} {q[pair]:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """bench.py's options: the shared ones, and the training and inference steps' counts and the GEMM's size."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_options(p, DEFAULT_SHAPES)
    p.add_argument("--steps", type=int, default=30, help="timed training steps per variant and shape (default 30)")
    p.add_argument("--round", type=int, default=5, help="steps a variant runs per turn (default 5)")
    p.add_argument(
        "--infer-tokens",
        type=int,
        default=400,
        help="timed generated tokens per variant and hidden size, batch 1 (default 400; 0 skips inference)",
    )
    p.add_argument("--infer-chunk", type=int, default=20, help="tokens per timed inference sample (default 20)")
    p.add_argument("--gemm-size", type=int, default=None, help="n of the n x n fp32 GEMM (default cpu 1024, cuda 4096)")
    p.add_argument(
        "--framework",
        action="store_true",
        help="time CharLM through Lightning's loop instead: bench_framework.py with the other options"
        " (--steps-per-call K among them; `--framework --help` lists them)",
    )
    return p


def run(args: argparse.Namespace) -> dict:
    """Time every variant at every shape (and at batch 1 for inference); return the report as --json writes it."""
    device = set_up(args)
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
    rows = [ratio_row(results, mode, B, H, device.type) for mode, B, H in jobs]
    report = report_head(args, device) | {
        "gemm_size": n,
        "gemm_samples": len(gemm_seconds),
        "gemm_gflops": gflops,
        # which implementation of the recurrence `fused` ran: "c" (gru_cpu.c) or "ops" (the torch-op loop)
        "fused_loop": "c" if backends.choose(device, torch.float32, True) == "c" else "ops",
        "results": results,
        "ratios": [q for q in rows if q],
    }
    if device.type == "cuda":
        report["tf32"] = args.tf32
        report["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        report["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return report


def ratios(report: dict) -> Iterable[tuple[str, float]]:
    """Each fused/torch and fused/scratch ratio of one run, named for --repeat's summary."""
    for q in report["ratios"]:
        for key in ("fused/torch", "fused/scratch"):
            if key in q:
                yield f"{q['mode']} B{q['batch']} H{q['hidden']} {key}", q[key]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--framework" in argv:
        argv.remove("--framework")
        bench_framework.main(argv)  # its own parser: its options, its one-line errors
        return
    parser = build_parser()
    if any(a.split("=")[0] == "--steps-per-call" for a in argv):
        parser.error("--steps-per-call K is a setting of Lightning's loop: give it with --framework")
    args = parser.parse_args(argv)
    check_common_options(parser, args, ("steps", "round", "infer_chunk", "gemm_size"))
    if args.infer_tokens < 0:
        parser.error(f"--infer-tokens must be >= 0 (0 skips inference), got {args.infer_tokens}")
    check_device_options(parser, args)
    run_and_report(args, run, format_report, ratios)


if __name__ == "__main__":
    main()
