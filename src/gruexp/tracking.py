"""W&B without waiting on a network: the mode chooser, the WandbLogger gruexp uses, a reader for offline runs, plots.

Online only when the user is logged in (WANDB_API_KEY or a netrc entry for the W&B host), else offline inside the
run's folder with one line that says how to upload it. Deciding reads the environment and a file, never the network.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import netrc
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger

log = logging.getLogger("gruexp.tracking")

MODES = ("online", "offline", "disabled")
INIT_TIMEOUT_S = 30.0  # online init gives up after this and falls back to offline; offline init never waits


def logged_in(env: Mapping[str, str] = os.environ) -> bool:
    """True when W&B has credentials: WANDB_API_KEY, or a netrc entry for its host (what `wandb login` writes)."""
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode(mode: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """The W&B mode to run in: `mode` if given, else WANDB_MODE, else online when logged in and offline otherwise."""
    from gruexp import UserError

    mode = mode or env.get("WANDB_MODE") or ("online" if logged_in(env) else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's old spellings
    if mode not in MODES:
        raise UserError(f"logger.wandb.mode={mode!r} is not a W&B mode: use one of {', '.join(MODES)} (or null)")
    return mode


def sweep_group() -> str | None:
    """The W&B group of this job: its sweep folder's name under --multirun (one multirun = one group), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger that picks its mode without the network, groups a sweep, and finishes its run.

    Finishing in `finalize` makes every Hydra multirun job (run one after another in one process) its own W&B run.
    """

    def __init__(
        self,
        save_dir: str,
        project: str = "gruexp",
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        log_model: bool | str = False,
        **kwargs: Any,
    ) -> None:
        import wandb

        from gruexp import stack

        self.mode = wandb_mode(mode)
        self.stacked = stack.current() is not None
        if self.stacked:  # a stack's trials are runs side by side in one process: none may take over another's
            kwargs["reinit"] = "create_new"
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        settings = kwargs.pop("settings", None) or wandb.Settings(
            init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)),
            silent=self.mode != "online",  # offline: our one line says how to upload, not wandb's banner
        )
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            log_model=log_model,
            group=group or sweep_group(),
            job_type=job_type,
            tags=[str(t) for t in tags or []],
            mode=self.mode,
            settings=settings,
            **kwargs,
        )
        self._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb 0.31 warns that it is ignored

    @property
    def experiment(self):
        """The W&B run (created on first use); an online init that fails or times out falls back to offline."""
        try:
            return _WandbLogger.experiment.fget(self)
        except Exception as e:  # wandb raises CommError, UsageError or a timeout; all mean "no server now"
            if self.mode != "online":
                raise
            log.warning("W&B online init failed (%s); logging offline instead", str(e).splitlines()[0])
            self.mode = self._wandb_init["mode"] = "offline"
            self._wandb_init["settings"] = self._wandb_init["settings"].model_copy(update={"silent": True})
            return _WandbLogger.experiment.fget(self)

    def finalize(self, status: str) -> None:
        """Log checkpoints (log_model), then finish the run so the next multirun job starts its own."""
        super().finalize(status)
        run, self._experiment = self._experiment, None
        if run is None or not hasattr(run, "finish"):
            return
        import wandb

        sync_dir = Path(run.dir).parent
        run.finish(exit_code=0 if status == "success" else 1)
        # finish() can return before wandb-core has written the run's file; teardown waits until it has, so a job's
        # run is whole on disk when the job ends (and the next job starts a fresh service). A stack's trials share
        # the service: the stack tears it down once, after its last trial (gruexp.stack.Stack.run).
        if not self.stacked:
            wandb.teardown()
        if self.mode == "offline":
            log.info("W&B run saved offline; upload it with: wandb sync %s", sync_dir)


def wandb_loggers(loggers: list[Any]) -> list[WandbLogger]:
    """The W&B loggers among a trainer's loggers (others, CSV say, cannot take images or tables)."""
    return [lg for lg in loggers if isinstance(lg, _WandbLogger)]


