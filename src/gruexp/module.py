"""CharLM: the LightningModule shared by all three variants (loss, carried state, perplexity, resume, predict).

No host sync in the training step: perplexity and bits per character come from the loss the step computes anyway
(a device sum of NLL and a token count, TokenNLL, synced once at an epoch's end), tokens are counted on the host
from batch shapes (gruexp.throughput), and the divergence check (gruexp.guards.StepChecks) reads the device only
every few steps. Throughput and the step logging are callbacks the module brings (configure_callbacks).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from torchmetrics import Metric

from gruexp.callbacks import StepMetrics
from gruexp.compat import CURRENT_HOOK, attached_trainer
from gruexp.data import Vocab
from gruexp.models import build_model, forward_flops_per_token, net_options, token_loss
from gruexp.steps import StepPlan, clip_gradients, run_chunk, stepping_batches
from gruexp.throughput import Throughput

log = logging.getLogger(__name__)

LN2 = math.log(2)


class TokenNLL(Metric):
    """Sum of per-token NLL (nats, fp32) and token count (int64) on the device; update() does no host sync.

    perplexity = exp(mean NLL), bits per character = mean NLL / ln 2. torchmetrics' Perplexity takes logits and
    indexes them with a boolean mask (a sync per step) and sums in the logits' dtype (bf16 under bf16-true); this
    takes the step's mean loss and its token count. The state names are Perplexity's, so mid-epoch checkpoints
    written with it still resume.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total_log_probs", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, count: int | torch.Tensor, summed: bool = False) -> None:
        """Add a mean loss over `count` tokens, or with `summed` their summed loss (a device op each: no sync, no
        check of the values; `count` may be a device tensor)."""
        if summed:
            self.total_log_probs.add_(loss.detach().float())
        else:
            self.total_log_probs.add_(loss.detach(), alpha=count)  # in place: the sum stays fp32 whatever loss is
        self.count.add_(count)

    def compute(self) -> torch.Tensor:
        """The mean NLL per token in nats (fp32), over all ranks' tokens."""
        return self.total_log_probs / self.count

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) (Lightning's bf16-true) would make the sums bf16: they stay fp32 and int64
        this = super()._apply(fn, *args, **kwargs)
        for key, dtype in (("total_log_probs", torch.float32), ("count", torch.int64)):
            setattr(this, key, getattr(this, key).to(dtype))
            this._defaults[key] = this._defaults[key].to(dtype)
        return this


def pin_memory(loaders: object, device: torch.device) -> None:
    """Page-locked batches on CUDA, so that Lightning's non_blocking host-to-device copy overlaps compute.

    The loaders are the data module's; a DataLoader reads `pin_memory` when an epoch's iterator is made, after
    Lightning's on_*_start hooks, so setting it there is enough and the data module stays device-agnostic.
    """
    if torch.device(device).type != "cuda":
        return
    for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
        if isinstance(loader, DataLoader):
            loader.pin_memory = True


def wandb_run_id(loggers: Sequence[Any]) -> str | None:
    """The id of the W&B run this training logs to, if any (rank 0's; other ranks hold no run)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            run_id = getattr(lg.experiment, "id", None)  # a rank > 0's DummyExperiment has none
            return run_id if isinstance(run_id, str) else None
    return None


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU's, and on a GPU the device's own (cuda_rng), for exact resume."""
    states = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, device: torch.device) -> None:
    """Put back what rng_states saved; a checkpoint from a CPU run resumed on a GPU restores the CPU's only."""
    torch.set_rng_state(states["rng"])
    if device.type == "cuda" and states.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


RESUME_KEY = "gruexp_resume"  # the checkpoint's own key (written by the module's hook, so every save has it)


def resume_point(module: CharLM) -> dict[str, Any]:
    """What a mid-epoch resume needs to continue exactly: carried state, the epoch's train metric, RNG, W&B run."""
    trainer = module.trainer
    state = module._train_state if trainer.validating else module.state
    # every rank carries its own rows; Lightning builds the checkpoint on all ranks, so gather them
    gather = module.all_gather if trainer.world_size > 1 else (lambda t: t)
    return {
        "epoch": module.current_epoch,
        # the index of the next training batch (the loader's own state says where the data continues)
        "batch": trainer.fit_loop.epoch_loop.batch_progress.current.ready,
        "world_size": trainer.world_size,
        "steps_per_call": module.steps.steps_per_call,  # the loops count calls: a resume must keep K
        "manual": module.steps.manual,  # and Lightning's manual and automatic optimization count steps apart
        "state": None if state is None else gather(state),
        "train_ppl": {k: gather(v) for k, v in module.train_nll.metric_state.items()},
        **rng_states(module.device),  # dropout's; the partitions draw from their own seeded generators
        "wandb_id": wandb_run_id(trainer.loggers),  # a resumed run continues this W&B run
    }


