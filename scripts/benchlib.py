"""What the benchmark scripts share: shapes and variants, the nets they time, the timers, the targets, the reports.

bench.py (variants against each other), bench_framework.py (Lightning's loop against the bare step),
framework_phases.py and profile_step.py import it; the scripts' folder is on sys.path when one of them runs, and
the tests put it there too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from gruexp.models import MODEL_NAMES, build_model, forward_flops_per_token

DEFAULT_SHAPES = "32x256,128x512,128x1024"
# `fused` with one backend forced (docs/fused-backends.md); fused-auto is fused as GRUEXP_FUSED_GPU=auto runs it;
# fused-d2l is fused with d2l's reset-before formula (model.reset_after=false), backend chosen as for fused-auto.
FUSED_VARIANTS = ("fused-cudnn", "fused-ops", "fused-auto", "fused-d2l")
CUDA_VARIANTS = ("scratch", "torch", "fused-cudnn", "fused-auto", "fused-d2l")  # cuda's default
# The pass/fail targets, (mode, device type, batch, hidden) -> {other variant: least fused/other ratio}; a batch or
# hidden of None matches any. The CPU ones are for --threads 2.
TARGETS: dict[tuple[str, str, int | None, int | None], dict[str, float]] = {
    ("train", "cpu", 32, 256): {"torch": 1.5, "scratch": 2.0},
    ("train", "cpu", 128, 1024): {"torch": 1.2},
    ("train", "cuda", 32, 256): {"torch": 1.0, "scratch": 10.0},
    ("infer", "cpu", 1, None): {"torch": 1.0},
    ("infer", "cuda", 1, None): {"torch": 1.0},
}
FRAMEWORK_TARGET = 0.95  # least framework/bare of fused through Lightning's loop, CPU, 2 threads, B32 H256
# the same with K > 1 optimizer steps per training-step call (issue 23): Lightning's loop is paid once per K steps
FRAMEWORK_TARGET_CHUNKED = 0.98
# The framework runs log every LOG_EVERY steps, as gruexp's trainer does; their rates are medians over windows of
# that many steps, so the logging steps count (a median of single steps would leave them out).
LOG_EVERY = 10


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


def parse_variants(text: str, choices: tuple[str, ...] = MODEL_NAMES + FUSED_VARIANTS) -> list[str]:
    """'torch,fused' -> ['torch', 'fused'], each one of `choices` (default MODEL_NAMES and FUSED_VARIANTS)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in choices]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose among {','.join(choices)}")
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


def make_net(variant: str, vocab_size: int, hidden_size: int, device: torch.device) -> torch.nn.Module:
    """build_model(variant) on `device`, or for fused-<backend> the fused model with that backend forced (auto: left
    to choose); the one place a benchmark variant name becomes a net."""
    if not variant.startswith("fused-"):
        return build_model(variant, vocab_size, hidden_size).to(device)
    if variant == "fused-d2l":
        return build_model("fused", vocab_size, hidden_size, reset_after=False).to(device)
    backend = variant.removeprefix("fused-")
    return build_model("fused", vocab_size, hidden_size, backend=None if backend == "auto" else backend).to(device)


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
        self.net = make_net(name, V, H, device).train()
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


def quiet_lightning() -> None:
    """Keep Lightning's banner lines (GPU available, ...), printed once per Trainer, out of the tables."""
    import lightning  # noqa: F401  (it sets its loggers' levels on import: set them after)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit_through_lightning(
    model,
    batches: list,
    timer,
    device: torch.device,
    max_steps: int = -1,
    floor: bool = False,
    gradient_clip_val: float | None = 1.0,
) -> None:
    """Train `model` (a CharLM) on `batches` with Trainer.fit as the framework runs are timed: gruexp's divergence and
    interrupt checks, then the `timer` callback, clipping at 1, a CSV logger every LOG_EVERY steps, no validation.
    With `floor` (bench_framework.floor_module), the same clipping and loop with no logger and no callback but the
    timer. `gradient_clip_val` None: the model clips itself (manual optimization, K steps per call)."""
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
            gradient_clip_val=gradient_clip_val,
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


