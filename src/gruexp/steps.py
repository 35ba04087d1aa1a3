"""The step engine: one call of the training step runs K optimizer steps (`steps_per_call`), so that Python and
Lightning's loop are paid once per K steps; on CUDA the K-step body is captured once as a CUDA graph and replayed.

K = 1 (the default on a CPU, where K > 1 gains only 3-6 %: docs/benchmarks.md) is Lightning's own automatic
optimization, untouched. K > 1 is Lightning's manual optimization, doing per step exactly what the automatic loop
does, in its order: zero the gradients, forward, backward, the `on_before_optimizer_step` hooks (StepMetrics'
gradient norm), clipping (d2l's global norm: clip_gradients, torch's call as Lightning's makes it), the optimizer
step, the per-step scheduler; the per-epoch scheduler after an epoch's last step. So K = 4 and K = 1 leave
bit-identical weights (tests/test_steps.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from gruexp import UserError, graphs
from gruexp.compat import CURRENT_HOOK, advance_logging_step, advance_optimizer_step, forget_train_loader

if TYPE_CHECKING:
    from gruexp.module import CharLM

log = logging.getLogger(__name__)

CUDA_STEPS_PER_CALL = 16  # `auto` on CUDA


@dataclass(frozen=True)
class StepPlan:
    """How training steps are run: K optimizer steps per call of the training step, and whether as a CUDA graph."""

    steps_per_call: int = 1
    cuda_graph: bool = False
    engine: bool = False  # the engine runs the steps at K = 1 too: stacked trials (gruexp.stack), a resume of one

    @property
    def manual(self) -> bool:
        """True when the step engine runs the steps (Lightning's manual optimization), not Lightning's own loop."""
        return self.steps_per_call > 1 or self.cuda_graph or self.engine


def will_use_cuda(accelerator: str) -> bool:
    """Whether a Trainer with this `accelerator` trains on a CUDA device here."""
    return str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def plan_steps(steps_per_call: Any, cuda_graph: Any, accelerator: str = "auto", stacked: bool = False) -> StepPlan:
    """The top-level `steps_per_call` (an int >= 1, or auto) and `cuda_graph` (auto | true | false) as a StepPlan:
    auto is 16 steps per call and graphs on CUDA, 1 step and no graph on a CPU. A `stacked` trial's steps are the
    engine's (auto: 16 per call anywhere), and not a graph (its forward and backward are its stack's, gruexp.stack)."""
    cuda = will_use_cuda(accelerator)
    if stacked:
        if cuda_graph is True:
            raise UserError("cuda_graph=true does not combine with hydra/launcher=stacked: use cuda_graph=auto")
        cuda_graph = False
    if steps_per_call == "auto":  # a stack's trials each pay Lightning's loop per call: K amortizes it on a CPU too
        steps_per_call = CUDA_STEPS_PER_CALL if cuda or stacked else 1
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, int) or steps_per_call < 1:
        raise UserError(f"steps_per_call must be an integer >= 1 or auto, got {steps_per_call!r}")
    if cuda_graph not in ("auto", True, False):
        raise UserError(f"cuda_graph must be auto, true or false, got {cuda_graph!r}")
    if cuda_graph is True and not cuda:
        raise UserError("cuda_graph=true needs a CUDA device (trainer.accelerator=gpu): use cuda_graph=auto or false")
    return StepPlan(steps_per_call, cuda if cuda_graph == "auto" else cuda_graph, engine=stacked)


def check_trainer(plan: StepPlan, trainer_cfg: Any) -> None:
    """What Lightning's manual optimization cannot take from the trainer config, refused in one line each."""
    if not plan.manual:
        return
    if plan.engine:
        devices, precision = trainer_cfg.get("devices", 1), str(trainer_cfg.get("precision", "32-true"))
        if devices not in (1, "1", "auto"):
            raise UserError(
                f"a stack trains on one device: trainer.devices must be 1 under hydra/launcher=stacked, got {devices}"
            )
        if precision.startswith("16"):
            raise UserError(
                f"trainer.precision={precision} scales each trial's loss by a GradScaler, which stacked trials do not "
                "run: use bf16-mixed or 32-true"
            )
    accumulate = trainer_cfg.get("accumulate_grad_batches", 1)
    if accumulate != 1:
        raise UserError(
            f"trainer.accumulate_grad_batches={accumulate} does not combine with steps_per_call="
            f"{plan.steps_per_call}: use steps_per_call=1, or a larger data.batch_size instead of accumulating"
        )
    every = trainer_cfg.get("val_check_interval")
    if isinstance(every, int) and not isinstance(every, bool) and every % plan.steps_per_call:
        raise UserError(
            f"trainer.val_check_interval={every} batches must be a multiple of steps_per_call={plan.steps_per_call}"
            " (validation runs between calls)"
        )


