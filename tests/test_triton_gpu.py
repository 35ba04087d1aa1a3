"""On a CUDA device: every backend of the fused GRU (cuDNN, the compiled Triton kernels, the op loop, auto) against a
float64 reference, in both forms, 1 and 2 layers, values and every gradient. Skipped without a GPU (CI has none);
run with `pytest -m gpu` on a GPU machine (conftest.py leaves TRITON_INTERPRET unset where an NVIDIA driver is).

Tolerances: TF32 off (torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False; the kernels follow the
matmul switch) and float32 against float64: atol 2e-5, rtol 1e-4. With TF32 on: atol = rtol = 2e-2.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import outputs_and_grads

from gruexp.models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
V, H, B, T = 28, 48, 19, 9  # B and H leave partial tiles


@pytest.fixture
def tf32(request):
    on = getattr(request, "param", False)
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    yield on
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


CASES = [(b, ra, L) for ra in (True, False) for b in ("cudnn", "triton", "ops") if ra or b != "cudnn" for L in (1, 2)]


@pytest.mark.parametrize("tf32", [False, True], indirect=True, ids=["ieee", "tf32"])
@pytest.mark.parametrize("backend, reset_after, num_layers", CASES)
def test_backend_matches_float64_reference(backend, reset_after, num_layers, tf32):
    torch.manual_seed(0)
    ref = build_model("fused", V, H, num_layers=num_layers, reset_after=reset_after).double()
    ref.rnn.backend = "ops"
    net = build_model("fused", V, H, num_layers=num_layers, reset_after=reset_after).cuda()
    net.load_state_dict(ref.state_dict())
    net.rnn.backend = backend
    x, h0 = torch.randint(0, V, (B, T)), torch.randn(num_layers, B, H)
    expected = outputs_and_grads(ref, x, h0.double())
    got = outputs_and_grads(net, x.cuda(), h0.cuda())
    tol = dict(atol=2e-2, rtol=2e-2) if tf32 else dict(atol=2e-5, rtol=1e-4)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g.double().cpu(), e, **tol, msg=f"tensor {i}")


@pytest.mark.parametrize("reset_after", [True, False])
def test_auto_decides_once_caches_and_matches(reset_after, tf32, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("GRUEXP_FUSED_GPU", "auto")
    torch.manual_seed(0)
    net = build_model("fused", V, H, reset_after=reset_after).cuda()
    ref = build_model("fused", V, H, reset_after=reset_after).cuda()
    ref.load_state_dict(net.state_dict())
    ref.rnn.backend = "ops"
    x, h0 = torch.randint(0, V, (B, T), device="cuda"), torch.randn(1, B, H, device="cuda")
    for g, e in zip(outputs_and_grads(net, x, h0), outputs_and_grads(ref, x, h0), strict=True):
        torch.testing.assert_close(g, e, atol=2e-5, rtol=1e-4)
    [decision] = json.loads((tmp_path / "gruexp" / "fused_autotune.json").read_text()).values()
    assert decision["backend"] in (("cudnn", "triton") if reset_after else ("ops", "triton")), decision


def test_cudnn_backend_keeps_float32_under_bf16_autocast_and_flat_weights(tf32):
    torch.manual_seed(0)
    net = build_model("fused", V, H, num_layers=2).cuda()
    net.rnn.backend = "cudnn"
    x = torch.randint(0, V, (T, B), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN warns when the weights are not one contiguous chunk
        expected, _ = net.rnn(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, _ = net.rnn(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
