"""Runs as the tests start them: the tiny run's overrides, the CLI in a subprocess, an entry point in this process."""

from __future__ import annotations

import importlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# A run that takes seconds on 2 cores: small model, the first 3000 characters, 2 epochs.
TINY = [
    "model.hidden_size=16",
    "data.max_tokens=3000",
    "data.batch_size=8",
    "data.num_steps=10",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
ONE_EPOCH = [*TINY, "trainer.max_epochs=1", "logger=csv"]
# the same numbers from the same seed, however the run was cut: what the exact-resume tests compare
EXACT = ["model=torch", "trainer.accelerator=cpu", "trainer.deterministic=true", "trainer.max_epochs=3"]
SGD = ["model=torch", "trainer.accelerator=cpu", "trainer.max_epochs=1", "optimizer.lr=1.0"]


def run_cli(module: str, *args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m module args` as a user would, capturing its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli(*args: str) -> list[str]:
    """The command line of `python -m gruexp.train args`, for tests that start the process themselves (Popen)."""
    return [sys.executable, "-m", "gruexp.train", *args]


def cli_env() -> dict[str, str]:
    """The environment run_cli gives its process: output unbuffered, Hydra's one-line errors."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


def run_main(capfd, module: str, *args: str) -> tuple[int, str]:
    """Run a Hydra entry point in this process as the CLI would (sys.argv), return (exit code, its output)."""
    # imported (not __main__), Hydra would look for conf/ as a package: point it at the folder
    argv, sys.argv = sys.argv, [module, "--config-path", str(ROOT / "conf"), *args]
    GlobalHydra.instance().clear()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        importlib.import_module(module).main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        root.handlers[:], root.level = handlers, level  # Hydra's handlers hold this test's captured streams
    out = capfd.readouterr()
    return code, out.out + out.err


def assert_one_line_error(code: int, output: str, message: str) -> None:
    """A failed run that said `message` on a line of its own, with no traceback: what a user's mistake must get."""
    assert code != 0
    assert "Traceback" not in output and "HYDRA_FULL_ERROR" not in output
    lines = [line for line in output.splitlines() if message in line]
    assert lines, output[-2000:]


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    """The lines of a CLI run's output that start with Error, asserting it printed no traceback."""
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


DIGEST = re.compile(r"rank (\d)/(\d) config ([0-9a-f]{12}) (.*)$", re.M)


def rank_lines(job: Path) -> dict[int, tuple[str, str]]:
    """Each rank's `rank r/w config <digest> <keys>` line, from rank 0's log and the other ranks' logs."""
    found = {}
    for log in job.glob("*.log"):
        for rank, _, digest, keys in DIGEST.findall(log.read_text()):
            found[int(rank)] = (digest, keys)
    return found