def continue_csv_history(loggers: list[Any], ckpt_path: str, step: int, output_dir: str | Path) -> None:
    """A resumed run's CSV logs begin with its checkpoint's run's rows from before the resume point, so that one
    metrics.csv holds the training from epoch 1 (each resume's file the whole history, however many there were).

    The earlier file is at the same place in the checkpoint's run folder (`<run>/checkpoints/x.ckpt`); rows logged
    at or after `step`, the checkpoint's (a kill's last minutes, the earlier test), are left out: the resumed
    run logs them again. Lightning's CSVLogger has no way in for earlier rows, so they are put in its writer's queue.
    """
    ckpt = Path(ckpt_path)
    if ckpt.parent.name != "checkpoints":  # a file outside a run folder: nothing to continue
        return
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        writer = lg.experiment
        try:
            earlier = ckpt.parent.parent / Path(writer.metrics_file_path).resolve().relative_to(
                Path(output_dir).resolve()
            )
        except ValueError:  # this logger writes outside the run folder: no earlier file to match it with
            continue
        if not earlier.is_file():
            log.info("no %s in the checkpoint's run: %s starts at step %d", earlier, writer.metrics_file_path, step)
            continue
        with open(earlier, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if row.get("step", "").isdigit() and int(row["step"]) < step]
        writer.metrics = rows + writer.metrics
        writer.metrics_keys = sorted(set(writer.metrics_keys) | set(reader.fieldnames or ()))
        log.info("%s continues %s: its %d rows before step %d", writer.metrics_file_path, earlier, len(rows), step)


# --- reading an offline run back ---------------------------------------------------------------------------------
# wandb 0.31 ships no Python reader for .wandb files (the old wandb.sdk.internal.datastore moved into wandb-core), so
# this walks the framing (LevelDB's log format behind a 7-byte ":W&B" header) and lets wandb.proto parse each record.
_BLOCK, _HEADER, _RECORD_HEADER = 32768, struct.Struct("<4sHB"), struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """Yield every `wandb.proto.wandb_internal_pb2.Record` stored in a run's .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, _, _ = _HEADER.unpack_from(data)
    if ident != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf = _HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        pos += _RECORD_HEADER.size
        if kind == 0:  # zero padding
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


# config keys a reader looks for first (the rest stays in run["config"])
SUMMARY_CONFIG = (
    "model.name",
    "model.hidden_size",
    "model.num_layers",
    "optimizer.lr",
    "trainer.gradient_clip_val",
    "trainer.max_epochs",
    "trainer.devices",
    "trainer.precision",
    "data.batch_size",
    "data.num_steps",
    "data.max_tokens",
    "data.partition",
    "seed",
)


class Run(dict):
    """An offline run as read back: a dict with `run`, `config`, `history` and `summary`, printed as a short summary.

    `print(read_run(path))` shows the run, its key config, final metrics and the history's length; the whole data is
    in the keys (`run["history"]`...) and `read_run(path, full=True)` (or `python -m gruexp.tracking PATH --full`).
    """

    def __repr__(self) -> str:
        return self.describe()

    __str__ = __repr__

    def describe(self) -> str:
        """A few lines: which run, its key config, final metrics, history length and keys, the sample."""
        r, hist, summary = self["run"], self["history"], self["summary"]
        flat = _flatten(self["config"])
        media = _media_prefixes([*summary, *(k for row in hist for k in row)])
        tags = f", tags {','.join(r['tags'])}" if r.get("tags") else ""
        config = " ".join(f"{k}={flat[k]}" for k in SUMMARY_CONFIG if flat.get(k) is not None)
        final = {k: v for k, v in summary.items() if _is_metric(k, v) and not k.startswith(media)}
        keys = sorted({k for row in hist for k in row if _is_metric(k, 0.0) and not k.startswith(media)})
        # the epochs trained: rows that end an epoch (train/ppl); a run's last rows (its end) carry the epoch after
        epochs = {row["epoch"] for row in hist if "epoch" in row and "train/ppl" in row}
        lines = [
            f"W&B run {r.get('name')} (id {r.get('id')}, project {r.get('project')}, group {r.get('group') or '-'}, "
            f"job type {r.get('job_type') or '-'}{tags})",
            f"config: {config} ({len(flat)} keys in all)",
            "final: " + " | ".join(f"{k} {_fmt(k, v)}" for k, v in sorted(final.items())),
            f"history: {len(hist)} rows, {len(epochs)} epochs: {', '.join(keys)}",
            f"media: {', '.join(sorted(p.rstrip('/') for p in media))}" if media else "",
            f"sample: {summary['sample']}" if isinstance(summary.get("sample"), str) else "",
            "(everything: run['config'], run['history'], run['summary']; read_run(path, full=True) for a plain dict)",
        ]
        return "\n".join(_wrap(line) for line in lines if line)


def _wrap(line: str, width: int = 120) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False)) or line


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _media_prefixes(keys: list[str]) -> tuple[str, ...]:
    """`plots/ppl/`, `val/samples/`: the images and tables, whose fields (`.../_type`, `.../size`) are no metrics."""
    return tuple(sorted({k.rsplit("/_type", 1)[0] + "/" for k in keys if k.endswith("/_type")}))


def _is_metric(key: str, value: Any) -> bool:
    if key.startswith("_") or key in ("sample", "epoch", "trainer/global_step") or "/_" in key:
        return False
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        or (isinstance(value, Mapping) and all(isinstance(v, (int, float)) for v in value.values()))
    )


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, Mapping):  # define_metric summaries, e.g. val/ppl {min, last}, in no fixed order: sorted
        return " ".join(f"{k} {_fmt(key, v)}" for k, v in sorted(value.items()))
    if "tokens" in key:
        return f"{value:,.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_run(folder: str | Path, full: bool = False) -> dict[str, Any]:
    """An offline run folder's run info, config, history rows and summary, as wandb recorded them.

    Returns a `Run` (a dict that prints as a short summary); `full=True` returns a plain dict, printed whole.
    """
    (path,) = Path(folder).glob("run-*.wandb")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}}
    for r in iter_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            out["run"] = {
                "id": run.run_id,
                "name": run.display_name,
                "project": run.project,
                "group": run.run_group,
                "job_type": run.job_type,
                "tags": list(run.tags),
            }
            out["config"].update({_item_key(i): json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            out["config"].update({_item_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({_item_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({_item_key(i): json.loads(i.value_json) for i in r.summary.update if _item_key(i)})
    out["config"].pop("_wandb", None)
    return out if full else Run(out)


def offline_runs(run_dir: str | Path) -> list[Path]:
    """The offline W&B run folders inside a gruexp run folder, oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