def trainer_overrides(plan: StepPlan, trainer_cfg: Any) -> dict[str, Any]:
    """The Trainer arguments the engine takes over (clipping, the batch limit, val_check_interval in calls)."""
    if not plan.manual:
        return {}
    every = trainer_cfg.get("val_check_interval")
    out: dict[str, Any] = {"gradient_clip_val": None, "limit_train_batches": None}
    if isinstance(every, int) and not isinstance(every, bool):
        out["val_check_interval"] = every // plan.steps_per_call
    return out


def stepping_batches(trainer: Any) -> int | float:
    """Lightning's estimated_stepping_batches (the optimizer steps of the run, for a schedule's total_steps) in
    optimizer steps also when each call trains a chunk of K batches (Lightning would count the calls)."""
    early = trainer.train_dataloader is None
    estimate = trainer.estimated_stepping_batches  # sets the training loader up if it is not yet
    loader = trainer.train_dataloader
    if early:  # set up before a resume's loader position is restored: the fit loop sets it up again, with it
        forget_train_loader(trainer)
    if trainer.lightning_module.automatic_optimization or estimate == float("inf"):
        return estimate
    per_epoch = loader.batches_per_epoch() if hasattr(loader, "batches_per_epoch") else trainer.num_training_batches
    total = per_epoch * max(trainer.max_epochs or 1, 1)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def _scheduler(module: CharLM, interval: str) -> Any:
    """The scheduler CharLM.configure_optimizers set up for this interval (its frequency is always 1), or None."""
    for config in module.trainer.lr_scheduler_configs:
        if config.interval == interval and not config.reduce_on_plateau:
            return config.scheduler
    return None


def run_chunk(module: CharLM, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Train on a chunk of k batches (X, Y: [k, B, T]): k optimizer steps as Lightning's automatic loop does them.

    Returns the k losses (device tensors: no host sync) as `loss`, for the guards, and the tokens trained. A chunk
    that would step past `trainer.max_steps` trains its first batches only; the loader hears of the rest.
    """
    trainer = module.trainer
    X, Y = batch
    if X.dim() == 2:  # steps_per_call 1 (the engine's for stacked trials): a batch is a chunk of one
        X, Y = X[None], Y[None]
    k = X.shape[0]
    if trainer.max_steps >= 0:
        k = min(k, trainer.max_steps - trainer.global_step)
        if k < X.shape[0]:
            trainer.train_dataloader.untrained(X.shape[0] - k)
    per_step, per_epoch = _scheduler(module, "step"), _scheduler(module, "epoch")
    graph = module.graph_steps
    if isinstance(graph, graphs.GraphSteps) and k == graph.body.k:
        losses = graph.train(module, X, Y, per_step)
        if graph.recorded.failed:
            _train_eagerly(module, graph.recorded.failed)
    else:
        losses = _eager_steps(module, X[:k], Y[:k], per_step)
        if graph is None and module.steps.cuda_graph and k == module.steps.steps_per_call:
            _set_up_graph(module, X, Y)
    if per_epoch is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
        per_epoch.step()  # where Lightning steps it: after the epoch's last batch, before its validation
    return {"loss": losses, "tokens": Y[:k].numel()}


class StepHooks:
    """The hooks Lightning's manual_backward and LightningOptimizer.step run each step, in their order, found once
    per chunk: only the callbacks' and the module's that override them.

    Lightning's own layers around them (strategy, precision plugin, profiler, a call per callback and hook) are
    Python paid every step, which K > 1 exists to remove (docs/benchmarks.md); called directly, only the hooks
    that do something run. Only where those layers add nothing: one device, no GradScaler, no profiler
    (`direct_hooks`); elsewhere the steps go through Lightning.
    """

    NAMES = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")

    def __init__(self, trainer: Any, module: CharLM) -> None:
        self.trainer, self.module = trainer, module
        self.by_name = {
            name: (
                [getattr(cb, name) for cb in trainer.callbacks if is_overridden(name, cb, Callback)],
                getattr(module, name) if is_overridden(name, module, LightningModule) else None,
            )
            for name in self.NAMES
        }

    def __call__(self, name: str, *args: Any) -> None:
        """Run hook `name` as Lightning does: the callbacks', then the module's, the hook's name set meanwhile."""
        callbacks, own = self.by_name[name]
        if not callbacks and own is None:
            return
        module, previous = self.module, getattr(self.module, CURRENT_HOOK)
        setattr(module, CURRENT_HOOK, name)  # what self.log inside a hook checks
        for fn in callbacks:
            fn(self.trainer, module, *args)
        if own is not None:
            own(*args)
        setattr(module, CURRENT_HOOK, previous)


def unscaled_precision(plugin: Precision) -> bool:
    """Whether Lightning's precision plugin leaves backward and clipping to torch itself: fp32, fp64, the half
    and bf16 casts, autocast without a GradScaler; not a GradScaler's, nor a strategy's own (FSDP, DeepSpeed)."""
    plain = type(plugin) in (Precision, HalfPrecision, DoublePrecision)
    return plain or (type(plugin) is MixedPrecision and plugin.scaler is None)


def direct_hooks(module: CharLM) -> StepHooks | None:
    """StepHooks where the eager steps may run backward, the hooks and the optimizer themselves; None where
    Lightning's layers do work of their own: DDP's reducer, a GradScaler, a profiler, another strategy."""
    trainer = module.trainer
    if (
        trainer.world_size == 1
        and type(trainer.strategy) is SingleDeviceStrategy
        and isinstance(trainer.profiler, PassThroughProfiler)
        and unscaled_precision(trainer.precision_plugin)
    ):
        return StepHooks(trainer, module)
    return None


def clip_gradients(module: CharLM, optimizer: torch.optim.Optimizer) -> None:
    """The module's clipping where it clips itself (K > 1, the engine): Lightning's clip_gradients, or where that
    plugin's clipping is torch's own (unscaled_precision), torch's call on the optimizer's parameters directly.

    The same call on the same parameters in the same order, so the same gradients; Lightning's checks and layers
    around it are Python paid every optimizer step, a measurable share of a small model's step (docs/benchmarks.md).
    A fused optimizer (which unscales itself) goes through Lightning, which refuses it under mixed precision.
    """
    value, algorithm = module.clip
    plugin = module.trainer.precision_plugin
    if not unscaled_precision(plugin) or getattr(optimizer, "_step_supports_amp_scaling", False):
        module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]  # Precision.main_params' order
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


