"""The benchmark scripts of scripts/ run as a user runs them, at a size that takes seconds."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers.runs import ROOT

TINY_BENCH = [
    "--shapes", "4x16,8x24",
    "--steps", "3", "--warmup", "1", "--round", "2",
    "--infer-tokens", "6", "--infer-chunk", "3",
    "--threads", "1", "--gemm-size", "64",
]  # fmt: skip


def run_bench(*args: str, env: dict[str, str] | None = None, script: str = "bench.py") -> subprocess.CompletedProcess:
    """python scripts/bench.py args (or another `script` of scripts/), as a user runs it."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=180,
    )
