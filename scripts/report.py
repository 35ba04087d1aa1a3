"""A sweep's report without a server: report.md (jobs sorted by val/ppl) and PNG plots, also sent to its W&B group.

python scripts/report.py outputs/train/multirun/<sweep>            [--no-wandb]

Reads every job folder's summary.json and csv/metrics.csv (the CSV logger's history), writes into the sweep folder
report.md and the plots its data supports: val_ppl_curves.png (val/ppl per epoch, when a job has 2 or more epochs),
val_ppl_heatmap.png (hidden size x lr per model and clip, when that is a grid of >= 2 x >= 2) and tokens_per_sec.png.
Jobs that diverged or failed are listed as such, last.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gruexp import UserError  # noqa: E402
from gruexp.sweeps import read_jobs  # noqa: E402
from gruexp.tracking import plot_ppl_curves, wandb_mode  # noqa: E402

log = logging.getLogger("gruexp.report")

COLUMNS = ["job", "model", "hidden", "lr", "clip", "val/ppl", "train/ppl", "tokens/sec", "epochs", "status"]
PLOTS = ("val_ppl_curves.png", "val_ppl_heatmap.png", "tokens_per_sec.png")
# Optuna's importances (PED-ANOVA, its default) compare the parameters of the best 10 % of the finished trials with
# all of them: below this many, that best part is one trial, and the ranking is chance; the plot and report.md say so.
FEW_TRIALS = 20


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_job(job: dict[str, Any]) -> dict[str, Any]:
    """One job's row (a job of sweeps.read_jobs): its summary.json, or its Hydra config when it died before writing
    one, plus its history."""
    folder, s = job["folder"], job["summary"]
    if s is not None:
        row = {
            "model": s.get("model"),
            "hidden": s.get("hidden_size"),
            "lr": s.get("lr"),
            "clip": s.get("gradient_clip_val"),
            "val/ppl": _num(s.get("val_ppl")),
            "train/ppl": _num(s.get("train_ppl")),
            "tokens/sec": _num(s.get("tokens_per_sec")),
            "epochs": s.get("epochs"),
            "status": s.get("status", "completed"),
            "load": _num(s.get("load_at_start")),  # only where the run started on a busy machine
        }
    else:  # the job raised (or was killed) before train() could write its summary
        config = folder / ".hydra" / "config.yaml"
        c = OmegaConf.load(config) if config.is_file() else OmegaConf.create()
        row = {
            "model": OmegaConf.select(c, "model.name"),
            "hidden": OmegaConf.select(c, "model.hidden_size"),
            "lr": OmegaConf.select(c, "optimizer.lr"),
            "clip": OmegaConf.select(c, "trainer.gradient_clip_val"),
            **{k: math.nan for k in ("val/ppl", "train/ppl", "tokens/sec")},
            "epochs": None,
            "status": "failed",
            "load": math.nan,
        }
    if row["status"] == "completed" and not math.isfinite(row["val/ppl"]):
        row["status"] = "diverged"
    row["job"] = job["job"]
    row["history"] = read_history(folder / "csv" / "metrics.csv")
    return row


def read_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch train/ppl and val/ppl from a CSVLogger metrics.csv (epochs counted from 1); empty if none."""
    out: dict[str, list[tuple[int, float]]] = {"train/ppl": [], "val/ppl": []}
    if not path.is_file():
        return out
    with path.open() as f:
        for row in csv.DictReader(f):
            for key, points in out.items():
                if row.get(key) not in (None, "") and row.get("epoch") not in (None, ""):
                    points.append((int(float(row["epoch"])) + 1, float(row[key])))
    return out


