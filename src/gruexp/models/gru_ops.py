"""The fused GRU's recurrence as a loop of preallocated, in-place torch ops: runs anywhere, the others' reference.

One backend of fused.GRURecurrence (backends.py chooses; docs/fused-backends.md), with the C loop's signature:
`forward(gi, h0, w_hh, b_hh, tokens, reset_after, save)` -> (hs, saved) and `backward(dhs, dh_T, saved,
reset_after, vocab_size, need_dh0)` -> (dgi, dh0, dW_hh, db_hh). Per step, one (B, H) x (H, 3H) product (two, H x 2H
and H x H, in the reset-before form) and the gate arithmetic, forward and backward; the gradients of W_hh and b_hh
are single GEMMs or sums over all steps after the backward loop.

The reset-after form also runs S trials of one shape at once (gruexp.models.stacked): every tensor then has a
trial dimension after T (gi [T, S, B, 3H], h0 [S, B, H], w_hh [S, 3H, H], b_hh [S, 3H]; with tokens [T, S, B],
gi is the tables [S, V, 3H]), each product is batched over the trials (baddbmm), and one step's kernels serve
them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def forward(
    gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, tokens: Tensor | None, reset_after: bool, save: bool
) -> tuple[Tensor, tuple]:
    """hs [T, B, H] and, if save, what backward needs; with tokens [T, B], gi is the table [V, 3H] they index."""
    x = gi if tokens is None else F.embedding(_rows(tokens, gi.shape[-2]), gi.reshape(-1, gi.shape[-1]))
    hs, buffers = _loop(x, h0, w_hh, b_hh, reset_after, save)
    return hs, ((tokens, h0, w_hh, hs, *buffers) if save else ())


def backward(
    dhs: Tensor, dh_T: Tensor, saved: tuple, reset_after: bool, vocab_size: int, need_dh0: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of gi (with tokens: of the [vocab_size, 3H] table), h0, W_hh and b_hh from forward's saved."""
    tokens, *rest = saved
    dhs = dhs.clone()
    dhs[-1] += dh_T
    dgi, dh0, dw_hh, db_hh = (_backward_reset_after if reset_after else _backward_reset_before)(dhs, *rest)
    if tokens is not None:  # the table's gradient: each step's dgi added to the row its token picked
        table = dgi.new_zeros(*tokens.shape[1:-1], vocab_size, dgi.shape[-1])  # [V, 3H], or [S, V, 3H]
        rows, dgi = _rows(tokens, vocab_size).flatten(), dgi.reshape(-1, dgi.shape[-1])
        dgi = table.view(-1, dgi.shape[-1]).index_add_(0, rows, dgi).view_as(table)
    return dgi, dh0, dw_hh, db_hh


def _rows(tokens: Tensor, vocab_size: int) -> Tensor:
    """The row each token picks in the table, or in the trials' tables flattened to [S * V, 3H]: trial s's tokens
    (tokens [T, S, B]) index its own table, at rows s * V + id."""
    if tokens.dim() == 2:
        return tokens
    return tokens + torch.arange(tokens.shape[1], device=tokens.device)[:, None] * vocab_size


