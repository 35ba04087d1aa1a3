"""The K-step body as one recorded program: captured once as a CUDA graph and replayed, or (on a CPU, to prove it
pure) traced once with make_fx and replayed the same way.

A replay re-runs the recorded kernels on the same memory: whatever Python did at record time (a host value read, a
branch on a tensor, a counter) is not redone. So the body takes everything that changes from call to call from
static device buffers, filled before each replay: the chunk's inputs and targets, the carried state, each step's
learning rate and optimizer step number. The parameters and optimizer state are updated in place, so torch's
optimizer state_dict (and so every checkpoint) stays the one source of truth.

The optimizer updates are written here as tensor ops because torch's cannot be recorded on every device the proof
runs on: SGD reads a tensor learning rate back to the host (`add_(alpha=-lr)`), and Adam(capturable=True) refuses
CPU tensors. They are torch's single-tensor SGD (momentum, dampening, nesterov, weight decay) and Adam (weight
decay, no amsgrad), op for op, with what torch computes on the host in Python (the learning rate, Adam's bias
corrections) in a device buffer: on a CPU bit-identical to torch's (tests/test_graphs.py). On CUDA torch's
default is its foreach kernels, which round differently: there a graph run equals an eager one to rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gruexp.callbacks import grad_norm
from gruexp.compat import advance_logging_step, advance_optimizer_step
from gruexp.models import backends, token_loss

aten = torch.ops.aten

# ops whose result the host must see before it can go on: a replayed graph cannot contain them
SYNCING_OPS = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), int(t)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


class HostSync(RuntimeError):
    """The body asked for a device value on the host: it cannot be replayed as recorded."""


class NoHostSync(TorchDispatchMode):
    """Raise HostSync at any op that reads a tensor back to the host (.item(), bool(), nonzero, a boolean-mask
    index, a copy to the CPU): such an op stalls a GPU every step and cannot be captured in a CUDA graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            raise HostSync(f"{func} reads a tensor back to the host")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
                raise HostSync(f"{func} with a boolean mask needs nonzero on the host")
        if func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device")
            if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                raise HostSync(f"{func} copies a device tensor to the host")
        return func(*args, **kwargs)


def sgd_scalars(group: dict, lr: float, step: int) -> tuple[float, float]:
    """What an SGD step takes from the host: its learning rate."""
    return lr, 0.0


def sgd_update(p: torch.Tensor, g: torch.Tensor, state: dict, scalars: torch.Tensor, group: dict) -> None:
    """torch.optim.SGD's single-tensor step with the learning rate scalars[0] a device tensor."""
    if group["maximize"]:
        g = -g
    if group["weight_decay"]:
        g = g.add(p, alpha=group["weight_decay"])
    if group["momentum"]:
        buf = state["momentum_buffer"]  # made by the eager chunk before the record
        buf.mul_(group["momentum"]).add_(g, alpha=1 - group["dampening"])
        g = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
    p.addcmul_(g, scalars[0], value=-1)  # p - g * lr, as add_(g, alpha=-lr) rounds it


def adam_scalars(group: dict, lr: float, step: int) -> tuple[float, float]:
    """What Adam's step `step` (from 1) computes on the host, as torch does: lr / (1 - beta1^step) and
    sqrt(1 - beta2^step), in double precision."""
    beta1, beta2 = group["betas"]
    return lr / (1 - beta1**step), (1 - beta2**step) ** 0.5


