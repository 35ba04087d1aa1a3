"""The fused GRU's recurrence as persistent Triton kernels: one program per batch tile runs all T steps.

Why our own kernels: cuDNN's GRU runs a few kernels per step, and at small H (d2l's 256) each leaves most of the GPU
idle; d2l's reset-before form has no cuDNN kernel at all, so without these it runs the ~10-launch-per-step op loop.
Here one launch runs the whole sequence (the persistent-RNN / FlashRNN idea, simplified): a program owns BLOCK_B
rows of the batch, computes each step's gates in registers, BLOCK_H hidden units at a time, and streams W_hh from L2
(all of W_hh held on-chip does not fit at H 256: 3 * 256 * 256 * 4 bytes = 0.8 MB, against 227 KB of shared memory).
h_t is written once, to the output hs it belongs in, and the next step's product reads it back in BLOCK_H slices
from L1/L2 after a barrier: a register tensor cannot be sliced, and a [BLOCK_B, H] h in registers would spill at H 256.
Programs never wait on each other (Triton's interpreter runs them one after another, and a GPU may too).

The backward runs the reverse loop the same way, carrying dL/dh; dW_hh and db_hh are one GEMM and one sum over all
steps after the loop (as the CPU paths do), and layer 0's table gradient one index_add_. Every load is upcast to
float32 at once (the interpreter mishandles bf16 arithmetic); state and saved activations are float32.
tl.dot's precision follows torch.backends.cuda.matmul.allow_tf32 (IEEE fp32 by default, as torch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# (BLOCK_B, BLOCK_H, num_warps, num_stages) the chooser picks from; tests/test_triton_compile.py compiles every one
# for sm_80 and sm_90 and checks shared memory and spills. tl.dot needs every dimension >= 16 on a GPU. Measured with
# ptxas (no GPU): at 4 warps, or with the k loops software-pipelined (num_stages 3), the forward kernels spill or sit
# at 255 registers; BLOCK_H 64 spills too; BLOCK_B 32 spills in the backward.
CONFIGS: tuple[tuple[int, int, int, int], ...] = ((16, 32, 8, 1),)


def tile_config(B: int, H: int) -> tuple[int, int, int, int]:
    """The (BLOCK_B, BLOCK_H, num_warps, num_stages) for a batch of B and H hidden units: one of CONFIGS.

    Small batch tiles: each program is a serial chain of T steps, so more programs (B / BLOCK_B) means more of the
    GPU at work; larger tiles would only pay once B alone fills the GPU's SMs. Not yet tuned on a GPU.
    """
    return CONFIGS[0]


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile(ptr, rows, cols, row_stride, mask):
    """A [rows, cols] tile of a row-major matrix, upcast to float32 (masked entries 0)."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _times_w(
    x_ptr,
    x_stride,
    w_ptr,
    rb,
    mb,
    cj,
    mj,
    H,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PREC: tl.constexpr,
    TRANS_W: tl.constexpr,
):
    """x [BLOCK_B, H] (rows rb of x_ptr) times W^T[:, cj] (TRANS_W, the forward's h W^T) or W[:, cj] (the backward's
    d W) for the [H, H] block W at w_ptr: [BLOCK_B, BLOCK_H]."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    ck0 = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        ck = k0 + ck0
        mk = ck < H
        x = _tile(x_ptr, rb, ck, x_stride, mb[:, None] & mk[None, :])
        if TRANS_W:
            w_offsets = cj[None, :] * H + ck[:, None]
        else:
            w_offsets = ck[:, None] * H + cj[None, :]
        w = tl.load(w_ptr + w_offsets, mask=mk[:, None] & mj[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    return acc


@triton.jit
def _gate(x_ptr, w_ptr, b_ptr, g, rb, mb, cj, mj, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr):
    """Gate g's recurrent pre-activation x W_hg^T + b_hg for rows rb, columns cj: [BLOCK_B, BLOCK_H]."""
    acc = _times_w(x_ptr, H, w_ptr + g * H * H, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, True)
    return acc + tl.load(b_ptr + g * H + cj, mask=mj, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _gi_rows(tok_ptr, t, B, rb, mb, HAS_TOK: tl.constexpr):
    """Row of gi for (t, batch rows rb): the token id in the table [V, 3H] (layer 0) or t * B + b in [T, B, 3H]."""
    if HAS_TOK:
        return tl.load(tok_ptr + t * B + rb, mask=mb, other=0).to(tl.int64)
    return (t * B + rb).to(tl.int64)


@triton.jit
def forward_reset_after_kernel(
    gi_ptr, tok_ptr, w_ptr, b_ptr, hs_ptr, g_ptr, n_ptr, T, B, H,
    HAS_TOK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """hs [T+1, B, H] (hs[0] = h0 on entry), G [T, B, 3H] = [r, z, h W_hn^T + b_hn], N [T, B, H] = n."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    for t in range(T):
        rows = _gi_rows(tok_ptr, t, B, rb, mb, HAS_TOK)
        h_prev = hs_ptr + t * B * H
        h_next = hs_ptr + (t + 1) * B * H
        for j0 in range(0, H, BLOCK_H):
            cj = j0 + tl.arange(0, BLOCK_H)
            mj = cj < H
            m = mb[:, None] & mj[None, :]
            gh_r = _gate(h_prev, w_ptr, b_ptr, 0, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC)
            gh_z = _gate(h_prev, w_ptr, b_ptr, 1, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC)
            gh_n = _gate(h_prev, w_ptr, b_ptr, 2, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC)
            r = tl.sigmoid(_tile(gi_ptr, rows, cj, 3 * H, m) + gh_r)
            z = tl.sigmoid(_tile(gi_ptr + H, rows, cj, 3 * H, m) + gh_z)
            n = _tanh(_tile(gi_ptr + 2 * H, rows, cj, 3 * H, m) + r * gh_n)
            h = n + z * (_tile(h_prev, rb, cj, H, m) - n)
            gt = g_ptr + t * B * 3 * H + rb[:, None] * (3 * H) + cj[None, :]
            tl.store(gt, r, mask=m)
            tl.store(gt + H, z, mask=m)
            tl.store(gt + 2 * H, gh_n, mask=m)
            tl.store(n_ptr + t * B * H + rb[:, None] * H + cj[None, :], n, mask=m)
            tl.store(h_next + rb[:, None] * H + cj[None, :], h, mask=m)
        tl.debug_barrier()  # h_t complete before the next step's product reads it


@triton.jit
def forward_reset_before_kernel(
    gi_ptr, tok_ptr, w_ptr, b_ptr, hs_ptr, rz_ptr, rh_ptr, n_ptr, T, B, H,
    HAS_TOK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """hs [T+1, B, H] (hs[0] = h0 on entry), RZ [T, B, 2H] = [r, z], RH [T, B, H] = r * h_{t-1}, N [T, B, H]."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    for t in range(T):
        rows = _gi_rows(tok_ptr, t, B, rb, mb, HAS_TOK)
        h_prev = hs_ptr + t * B * H
        rz_t = rz_ptr + t * B * 2 * H
        rh_t = rh_ptr + t * B * H
        for j0 in range(0, H, BLOCK_H):  # r, z and r * h_{t-1}, which the candidate's product needs in full
            cj = j0 + tl.arange(0, BLOCK_H)
            mj = cj < H
            m = mb[:, None] & mj[None, :]
            a_r = _gate(h_prev, w_ptr, b_ptr, 0, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC)
            a_z = _gate(h_prev, w_ptr, b_ptr, 1, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC)
            r = tl.sigmoid(_tile(gi_ptr, rows, cj, 3 * H, m) + a_r)
            z = tl.sigmoid(_tile(gi_ptr + H, rows, cj, 3 * H, m) + a_z)
            tl.store(rz_t + rb[:, None] * (2 * H) + cj[None, :], r, mask=m)
            tl.store(rz_t + H + rb[:, None] * (2 * H) + cj[None, :], z, mask=m)
            tl.store(rh_t + rb[:, None] * H + cj[None, :], r * _tile(h_prev, rb, cj, H, m), mask=m)
        tl.debug_barrier()  # r * h_{t-1} complete before (r * h_{t-1}) W_hn^T reads it
        for j0 in range(0, H, BLOCK_H):
            cj = j0 + tl.arange(0, BLOCK_H)
            mj = cj < H
            m = mb[:, None] & mj[None, :]
            a_n = _gate(rh_t, w_ptr, b_ptr, 2, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC)
            n = _tanh(_tile(gi_ptr + 2 * H, rows, cj, 3 * H, m) + a_n)
            z = _tile(rz_t + H, rb, cj, 2 * H, m)
            h = n + z * (_tile(h_prev, rb, cj, H, m) - n)
            tl.store(n_ptr + t * B * H + rb[:, None] * H + cj[None, :], n, mask=m)
            tl.store(hs_ptr + (t + 1) * B * H + rb[:, None] * H + cj[None, :], h, mask=m)
        tl.debug_barrier()


@triton.jit
def backward_reset_after_kernel(
    w_ptr, hs_ptr, g_ptr, n_ptr, dh_ptr, dgh_ptr, dgi_ptr, T, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The reverse loop. dh [T+1, B, H]: on entry dh[t+1] = dL/dh_t through the outputs, dh[0] = 0; on return the
    total dL/dh_t, dh[0] that of h0. dgh [T, B, 3H] = d(h W_hh^T + b_hh), dgi [T, B, 3H] = d gi."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    for i in range(T):
        t = T - 1 - i
        dh_t = dh_ptr + (t + 1) * B * H
        g_t = g_ptr + t * B * 3 * H
        dgh_t = dgh_ptr + t * B * 3 * H
        dgi_t = dgi_ptr + t * B * 3 * H
        for j0 in range(0, H, BLOCK_H):  # the gates' gradients, elementwise
            cj = j0 + tl.arange(0, BLOCK_H)
            m = mb[:, None] & (cj < H)[None, :]
            dh = _tile(dh_t, rb, cj, H, m)
            r = _tile(g_t, rb, cj, 3 * H, m)
            z = _tile(g_t + H, rb, cj, 3 * H, m)
            gh_n = _tile(g_t + 2 * H, rb, cj, 3 * H, m)
            n = _tile(n_ptr + t * B * H, rb, cj, H, m)
            h_prev = _tile(hs_ptr + t * B * H, rb, cj, H, m)
            da_n = dh * (1.0 - z) * (1.0 - n * n)
            da_r = da_n * gh_n * r * (1.0 - r)
            da_z = dh * (h_prev - n) * z * (1.0 - z)
            off = rb[:, None] * (3 * H) + cj[None, :]
            tl.store(dgh_t + off, da_r, mask=m)
            tl.store(dgh_t + H + off, da_z, mask=m)
            tl.store(dgh_t + 2 * H + off, da_n * r, mask=m)
            tl.store(dgi_t + off, da_r, mask=m)
            tl.store(dgi_t + H + off, da_z, mask=m)
            tl.store(dgi_t + 2 * H + off, da_n, mask=m)
        tl.debug_barrier()
        for j0 in range(0, H, BLOCK_H):  # dL/dh_{t-1} += dh * z + dgh W_hh
            cj = j0 + tl.arange(0, BLOCK_H)
            mj = cj < H
            m = mb[:, None] & mj[None, :]
            acc = _times_w(dgh_t, 3 * H, w_ptr, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, False)
            acc += _times_w(dgh_t + H, 3 * H, w_ptr + H * H, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, False)
            acc += _times_w(dgh_t + 2 * H, 3 * H, w_ptr + 2 * H * H, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, False)
            acc += _tile(dh_t, rb, cj, H, m) * _tile(g_t + H, rb, cj, 3 * H, m)
            out = dh_ptr + t * B * H + rb[:, None] * H + cj[None, :]
            tl.store(out, tl.load(out, mask=m, other=0.0) + acc, mask=m)
        tl.debug_barrier()


@triton.jit
def backward_reset_before_kernel(
    w_ptr, hs_ptr, rz_ptr, n_ptr, dh_ptr, d_ptr, T, B, H,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """The reverse loop of the reset-before form; dh as in backward_reset_after_kernel, D [T, B, 3H] = [da_r, da_z,
    da_n], the gradient of gi + b_hh."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    for i in range(T):
        t = T - 1 - i
        dh_t = dh_ptr + (t + 1) * B * H
        rz_t = rz_ptr + t * B * 2 * H
        d_t = d_ptr + t * B * 3 * H
        out_t = dh_ptr + t * B * H
        for j0 in range(0, H, BLOCK_H):  # da_z, da_n
            cj = j0 + tl.arange(0, BLOCK_H)
            m = mb[:, None] & (cj < H)[None, :]
            dh = _tile(dh_t, rb, cj, H, m)
            z = _tile(rz_t + H, rb, cj, 2 * H, m)
            n = _tile(n_ptr + t * B * H, rb, cj, H, m)
            h_prev = _tile(hs_ptr + t * B * H, rb, cj, H, m)
            off = rb[:, None] * (3 * H) + cj[None, :]
            tl.store(d_t + H + off, dh * (h_prev - n) * z * (1.0 - z), mask=m)
            tl.store(d_t + 2 * H + off, dh * (1.0 - z) * (1.0 - n * n), mask=m)
        tl.debug_barrier()
        for j0 in range(0, H, BLOCK_H):  # d(r * h) = da_n W_hn, then da_r and the direct paths to h_{t-1}
            cj = j0 + tl.arange(0, BLOCK_H)
            mj = cj < H
            m = mb[:, None] & mj[None, :]
            drh = _times_w(d_t + 2 * H, 3 * H, w_ptr + 2 * H * H, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, False)
            r = _tile(rz_t, rb, cj, 2 * H, m)
            z = _tile(rz_t + H, rb, cj, 2 * H, m)
            h_prev = _tile(hs_ptr + t * B * H, rb, cj, H, m)
            tl.store(d_t + rb[:, None] * (3 * H) + cj[None, :], drh * h_prev * r * (1.0 - r), mask=m)
            out = out_t + rb[:, None] * H + cj[None, :]
            direct = _tile(dh_t, rb, cj, H, m) * z + drh * r
            tl.store(out, tl.load(out, mask=m, other=0.0) + direct, mask=m)
        tl.debug_barrier()
        for j0 in range(0, H, BLOCK_H):  # dL/dh_{t-1} += [da_r, da_z] W_hrz
            cj = j0 + tl.arange(0, BLOCK_H)
            mj = cj < H
            m = mb[:, None] & mj[None, :]
            acc = _times_w(d_t, 3 * H, w_ptr, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, False)
            acc += _times_w(d_t + H, 3 * H, w_ptr + H * H, rb, mb, cj, mj, H, BLOCK_B, BLOCK_H, PREC, False)
            out = out_t + rb[:, None] * H + cj[None, :]
            tl.store(out, tl.load(out, mask=m, other=0.0) + acc, mask=m)
        tl.debug_barrier()


def precision() -> str:
    """tl.dot's input precision: TF32 where torch's matmuls may use it (torch.backends.cuda.matmul.allow_tf32)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def forward(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None, reset_after: bool
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """HS = [h0, h1, ..., hT] (float32, [T+1, B, H]) and what backward needs: (G, N) or (RZ, RH, N).

    gi is [T, B, 3H], or with tokens [T, B] the table [V, 3H] they index; any float dtype, read as float32.
    """
    T, B = (tokens if tokens is not None else gi).shape[:2]
    H = h0.shape[-1]
    gi, w_hh, b_hh = gi.contiguous(), w_hh.contiguous(), b_hh.contiguous()
    tok = tokens.contiguous() if tokens is not None else gi  # a pointer the kernel never reads without HAS_TOK
    f32 = dict(device=h0.device, dtype=torch.float32)
    HS = torch.empty(T + 1, B, H, **f32)
    HS[0] = h0
    block_b, block_h, warps, stages = tile_config(B, H)
    grid = (triton.cdiv(B, block_b),)
    meta = dict(HAS_TOK=tokens is not None, BLOCK_B=block_b, BLOCK_H=block_h, PREC=precision())
    meta.update(num_warps=warps, num_stages=stages)
    N = torch.empty(T, B, H, **f32)
    if reset_after:
        G = torch.empty(T, B, 3 * H, **f32)
        forward_reset_after_kernel[grid](gi, tok, w_hh, b_hh, HS, G, N, T, B, H, **meta)
        return HS, (G, N)
    RZ, RH = torch.empty(T, B, 2 * H, **f32), torch.empty(T, B, H, **f32)
    forward_reset_before_kernel[grid](gi, tok, w_hh, b_hh, HS, RZ, RH, N, T, B, H, **meta)
    return HS, (RZ, RH, N)


def backward(
    dhs: Tensor, dh_T: Tensor, w_hh: Tensor, HS: Tensor, saved: tuple[Tensor, ...], reset_after: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dgi [T, B, 3H], dh0, dW_hh, db_hh) in float32, from dL/dhs and dL/dh_T and forward's HS and saved tensors."""
    T, B, H = dhs.shape
    DH = torch.empty(T + 1, B, H, device=dhs.device, dtype=torch.float32)
    DH[0] = 0
    DH[1:] = dhs
    DH[T] += dh_T
    w_hh = w_hh.contiguous()
    block_b, block_h, warps, stages = tile_config(B, H)
    grid = (triton.cdiv(B, block_b),)
    meta = dict(BLOCK_B=block_b, BLOCK_H=block_h, PREC=precision(), num_warps=warps, num_stages=stages)
    h_prev = HS[:-1].reshape(T * B, H)
    if reset_after:
        G, N = saved
        dgh, dgi = torch.empty_like(G), torch.empty_like(G)
        backward_reset_after_kernel[grid](w_hh, HS, G, N, DH, dgh, dgi, T, B, H, **meta)
        dgh2 = dgh.view(T * B, 3 * H)
        return dgi, DH[0], dgh2.t() @ h_prev, dgh2.sum(0)
    RZ, RH, N = saved
    D = torch.empty(T, B, 3 * H, device=dhs.device, dtype=torch.float32)
    backward_reset_before_kernel[grid](w_hh, HS, RZ, N, DH, D, T, B, H, **meta)
    D2 = D.view(T * B, 3 * H)
    dw_hh = torch.cat((D2[:, : 2 * H].t() @ h_prev, D2[:, 2 * H :].t() @ RH.view(T * B, H)))
    return D, DH[0], dw_hh, D2.sum(0)


KERNELS = {  # kernel -> the HAS_TOK values it is launched with
    forward_reset_after_kernel: (False, True),
    forward_reset_before_kernel: (False, True),
    backward_reset_after_kernel: (None,),
    backward_reset_before_kernel: (None,),
}


def compile_report(capabilities: tuple[int, ...] = (80, 90)) -> list[dict]:
    """Compile every kernel in every configuration of CONFIGS, both precisions, for each sm_<capability>, without
    a GPU (Triton ships ptxas); one row per kernel with its shared memory, and ptxas's registers, stack frame and
    spill stores/loads in bytes (what the driver reports as n_spills on a GPU).

    Run it where TRITON_INTERPRET is unset: the interpreter compiles nothing. Used by tests/test_triton_compile.py.
    """
    import contextlib
    import io
    import re

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: the only place spills show without a GPU
    for capability in capabilities:
        target = GPUTarget("cuda", capability, 32)
        for fn, has_tok_values in KERNELS.items():
            for (block_b, block_h, warps, stages), prec, has_tok in (
                (c, p, t) for c in CONFIGS for p in ("ieee", "tf32") for t in has_tok_values
            ):
                signature = {name: "*fp32" if name.endswith("_ptr") else "i32" for name in fn.arg_names}
                constants = {"BLOCK_B": block_b, "BLOCK_H": block_h, "PREC": prec}
                if has_tok is not None:
                    signature["tok_ptr"], constants["HAS_TOK"] = "*i64", has_tok
                signature.update(dict.fromkeys(constants, "constexpr"))
                source = ASTSource(fn, signature, constants)
                log = io.StringIO()
                with contextlib.redirect_stdout(log):
                    kernel = triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})
                text = log.getvalue()
                stack, stores, loads = re.search(
                    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text
                ).groups()
                rows.append(
                    {
                        "kernel": fn.__name__,
                        "sm": capability,
                        "config": (block_b, block_h, warps, stages),
                        "precision": prec,
                        "HAS_TOK": has_tok,
                        "shared": kernel.metadata.shared,
                        "registers": int(re.search(r"Used (\d+) registers", text).group(1)),
                        "stack": int(stack),
                        "spill_stores": int(stores),
                        "spill_loads": int(loads),
                    }
                )
    return rows
