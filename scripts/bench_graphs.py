#!/usr/bin/env python
"""CUDA graphs against eager steps, as a user trains: each variant and shape run by `python -m gruexp.train`, once
with one eager optimizer step per call and once with K steps per call captured as a CUDA graph.

    python scripts/bench_graphs.py [--device cuda|cpu] [--shapes 32x256,128x512] [--variants scratch,torch,fused]
                                   [--steps 128] [--epochs 3] [--steps-per-call 16] [--runs-dir DIR] [--json PATH]
                                   [HYDRA_OVERRIDE ...]

Each run is gruexp's command with `model=V model.hidden_size=H data.batch_size=B`, `steps_per_call=1
cuda_graph=false` (eager) or `steps_per_call=K cuda_graph=true` (graph), --epochs epochs of --steps optimizer
steps (trainer.limit_train_batches, cut to what every epoch of the corpus holds and to whole chunks of K), the CSV
logger only (no W&B), and the overrides given after the options (e.g. trainer.precision=bf16-mixed). Its rate is
the run's own train/tokens_per_sec (and train/mfu, where the device's peak is known) over the epochs after the
first, which holds the start-up, the first chunk and the capture. graph/eager per variant and shape is set against
the issue's targets on a GPU: >= 5x for torch and fused, >= 10x for scratch, at B32 H256.

--device cpu is a smoke mode, for the tests: gruexp refuses cuda_graph=true without CUDA, so there the second run
is K steps per call eagerly (cuda_graph=false), and its ratio has no target. Exit status 1 if a run failed or, on
CUDA, a graph run fell back to eager steps (its log line is in the report); 2 for options that cannot run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from benchlib import check_new_json, check_positive, device_description, parse_shapes, parse_variants

from gruexp.models import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
# graph/eager tokens/s at least, on CUDA: (batch, hidden) -> {variant: ratio}
TARGETS = {(32, 256): {"torch": 5.0, "fused": 5.0, "scratch": 10.0}}


def epoch_batches(overrides: list[str], epochs: int) -> int:
    """The fewest batches any of the run's epochs holds: the data module as the run builds it (its offset moves
    from epoch to epoch), so that --steps can be cut to what every epoch trains."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=overrides)
    seed = cfg.seed if cfg.seed is not None else 0  # seed=null draws one: its offsets are not known before
    sampler = instantiate(cfg.data, seed=seed).train_dataloader().sampler
    counts = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts.append(sampler.num_batches())
    return min(counts)