def find_jobs(sweep: Path) -> list[dict[str, Any]]:
    """Every job folder of a sweep (a child holding summary.json or .hydra/config.yaml), in job-number order."""
    if not sweep.is_dir():
        raise UserError(f"{sweep} is not a folder: pass a sweep folder such as outputs/train/multirun/<date>")
    jobs = read_jobs(sweep)
    if not jobs:
        raise UserError(f"{sweep} holds no job folders (none has summary.json or .hydra/config.yaml): is it a sweep?")
    return [read_job(j) for j in jobs]


def ranked(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completed jobs by val/ppl, best first; diverged and failed ones after them."""
    return sorted(jobs, key=lambda j: (j["status"] != "completed", _finite_or_inf(j["val/ppl"])))


def _finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def _fmt(v: Any, key: str) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "—"
        return f"{v:,.0f}" if key == "tokens/sec" else f"{v:.3f}" if "ppl" in key else f"{v:g}"
    return str(v)


def label(job: dict[str, Any]) -> str:
    """A job's short name in plots: number, model and its hyperparameters."""
    return f"#{job['job']} {job['model']} h{job['hidden']} lr{job['lr']:g} clip{_fmt(job['clip'], 'clip')}"


def write_markdown(sweep: Path, jobs: list[dict[str, Any]], images: list[Path]) -> Path:
    """report.md: the jobs table sorted by val/ppl, then the plots that were drawn (and why others were not)."""
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"{len(jobs)} jobs, {sum(j['status'] == 'completed' for j in jobs)} completed; sorted by val/ppl (lower is "
        "better). Written by `scripts/report.py`.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for j in ranked(jobs):
        status = j["status"] if j["status"] == "completed" else f"**{j['status']}**"
        lines.append("| " + " | ".join(_fmt(j[c], c) if c != "status" else status for c in COLUMNS) + " |")
    for p in images:
        lines += ["", f"![{p.name}]({p.name})"]
        if p.name == PLOTS[2]:
            lines += ["", throughput_caveat(jobs)]
    drawn = {p.name for p in images}
    if PLOTS[0] not in drawn:
        lines += ["", "No perplexity curves: no job validated on 2 or more epochs (the table has each job's value)."]
    if PLOTS[1] not in drawn:
        lines += ["", "No heat map: no model and clip value was run on a grid of >= 2 hidden sizes x >= 2 lrs."]
    lines.append("")
    path = sweep / "report.md"
    path.write_text("\n".join(lines))
    return path


def _val_curve(job: dict[str, Any]) -> list[tuple[int, float]]:
    return [(e, v) for e, v in job["history"]["val/ppl"] if math.isfinite(v)]


def curve_lines(jobs: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The lines of val_ppl_curves.png: legend label -> (epoch, val/ppl) points, best last val/ppl first.

    Jobs whose curves are equal to 4 significant digits (torch and fused at one seed, say) share one line whose
    label names them all, so that no curve hides another without a word. Empty when no job has 2 epochs.
    """
    curves = [(j, _val_curve(j)) for j in jobs]
    if max((len(c) for _, c in curves), default=0) < 2:
        return {}
    same: dict[tuple, list[tuple[dict[str, Any], list]]] = defaultdict(list)
    for job, curve in curves:
        if curve:
            same[tuple((e, float(f"{v:.4g}")) for e, v in curve)].append((job, curve))
    lines = {}
    for group in sorted(same.values(), key=lambda g: g[0][1][-1][1]):
        names = [label(j) for j, _ in group]
        name = names[0] if len(names) == 1 else " = ".join(names) + " (identical)"
        lines[f"{name}: {group[0][1][-1][1]:.3f}"] = group[0][1]
    return lines


def plot_curves(jobs: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """val/ppl per epoch, one line per job (see curve_lines); None (no plot) when no job has 2 epochs."""
    lines = curve_lines(jobs)
    if not lines:
        return None
    return plot_ppl_curves({k: {"val/ppl": v} for k, v in lines.items()}, path, title)


def _grid_panels(jobs: list[dict[str, Any]]) -> dict[tuple, dict[tuple, dict]]:
    """Per (model, clip), the jobs by (hidden, lr), keeping only panels with >= 2 hidden sizes and >= 2 lrs."""
    panels: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for j in jobs:
        panels[(j["model"], j["clip"])][(j["hidden"], j["lr"])] = j  # a repeated cell keeps the later job
    return {
        k: cells for k, cells in panels.items() if min(len({h for h, _ in cells}), len({lr for _, lr in cells})) >= 2
    }


def plot_heatmap(jobs: list[dict[str, Any]], path: Path) -> Path | None:
    """val/ppl over hidden size (rows) x lr (columns), one panel per (model, clip) that is a grid (>= 2 x 2).

    None (no plot) when no panel is a grid: a 1 x N heat map says nothing the table does not. Blank cells name the
    failure; the best cell of each panel is framed.
    """
    panels = _grid_panels(jobs)
    if not panels:
        return None
    keys = sorted(panels, key=lambda k: (str(k[0]), _num(k[1])))
    finite = [j["val/ppl"] for k in keys for j in panels[k].values() if math.isfinite(j["val/ppl"])]
    norm = LogNorm(min(finite), max(finite) * 1.0001) if finite else None
    widest = max(len({lr for _, lr in panels[k]}) for k in keys)
    fig, axes = plt.subplots(
        1,
        len(keys),
        figsize=(1.6 + (1.2 + 1.1 * widest) * len(keys), 4.2),
        dpi=110,
        squeeze=False,
        layout="constrained",
    )
    image = None
    for i, (ax, key) in enumerate(zip(axes[0], keys, strict=True)):
        cells = panels[key]
        hiddens = sorted({h for h, _ in cells})
        lrs = sorted({lr for _, lr in cells})
        grid = [[cells.get((h, lr), {}).get("val/ppl", math.nan) for lr in lrs] for h in hiddens]
        image = ax.imshow(grid, cmap="viridis_r", norm=norm, aspect="auto")
        best = min(
            ((v, r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if math.isfinite(v)), default=None
        )
        for r, h in enumerate(hiddens):
            for c, lr in enumerate(lrs):
                job, v = cells.get((h, lr)), grid[r][c]
                if job is None:
                    continue
                ok = math.isfinite(v) and norm is not None
                shade = sum(image.cmap(norm(v))[:3]) / 3 if ok else 1.0  # dark cell: white text
                text = _fmt(v, "val/ppl") if ok else job["status"]
                color = "white" if shade < 0.5 else "black"
                ax.text(c, r, text, ha="center", va="center", fontsize=10, color=color)
        if best is not None:
            _, r, c = best
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(hiddens)), [str(h) for h in hiddens])
        ax.set_xlabel("lr")
        if i == 0:
            ax.set_ylabel("hidden size")
        ax.set_title(f"{key[0]}, clip {_fmt(key[1], 'clip')}", fontsize=11)
    fig.suptitle("val/ppl by hidden size and learning rate", fontsize=12)
    if image is not None and norm is not None:
        bar = fig.colorbar(image, ax=axes[0].tolist(), label="val/ppl (lower is better; red: best)", shrink=0.9)
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        bar.ax.yaxis.set_major_formatter(plain)
        bar.ax.yaxis.set_minor_formatter(plain)
    fig.savefig(path)
    plt.close(fig)
    return path


def thousands(v: float, _pos: Any = None) -> str:
    """An axis tick or label as a whole number with thousands separators: 82,179."""
    return f"{v:,.0f}"


def throughput_bars(jobs: list[dict[str, Any]]) -> list[tuple[str, float, tuple[float, float] | None]]:
    """tokens_per_sec.png's bars: (label, mean tokens/sec, (min, max) or None) per variant (model, hidden size).

    The range (whiskers) only for a variant that ran several jobs; the job count is named when any did.
    """
    groups: dict[tuple, list[float]] = defaultdict(list)
    for j in jobs:
        if math.isfinite(j["tokens/sec"]):
            groups[(str(j["model"]), j["hidden"])].append(j["tokens/sec"])
    several = any(len(v) > 1 for v in groups.values())
    bars = []
    for key in sorted(groups, key=lambda k: (k[0], _num(k[1]))):
        v = groups[key]
        count = f"\n{len(v)} job{'s' if len(v) > 1 else ''}" if several else ""
        bars.append((f"{key[0]}\nh{key[1]}{count}", sum(v) / len(v), (min(v), max(v)) if len(v) > 1 else None))
    return bars


def throughput_caveat(jobs: list[dict[str, Any]]) -> str:
    """What tokens_per_sec.png's differences can mean: each job's rate is its machine's, loaded as it was then."""
    busy = [j for j in jobs if math.isfinite(j.get("load", math.nan))]
    line = (
        "Each rate is measured while its job ran: other work on the machine lowers it, so small differences are noise."
    )
    if busy:
        top = max(j["load"] for j in busy)
        line += (
            f" {len(busy)} of {len(jobs)} jobs started on a busy machine (load average up to {top:.1f}), slower for it."
        )
    return line


def plot_throughput(jobs: list[dict[str, Any]], path: Path) -> Path | None:
    """Training tokens/sec per variant (see throughput_bars); None when no job has a throughput."""
    bars = throughput_bars(jobs)
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(2.2 + 1.3 * max(len(bars), 2), 4.2), dpi=110)
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
    ranged = [(rect, mean, r) for rect, (_, mean, r) in zip(drawn, bars, strict=True) if r is not None]
    if ranged:
        ax.errorbar(
            [rect.get_x() + rect.get_width() / 2 for rect, _, _ in ranged],
            [mean for _, mean, _ in ranged],
            yerr=[[mean - r[0] for _, mean, r in ranged], [r[1] - mean for _, mean, r in ranged]],
            fmt="none",
            ecolor="black",
            capsize=5,
        )
    # inside the bars when whiskers stand on their tops, above them otherwise
    where = {"label_type": "center", "color": "white"} if ranged else {"padding": 3}
    ax.bar_label(drawn, [thousands(b[1]) for b in bars], fontsize=9, **where)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(thousands))
    ax.set(ylabel="training tokens/sec")
    what = "mean over its jobs; whiskers: min to max" if ranged else "one job each"
    ax.set_title(f"training tokens/sec per variant\n({what})", fontsize=10)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def wandb_is_on(sweep: Path) -> bool:
    """W&B was on for the sweep when its jobs logged to it (an offline/online run folder or a wandb logger config)."""
    for d in sweep.iterdir():
        if (d / "wandb").is_dir():
            return True
        cfg = d / ".hydra" / "config.yaml"
        if cfg.is_file() and OmegaConf.select(OmegaConf.load(cfg), "logger.wandb") is not None:
            return True
    return False


