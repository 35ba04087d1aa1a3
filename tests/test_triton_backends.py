"""The fused GRU's backends: the chooser, the environment's switches, the cuDNN plumbing (torch._VF.gru runs on the
CPU too) and the first-use autotuner with its cache. The backends all run for real here (cuDNN's function on the
CPU, Triton interpreted); only the CUDA-event timer is a recording fake, since it cannot run without a GPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import outputs_and_grads

from gruexp import UserError
from gruexp.models import build_model, choose_backend
from gruexp.models.backends import Autotuner, triton_available, triton_interpreted

needs_interpreter = pytest.mark.skipif(
    not (triton_available() and triton_interpreted()), reason="runs Triton's interpreter (TRITON_INTERPRET=1)"
)
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize(
    "device, dtype, reset_after, T, B, env, tuned, expected",
    [
        (CPU, F32, True, 35, 32, {}, None, "c"),
        (CPU, F64, True, 35, 32, {}, None, "c"),
        (CPU, BF16, True, 35, 32, {}, None, "ops"),  # the C loop is float32/64 only
        (CPU, F32, False, 35, 32, {}, None, "ops"),  # the C loop is reset-after only
        (CPU, F32, True, 35, 32, {"cpu": "ops"}, None, "ops"),
        (CPU, F32, False, 35, 32, {"cpu": "triton"}, None, "triton"),
        (CPU, F64, True, 35, 32, {"cpu": "triton"}, None, "ops"),  # the kernels compute in float32
        (CPU, F32, True, 0, 32, {"cpu": "triton"}, None, "ops"),  # nothing to launch
        (CPU, F32, True, 35, 32, {"gpu": "triton"}, None, "c"),  # GRUEXP_FUSED_GPU is for CUDA only
        (CUDA, F32, True, 35, 32, {}, None, "cudnn"),  # auto before its first-use decision
        (CUDA, F32, True, 35, 32, {}, "triton", "triton"),
        (CUDA, F32, True, 35, 32, {}, "cudnn", "cudnn"),
        (CUDA, F32, False, 35, 32, {}, None, "triton"),  # no cuDNN form of reset-before
        (CUDA, F32, False, 35, 32, {}, "ops", "ops"),  # the first-use check fell back
        (CUDA, BF16, False, 35, 32, {}, None, "triton"),
        (CUDA, F64, True, 35, 32, {}, "triton", "cudnn"),  # never float64 through float32 kernels
        (CUDA, F64, False, 35, 32, {}, None, "ops"),
        (CUDA, F32, True, 35, 0, {}, None, "cudnn"),
        (CUDA, F32, True, 35, 32, {"gpu": "cudnn"}, "triton", "cudnn"),
        (CUDA, F32, False, 35, 32, {"gpu": "cudnn"}, None, "ops"),
        (CUDA, F32, True, 35, 32, {"gpu": "triton"}, "cudnn", "triton"),
        (CUDA, F32, True, 35, 32, {"gpu": "ops"}, None, "ops"),
        (CUDA, F32, True, 35, 32, {"cpu": "triton"}, None, "cudnn"),  # GRUEXP_FUSED_CPU is for the CPU only
    ],
)
def test_choose_backend(device, dtype, reset_after, T, B, env, tuned, expected):
    assert choose_backend(device, dtype, reset_after, True, T, B, 256, 1, **env, tuned=tuned) == expected


def test_a_bad_gruexp_fused_gpu_is_refused_at_model_build(monkeypatch):
    monkeypatch.setenv("GRUEXP_FUSED_GPU", "fast")
    with pytest.raises(UserError, match="^GRUEXP_FUSED_GPU must be one of auto, cudnn, triton, ops, got 'fast'$"):
        build_model("fused", 28, 8)


def test_gruexp_fused_cpu_triton_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("GRUEXP_FUSED_CPU", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="^GRUEXP_FUSED_CPU=triton .* set TRITON_INTERPRET=1 too$"):
        build_model("fused", 28, 8)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_cudnn_backend_equals_fused_and_nn_gru_on_the_same_state_dict(num_layers):
    """_VF.gru on fused's own parameters: fused's C loop and nn.GRU (TorchGRU, same state_dict) to 1e-6."""
    V, H, B, T = 11, 24, 5, 7
    net = build_model("fused", V, H, num_layers=num_layers)
    ref = build_model("torch", V, H, num_layers=num_layers)
    ref.load_state_dict(net.state_dict())
    x, h0 = torch.randint(0, V, (B, T)), torch.randn(num_layers, B, H)
    net.rnn.backend = "cudnn"
    got = outputs_and_grads(net, x, h0)
    net.rnn.backend = "c"
    for a, b in zip(got, outputs_and_grads(net, x, h0), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, b in zip(got, outputs_and_grads(ref, x, h0), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


class RecordingTimer:
    """Stands in for the CUDA-event timer: runs each function once (for real) and reports preset seconds."""

    def __init__(self, *seconds: float) -> None:
        self.seconds, self.calls = list(seconds), []

    def __call__(self, fn, steps):
        fn()
        self.calls.append(steps)
        return self.seconds[len(self.calls) - 1]


def model(reset_after: bool = True, num_layers: int = 1):
    return build_model("fused", 9, 20, num_layers=num_layers, reset_after=reset_after)


X = torch.randint(0, 9, (5, 3))  # [T, B], as GRULayers takes it


@needs_interpreter
def test_autotune_times_both_logs_the_winner_and_a_second_process_reuses_it(tmp_path, caplog):
    path = tmp_path / "autotune.json"
    timer = RecordingTimer(2e-3, 1e-3)  # cuDNN, then Triton
    net = model(num_layers=2)
    with caplog.at_level(logging.INFO, logger="gruexp.models.backends"):
        assert net.rnn.autotune(X, None, True, Autotuner(path, timer, steps=3)) == "triton"
    assert timer.calls == [3, 3]
    assert "triton won, 2.00x faster than cudnn (1.000 vs 2.000 ms per step)" in caplog.text
    (key, decision), *others = json.loads(path.read_text()).items()
    assert not others and decision == {"backend": "triton", "seconds": {"cudnn": 2e-3, "triton": 1e-3}}
    assert "reset_after|float32|train|T5 B3 H20 L2" in key
    code = f"""
