"""The C loop of the fused GRU (gru_cpu.c): built and cached here, equal to the torch-op loop, and optional."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from gruexp.models import FusedGRU, gru_cpu
from gruexp.models.fused import GRURecurrence

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler on PATH")
pytestmark = needs_cc


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_the_c_loop_builds_and_loads_here():
    assert gru_cpu.load() is not None


def inputs(T: int, B: int, H: int, V: int | None, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """gi [T, B, 3H] (or, with V, a table [V, 3H] and tokens [T, B]), h0, W_hh, b_hh: leaves that need grads.

    W_hh has nn.GRU's scale, 1/sqrt(H): gradients then neither vanish nor explode over the T steps.
    """
    gi = torch.randn(V or T * B, 3 * H, dtype=dtype)
    gi = gi if V else gi.view(T, B, 3 * H)
    w_hh = torch.randn(3 * H, H, dtype=dtype) / H**0.5
    leaves = [t.requires_grad_() for t in (gi, torch.randn(B, H, dtype=dtype), w_hh)]
    leaves.append(torch.randn(3 * H, dtype=dtype, requires_grad=True))
    return (*leaves, torch.randint(0, V, (T, B)) if V else None)


def run(gi, h0, w_hh, b_hh, tokens, backend: str, threads: int):
    """Values and gradients of a loss weighing every output and the final state differently."""
    torch.set_num_threads(threads)
    try:
        for leaf in (gi, h0, w_hh, b_hh):
            leaf.grad = None
        hs, h_T = GRURecurrence.apply(gi, h0, w_hh, b_hh, tokens, True, backend)
        g = torch.Generator().manual_seed(1)
        w1 = torch.randn(hs.shape, generator=g, dtype=hs.dtype)
        w2 = torch.randn(h_T.shape, generator=g, dtype=hs.dtype)
        ((hs * w1).sum() + (h_T * w2).sum()).backward()
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return hs.detach(), h_T.detach(), gi.grad, h0.grad, w_hh.grad, b_hh.grad


# B * H * H reaches MIN_WORK_PER_THREAD in the 2- and 3-thread cases, so the hidden units are split; H = 40 and 72
# are no multiples of 16 * threads; V: the input as a token table (layer 0) or as dense gi (later layers).
CASES = [(6, 3, 8, None, 1), (7, 5, 8, 11, 1), (5, 48, 40, None, 2), (5, 48, 40, 28, 2), (4, 16, 72, 28, 3)]


@pytest.mark.parametrize("T, B, H, V, threads", CASES)
def test_c_loop_equals_op_loop_in_values_and_gradients(T, B, H, V, threads):
    args = inputs(T, B, H, V, torch.float32)
    expected, got = run(*args, "ops", threads), run(*args, "c", threads)
    names = ["hs", "h_T", "d table" if V else "dgi", "dh0", "dW_hh", "db_hh"]
    for name, e, g in zip(names, expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("T, B, H, V, threads", CASES)
def test_c_loop_in_float64_agrees_to_rounding(T, B, H, V, threads):
    args = inputs(T, B, H, V, torch.float64)
    for e, g in zip(run(*args, "ops", threads), run(*args, "c", threads), strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("V", [None, 6])
def test_c_loop_gradcheck(V):
    gi, h0, w_hh, b_hh, tokens = inputs(4, 3, 5, V, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: GRURecurrence.apply(*a, tokens, True, "c"), (gi, h0, w_hh, b_hh))


@pytest.mark.parametrize("bad", [-1, 28])
def test_token_ids_outside_the_vocabulary_are_refused_not_read(bad):
    x = torch.randint(0, 28, (4, 9))
    x[2, 3] = bad
    with pytest.raises(IndexError, match=re.escape("token ids must lie in [0, 28): the vocabulary has 28 tokens")):
        FusedGRU(28, 16)(x)


def test_thread_count_does_not_change_the_result():
    args = inputs(6, 32, 64, 28, torch.float32)
    one, two = run(*args, "c", 1), run(*args, "c", 2)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("V", [None, 28])
def test_forward_without_saving_equals_forward_for_backward(V):
    gi, h0, w_hh, b_hh, tokens = inputs(5, 4, 24, V, torch.float32)
    lib = gru_cpu.load()
    with torch.no_grad():
        saved, (G, N) = gru_cpu.kernel_forward(lib, gi, h0, w_hh, b_hh, save=True, tokens=tokens)
        bare, kept = gru_cpu.kernel_forward(lib, gi, h0, w_hh, b_hh, save=False, tokens=tokens)
    assert kept == () and G.shape == (5, 4, 72) and N.shape == (5, 4, 24)
    torch.testing.assert_close(bare, saved, atol=0, rtol=0)
    torch.testing.assert_close(bare[0], h0.detach(), atol=0, rtol=0)


def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


CHECK = """
import logging, torch
from gruexp.models import gru_cpu, FusedGRU, TorchGRU
logging.basicConfig(level=logging.WARNING, format="%(message)s")
ref, net = TorchGRU(11, 8), FusedGRU(11, 8)
print({"c": "loaded", "ops": "fallback"}[net.rnn.choose()])
net.load_state_dict(ref.state_dict())
x = torch.randint(0, 11, (4, 9))
torch.testing.assert_close(net(x)[0], ref(x)[0], atol=1e-5, rtol=1e-4)
print("equal")
"""


def test_first_use_compiles_into_the_cache_and_later_runs_reuse_it(tmp_path):
    first = python(CHECK, {"XDG_CACHE_HOME": str(tmp_path)})
    assert first.stdout.split() == ["loaded", "equal"], first.stderr
    built = list((tmp_path / "gruexp" / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("gru_cpu-") and built[0].suffix == ".so"
    mtime = built[0].stat().st_mtime_ns
    second = python(CHECK, {"XDG_CACHE_HOME": str(tmp_path), "CC": "false"})  # a compiler that always fails
    assert second.stdout.split() == ["loaded", "equal"], second.stderr
    assert list((tmp_path / "gruexp" / "kernels").iterdir()) == built and built[0].stat().st_mtime_ns == mtime


def test_without_a_working_compiler_it_warns_once_and_the_op_loop_runs(tmp_path):
    result = python(CHECK, {"XDG_CACHE_HOME": str(tmp_path), "CC": "false"})
    assert result.stdout.split() == ["fallback", "equal"], result.stderr
    warnings = [line for line in result.stderr.splitlines() if "no C loop" in line]
    assert len(warnings) == 1 and "using the torch-op loop" in warnings[0]
    assert list((tmp_path / "gruexp" / "kernels").iterdir()) == []  # no half-built library left behind


def test_gruexp_fused_cpu_ops_chooses_the_op_loop_silently(tmp_path):
    result = python(CHECK, {"XDG_CACHE_HOME": str(tmp_path), "GRUEXP_FUSED_CPU": "ops"})
    assert result.stdout.split() == ["fallback", "equal"] and "no C loop" not in result.stderr
    assert not (tmp_path / "gruexp" / "kernels").exists()


def test_an_unknown_gruexp_fused_cpu_is_refused_naming_the_choices():
    result = python("from gruexp.models import build_model; build_model('fused', 28, 8)", {"GRUEXP_FUSED_CPU": "off"})
    assert result.returncode != 0
    choices = "'c' (the C loop) or 'ops' (the torch-op loop)"
    assert f"GRUEXP_FUSED_CPU must be {choices}, got 'off'" in result.stderr