# --- plots -------------------------------------------------------------------------------------------------------
def best_point(points: list[tuple[int, float]]) -> tuple[int, float]:
    """The (epoch, value) of the lowest finite perplexity, the first such epoch on a tie (ModelCheckpoint's choice)."""
    finite = [(e, v) for e, v in points if math.isfinite(v)]
    if not finite:
        raise ValueError("no finite perplexity to mark")
    return min(finite, key=lambda p: p[1])


def plot_ppl_curves(
    curves: Mapping[str, Mapping[str, list[tuple[int, float]]]],
    path: str | Path,
    title: str,
    mark_best: bool = False,
) -> Path:
    """Perplexity against epoch (from 1), one line per (label, metric), log scale; written as a PNG (Agg, no display).

    `mark_best` circles each val/ppl curve's lowest point and names its value and epoch (the best checkpoint's).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    n = 0
    for label, metrics in curves.items():
        for metric, points in metrics.items():
            points = [(e, v) for e, v in points if math.isfinite(v)]
            if not points:
                continue
            style = "--" if metric.startswith("train") else "-"
            name = f"{label} {metric}".strip() if len(metrics) > 1 else label
            # the 10 colours repeat after 10 lines: the marker tells the repeats apart
            marker = ".osD^v"[n // 10 % 6] if len(points) < 40 else None
            (line,) = ax.plot(*zip(*points, strict=True), style, marker=marker, ms=4 if n >= 10 else 6, label=name)
            n += 1
            if mark_best and metric.startswith("val"):
                epoch, best = best_point(points)
                ax.plot([epoch], [best], "o", ms=11, mfc="none", mec=line.get_color(), mew=2)
                ax.annotate(
                    f"best {best:.3f} (epoch {epoch})",
                    (epoch, best),
                    xytext=(0, 14),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    color=line.get_color(),
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
                )
    values = [v for line in ax.lines for v in line.get_ydata() if math.isfinite(v) and v > 0]
    # a log axis only where perplexity spans over a decade (d2l_classic: 1 to 200); on a narrower range it would
    # label too few ticks
    wide = bool(values) and max(values) / min(values) > 20
    ax.set(xlabel="epoch", ylabel="perplexity (log scale)" if wide else "perplexity", title=title)
    if wide:
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 12 rather than 1.2x10^1
        # between the decades only 2, 3 and 5 (20, 30, 50...): no crowded labels
        minor = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "235" else "")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(minor)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.12)  # room for the best point's label
    entries = len(ax.get_legend_handles_labels()[1])
    if entries > 5:  # beside the plot, where it covers no curve
        fig.set_size_inches(7 + 3.5 * (1 + entries // 20), 4.5)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 + entries // 20)
    elif entries:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m gruexp.tracking <offline run folder> [--full]`: print a run's summary (or all of it, as JSON)."""
    import argparse

    p = argparse.ArgumentParser(description="Read an offline W&B run without uploading it.")
    p.add_argument("run", type=Path, help="outputs/.../wandb/offline-run-... (or the gruexp run folder holding it)")
    p.add_argument("--full", action="store_true", help="print every config key, history row and summary value (JSON)")
    args = p.parse_args(argv)
    folder = args.run
    if not list(folder.glob("run-*.wandb")):
        runs = offline_runs(folder)
        if not runs:
            print(
                f"error: {folder} holds no W&B run (run-*.wandb): pass <run folder>/wandb/offline-run-...",
                file=sys.stderr,
            )
            return 2
        folder = runs[-1]
    run = read_run(folder, full=args.full)
    print(json.dumps(run, indent=1) if args.full else run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