def _addmm(bias: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """bias + a @ b; batched over a leading trial dimension (baddbmm, bias [S, 1, n]) when a is 3-D."""
    return torch.addmm(bias, a, b, out=out) if a.dim() == 2 else torch.baddbmm(bias, a, b, out=out)


def _loop(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, reset_after: bool, save: bool) -> tuple[Tensor, tuple]:
    """Run the recurrence; return hs [T, B, H] and, if save, the gate activations backward needs."""
    T, *lead, H3 = gi.shape  # lead: [B], or [S, B] for trials (reset-after form)
    B, H = lead[-1], H3 // 3
    hs = gi.new_empty(T, *lead, H)
    # Gate activations go to [T, ...] buffers for backward, or to temporaries (out=None) when none will run.
    N = gi.new_empty(T, *lead, H) if save else [None] * T
    h = h0
    if reset_after:
        G = gi.new_empty(T, *lead, 3 * H) if save else [None] * T  # G[t] = [r, z, gh_n]
        if save:  # HS = [h0, h1, ..., hT]: backward reads h_{t-1} as HS[:-1] without a copy
            HS = gi.new_empty(T + 1, *lead, H)
            HS[0] = h0
            hs = HS[1:]
        gi_rz, gi_n = gi.split((2 * H, H), dim=-1)
        w_t, bias = w_hh.transpose(-2, -1), b_hh if b_hh.dim() == 1 else b_hh.unsqueeze(-2)
        for t in range(T):
            g = _addmm(bias, h, w_t, out=G[t])  # gh = h W_hh^T + b_hh
            r, z = g[..., : 2 * H].add_(gi_rz[t]).sigmoid_().chunk(2, dim=-1)
            n = torch.addcmul(gi_n[t], r, g[..., 2 * H :], out=N[t]).tanh_()
            h = torch.lerp(n, h, z, out=hs[t])  # (1 - z) * n + z * h
        return hs, ((HS, G, N) if save else ())
    a_rz, a_n = (gi + b_hh).split((2 * H, H), dim=2)
    RZ = gi.new_empty(T, B, 2 * H) if save else [None] * T
    RH = gi.new_empty(T, B, H) if save else [None] * T
    w_rz_t, w_n_t = w_hh[: 2 * H].t(), w_hh[2 * H :].t()
    for t in range(T):
        r, z = torch.addmm(a_rz[t], h, w_rz_t, out=RZ[t]).sigmoid_().chunk(2, dim=1)
        rh = torch.mul(r, h, out=RH[t])
        n = torch.addmm(a_n[t], rh, w_n_t, out=N[t]).tanh_()
        h = torch.lerp(n, h, z, out=hs[t])
    return hs, (RZ, RH, N)


def _backward_reset_after(dhs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, HS: Tensor, G: Tensor, N: Tensor):
    """Gradients of the reset-after recurrence w.r.t. gi, h0, W_hh, b_hh (of each trial's, for trials)."""
    T, *lead, H = hs.shape
    r, z, gh_n = G.split(H, dim=-1)
    # Everything that does not depend on dh is computed for all steps at once, into preallocated buffers:
    # per step, dG_h = [da_r, da_z, dgh_n] is then dh * C[t] in one op, with C = [k_r, k_z, k_n * r].
    C = N.new_empty(T, *lead, 3, H)
    k_r, k_z, k_gn = C.unbind(-2)
    one_z = torch.rsub(z, 1)
    k_n = torch.mul(N, N).neg_().add_(1).mul_(one_z)  # dn/da_n * dh/dn: (1 - n^2)(1 - z)
    torch.mul(k_n, r, out=k_gn)
    torch.addcmul(r, r, r, value=-1, out=k_r).mul_(gh_n).mul_(k_n)  # r (1 - r) gh_n k_n
    torch.sub(HS[:-1], N, out=k_z).mul_(z).mul_(one_z)  # (h_{t-1} - n) z (1 - z)
    D = torch.empty_like(C)  # per step [da_r, da_z, dgh_n]; after the loop [da_r, da_z, da_n] = dgi
    DH = torch.empty_like(N)  # DH[t] = dL/dh_t, all paths
    DH[-1] = dhs[-1]
    for t in range(T - 1, 0, -1):
        d = torch.mul(C[t], DH[t].unsqueeze(-2), out=D[t]).view(*lead, 3 * H)  # B*3H: under ATen's parallel grain
        dh = torch.addcmul(dhs[t - 1], DH[t], z[t], out=DH[t - 1])
        if d.dim() == 2:
            dh.addmm_(d, w_hh)
        else:
            dh.baddbmm_(d, w_hh)
    d = torch.mul(C[0], DH[0].unsqueeze(-2), out=D[0]).view(*lead, 3 * H)
    dh0 = _addmm(DH[0] * z[0], d, w_hh)
    dG_h = D.view(T, *lead, 3 * H)
    if len(lead) == 1:
        dw_hh, db_hh = _weight_grads(dG_h, HS[:-1])
    else:  # trials: each one's as its lone run computes them, the same GEMM and sum (so the same bits)
        grads = [_weight_grads(dG, h) for dG, h in zip(dG_h.unbind(1), HS[:-1].unbind(1), strict=True)]
        dw_hh, db_hh = (torch.stack(g) for g in zip(*grads, strict=True))
    torch.mul(DH, k_n, out=D.select(-2, 2))  # da_n replaces dgh_n: D becomes dgi
    return D.view(T, *lead, 3 * H), dh0, dw_hh, db_hh


def _weight_grads(dG_h: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """dW_hh and db_hh from dG_h [T, B, 3H] and h_{t-1} [T, B, H]: one GEMM and one sum over all the steps."""
    dG_h = dG_h.reshape(-1, dG_h.shape[-1])
    return dG_h.t() @ h.reshape(dG_h.shape[0], -1), dG_h.sum(0)


def _backward_reset_before(dhs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, RZ: Tensor, RH: Tensor, N: Tensor):
    """Gradients of the reset-before (d2l) recurrence w.r.t. gi, h0, W_hh, b_hh."""
    T, B, H = hs.shape
    r, z = RZ.split(H, dim=2)
    h_prev = torch.cat((h0[None], hs[:-1]))
    one_z = 1 - z
    K = torch.stack(((h_prev - N) * z * one_z, one_z * (1 - N * N)), dim=2)  # dh * K[t] = [da_z, da_n]
    k_r = h_prev * r * (1 - r)  # da_r = d(r * h) * k_r
    w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H :]
    D = hs.new_empty(T, B, 3 * H)  # [da_r, da_z, da_n]; with b_hh added to gi before the loop, also dgi
    dh = dhs[-1]
    for t in range(T - 1, -1, -1):
        d = D[t]
        torch.mul(K[t], dh[:, None], out=d[:, H:].view(B, 2, H))
        drh = d[:, 2 * H :] @ w_n
        torch.mul(drh, k_r[t], out=d[:, :H])
        dh_direct = torch.addcmul(dhs[t - 1], dh, z[t]) if t > 0 else dh * z[t]
        dh = torch.addmm(dh_direct.addcmul_(drh, r[t]), d[:, : 2 * H], w_rz)
    D2 = D.view(T * B, 3 * H)
    dw_hh = torch.cat((D2[:, : 2 * H].t() @ h_prev.reshape(T * B, H), D2[:, 2 * H :].t() @ RH.view(T * B, H)))
    return D, dh, dw_hh, D2.sum(0)
