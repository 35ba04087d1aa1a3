"""Benchmark: the same TPE search (hidden size, lr, clipping) with and without median pruning, side by side.

python scripts/bench_search.py [--trials 24] [--epochs 24] [--max-tokens 5000] [--out outputs/bench_search/<now>]

Both sweeps start at once, one thread each (so load on a shared machine hits both alike), from the same sampler
seed, over hparams_search=optuna's space on the Time Machine; each trial trains `--epochs` epochs of model=torch
on the first `--max-tokens` characters (validation: the 5 % after the corpus' first 90 %, data's default).
Prints a markdown table (wall time, best val/ppl, trials pruned, epochs trained) and writes bench_search.json.
The ratios are the measurement; absolute times depend on the machine's load (`uptime`). Wall time of sweeps run side
by side is skewed on a busy box (the one still running gets more of the CPU once the other ends); each sweep's own
CPU time (one thread, so its work) is not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import optuna

from gruexp.search import open_storage

ROOT = Path(__file__).resolve().parents[1]
# `hydra.sweeper.pruner=median`: Optuna's MedianPruner with its defaults: after 5 complete trials, stop a trial whose
# best val/ppl so far is worse than the median of the complete trials' at the same epoch
MEDIAN = "median"


def command(label: str, pruner: str, args: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gruexp.train",
        "hparams_search=optuna",
        "model=torch",
        f"trainer.max_epochs={args.epochs}",
        f"data.max_tokens={args.max_tokens}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=csv",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweeper.study_name={label}",
        f"hydra.sweep.dir={out / label}",
    ]


def study_stats(folder: Path) -> dict:
    study = optuna.load_study(study_name=folder.name, storage=open_storage(str(folder / "optuna.journal")))
    epochs = sum(json.loads(p.read_text())["epochs"] for p in folder.glob("*/summary.json"))
    states = [t.state for t in study.trials]
    return {
        "best_val_ppl": study.best_value,
        "best_params": study.best_params,
        "trials": len(states),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "failed": states.count(optuna.trial.TrialState.FAIL),
        "epochs_trained": epochs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=5000, help="training characters of the Time Machine per epoch")
    p.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "bench_search" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
    )
    args = p.parse_args()
    if args.out.exists():
        print(f"error: {args.out} exists: pass another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    runs = {"none": "none", "median": MEDIAN}
    procs, start = {}, {}
    load_before = os.getloadavg()
    for label, pruner in runs.items():
        log = (args.out / f"{label}.log").open("w")
        start[label] = time.perf_counter()
        procs[label] = subprocess.Popen(
            command(label, pruner, args, args.out), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    wall, cpu, failed = {}, {}, []

    def wait(label: str) -> None:
        _, status, usage = os.wait4(procs[label].pid, 0)  # the sweep's CPU time: load on the box does not count
        wall[label], cpu[label] = time.perf_counter() - start[label], usage.ru_utime + usage.ru_stime
        if status != 0:
            failed.append(label)

    threads = [threading.Thread(target=wait, args=(label,)) for label in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        print(f"error: the {', '.join(failed)} sweep failed: see {args.out}/<pruner>.log", file=sys.stderr)
        return 1
    stats = {label: {"wall_s": wall[label], "cpu_s": cpu[label], **study_stats(args.out / label)} for label in runs}
    none, median = stats["none"], stats["median"]
    saved = 1 - median["wall_s"] / none["wall_s"]
    saved_cpu = 1 - median["cpu_s"] / none["cpu_s"]
    gap = median["best_val_ppl"] / none["best_val_ppl"] - 1
    result = {
        "trials": args.trials,
        "epochs": args.epochs,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "stats": stats,
        "wall_time_cut": saved,
        "cpu_time_cut": saved_cpu,
        "best_val_ppl_gap": gap,
    }
    (args.out / "bench_search.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.trials}-trial TPE search, {args.epochs} epochs of {args.max_tokens} characters per trial, "
        "model=torch, Time Machine, both sweeps at once, 1 thread each"
    )
    print("| pruner | wall time (s) | CPU time (s) | best val/ppl | trials pruned | epochs trained |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, s in stats.items():
        print(
            f"| {label} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} | {s['best_val_ppl']:.3f} | {s['pruned']}/{s['trials']} "
            f"| {s['epochs_trained']} |"
        )
    print(
        f"median pruning: wall time {-saved:+.0%}, CPU time {-saved_cpu:+.0%}, best val/ppl {gap:+.1%} "
        "(load average before/after "
        f"{load_before[0]:.1f}/{result['loadavg_after'][0]:.1f}); {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