import torch
from gruexp.models import build_model
from gruexp.models.backends import Autotuner
def timer(fn, steps):
    raise AssertionError("timed again")
net = build_model("fused", 9, 20, num_layers=2)
print(net.rnn.autotune(torch.tensor({X.tolist()}), None, True, Autotuner({str(path)!r}, timer)))
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["triton"]


@needs_interpreter
def test_autotune_keeps_cudnn_where_it_is_faster_and_remembers_in_process(tmp_path):
    timer = RecordingTimer(1e-3, 3e-3)
    tuner = Autotuner(tmp_path / "a.json", timer)
    net = model()
    assert net.rnn.autotune(X, None, False, tuner) == "cudnn"
    assert net.rnn.autotune(X, None, False, tuner) == "cudnn"  # decided once
    assert timer.calls == [5, 5]
    assert "|infer|" in next(iter(json.loads((tmp_path / "a.json").read_text())))


@needs_interpreter
def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(tmp_path, caplog):
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    timer = RecordingTimer(2e-3, 1e-3)
    with caplog.at_level(logging.WARNING, logger="gruexp.models.backends"):
        assert model().rnn.autotune(X, None, True, Autotuner(path, timer)) == "triton"
    assert f"ignoring the autotune cache {path}" in caplog.text and len(timer.calls) == 2
    assert [d["backend"] for d in json.loads(path.read_text()).values()] == ["triton"]


@needs_interpreter
def test_a_triton_result_that_disagrees_falls_back_to_cudnn_with_one_warning(tmp_path, caplog):
    """A real disagreement: the candidate computes the reset-before form on the same parameters."""
    net, other = model(), model(reset_after=False)
    other.load_state_dict(net.state_dict())
    timer = RecordingTimer()
    tuner = Autotuner(tmp_path / "a.json", timer)
    with caplog.at_level(logging.WARNING, logger="gruexp.models.backends"):
        backend = tuner.decide(
            "key",
            ("cudnn", lambda: net.rnn._trial("cudnn", X, None, True)),
            ("triton", lambda: other.rnn._trial("triton", X, None, True)),
            timed=True,
            tolerance=1e-3,
        )
    assert backend == "cudnn" and timer.calls == []
    [record] = caplog.records
    assert "triton disagrees with cudnn on first use (max relative error" in record.getMessage()
    assert json.loads((tmp_path / "a.json").read_text())["key"]["backend"] == "cudnn"


@needs_interpreter
@pytest.mark.parametrize("reset_after, fallback", [(True, "cudnn"), (False, "ops")])
def test_a_triton_failure_falls_back_with_one_warning_naming_the_cause(
    tmp_path, caplog, monkeypatch, reset_after, fallback
):
    """A real Triton error: a 24-unit tile is no power of 2, which tl.arange refuses."""
    from gruexp.models import gru_triton

    monkeypatch.setattr(gru_triton, "tile_config", lambda B, H: (16, 24, 8, 1))
    timer = RecordingTimer()
    with caplog.at_level(logging.WARNING, logger="gruexp.models.backends"):
        assert model(reset_after).rnn.autotune(X, None, True, Autotuner(tmp_path / "a.json", timer)) == fallback
    [record] = caplog.records
    assert "triton failed on first use (" in record.getMessage() and f"using {fallback}" in record.getMessage()
    assert timer.calls == []


@needs_interpreter
@pytest.mark.parametrize("seconds, winner", [((3e-3, 1e-3), "triton"), ((1e-3, 3e-3), "ops")])
def test_reset_before_autotune_times_the_op_loop_against_triton(tmp_path, seconds, winner):
    """On an H200 the kernels lost to scratch's loop at larger shapes: auto times both forms, not only reset-after."""
    timer = RecordingTimer(*seconds)  # the op loop (the reference), then Triton
    path = tmp_path / "a.json"
    assert model(reset_after=False, num_layers=2).rnn.autotune(X, None, True, Autotuner(path, timer)) == winner
    assert timer.calls == [5, 5]
    [decision] = json.loads(path.read_text()).values()
    assert decision == {"backend": winner, "seconds": {"ops": seconds[0], "triton": seconds[1]}}


@needs_interpreter
def test_autotune_looks_a_shape_up_without_building_the_key_again(tmp_path, monkeypatch):
    """Generation calls the model once per token: the tuner's key (device name, ...) is built once per shape."""
    tuner = Autotuner(tmp_path / "a.json", RecordingTimer(*[1e-3, 3e-3] * 3))
    keys = []
    key = tuner.key
    monkeypatch.setattr(tuner, "key", lambda *a: keys.append(a[4:6]) or key(*a))
    net = model()
    for _ in range(3):
        assert net.rnn.autotune(X, None, False, tuner) == "cudnn"
    assert keys == [(5, 3)]
    assert net.rnn.autotune(X[:, :2], None, False, tuner) == "cudnn"  # another batch size is another shape
    assert keys == [(5, 3), (5, 2)]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not tf32  # TF32 changes what the kernels compute: decided again
    try:
        net.rnn.autotune(X, None, False, tuner)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert keys == [(5, 3), (5, 2), (5, 3)]