def resume(module: CharLM, saved: dict[str, Any], batch_idx: int) -> None:
    """On the first batch after a resume: if it is the checkpoint's next batch, restore what resume_point saved."""
    if (saved["epoch"], saved["batch"]) != (module.current_epoch, batch_idx):
        return  # the checkpoint ended its epoch: the new epoch starts fresh
    state, world = saved["state"], saved.get("world_size", 1)
    if world != module.trainer.world_size:
        log.warning("resumed on %d devices, saved on %d: state restarts", module.trainer.world_size, world)
        return
    mine = (lambda t: t[module.global_rank]) if world > 1 else (lambda t: t)  # this rank's share of a gathered one
    module.state = None if state is None else mine(state).to(module.device)
    for k, v in saved["train_ppl"].items():
        setattr(module.train_nll, k, mine(v).to(module.device, getattr(module.train_nll, k).dtype))
    restore_rng_states(saved, module.device)


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 == 1.0, (0.9, 0.999) == [0.9, 0.999]."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return float(a) == float(b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else a == b


def apply_config(optimizer: torch.optim.Optimizer, scheduler: Any, module: CharLM) -> list[str]:
    """Put this run's optimizer and scheduler values over those a resumed checkpoint restored; say what changed.

    Lightning restores the param groups and the scheduler's state as they were saved, so a changed `optimizer.lr`
    would be recorded and never used. With a scheduler the saved lr is the scheduled one: it is rescaled to the new
    base (LambdaLR and the cosine schedules are proportional to it). Returns `optimizer.lr 1.0 -> 1e-06`, ...
    """
    changes = []
    wanted = dict(getattr(module.optimizer, "keywords", {}) or {})
    for key, want in wanted.items():
        want = tuple(want) if isinstance(want, Sequence) and not isinstance(want, str) else want  # Adam's betas
        for i, group in enumerate(optimizer.param_groups):
            if key not in group:
                continue
            base = group.get("initial_lr", group["lr"]) if key == "lr" else group[key]
            if _same(base, want):
                continue
            if key == "lr":
                group["lr"] = group["lr"] * want / base if base else want
                if "initial_lr" in group:
                    group["initial_lr"] = want
                if scheduler is not None and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[i] = want
                    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() says
            else:
                group[key] = type(group[key])(want) if isinstance(group[key], tuple) else want
            if i == 0:
                changes.append(f"optimizer.{key} {base} -> {want}")
    for key, want in (getattr(module.scheduler, "keywords", {}) or {}).items():
        if scheduler is not None and key in vars(scheduler) and not _same(getattr(scheduler, key), want):
            changes.append(f"scheduler.{key} {getattr(scheduler, key)} -> {want}")
            setattr(scheduler, key, want)
    return changes