def adam_update(p: torch.Tensor, g: torch.Tensor, state: dict, scalars: torch.Tensor, group: dict) -> None:
    """torch.optim.Adam's single-tensor step (no amsgrad) with its host scalars (adam_scalars) as device tensors."""
    beta1, beta2 = group["betas"]
    if group["maximize"]:
        g = -g
    if group["weight_decay"]:
        g = g.add(p, alpha=group["weight_decay"])
    state["exp_avg"].lerp_(g, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (state["exp_avg_sq"].sqrt() / scalars[1]).add_(group["eps"])
    p.addcdiv_(state["exp_avg"] * -scalars[0], denom)  # as addcdiv_(exp_avg, denom, value=-step_size) rounds it


UPDATES = {torch.optim.SGD: (sgd_update, sgd_scalars), torch.optim.Adam: (adam_update, adam_scalars)}


def update_for(optimizer: torch.optim.Optimizer) -> tuple[Callable[..., None], Callable[..., tuple]] | None:
    """The recordable update of this optimizer and its host scalars, or None where there is none."""
    group = optimizer.param_groups[0]
    if group.get("amsgrad") or group.get("differentiable"):
        return None
    return UPDATES.get(type(optimizer))


def why_eager(module: Any) -> str | None:
    """Why the K-step body of this module's run cannot be recorded (a line for the log), or None if it can."""
    trainer, optimizer = module.trainer, module.optimizers(use_pl_optimizer=False)
    if str(trainer.precision).startswith("16-mixed"):
        return "16-mixed's GradScaler reads the gradients' finiteness back to the host every step"
    if trainer.world_size > 1:
        return "under DDP the gradients are all-reduced by hooks on backward(), which the recorded body bypasses"
    if len(optimizer.param_groups) != 1 or update_for(optimizer) is None:
        return f"only torch.optim.SGD and Adam (one parameter group, no amsgrad) are recorded, not {optimizer!r}"
    value, algorithm = module.clip
    if value and algorithm != "norm":
        return f"clipping is recorded by norm only, not gradient_clip_algorithm={algorithm}"
    if module.device.type == "cpu" and module.hparams.name == "fused" and backends.cpu_choice() == "c":
        return "the C loop runs outside torch's ops, where a trace cannot see it (GRUEXP_FUSED_CPU=ops can be)"
    return None


class KSteps:
    """The K-step body over static buffers: `run()` trains the chunk in X, Y from the state in `h`.

    Each step: forward, autograd.grad (no .grad attributes: the gradients are the body's own tensors), the global
    gradient norm (train/grad_norm) and clipping by it as torch.nn.utils.clip_grad_norm_ computes it (no host
    sync), the update. It writes each step's loss and norm into `losses` and `norms`, and the state it ends in
    into `h`, for the next chunk.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        X: torch.Tensor,
        Y: torch.Tensor,
        state: torch.Tensor | None,
        clip: float | None = None,
    ) -> None:
        """Buffers shaped like a chunk (X, Y: [k, B, T]) and like the state it starts from (None: the state is not
        carried); `clip`: the global gradient norm to clip to (None: no clipping)."""
        self.net, self.carry, self.clip = net, state is not None, clip
        self.update, self.scalars_for = update_for(optimizer)
        self.group = optimizer.param_groups[0]
        self.params = [p for p in self.group["params"] if p.requires_grad]
        self.states = [optimizer.state[p] for p in self.params]  # made by the eager chunk before the record
        self.k = k = X.shape[0]
        device = X.device
        self.X, self.Y = torch.zeros_like(X), torch.zeros_like(Y)
        self.h = torch.zeros_like(state) if self.carry else None
        # each step's scalars from the host: its learning rate (the scheduler's), Adam's bias corrections
        # (in fp32 at least: a bf16-true run's learning rate is not rounded to bf16, as torch's host float is not)
        dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        self.scalars = torch.zeros(k, 2, dtype=dtype, device=device)
        self.losses = torch.zeros(k, device=device)
        self.norms = torch.zeros(k, device=device)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the body reads or updates that outlives it: a trace takes them as its inputs."""
        buffers = [self.X, self.Y, self.scalars, self.losses, self.norms]
        state = [t for s in self.states for t in s.values() if isinstance(t, torch.Tensor)]
        return [*self.params, *state, *self.net.buffers(), *buffers, *([self.h] if self.h is not None else [])]

    def fill(self, X: torch.Tensor, Y: torch.Tensor, state: torch.Tensor | None, lrs: list, first_step: int) -> None:
        """Copy in a chunk, the state it starts from (None: zeros) and the host scalars of its steps, which run
        at learning rates `lrs` from optimizer step `first_step` (counted from 1)."""
        self.X.copy_(X)
        self.Y.copy_(Y)
        if self.h is not None:
            self.h.copy_(state) if state is not None else self.h.zero_()
        scalars = [self.scalars_for(self.group, lr, first_step + i) for i, lr in enumerate(lrs)]
        self.scalars.copy_(torch.tensor(scalars, dtype=self.scalars.dtype))

    def forward_backward(
        self, X: torch.Tensor, Y: torch.Tensor, h: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One step's loss, its gradients and the state it ends in, from batch X, Y and state h."""
        logits, h_next = self.net(X, h if self.carry else None)
        loss = token_loss(logits, Y)
        # in the layout backward() gives .grad (AccumulateGrad's, the parameter's): a norm reduces a transposed
        # gradient in another order, to another rounding
        grads = [
            g if g.stride() == p.stride() else torch.empty_like(p).copy_(g)
            for p, g in zip(self.params, torch.autograd.grad(loss, self.params), strict=True)
        ]
        return loss, grads, h_next

    def run(self) -> None:
        h = self.h
        for i in range(self.k):
            loss, grads, h_next = self.forward_backward(self.X[i], self.Y[i], h)
            norm = grad_norm(grads)
            with torch.no_grad():
                if self.clip:
                    coef = torch.clamp(self.clip / (norm + 1e-6), max=1.0)
                    grads = [g * coef for g in grads]
                for p, g, state in zip(self.params, grads, self.states, strict=True):
                    self.update(p, g, state, self.scalars[i], self.group)
                self.losses[i].copy_(loss)
                self.norms[i].copy_(norm)
            h = h_next.detach()
        if self.h is not None:
            with torch.no_grad():
                self.h.copy_(h)


class Recorded:
    """`body` recorded once and replayed: a CUDA graph on CUDA, a make_fx trace elsewhere (the CPU proof).

    record() trains once and records: on CUDA a warm-up run on a side stream (what capture needs) and a capture,
    which runs nothing; elsewhere make_fx, which runs the body while it traces it. So both train the chunk in the
    buffers once, and replay() trains the next.
    """

    def __init__(self, body: Callable[[], None], tensors: list[torch.Tensor]) -> None:
        self.body, self.tensors = body, tensors
        self.cuda = tensors[0].device.type == "cuda"
        self.graph: Any = None
        self.failed: str | None = None  # why the CUDA capture failed, if it did

    def record(self) -> None:
        if self.cuda:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.body()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.body()
            except RuntimeError as e:  # the warm-up trained the chunk: it stands, and later ones run eagerly
                self.failed = f"capture failed: {e}".splitlines()[0]
                return
            self.graph = graph
            return
        from torch.fx.experimental.proxy_tensor import make_fx

        # the tensors as the trace's inputs, so that a replay reads and updates those very tensors; make_fx in
        # real mode knows them by identity when the body reaches them through its own references
        def traced(*tensors):
            self.body()

        self.graph = make_fx(traced, tracing_mode="real")(*self.tensors)

    def replay(self) -> None:
        if self.cuda:
            self.graph.replay()
            return
        with torch.no_grad():  # the trace holds the backward as plain ops: autograd must not see the updates
            self.graph(*self.tensors)


class GraphSteps:
    """Full chunks of K steps as one recorded K-step body, with the host's bookkeeping around each replay: the
    learning rates from the scheduler, Adam's step count, global_step, the logged step metrics, the carried state."""

    def __init__(self, module: Any, X: torch.Tensor, Y: torch.Tensor) -> None:
        state = module.state
        if module.carry_state and state is None:  # an epoch of one chunk: shaped as the nets return it
            hp, dtype = module.hparams, next(module.net.parameters()).dtype
            state = torch.zeros(hp.num_layers, X.shape[1], hp.hidden_size, dtype=dtype, device=X.device)
        optimizer = module.optimizers(use_pl_optimizer=False)
        self.body = KSteps(module.net, optimizer, X, Y, state if module.carry_state else None, module.clip[0])
        self.replays = 0
        self.recorded = Recorded(self.body.run, self.body.tensors())

    def dry_run(self, X: torch.Tensor, Y: torch.Tensor, state: torch.Tensor | None) -> str | None:
        """Why the body reads a tensor back to the host (one step's forward and backward on X[0], Y[0] under
        NoHostSync, the random state put back), or None: a body that syncs cannot be recorded."""
        body = self.body
        devices = [X.device] if X.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), NoHostSync():
            try:
                body.forward_backward(X[0], Y[0], state)
            except HostSync as e:
                return str(e)
        return None

    def train(self, module: Any, X: torch.Tensor, Y: torch.Tensor, per_step: Any) -> torch.Tensor:
        """Train the chunk X, Y (k = K steps) by one replay (the first call records); returns its k losses."""
        body, trainer = self.body, module.trainer
        lrs = []
        for _ in range(body.k):
            lrs.append(body.group["lr"])
            if per_step is not None:
                per_step.step()
        counts = [s["step"] for s in body.states if "step" in s]  # Adam's, a host tensor
        done = int(counts[0]) if counts else 0
        body.fill(X, Y, module.state if module.carry_state else None, lrs, done + 1)
        if self.recorded.graph is None:
            self.recorded.record()  # trains the chunk too
        else:
            self.recorded.replay()
            self.replays += 1
        for state in body.states:
            if "step" in state:
                state["step"] += body.k
        if body.h is not None:
            module.state = body.h.clone()
        losses, norms = body.losses.clone(), body.norms.clone()
        for i in range(body.k):
            if i:
                advance_logging_step(trainer)
            module.train_nll.update(losses[i], Y[i].numel())
            module.step_metrics.write(trainer, losses[i], norms[i])
            advance_optimizer_step(trainer)
        return losses
