"""CharLM: the LightningModule shared by all three variants (loss, carried state, perplexity, throughput, predict)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric
from torchmetrics.text import Perplexity

from gruexp.data import Vocab
from gruexp.models import build_model

log = logging.getLogger(__name__)


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
    ):
        super().__init__()
        # plain strings, not Hydra's ListConfig: checkpoints then load with torch.load(weights_only=True)
        vocab = [str(t) for t in vocab]
        self.save_hyperparameters(ignore=["optimizer", "scheduler"], logger=False)  # train() logs the whole config
        self.vocab = Vocab(idx_to_token=vocab)
        self.net = build_model(
            name,
            vocab_size=len(self.vocab),
            hidden_size=hidden_size,
            num_layers=num_layers,
            dropout=dropout,
            **({} if name == "scratch" else {"reset_after": reset_after}),
        )
        self.optimizer, self.scheduler = optimizer, scheduler
        self.carry_state = carry_state
        self.state: torch.Tensor | None = None
        self._resume: dict | None = None  # a mid-epoch checkpoint's carried state, applied at its next batch
        self._train_state: torch.Tensor | None = None
        self.train_ppl, self.val_ppl, self.test_ppl = Perplexity(), Perplexity(), Perplexity()
        self.train_tokens = SumMetric()  # summed over ranks: tokens/sec counts every device's tokens
        self.sample = ""

    def forward(self, tokens: torch.Tensor, state: torch.Tensor | None = None):
        return self.net(tokens, state)

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token of a 1-layer GRU LM: forward 2*3H*(H+V) + 2*H*V, backward twice that."""
        H, V = self.hparams.hidden_size, len(self.vocab)
        return 3 * (2 * 3 * H * (H + V) + 2 * H * V)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], carry: bool):
        X, Y = batch
        state = self.state if carry and self.state is not None and self.state.shape[1] == X.shape[0] else None
        logits, state = self(X, state)
        self.state = state.detach() if carry else None
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), Y.reshape(-1))
        return loss, logits

    def on_train_start(self) -> None:
        # a mid-epoch resume skips on_train_epoch_start: time that partial epoch from here
        self._t0 = self._t1 = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        self.state = None
        self._t0 = self._t1 = time.perf_counter()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self._resume is not None:
            self._apply_resume(batch_idx)
        loss, logits = self._step(batch, carry=self.carry_state)
        # update(), not forward(): forward also computes a per-batch perplexity that nothing reads
        self.train_ppl.update(logits.detach(), batch[1])
        self.train_tokens.update(batch[1].numel())
        if self.trainer._logger_connector.should_update_logs:  # self.log costs ~1 ms; the loggers skip other steps
            self.log("train/loss", loss, prog_bar=False)
        self.log("train/ppl", self.train_ppl, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._t1 = time.perf_counter()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this before it clips: the global L2 norm that trainer.gradient_clip_val acts on. Computed
        # on the device (lightning's grad_norm() copies every norm to the host: a GPU sync per parameter per step),
        # and only on the steps the loggers write (the test Lightning's own ThroughputMonitor uses).
        if not self.trainer._logger_connector.should_update_logs:
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            self.log("train/grad_norm", norm)

    def on_train_epoch_end(self) -> None:
        # ThroughputMonitor logs per-step sliding windows from rank 0; we want one epoch figure for the summary
        # and dashboards: all ranks' tokens (a synced SumMetric) over the epoch's training wall time.
        if self.train_tokens.update_count == 0:
            return  # a resume from an epoch's end re-enters that epoch's end with no batch trained
        tokens = self.train_tokens.compute()
        self.train_tokens.reset()
        self.log("train/tokens_per_sec", tokens / max(self._t1 - self._t0, 1e-9), prog_bar=True)

    def on_validation_epoch_start(self) -> None:
        self._train_state, self.state = self.state, None

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, logits = self._step(batch, carry=True)
        self.val_ppl(logits, batch[1])
        self.log("val/ppl", self.val_ppl, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.state = self._train_state
        if not self.trainer.sanity_checking:
            self.sample = self.predict(self.hparams.sample_prefix, self.hparams.sample_chars)
            if self.trainer.is_global_zero:
                log.info("epoch %d sample: %s", self.current_epoch, self.sample)

    def on_test_epoch_start(self) -> None:
        self.state = None

    def test_step(self, batch, batch_idx: int) -> None:
        _, logits = self._step(batch, carry=True)
        self.test_ppl.update(logits, batch[1])

    def on_test_epoch_end(self) -> None:
        ppl = self.test_ppl.compute()  # synced over ranks: the whole split's exp(mean NLL)
        self.test_ppl.reset()
        self.log("test/ppl", ppl)
        self.log("test/bpc", torch.log2(ppl))  # mean NLL in nats / ln 2

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Save what a mid-epoch resume needs to continue exactly: carried state, epoch's train metric, RNG."""
        if self._trainer is None:
            return
        state = self._train_state if self.trainer.validating else self.state
        if state is not None and self.trainer.world_size > 1:
            # every rank carries its own rows; Lightning builds the checkpoint on all ranks, so gather them
            state = self.all_gather(state)
        checkpoint["gruexp_resume"] = {
            "epoch": self.current_epoch,
            # the index of the next training batch (the loader's own state says where the data continues)
            "batch": self.trainer.fit_loop.epoch_loop.batch_progress.current.ready,
            "world_size": self.trainer.world_size,
            "state": state,
            "train_ppl": {
                k: self.all_gather(v) if self.trainer.world_size > 1 else v
                for k, v in self.train_ppl.metric_state.items()
            },
            "rng": torch.get_rng_state(),  # dropout's; the partitions draw from their own seeded generators
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume = checkpoint.get("gruexp_resume")

    def _apply_resume(self, batch_idx: int) -> None:
        """On the first batch after a resume: if it is the checkpoint's next batch, restore the carried state."""
        r, self._resume = self._resume, None
        if (r["epoch"], r["batch"]) != (self.current_epoch, batch_idx):
            return  # the checkpoint ended its epoch: the new epoch starts fresh
        state, world = r["state"], r.get("world_size", 1)
        if world != self.trainer.world_size:
            log.warning("resumed on %d devices, saved on %d: state restarts", self.trainer.world_size, world)
            return
        mine = (lambda t: t[self.global_rank]) if world > 1 else (lambda t: t)  # this rank's share of a gathered one
        self.state = None if state is None else mine(state).to(self.device)
        for k, v in r["train_ppl"].items():
            setattr(self.train_ppl, k, mine(v).to(self.device))
        torch.set_rng_state(r["rng"])

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
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "epoch"}}