def run_train(run_dir: Path, overrides: list[str]) -> dict:
    """One `python -m gruexp.train` run in run_dir; its status and its rate and MFU over the epochs after the first."""
    cmd = [sys.executable, "-m", "gruexp.train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    src = str(ROOT / "src")  # this checkout's gruexp, installed or not
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    row: dict = {"exit": rc, "log": str(log)}
    summary = run_dir / "summary.json"
    s = json.loads(summary.read_text()) if summary.is_file() else {}
    row |= {
        "status": s.get("status", "no summary.json"),
        "val_ppl": s.get("val_ppl"),
        "global_step": s.get("global_step"),
    }
    row["run_tokens_per_sec"] = s.get("tokens_per_sec")  # the whole run's, first epoch included
    lines = log.read_text(errors="replace").splitlines()
    row["fallback"] = next((line.strip() for line in lines if "cuda_graph:" in line), None)
    if rc != 0 or row["status"] != "completed":
        row["error"] = next((line.strip() for line in reversed(lines) if line.strip()), f"exit {rc}")
    rates, mfus = [], []
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        with metrics.open() as f:
            epochs = [r for r in csv.DictReader(f) if r.get("train/tokens_per_sec")]
        for r in sorted(epochs, key=lambda r: int(r["epoch"]))[1:]:
            rates.append(float(r["train/tokens_per_sec"]))
            if r.get("train/mfu"):
                mfus.append(float(r["train/mfu"]))
    # every epoch trains as many tokens: the rate of them all is the harmonic mean of the epochs' rates
    row["tokens_per_sec"] = len(rates) / sum(1 / r for r in rates) if rates else None
    row["mfu"] = len(mfus) / sum(1 / m for m in mfus) if mfus and all(mfus) else None
    row["epochs_timed"] = len(rates)
    return row


def ratio_rows(runs: list[dict], cuda: bool) -> list[dict]:
    """graph/eager tokens/s per variant and shape, with the target where the issue sets one (on CUDA)."""
    out = []
    for eager in (r for r in runs if r["mode"] == "eager"):
        key = (eager["variant"], eager["batch"], eager["hidden"])
        other = next(r for r in runs if r["mode"] != "eager" and (r["variant"], r["batch"], r["hidden"]) == key)
        row = {"variant": key[0], "batch": key[1], "hidden": key[2], "steps": eager["steps"]}
        row |= {"eager_tokens_per_sec": eager["tokens_per_sec"], "graph_tokens_per_sec": other["tokens_per_sec"]}
        row |= {"eager_mfu": eager["mfu"], "graph_mfu": other["mfu"]}
        ok = eager["tokens_per_sec"] and other["tokens_per_sec"]
        row["graph/eager"] = other["tokens_per_sec"] / eager["tokens_per_sec"] if ok else None
        target = TARGETS.get(key[1:], {}).get(key[0]) if cuda else None
        if target is not None:
            row["target graph/eager"] = target
        out.append(row)
    return out


def format_table(report: dict) -> str:
    """The markdown table a person reads (and docs/benchmarks.md takes): one row per variant and shape."""
    K, label = report["steps_per_call"], report["graph_label"]
    lines = [
        f"device: {report['device']}, torch {report['torch']}; eager: steps_per_call=1 cuda_graph=false; {label}:"
        f" steps_per_call={K} cuda_graph={'true' if report['cuda'] else 'false'}; {report['epochs']} epochs a run"
        " of `steps` optimizer steps each, rates over the epochs after the first",
        "",
        f"| variant | B x H | steps | eager tok/s | eager MFU | {label} tok/s | {label} MFU | {label}/eager | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in report["ratios"]:
        ratio, target = r["graph/eager"], r.get("target graph/eager")
        verdict = "-" if target is None else f"{'ok' if ratio is not None and ratio >= target else 'below'} {target:g}x"
        cells = [r["variant"], f"{r['batch']} x {r['hidden']}", str(r["steps"])]
        cells += [num(r["eager_tokens_per_sec"], ",.0f"), num(r["eager_mfu"], ".4f")]
        cells += [num(r["graph_tokens_per_sec"], ",.0f"), num(r["graph_mfu"], ".4f")]
        cells += ["-" if ratio is None else f"{ratio:.2f}x", verdict]
        lines.append("| " + " | ".join(cells) + " |")
    for r in report["runs"]:
        if r.get("error") or (report["cuda"] and r["mode"] == "graph" and r["fallback"]):
            why = r.get("error") or r["fallback"]
            lines.append(
                f"\n{r['mode']} {r['variant']} B{r['batch']} H{r['hidden']}: {r['status']}: {why} ({r['log']})"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.epilog = __doc__.split("\n\n", 2)[2]
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda; cpu: the smoke mode (see below)")
    p.add_argument("--shapes", type=parse_shapes, default=parse_shapes("32x256,128x512"), help="BxH list")
    p.add_argument(
        "--variants",
        type=functools.partial(parse_variants, choices=MODEL_NAMES),  # gruexp's own model= choices
        default=list(MODEL_NAMES),
        help=",".join(MODEL_NAMES) + " (all)",
    )
    p.add_argument("--steps", type=int, default=128, help="optimizer steps per epoch (default 128, cut as above)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, the first untimed (default 3)")
    p.add_argument("--steps-per-call", type=int, default=16, help="K of the graph runs (default 16)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: as set)")
    p.add_argument("--runs-dir", type=Path, default=None, help="keep the runs' folders and logs here (default: none)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file (never overwritten)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.precision=bf16-mixed")
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, in one line and exit 2, what cannot run as asked, before any run starts."""
    check_positive(p, args, ("steps", "steps_per_call", "threads"))
    if args.steps < args.steps_per_call:
        p.error(f"--steps {args.steps} must be at least --steps-per-call {args.steps_per_call} (whole chunks)")
    if args.epochs < 2:
        p.error(f"--epochs must be at least 2 (the first is untimed), got {args.epochs}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch build or machine has no CUDA device; --device cpu is the smoke mode")
    check_new_json(p, args)
    if args.runs_dir is not None and args.runs_dir.exists() and any(args.runs_dir.iterdir()):
        p.error(f"--runs-dir {args.runs_dir} holds files already: pass a new or empty folder")
    mine = ("model=", "model.hidden_size=", "data.batch_size=", "steps_per_call=", "cuda_graph=", "trainer.max_epochs=")
    taken = [o for o in args.overrides if o.lstrip("+~").startswith(mine + ("trainer.limit_train_batches=",))]
    if taken:
        p.error(f"{' '.join(taken)}: the script sets these itself (--variants, --shapes, --steps, ...)")


def run(args: argparse.Namespace, runs_dir: Path) -> dict:
    """Every variant at every shape, eager then graph (cpu: K steps eagerly); the report --json writes."""
    cuda, K = args.device == "cuda", args.steps_per_call
    accelerator = "gpu" if cuda else "cpu"
    base = ["logger=csv", f"trainer.accelerator={accelerator}", "trainer.enable_progress_bar=false"]
    base += [f"trainer.max_epochs={args.epochs}", *args.overrides]
    modes = {"eager": ["steps_per_call=1", "cuda_graph=false"]}
    modes["graph" if cuda else "chunked"] = [f"steps_per_call={K}", f"cuda_graph={'true' if cuda else 'false'}"]
    runs = []
    for B, H in args.shapes:
        shape = [f"data.batch_size={B}", f"model.hidden_size={H}"]
        fits = epoch_batches([*base, *shape], args.epochs)
        steps = min(args.steps, fits) // K * K  # whole chunks: a short one would run eagerly
        if steps < 1:
            raise SystemExit(f"bench_graphs: B{B} H{H}: an epoch holds {fits} batches, fewer than K={K}")
        for v in args.variants:
            for mode, settings in modes.items():
                print(
                    f"training {mode} {v} B={B} H={H}, {steps} steps x {args.epochs} ...", file=sys.stderr, flush=True
                )
                name = f"{mode}_{v}_B{B}_H{H}"
                overrides = [f"model={v}", *shape, *base, *settings, f"trainer.limit_train_batches={steps}"]
                row = {"mode": mode, "variant": v, "batch": B, "hidden": H, "steps": steps}
                row |= {"steps_per_call": 1 if mode == "eager" else K, "overrides": overrides}
                runs.append(row | run_train(runs_dir / name, overrides))
    return {
        "device": device_description(torch.device(args.device), args.threads or torch.get_num_threads()),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": cuda,
        "graph_label": "graph" if cuda else "chunked",
        "steps_per_call": K,
        "steps": args.steps,
        "epochs": args.epochs,
        "overrides": args.overrides,
        "runs": runs,
        "ratios": ratio_rows(runs, cuda),
    }


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check(p, args)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        runs_dir.mkdir(parents=True, exist_ok=True)
        report = run(args, runs_dir.resolve())
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = [r for r in report["runs"] if r.get("error") or (report["cuda"] and r["mode"] == "graph" and r["fallback"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