class CharLM(L.LightningModule):
    """A character language model around `build_model(name, ...)`, trained like d2l's train_ch8.

    In the sequential partition the hidden state is carried (detached) from batch to batch and reset at the start
    of every epoch and of validation; in the random partition it is reset for every batch.
    """

    def __init__(
        self,
        name: str,
        hidden_size: int,
        vocab: Sequence[str],
        num_layers: int = 1,
        dropout: float = 0.0,
        reset_after: bool = True,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        carry_state: bool = True,
        sample_prefix: str = "time traveller",
        sample_chars: int = 50,
        steps_per_call: int = 1,
        cuda_graph: bool = False,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        engine: bool = False,
        stack: Any = None,
    ):
        """`steps_per_call`, `cuda_graph`, `engine`: how the training step runs its optimizer steps (gruexp.steps).
        With more than one, graphs or the engine, the module clips (`gradient_clip_val`; the Trainer's must then be
        None). `stack`: the gruexp.stack.Stack this run is a trial of, which does its forward and backward."""
        super().__init__()
        # plain strings, not Hydra's ListConfig: checkpoints then load with torch.load(weights_only=True)
        vocab = [str(t) for t in vocab]
        # train() logs the whole config; how the steps run is not the model's
        ignore = [
            "optimizer",
            "scheduler",
            "steps_per_call",
            "cuda_graph",
            "gradient_clip_val",
            "gradient_clip_algorithm",
            "engine",
            "stack",
        ]
        self.save_hyperparameters(ignore=ignore, logger=False)
        self.vocab = Vocab(idx_to_token=vocab)
        self.net = build_model(vocab_size=len(self.vocab), **net_options(self.hparams))
        self.optimizer, self.scheduler = optimizer, scheduler
        self.steps = steps = StepPlan(steps_per_call, cuda_graph, engine)
        self.stack = stack
        self.automatic_optimization = not steps.manual
        self.clip = (gradient_clip_val, gradient_clip_algorithm)
        self.graph_steps: Any = None  # gruexp.graphs.GraphSteps once recorded; False: eager for the run
        self.carry_state = carry_state
        self.state: torch.Tensor | None = None
        self._resume: dict | None = None  # a mid-epoch checkpoint's resume_point, applied at its next batch
        self._train_state: torch.Tensor | None = None
        self.train_nll, self.val_nll, self.test_nll = TokenNLL(), TokenNLL(), TokenNLL()
        self.throughput = Throughput(self.flops_per_token)
        self.step_metrics = StepMetrics()
        self.sample = ""

    def __setattr__(self, name: str, value) -> None:
        # Lightning names the running hook in CURRENT_HOOK around every hook call, about 50 times a training step;
        # nn.Module.__setattr__ checks each time whether a str is a Parameter, Module or buffer.
        if name == CURRENT_HOOK:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        return self.net(tokens, state)

    @property
    def flops_per_token(self) -> int:
        """Model FLOPs per training token (gruexp.models.forward_flops_per_token, three times: forward, backward)."""
        return 3 * forward_flops_per_token(len(self.vocab), self.hparams.hidden_size, self.hparams.num_layers)

    @property
    def tokens_per_sec(self) -> float:
        """Whole-run training throughput: all ranks' tokens over the summed training time of all epochs."""
        return self.throughput.tokens_per_sec

    def configure_callbacks(self) -> list[Callback]:
        """Throughput (tokens/sec, train/mfu) and StepMetrics (train/loss, grad norm), once in each trainer: a second
        run of the same trainer (its test after fit) keeps them, with no Lightning line about overriding them."""
        return [cb for cb in (self.throughput, self.step_metrics) if cb not in self.trainer.callbacks]

    def carried_state(self, X: torch.Tensor, carry: bool) -> torch.Tensor | None:
        """The state the next training batch X starts from: the carried one, or None (zeros) when not carrying or
        when the batch has another number of rows."""
        return self.state if carry and self.state is not None and self.state.shape[1] == X.shape[0] else None

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], carry: bool):
        X, Y = batch
        logits, state = self(X, self.carried_state(X, carry))
        self.state = state.detach() if carry else None
        return token_loss(logits, Y), logits

    def on_train_start(self) -> None:
        # here, not in on_fit_start: Lightning restores a checkpoint's optimizer and scheduler between the two
        if self.trainer.ckpt_path is not None:
            for change in apply_config(self.optimizers(use_pl_optimizer=False), self.lr_schedulers(), self):
                if self.global_rank == 0:
                    log.info("resumed with %s from the command line", change)
        pin_memory(self.trainer.train_dataloader, self.device)
        pin_memory(self.trainer.val_dataloaders, self.device)

    def on_train_epoch_start(self) -> None:
        self.state = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self._resume is not None:
            saved, self._resume = self._resume, None
            resume(self, saved, batch_idx)
        if not self.automatic_optimization:
            return run_chunk(self, batch)
        loss, _ = self._step(batch, carry=self.carry_state)
        self.train_nll.update(loss, batch[1].numel())
        self.step_metrics.keep(self.trainer, loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # where Lightning's automatic optimization clips: after the callbacks' hook (the gradient norm logged is
        # the one before clipping), after a GradScaler's unscale
        if not self.automatic_optimization and self.clip[0]:
            clip_gradients(self, optimizer)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # here, not in on_train_epoch_end: callbacks' on_train_epoch_end (ppl.png, the epoch line) run before
            # the module's and must see this epoch's figures; validation has not run yet
            self._log_nll("train", self.train_nll)

    def on_train_epoch_end(self) -> None:
        # an epoch that did not end at its last batch (max_steps): its figures, later than callbacks see them
        self._log_nll("train", self.train_nll)

    def _log_nll(self, stage: str, metric: TokenNLL) -> None:
        """`{stage}/ppl` and `{stage}/bpc` from a TokenNLL (synced over ranks), then reset it; nothing if it is empty
        (an epoch's end that logged at its last batch, or a resume re-entering an epoch's end)."""
        if metric.update_count == 0:
            return
        nll = metric.compute()
        metric.reset()
        # the values are the same on every rank already: max over ranks keeps them exact and silences the hint
        same = {"on_step": False, "on_epoch": True, "sync_dist": True, "reduce_fx": "max"}
        self.log(f"{stage}/ppl", nll.exp(), prog_bar=True, **same)
        self.log(f"{stage}/bpc", nll / LN2, **same)

    def on_validation_epoch_start(self) -> None:
        self._train_state, self.state = self.state, None

    def _score(self, batch, metric: TokenNLL) -> None:
        """Add a held-out batch to `metric`: its summed NLL and its count of real (not padded) targets."""
        X, Y = batch
        state = self.state if self.state is not None and self.state.shape[1] == X.shape[0] else None
        logits, state = self(X, state)
        self.state = state.detach()
        nll = token_loss(logits, Y, reduction="sum")
        metric.update(nll, (Y >= 0).sum(), summed=True)  # PAD targets (-100) are ignored by both

    def validation_step(self, batch, batch_idx: int) -> None:
        self._score(batch, self.val_nll)

    def on_validation_epoch_end(self) -> None:
        self._log_nll("val", self.val_nll)
        self.state = self._train_state
        if not self.trainer.sanity_checking:
            self.sample = self.predict(self.hparams.sample_prefix, self.hparams.sample_chars)
            if self.trainer.is_global_zero:
                log.info("epoch %d sample: %s", self.current_epoch + 1, self.sample)  # 1-based, as the log lines

    def on_test_start(self) -> None:
        pin_memory(self.trainer.test_dataloaders, self.device)

    def on_test_epoch_start(self) -> None:
        self._train_state, self.state = self.state, None

    def test_step(self, batch, batch_idx: int) -> None:
        """The test split, read like validation (state carried across its batches): test/ppl and test/bpc."""
        self._score(batch, self.test_nll)

    def on_test_epoch_end(self) -> None:
        self._log_nll("test", self.test_nll)
        self.state = self._train_state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # a module hook, not a callback's: Lightning calls callbacks' on_save_checkpoint for full checkpoints only
        if attached_trainer(self) is not None:
            checkpoint[RESUME_KEY] = resume_point(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume = checkpoint.get(RESUME_KEY)

    @torch.no_grad()
    def predict(
        self, prefix: str, num_chars: int, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> str:
        """d2l's predict_ch8: warm the state up on `prefix`, then emit `num_chars` characters.

        Greedy (argmax) at temperature 0, else sampled from softmax(logits / temperature).
        """
        was_training = self.training
        self.eval()
        ids = self.vocab.encode(prefix)
        x = torch.tensor([ids], device=self.device)
        logits, state = self(x)
        out = list(ids)
        for _ in range(num_chars):
            last = logits[0, -1]
            if temperature > 0:
                y = int(torch.multinomial(F.softmax(last / temperature, -1).cpu(), 1, generator=generator))
            else:
                y = int(last.argmax())
            out.append(y)
            logits, state = self(torch.tensor([[y]], device=self.device), state)
        self.train(was_training)
        return self.vocab.decode(out)

    def configure_optimizers(self):
        opt = (self.optimizer or torch.optim.SGD)(self.parameters(), **({} if self.optimizer else {"lr": 1.0}))
        if self.scheduler is None:
            return opt
        # a scheduler that takes total_steps (gruexp.schedules.warmup_cosine, OneCycleLR) spans the run step by step
        if "total_steps" not in inspect.signature(self.scheduler).parameters:
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "epoch"}}
        given = getattr(self.scheduler, "keywords", {}).get("total_steps")
        total = {} if given is not None else {"total_steps": int(stepping_batches(self.trainer))}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt, **total), "interval": "step"}}