def _eager_steps(module: CharLM, X: torch.Tensor, Y: torch.Tensor, per_step: Any) -> torch.Tensor:
    """The chunk's steps one by one, as Lightning's manual_backward and optimizer step run them (or through them,
    where they do more: direct_hooks); returns their losses."""
    trainer, opt = module.trainer, module.optimizers()
    hooks = direct_hooks(module)
    stack = module.stack
    if stack is not None and hooks is None:  # check_trainer refuses what would get here
        raise RuntimeError("stacked trials need one device, no GradScaler and no profiler")
    losses = []
    for i in range(X.shape[0]):
        if i:
            advance_logging_step(trainer)  # the step Lightning logs at: one per optimizer step, as at K = 1
        opt.zero_grad()
        if stack is None:
            loss, _ = module._step((X[i], Y[i]), carry=module.carry_state)
        else:  # forward and backward with every trial of the stack at once: the gradients are in place after it
            loss = stack.step(module, X[i], Y[i], module.carry_state)
        module.train_nll.update(loss, Y[i].numel())
        module.step_metrics.keep(trainer, loss)
        if hooks is None:
            module.manual_backward(loss)
            opt.step()  # Lightning's: the hooks (clipping: CharLM.on_before_optimizer_step), precision, global_step
        else:
            hooks("on_before_backward", loss)
            if stack is None:
                module.backward(loss)
            hooks("on_after_backward")
            hooks("on_before_optimizer_step", opt.optimizer)  # StepMetrics' gradient norm, then the clipping
            opt.optimizer.step()
            advance_optimizer_step(trainer)
        if per_step is not None:
            per_step.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _set_up_graph(module: CharLM, X: torch.Tensor, Y: torch.Tensor) -> None:
    """After the first full chunk (which made the optimizer's state), the graph of the next ones; or, where the
    body cannot be recorded, eager steps for the rest of the run, said once."""
    reason = graphs.why_eager(module)
    if reason is None:
        graph = graphs.GraphSteps(module, X, Y)
        reason = graph.dry_run(X, Y, module.state)
    if reason is not None:
        _train_eagerly(module, reason)
    else:
        module.graph_steps = graph


def _train_eagerly(module: CharLM, reason: str) -> None:
    module.graph_steps = False
    if module.global_rank == 0:
        log.warning("cuda_graph: %s; training eagerly, %d steps per call", reason, module.steps.steps_per_call)
