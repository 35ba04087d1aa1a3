"""A sweep's results, read in one place: each job folder's summary.json and .hydra/overrides.yaml.

- read_jobs: every job of a sweep folder, for PrintBestRun, SweepOutcome, scripts/report.py and the local launcher.
- is_grid_sweep: whether this multirun is a grid (Hydra's BasicSweeper) rather than a search (Optuna).
- PrintBestRun, SweepOutcome: Hydra callbacks at a sweep's end: the jobs by val/ppl and best.json; the failed jobs.

Imported by Hydra's plugin scan (through the local launcher), so torch and Lightning are imported only when needed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def is_grid_sweep(hydra_cfg: Any) -> bool:
    """Whether a multirun's sweeper is Hydra's BasicSweeper (a grid): its failed jobs are outcomes, not stops."""
    return "BasicSweeper" in str(hydra_cfg.sweeper.get("_target_"))


def read_summary(folder: Path) -> dict[str, Any] | None:
    """A job folder's summary.json, or None when it has none (or none that can be read)."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def read_jobs(sweep_dir: Path, since: float | None = None) -> list[dict[str, Any]]:
    """Every job folder of a sweep (one holding summary.json or .hydra/config.yaml), in job-number order.

    Each is {"job": its name, "folder", "overrides": its .hydra/overrides.yaml, "summary": its summary.json or None
    when it died before writing one}. `since`: leave out jobs whose summary.json is older (a resumed Optuna study's
    folder holds earlier invocations' jobs too).
    """
    jobs = []
    for folder in sweep_dir.iterdir() if sweep_dir.is_dir() else ():
        written = folder / "summary.json"
        if not written.is_file() and not (folder / ".hydra" / "config.yaml").is_file():
            continue
        try:
            if since is not None and written.stat().st_mtime < since - 1:
                continue
        except OSError:
            continue  # no summary.json: not a job of this invocation either
        overrides = folder / ".hydra" / "overrides.yaml"
        jobs.append(
            {
                "job": folder.name,
                "folder": folder,
                "overrides": OmegaConf.to_container(OmegaConf.load(overrides)) if overrides.is_file() else [],
                "summary": read_summary(folder),
            }
        )
    return sorted(jobs, key=lambda j: (not j["job"].isdigit(), int(j["job"]) if j["job"].isdigit() else 0, j["job"]))


class PrintBestRun(HydraCallback):
    """Hydra callback: when a sweep ends, print its jobs by val/ppl and the winner; write best.json beside them."""

    def __init__(self, metric: str = "val_ppl"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from gruexp.checkpoints import atomic_write

        sweep_dir = Path(config.hydra.sweep.dir)
        everyone = [
            {"job": j["job"], "overrides": j["overrides"], **j["summary"]}
            for j in read_jobs(sweep_dir)
            if j["summary"] is not None
        ]
        jobs = [j for j in everyone if not math.isnan(j.get(self.metric, math.nan))]
        pruned = [j for j in jobs if j.get("status") == "pruned"]  # stopped early by Optuna: not comparable
        jobs = [j for j in jobs if j.get("status") != "pruned"]
        if pruned:
            log.info(
                "%d jobs pruned, not ranked: %s",
                len(pruned),
                ", ".join(
                    f"job {j['job']} at epoch {j.get('pruned_epoch')}"
                    for j in sorted(pruned, key=lambda j: int(j["job"]))
                ),
            )
        if not jobs:
            log.warning("sweep %s: no job wrote a %s to its summary.json", sweep_dir, self.metric)
            return
        jobs.sort(key=lambda j: j[self.metric])
        # what differs between the sweep's jobs, failed and diverged ones included: a winner among one is still
        # named by the values it was given
        common = set.intersection(*(set(j["overrides"]) for j in everyone))
        for j in jobs:
            swept = " ".join(o for o in j["overrides"] if o not in common)
            log.info("job %s  %s %.3f  %s", j["job"], self.metric, j[self.metric], swept)
        best = jobs[0]
        log.info(
            "best of %s jobs: job %s (%s), %s %.3f: %s",
            len(jobs) if len(jobs) == len(everyone) else f"{len(jobs)} of {len(everyone)}",
            best["job"],
            sweep_dir / best["job"],
            self.metric,
            best[self.metric],
            " ".join(o for o in best["overrides"] if o not in common) or "(all jobs alike)",
        )
        payload = {
            "job": best["job"],
            "folder": str(sweep_dir / best["job"]),
            self.metric: best[self.metric],
            "overrides": best["overrides"],
        }
        text = json.dumps(payload, indent=2) + "\n"
        atomic_write(sweep_dir / "best.json", lambda f: f.write(text.encode()))  # as summary.json: never half


class SweepOutcome(HydraCallback):
    """When a sweep ends (after PrintBestRun wrote best.json for the jobs that finished): name each job that failed
    on bad input or diverged, and exit 1.

    Such a job is an outcome, recorded in its summary.json, so train.main lets the sweep go on (Hydra's sweepers
    stop at the first job that raises, before any on_multirun_end); bugs still raise as before.
    """

    OK = ("completed", "pruned")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()  # a resumed Optuna study's folder holds earlier invocations' jobs too

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_grid_sweep(config.hydra):
            return  # a search (Optuna) records failed trials in its study and decides its own exit (train.main)
        failed = [
            f"Error executing job with overrides: {j['overrides']} (job {j['job']} "
            f"{j['summary'].get('status')}: {j['summary'].get('error', '')})"
            for j in read_jobs(Path(str(config.hydra.sweep.dir)), since=getattr(self, "_started", 0))
            if j["summary"] is not None and j["summary"].get("status") not in self.OK
        ]
        if failed:
            print("\n".join(failed), file=sys.stderr)
            raise SystemExit(1)
