"""Shared fixtures: the corpus ($GRUEXP_DATA_DIR, else the user cache, else ../shared/data) and tiny Hydra configs."""

from __future__ import annotations

import os

# Before torch, lightning or gruexp are imported: numpy's OpenBLAS sizes its thread pool at load.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch
from helpers import CONF, ROOT, TINY
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict


def _data_dir() -> Path:
    """Where the tests find d2l's corpus: $GRUEXP_DATA_DIR when set, else where README's training run put it (the
    user cache, gruexp.cache_dir()), else ../shared/data beside the checkout. Absolute, so that processes the tests
    start in other folders find it too; the corpus_path fixture fails with the fix when none holds the file."""
    from gruexp import cache_dir

    if os.environ.get("GRUEXP_DATA_DIR"):
        return Path(os.environ["GRUEXP_DATA_DIR"]).expanduser().resolve()
    places = [cache_dir(), ROOT.parent / "shared" / "data"]
    return next((p.resolve() for p in places if (p / "timemachine.txt").is_file()), places[0])


_GIVEN = bool(os.environ.get("GRUEXP_DATA_DIR"))
os.environ["GRUEXP_DATA_DIR"] = str(_data_dir())
os.environ.setdefault("WANDB_MODE", "offline")
# One thread per process, inherited by every process a test starts: tiny models gain nothing from more, and two
# processes (DDP) on 2 cores must not oversubscribe them (OpenMP's spin-waits then slow everything 100-fold).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def quiet_console():
    """Every test as every run is: Lightning's known noise filtered (gruexp.console's list, each with its reason),
    so that the warnings pytest shows are the ones a user would see. pytest resets warning filters per test."""
    from gruexp.console import quiet

    quiet()


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    p = Path(os.environ["GRUEXP_DATA_DIR"]) / "timemachine.txt"
    if not p.is_file():
        where = "GRUEXP_DATA_DIR" if _GIVEN else "the user cache (where `python -m gruexp.train` downloads it)"
        pytest.fail(
            f"the tests need d2l's corpus (timemachine.txt) and {where} has none at {p}: run `python -m gruexp.train "
            "trainer.max_epochs=1` once to download it, or set GRUEXP_DATA_DIR to the folder holding it",
            pytrace=False,
        )
    return p


@pytest.fixture
def make_cfg(tmp_path):
    """compose('train', overrides) with the output folder set, as @hydra.main would set it."""

    def make(*overrides: str, config_name: str = "train", out: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            cfg = compose(config_name, overrides=[*TINY, *overrides], return_hydra_config=True)
        out = out or tmp_path
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        return cfg

    yield make
    GlobalHydra.instance().clear()


TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture
def inject_path(monkeypatch):
    """Let the CLI processes a test starts import tests/helpers/inject.py."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


@pytest.fixture
def inject_env(monkeypatch, tmp_path):
    """CLI runs that import tests/helpers/inject.py and encode into their own, empty token cache."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def first_run(make_cfg, tmp_path, corpus_path) -> Path:
    """A finished 1-epoch fused run in tmp_path/runs/a, which the resume, checkpoint and bad-input tests start from."""
    from gruexp.train import train

    train(make_cfg("model=fused", "trainer.max_epochs=1", "logger=csv", out=tmp_path / "runs" / "a"))
    return tmp_path / "runs" / "a"