def log_to_wandb(sweep: Path, jobs: list[dict[str, Any]], images: list[Path]) -> None:
    """Send the table and images to the sweep's W&B group (job type `report`), in the mode the jobs would use."""
    import wandb

    from gruexp.tracking import WandbLogger

    logger = WandbLogger(
        save_dir=str(sweep), project="gruexp", name=f"report-{sweep.name}", group=sweep.name, job_type="report"
    )
    run = logger.experiment
    table = wandb.Table(columns=COLUMNS, data=[[j[c] for c in COLUMNS] for j in ranked(jobs)])
    run.log({"report/jobs": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in images}})
    logger.finalize("success")


def report(sweep: Path, use_wandb: bool | None = None) -> Path:
    """Write report.md and the plots that fit the sweep's data into its folder; log them to W&B when it is on.

    Curves need a job with 2 or more validation epochs, the heat map a grid (>= 2 hidden sizes x >= 2 lrs); a plot
    an earlier report wrote that no longer fits is removed, so the folder never shows a stale one. Returns report.md.
    """
    jobs = find_jobs(sweep)
    made = [
        plot_curves(jobs, sweep / PLOTS[0], f"validation perplexity per epoch ({sweep.name})"),
        plot_heatmap(jobs, sweep / PLOTS[1]),
        plot_throughput(jobs, sweep / PLOTS[2]),
    ]
    for name, image in zip(PLOTS, made, strict=True):
        if image is None:
            (sweep / name).unlink(missing_ok=True)
    images = [p for p in made if p is not None]
    path = write_markdown(sweep, jobs, images)
    optuna_images, caveat = plot_optuna_views(sweep)  # hparams_search=optuna: Optuna's views of the study
    if optuna_images:
        text = "".join(f"![{p.name}]({p.name})\n" for p in optuna_images)
        path.write_text(path.read_text() + text + (f"\nParameter importances {caveat}.\n" if caveat else ""))
        images += optuna_images
    if (wandb_is_on(sweep) if use_wandb is None else use_wandb) and wandb_mode() != "disabled":
        log_to_wandb(sweep, jobs, images)
    return path