def add_common_options(p: argparse.ArgumentParser, default_shapes: str) -> None:
    """The options bench.py and bench_framework.py share: device, threads, shapes, variants, T, V, seed, runs, JSON."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: the CPU targets')")
    p.add_argument(
        "--shapes", type=parse_shapes, default=parse_shapes(default_shapes), help=f"BxH list ({default_shapes})"
    )
    p.add_argument(
        "--variants",
        type=parse_variants,
        default=None,
        help=f"scratch,torch,fused and {','.join(FUSED_VARIANTS)} (default cpu: scratch,torch,fused;"
        f" cuda: {','.join(CUDA_VARIANTS)})",
    )
    p.add_argument("--tf32", action="store_true", help="cuda: allow TF32 in cuBLAS and cuDNN alike")
    p.add_argument("--num-steps", type=int, default=35, help="T, time steps per sequence (d2l: 35)")
    p.add_argument("--vocab-size", type=int, default=28, help="V (d2l's character vocabulary: 28)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant and shape first (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat", type=int, default=1, help="run everything N times; report each ratio's median and spread"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file (never overwritten)")


def check_common_options(parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Iterable[str]) -> None:
    """Refuse, in one line and exit 2, what would fail or mislead only after minutes of timing."""
    check_positive(parser, args, ("threads", "num_steps", "vocab_size", "warmup", "repeat", *positive), ("warmup",))


def check_positive(
    parser: argparse.ArgumentParser, args: argparse.Namespace, options: Iterable[str], zero_ok: Iterable[str] = ()
) -> None:
    """Refuse an option below 1 (below 0 for those in `zero_ok`), in one line and exit 2; None is not given."""
    for option in options:
        value = getattr(args, option)
        if value is not None and value < (0 if option in zero_ok else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive, got {value}")


def check_new_json(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a --json path that exists: a report is never written over another."""
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} exists and would be overwritten: pass a new path")


def check_device_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a device, variant or --json that cannot run as asked, before any timing."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch build or machine has no CUDA device; use --device cpu")
    variants = args.variants or []
    if {"fused-auto", "fused-d2l"} & set(variants) and os.environ.get("GRUEXP_FUSED_GPU", "auto") != "auto":
        parser.error("--variants fused-auto/fused-d2l run fused as GRUEXP_FUSED_GPU=auto does: unset GRUEXP_FUSED_GPU")
    check_new_json(parser, args)


def set_up(args: argparse.Namespace) -> torch.device:
    """The device, with args' threads and TF32 setting, and args.variants filled in with the device's default."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.variants is None:
        args.variants = list(CUDA_VARIANTS if device.type == "cuda" else MODEL_NAMES)
    # one TF32 setting for every variant: torch's matmuls and cuDNN
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    return device


def report_head(args: argparse.Namespace, device: torch.device) -> dict:
    """The fields every report opens with: where, when, which torch, and the sequence shape."""
    return {
        "device": device_description(device, args.threads),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": args.threads,
        "num_steps": args.num_steps,
        "vocab_size": args.vocab_size,
    }


def summarize(series: dict[str, list[float]]) -> dict[str, dict]:
    """Each ratio over the runs: its median, min and max ('train B32 H256 fused/scratch' -> {...})."""
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in series.items()}


def format_summary(summary: dict[str, dict], n: int) -> str:
    """The --repeat lines: each ratio's median and its min-max over the n runs."""
    lines = [f"over {n} runs: median (min-max)"]
    for key, s in summary.items():
        lines.append(f"  {key:<38}{s['median']:>7.3f}  ({s['min']:.3f}-{s['max']:.3f})")
    return "\n".join(lines)


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict],
    format_report: Callable[[dict], str],
    ratios: Callable[[dict], Iterable[tuple[str, float]]],
) -> None:
    """Run `run` args.repeat times, print each report's table and, over several runs, each ratio's spread; write
    the one report (or {"repeat", "summary", "runs"}) to args.json."""
    reports = []
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"run {i + 1}/{args.repeat}", file=sys.stderr, flush=True)
        reports.append(run(args))
        print(format_report(reports[-1]) + "\n")
    report = reports[0]
    if args.repeat > 1:
        series: dict[str, list[float]] = {}
        for r in reports:
            for key, value in ratios(r):
                series.setdefault(key, []).append(value)
        summary = summarize(series)
        print(format_summary(summary, args.repeat))
        report = {"repeat": args.repeat, "summary": summary, "runs": reports}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
