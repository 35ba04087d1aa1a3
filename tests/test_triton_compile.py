"""The compile check, no GPU needed: every Triton kernel in every tile configuration the chooser can pick compiles
for sm_80 (A100) and sm_90 (H100) with Triton's own ptxas, fits in shared memory and spills nothing.

A child process, because the interpreter (TRITON_INTERPRET=1, which the other tests run under) compiles nothing and
Triton reads that switch at import; with a fresh TRITON_CACHE_DIR, so every kernel is compiled here, not recalled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory one block may use


def test_every_kernel_configuration_compiles_for_sm80_and_sm90_in_shared_memory_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    code = "import json; from gruexp.models import gru_triton; print(json.dumps(gru_triton.compile_report((80, 90))))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    rows = json.loads(child.stdout.strip().splitlines()[-1])

    from gruexp.models import gru_triton

    # 2 forward kernels x 2 inputs (dense gi, token table) + 2 backward kernels, x 2 precisions, x configs, x 2 SMs
    assert len(rows) == 6 * 2 * len(gru_triton.CONFIGS) * 2
    assert {tuple(r["config"]) for r in rows} == set(gru_triton.CONFIGS)
    for r in rows:
        assert 0 < r["shared"] <= SHARED_LIMIT[r["sm"]], r
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, r
        assert r["registers"] <= 255, r