def load_study(sweep: Path) -> Any:
    """The Optuna study of an hparams_search=optuna sweep folder (its storage per multirun.yaml), or None."""
    import optuna

    from gruexp.search import open_storage

    multirun = sweep / "multirun.yaml"
    sweeper = OmegaConf.load(multirun).hydra.sweeper if multirun.is_file() else {}
    name = sweeper.get("study_name") or sweep.name
    storage = sweeper.get("storage") or (
        str(sweep / "optuna.journal") if (sweep / "optuna.journal").is_file() else None
    )
    if storage is None:  # a grid sweep
        return None
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        raise UserError(
            f"{sweep}: no study {name} in {storage}: is it the folder of an hparams_search=optuna sweep?"
        ) from None


def importance_caveat(complete: int) -> str:
    """The line under optuna_importances.png when it rests on few finished trials."""
    return f"from {complete} complete trials only: with fewer than {FEW_TRIALS}, these importances are mostly noise"


def plot_optuna_views(sweep: Path) -> tuple[list[Path], str | None]:
    """Optuna's own views of the sweep's study (optimization history, parameter importances) as PNGs, if it has one,
    and the importance plot's caveat when it rests on few trials (importance_caveat), else None."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as views

    study = load_study(sweep)
    if study is None:
        return [], None
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    plots = {"optuna_history.png": views.plot_optimization_history}
    caveat = None
    if len(complete) >= 2:  # importances need at least two finished trials to compare
        plots["optuna_importances.png"] = views.plot_param_importances
        caveat = importance_caveat(len(complete)) if len(complete) < FEW_TRIALS else None
    paths = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib views are
            ax = plot(study)
        title = ax.get_title(loc="left") or ax.get_title()
        ax.set_title("")
        ax.set_title(f"{title}: {study.study_name}, {len(study.trials)} trials", loc="left")
        if name == "optuna_importances.png" and caveat:
            ax.set_xlabel(f"{ax.get_xlabel()}\n{caveat}")
        if name == "optuna_history.png":
            ax.set_ylabel("val/ppl (the objective)")
        ax.figure.savefig(sweep / name, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(sweep / name)
    log.info("wrote Optuna's views of study %s: %s", study.study_name, ", ".join(p.name for p in paths))
    return paths, caveat


def main(argv: list[str] | None = None) -> int:
    """CLI: a user error is one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="a multirun folder, e.g. outputs/train/multirun/<date>")
    p.add_argument("--no-wandb", action="store_true", help="do not log the report to the sweep's W&B group")
    args = p.parse_args(argv)
    try:
        path = report(args.sweep, use_wandb=False if args.no_wandb else None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    drawn = [p for p in PLOTS if (args.sweep / p).is_file()]
    print(f"wrote {path}" + (f" and {', '.join(drawn)}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
