"""Our own GRU: nn.GRU's parameters and math, with the recurrence as a hand-written autograd Function.

Only the recurrence h_{t-1} -> h_t is sequential. Layer 0's input projection is a lookup: a one-hot token picks a
row of the table W_ih^T + b_ih, which the loop reads by token id; later layers' is one GEMM before the loop, the
output layer one GEMM after it. The loop itself runs one (B, H) x (H, 3H) product (two, H x 2H and H x H, in the
reset-before form) and the gate arithmetic per step, forward and backward; the gradients of W_hh and b_hh are
single GEMMs or sums over all steps after the backward loop.

Four backends compute the same function (backends.py chooses; docs/fused-backends.md): on the CPU, in float32 or
float64 and the reset-after form, the loop runs in C (gru_cpu.c: one call for all T steps, gates fused into one pass,
the hidden units split across threads); on CUDA, cuDNN's GRU (torch._VF.gru, nn.GRU's own function, on these
parameters) or our persistent Triton kernels (gru_triton.py, both forms; on the CPU under Triton's interpreter);
everywhere else (reset-before on the CPU, no C compiler at hand) a loop of preallocated, in-place torch ops.

Gates are stacked r, z, n as in nn.GRU. reset_after=True is nn.GRU's (and cuDNN's) form,
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),
reset_after=False is d2l's, n = tanh(x W_in^T + b_in + (r * h) W_hn^T + b_hn), on the same parameters.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import _VF, Tensor, nn
from torch.autograd.function import once_differentiable

from gruexp.models import backends, gru_cpu
from gruexp.models.amp import fp32_recurrence


def _forward(gi: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, reset_after: bool, save: bool) -> tuple[Tensor, tuple]:
    """Run the recurrence; return hs [T, B, H] and, if save, the gate activations backward needs."""
    T, B, H3 = gi.shape
    H = H3 // 3
    hs = gi.new_empty(T, B, H)
    # Gate activations go to [T, ...] buffers for backward, or to temporaries (out=None) when none will run.
    N = gi.new_empty(T, B, H) if save else [None] * T
    h = h0
    if reset_after:
        G = gi.new_empty(T, B, 3 * H) if save else [None] * T  # G[t] = [r, z, gh_n]
        if save:  # HS = [h0, h1, ..., hT]: backward reads h_{t-1} as HS[:-1] without a copy
            HS = gi.new_empty(T + 1, B, H)
            HS[0] = h0
            hs = HS[1:]
        gi_rz, gi_n = gi.split((2 * H, H), dim=2)
        w_t = w_hh.t()
        for t in range(T):
            g = torch.addmm(b_hh, h, w_t, out=G[t])  # gh = h W_hh^T + b_hh
            r, z = g[:, : 2 * H].add_(gi_rz[t]).sigmoid_().chunk(2, dim=1)
            n = torch.addcmul(gi_n[t], r, g[:, 2 * H :], out=N[t]).tanh_()
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


def _check_ids(tokens: Tensor, vocab_size: int) -> None:
    """The C loop and the Triton kernels read table rows by id unchecked: refuse what F.embedding refuses."""
    lo, hi = torch.aminmax(tokens)  # one pass over the ids, not a min() and a max()
    if not 0 <= int(lo) <= int(hi) < vocab_size:
        raise IndexError(f"token ids must lie in [0, {vocab_size}): the vocabulary has {vocab_size} tokens")


def _recurrence(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    tokens: Tensor | None,
    reset_after: bool,
    backend: str | bool,
    save: bool,
) -> tuple[str, Tensor, tuple]:
    """Run the loop with `backend` ("c", "triton" or "ops"; True means "c", False "ops"), in C only where it can
    run (the CPU, reset-after, contiguous float32/64 inputs), in a kernel only if T and B are above 0.

    Returns the backend that ran ("c", "triton" or "ops"), hs [T, B, H] and, if save, what backward needs.
    """
    backend = {True: "c", False: "ops"}.get(backend, backend)
    T, B = (tokens if tokens is not None else gi).shape[:2]
    if backend == "triton" and T and B:
        from gruexp.models import gru_triton  # imports triton: only where it runs

        if tokens is not None:
            _check_ids(tokens, gi.shape[0])
        HS, saved = gru_triton.forward(gi, h0, w_hh, b_hh, tokens, reset_after)
        return "triton", HS[1:].to(gi.dtype), ((HS, *saved) if save else ())
    lib = None
    if backend == "c" and reset_after and T and B and gru_cpu.supports(gi, h0, w_hh, b_hh):
        if tokens is None or (tokens.dtype == torch.int64 and tokens.is_contiguous()):
            lib = gru_cpu.load()
    if lib is not None:
        if tokens is not None:
            _check_ids(tokens, gi.shape[0])
        HS, saved = gru_cpu.forward(lib, gi, h0, w_hh, b_hh, save, tokens)
        return "c", HS[1:], ((HS, *saved) if save else ())
    hs, saved = _forward(gi if tokens is None else F.embedding(tokens, gi), h0, w_hh, b_hh, reset_after, save)
    return "ops", hs, saved


class GRURecurrence(torch.autograd.Function):
    """(hs [T, B, H], h_T [B, H]) = the GRU recurrence from h0 [B, H] over gi = x W_ih^T + b_ih.

    gi is [T, B, 3H]; or, with tokens [T, B], the table [V, 3H] whose rows the tokens pick (layer 0: a one-hot x
    picks a row of W_ih^T + b_ih), and its gradient is then the table's. h_T is hs[-1] as an output of its own, so
    that its gradient arrives as [B, H] and not as a [T, B, H] tensor of zeros but for the last step. The
    backward is by hand. backend: "c" (or True) where the C loop can run, "triton", or "ops" (or False: the
    torch-op loop, the others' reference).
    """

    @staticmethod
    def forward(
        ctx,
        gi: Tensor,
        h0: Tensor,
        w_hh: Tensor,
        b_hh: Tensor,
        tokens: Tensor | None,
        reset_after: bool,
        backend: str | bool = True,
    ) -> tuple[Tensor, Tensor]:
        ran, hs, saved = _recurrence(gi, h0, w_hh, b_hh, tokens, reset_after, backend, save=True)
        ctx.reset_after, ctx.ran, ctx.vocab_size = reset_after, ran, gi.shape[0]
        ctx.dtypes = (gi.dtype, h0.dtype, w_hh.dtype, b_hh.dtype)
        ctx.save_for_backward(tokens, h0, w_hh, hs, *saved)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dhs: Tensor, dh_T: Tensor):
        tokens, *saved = ctx.saved_tensors
        if ctx.ran == "c":
            dgi, dh0, dw_hh, db_hh = _backward_c(ctx, dhs, dh_T, tokens, *saved)
        elif ctx.ran == "triton":
            from gruexp.models import gru_triton

            _, w_hh, _, HS, *rest = saved
            grads = gru_triton.backward(dhs, dh_T, w_hh, HS, tuple(rest), ctx.reset_after)
            dgi, dh0, dw_hh, db_hh = (g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True))
            if tokens is not None:
                dgi = dgi.new_zeros(ctx.vocab_size, dgi.shape[-1]).index_add_(0, tokens.flatten(), dgi.flatten(0, 1))
        else:
            dhs = dhs.clone()
            dhs[-1] += dh_T
            backward = _backward_reset_after if ctx.reset_after else _backward_reset_before
            dgi, dh0, dw_hh, db_hh = backward(dhs, *saved)
            if tokens is not None:  # the table's gradient: each step's dgi added to the row its token picked
                dgi = dgi.new_zeros(ctx.vocab_size, dgi.shape[-1]).index_add_(0, tokens.flatten(), dgi.flatten(0, 1))
        return dgi, dh0, dw_hh, db_hh, None, None, None


def _backward_c(
    ctx,
    dhs: Tensor,
    dh_T: Tensor,
    tokens: Tensor | None,
    h0: Tensor,
    w_hh: Tensor,
    hs: Tensor,
    HS: Tensor,
    G: Tensor,
    N: Tensor,
):
    """The reset-after gradients with the C loop; only the weight gradients, one GEMM and one sum, are left here."""
    T, B, H = hs.shape
    dgi, dG_h, dh0 = gru_cpu.backward(
        gru_cpu.load(),
        dhs.contiguous(),
        dh_T.contiguous(),
        w_hh,
        HS,
        G,
        N,
        ctx.needs_input_grad[1],
        tokens,
        ctx.vocab_size,
    )
    dG_h = dG_h.view(T * B, 3 * H)
    return dgi, dh0, dG_h.t() @ HS[:-1].reshape(T * B, H), dG_h.sum(0)


def _backward_reset_after(dhs: Tensor, h0: Tensor, w_hh: Tensor, hs: Tensor, HS: Tensor, G: Tensor, N: Tensor):
    """Gradients of the reset-after recurrence w.r.t. gi, h0, W_hh, b_hh."""
    T, B, H = hs.shape
    r, z, gh_n = G.split(H, dim=2)
    # Everything that does not depend on dh is computed for all steps at once, into preallocated buffers:
    # per step, dG_h = [da_r, da_z, dgh_n] is then dh * C[t] in one op, with C = [k_r, k_z, k_n * r].
    C = N.new_empty(T, B, 3, H)
    k_r, k_z, k_gn = C.unbind(2)
    one_z = torch.rsub(z, 1)
    k_n = torch.mul(N, N).neg_().add_(1).mul_(one_z)  # dn/da_n * dh/dn: (1 - n^2)(1 - z)
    torch.mul(k_n, r, out=k_gn)
    torch.addcmul(r, r, r, value=-1, out=k_r).mul_(gh_n).mul_(k_n)  # r (1 - r) gh_n k_n
    torch.sub(HS[:-1], N, out=k_z).mul_(z).mul_(one_z)  # (h_{t-1} - n) z (1 - z)
    D = torch.empty_like(C)  # per step [da_r, da_z, dgh_n]; after the loop [da_r, da_z, da_n] = dgi
    DH = torch.empty_like(N)  # DH[t] = dL/dh_t, all paths
    DH[-1] = dhs[-1]
    for t in range(T - 1, 0, -1):
        d = torch.mul(C[t], DH[t, :, None], out=D[t]).view(B, 3 * H)  # B*3H stays under ATen's parallel grain
        torch.addcmul(dhs[t - 1], DH[t], z[t], out=DH[t - 1]).addmm_(d, w_hh)
    d = torch.mul(C[0], DH[0, :, None], out=D[0]).view(B, 3 * H)
    dh0 = torch.addmm(DH[0] * z[0], d, w_hh)
    dG_h = D.view(T * B, 3 * H)
    dw_hh, db_hh = dG_h.t() @ HS[:-1].reshape(T * B, H), dG_h.sum(0)
    torch.mul(DH, k_n, out=D[:, :, 2])  # da_n replaces dgh_n: D becomes dgi
    return D.view(T, B, 3 * H), dh0, dw_hh, db_hh


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


@fp32_recurrence  # mixed precision: state and gates in fp32 (gruexp.models.amp, docs/precision.md)
def gru_recurrence(
    gi: Tensor,
    h0: Tensor,
    w_hh: Tensor,
    b_hh: Tensor,
    reset_after: bool = True,
    backend: str | bool = True,
    tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(hs, h_T): GRURecurrence when a gradient is needed; otherwise the bare loop, which saves nothing.

    backend: "c" (or True) where the C loop can run, "triton", or "ops" (or False), as GRURecurrence.
    """
    if torch.is_grad_enabled() and any(x.requires_grad for x in (gi, h0, w_hh, b_hh)):
        return GRURecurrence.apply(gi, h0, w_hh, b_hh, tokens, reset_after, backend)
    hs = _recurrence(gi, h0, w_hh, b_hh, tokens, reset_after, backend, save=False)[1]
    return hs, hs[-1]


class GRULayers(nn.Module):
    """A stack of GRU layers on token ids with nn.GRU's parameter names, shapes and initialisation."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        reset_after: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.dropout, self.reset_after = dropout, reset_after
        self.use_c = True  # False: the torch-op loop even where the C loop could run (a switch for tests, not state)
        self.backend: str | None = None  # one of backends.BACKENDS forces it (tests, the autotuner); None chooses
        self._tuned: dict[tuple, str] = {}  # autotune's decisions for this module, by tuner, device, dtype, shape
        # the environment's choices, read once here (a bad value is refused now, and a step does not pay for it)
        self.cpu_choice, self.gpu_choice = backends.cpu_choice(), backends.gpu_choice()
        H = hidden_size
        self.layer_names = []
        for k in range(num_layers):
            names = (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}")
            shapes = ((3 * H, vocab_size if k == 0 else H), (3 * H, H), (3 * H,), (3 * H,))
            for name, shape in zip(names, shapes, strict=True):
                setattr(self, name, nn.Parameter(torch.empty(shape)))
            self.layer_names.append(names)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in ±1/sqrt(H), as nn.GRU."""
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _apply(self, fn, recurse=True):
        """After .to(device) or .half(): on CUDA, put the weights in one flat buffer again, as nn.GRU does."""
        ret = super()._apply(fn, recurse)
        self._flatten_parameters()
        return ret

    def _flatten_parameters(self) -> None:
        """Make the parameters views of one buffer in cuDNN's layout (nn.RNNBase.flatten_parameters, on our
        parameters): otherwise cuDNN copies them together on every call, with a warning."""
        params = [getattr(self, name) for names in self.layer_names for name in names]
        w = params[0]
        if not (w.is_cuda and torch.backends.cudnn.is_acceptable(w) and torch._use_cudnn_rnn_flatten_weight()):
            return
        if len({p.dtype for p in params}) > 1 or len({p.data_ptr() for p in params}) < len(params):
            return
        import torch.backends.cudnn.rnn as rnn

        with torch.cuda.device_of(w), torch.no_grad():
            vocab_size = self.weight_ih_l0.shape[1]
            mode = rnn.get_cudnn_mode("GRU")
            torch._cudnn_rnn_flatten_weight(
                params, 4, vocab_size, mode, self.hidden_size, 0, self.num_layers, False, False
            )

    def _forward_cudnn(self, tokens: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
        """nn.GRU's function (cuDNN on CUDA) on one-hot tokens, in the parameters' dtype whatever autocast says."""
        # Generation calls this once per token, so the parameters come from _parameters (a Module's getattr costs
        # ~1 us each) and the autocast context is entered only under autocast: fused's Python stays below nn.GRU's.
        params = [self._parameters[name] for names in self.layer_names for name in names]
        w = params[0]
        x = F.one_hot(tokens, w.shape[1]).to(w.dtype)
        args = (x, h0.to(w.dtype), params, True, self.num_layers, self.dropout, self.training, False, False)
        if not torch.is_autocast_enabled(w.device.type):
            return _VF.gru(*args)
        with torch.autocast(w.device.type, enabled=False):  # no silent fp16/bf16 recurrence: we chose fp32
            return _VF.gru(*args)

    def _trial(self, backend: str, tokens: Tensor, h0: Tensor, needs_grad: bool) -> list[Tensor]:
        """One forward (and, if needs_grad, backward) with `backend`: the outputs and every gradient, for the
        autotuner to compare and time. Without dropout (cuDNN draws its masks its own way); leaves no .grad."""
        forced, dropout = self.backend, self.dropout
        self.backend, self.dropout = backend, 0.0
        try:
            hs, h_n = self.forward(tokens, h0)
            if not needs_grad:
                return [hs, h_n]
            g = torch.Generator(hs.device).manual_seed(0)
            dhs = torch.randn(hs.shape, generator=g, device=hs.device, dtype=hs.dtype)
            dh_n = torch.randn(h_n.shape, generator=g, device=hs.device, dtype=hs.dtype)
            inputs = [p for p in self.parameters() if p.requires_grad]
            return [hs, h_n, *torch.autograd.grad((hs, h_n), inputs, (dhs, dh_n))]
        finally:
            self.backend, self.dropout = forced, dropout

    def autotune(
        self, tokens: Tensor, h0: Tensor | None, needs_grad: bool, tuner: backends.Autotuner | None = None
    ) -> str:
        """The first-use decision at this shape: the faster of Triton and the reference (cuDNN; the op loop for
        reset-before, which cuDNN lacks), and the reference wherever Triton fails or disagrees with it. Every backend
        here also runs on the CPU (cuDNN's function as _VF.gru, Triton interpreted), for the tests."""
        tuner = tuner or backends.AUTOTUNER
        w = self.weight_hh_l0
        T, B = tokens.shape
        # A step at batch 1 (generation) lasts ~0.25 ms on a GPU: building the tuner's key (the device's name, ...)
        # each call cost a fifth of it. The decision for a shape is looked up here first, by what can vary per call.
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        seen = (id(tuner), w.device, w.dtype, needs_grad, T, B, tf32)
        if seen in self._tuned:
            return self._tuned[seen]
        key = tuner.key(w.device, self.reset_after, w.dtype, needs_grad, T, B, self.hidden_size, self.num_layers)
        h0 = h0.detach() if h0 is not None else None
        reference = "cudnn" if self.reset_after else "ops"
        # cuDNN's TF32 switch is on by default: compare to TF32 rounding whenever either side may use it
        maybe_tf32 = tf32[0] or (self.reset_after and tf32[1])
        # Timed for both forms: on an H200 the kernels were slower than even scratch's autograd loop from B 128 x
        # H 512 on (docs/fused-backends.md, GPU timings), so Triton is not assumed to win for reset-before either.
        self._tuned[seen] = tuner.decide(
            key,
            (reference, partial(self._trial, reference, tokens, h0, needs_grad)),
            ("triton", partial(self._trial, "triton", tokens, h0, needs_grad)),
            timed=True,
            tolerance=3e-2 if maybe_tf32 and w.device.type == "cuda" else 1e-3,
        )
        return self._tuned[seen]

    def choose(self, tokens: Tensor, h0: Tensor | None, needs_grad: bool) -> str:
        """backends.choose_backend for this call, with the environment's choices (as the model was built) and, for
        auto on CUDA, the autotuner's first-use decision at this shape."""
        w = self.weight_hh_l0
        T, B = tokens.shape
        cpu, gpu = (self.cpu_choice if self.use_c else "ops"), self.gpu_choice
        tuned = None
        if w.device.type == "cuda" and gpu == "auto" and w.dtype != torch.float64 and T and B:
            # without the triton package (e.g. a CPU torch on a GPU machine) there is nothing to race
            tuned = self.autotune(tokens, h0, needs_grad) if backends.triton_available() else None
            tuned = tuned or ("cudnn" if self.reset_after else "ops")
        shape = (T, B, self.hidden_size, self.num_layers)
        return backends.choose_backend(
            w.device, w.dtype, self.reset_after, needs_grad, *shape, cpu=cpu, gpu=gpu, tuned=tuned
        )

    def forward(self, tokens: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [T, B] -> the last layer's hs [T, B, H] and every layer's final state [num_layers, B, H]."""
        needs_grad = torch.is_grad_enabled() and (
            any(p.requires_grad for p in self.parameters()) or (h0 is not None and h0.requires_grad)
        )
        backend = self.backend or self.choose(tokens, h0, needs_grad)
        if h0 is None:
            h0 = self.weight_hh_l0.new_zeros(self.num_layers, tokens.shape[1], self.hidden_size)
        if backend == "cudnn":
            return self._forward_cudnn(tokens, h0)
        x, h_n = tokens, []
        for k, names in enumerate(self.layer_names):
            w_ih, w_hh, b_ih, b_hh = (getattr(self, name) for name in names)
            ids = None
            if k == 0 and x.numel() > w_ih.shape[1]:
                # one_hot(x) W_ih^T + b_ih is row x of the table W_ih^T + b_ih: the recurrence reads its rows
                gi, ids = (w_ih.t() + b_ih).contiguous(), x.contiguous()
            elif k == 0:  # a few tokens (generation): gather them from the transposed view, no table
                gi = F.embedding(x, w_ih.t()) + b_ih
            else:
                gi = F.linear(F.dropout(x, self.dropout, self.training), w_ih, b_ih)
            x, h_T = gru_recurrence(gi, h0[k], w_hh, b_hh, self.reset_after, backend, ids)
            h_n.append(h_T)
        return x, torch.stack(h_n)


class FusedGRU(nn.Module):
    """GRU language model on GRULayers; its state_dict is interchangeable with TorchGRU's."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        reset_after: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size, self.num_layers = vocab_size, hidden_size, num_layers
        self.rnn = GRULayers(vocab_size, hidden_size, num_layers, dropout, reset_after)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tokens [B, T] -> logits [B, T, V] and final state [num_layers, B, H]; state None means zeros."""
        hs, state = self.rnn(tokens.T, state)
        return self.linear(hs).transpose(0, 1), state  # the output layer on [T, B, H] as it lies: no copy
