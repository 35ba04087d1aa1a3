"""gruexp.tracking.read_run on a real offline W&B run: a readable summary by default, the whole record behind full."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gruexp.tracking import Run, offline_runs, read_run
from gruexp.train import train


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, corpus_path):
    from helpers import CONF, TINY
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    out = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", [*TINY, "model=torch", "logger.wandb.mode=offline"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(out)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    summary = train(cfg)
    GlobalHydra.instance().clear()
    return out, summary


def test_read_run_prints_a_short_summary(run_folder):
    out, summary = run_folder
    (run_dir,) = offline_runs(out)
    run = read_run(run_dir)
    assert isinstance(run, Run) and set(run) == {"run", "config", "history", "summary"}
    text = str(run)
    assert text == repr(run) and len(text) < 1500 and all(len(line) <= 120 for line in text.splitlines())
    lines = text.splitlines()
    assert (
        lines[0] == f"W&B run torch-h16-lr1.0-clip1.0 (id {run['run']['id']}, project gruexp, group -, job type train)"
    )
    assert lines[1].startswith("config: model.name=torch model.hidden_size=16 model.num_layers=1 optimizer.lr=1.0 ")
    assert "data.max_tokens=3000" in text and "seed=42" in text
    final = text[text.index("final: ") :].replace("\n  ", " ")  # the final metrics, wrapped at 120 columns
    assert f"train/ppl {summary['train_ppl']:.4g}" in final and f"train/bpc {summary['train_bpc']:.4g}" in final
    assert f"val/ppl last {summary['val_ppl']:.4g} min {summary['best_val_ppl']:.4g}" in text.replace("\n  ", " ")
    assert f"run/tokens_per_sec {summary['tokens_per_sec']:,.0f}" in text.replace("\n  ", " ")
    history = text[text.index("history: ") :].replace("\n  ", " ")  # wrapped at 120 columns
    assert history.startswith(f"history: {len(run['history'])} rows, 2 epochs: ")
    assert "val/ppl" in history and "_type" not in text and "sha256" not in text  # media fields are not metrics
    assert f"sample: {summary['sample'].rstrip()}" in lines


def test_read_run_full_and_cli(run_folder):
    out, summary = run_folder
    (run_dir,) = offline_runs(out)
    full = read_run(run_dir, full=True)
    assert type(full) is dict and full == dict(read_run(run_dir))
    assert len(repr(full)) > 3 * len(str(read_run(run_dir)))  # the whole record: every history row and media field
    cli = [sys.executable, "-m", "gruexp.tracking"]
    r = subprocess.run([*cli, str(out)], capture_output=True, text=True, timeout=120)  # the gruexp run folder works
    assert r.returncode == 0 and r.stdout.strip() == str(read_run(run_dir)).strip()
    r = subprocess.run([*cli, str(run_dir), "--full"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout) == json.loads(json.dumps(full))
    r = subprocess.run([*cli, str(out / "csv")], capture_output=True, text=True, timeout=120)
    assert (
        r.returncode == 2
        and not r.stdout
        and r.stderr.strip()
        == (f"error: {out / 'csv'} holds no W&B run (run-*.wandb): pass <run folder>/wandb/offline-run-...")
    )


def test_summary_of_a_defined_metric_prints_in_one_order_whatever_wandb_wrote():
    # wandb writes a define_metric summary ({min, last}) in no fixed key order; the printed line must not depend on it
    base = {"run": {"name": "r", "id": "x"}, "config": {}, "history": []}
    a = Run({**base, "summary": {"val/ppl": {"min": 12.5, "last": 13.25}}})
    b = Run({**base, "summary": {"val/ppl": {"last": 13.25, "min": 12.5}}})
    assert "final: val/ppl last 13.25 min 12.5" in str(a).splitlines() and str(a) == str(b)
