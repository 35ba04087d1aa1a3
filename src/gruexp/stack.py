"""Stacked trials: the runs of one sweep group train in one process, each still a lone run of its own.

Each trial is `train(cfg)` as a lone run does it (its Trainer, callbacks, loggers, folder, summary.json,
checkpoints), in a thread of its own; at every optimizer step the trials meet, and one forward and one backward
serve them all (gruexp.models.stacked), after which each goes on with its own hooks, clipping and optimizer.

Why threads that take turns: Lightning's fit loop can only be paused inside a training step by blocking its
thread. One thread runs at a time (it holds the baton); it hands the baton on when it reaches the next step's
meeting point or ends. So nothing in the trials races, and what a lone run owns process-wide is each trial's own,
swapped in with the baton: torch's generators (dropout's masks, a trial's RNG stream), Hydra's job config (its
`${hydra:...}` values) and the root logger's handlers (its <job>.log). The step's work runs in the thread that
completes the meeting, inside that trial's training step (its autocast and grad mode, which are per thread).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gruexp.models import token_loss
from gruexp.models.stacked import forward_all

if TYPE_CHECKING:
    from gruexp.module import CharLM

_local = threading.local()


def current() -> Stack | None:
    """The Stack this thread's trial trains in; None in a lone run."""
    return getattr(_local, "stack", None)


def _device() -> torch.device:
    """Where the trials' generators are: the CPU's, and the current CUDA device's once CUDA is in use."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_initialized() else torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    """The generators a trial draws from, as its checkpoint keeps them (gruexp.module.rng_states)."""
    from gruexp.module import rng_states  # here: gruexp.module's imports reach this module (guards)

    return rng_states(_device())


def _set_rng_state(state: dict[str, Any]) -> None:
    from gruexp.module import restore_rng_states

    restore_rng_states(state, _device())


@dataclass
class _Step:
    """One trial's request at a meeting: its module and batch in, its loss (or the step's error) out."""

    module: CharLM
    X: torch.Tensor
    Y: torch.Tensor
    carry: bool
    loss: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class _Trial:
    """What a trial owns process-wide while it does not hold the baton, and how it is woken."""

    wake: threading.Event = field(default_factory=threading.Event)
    saved: dict[str, Any] | None = None  # rng, hydra, handlers: taken when it handed the baton on
    step: _Step | None = None  # set while it waits at a meeting
    on_signal: Callable[[int, Any], None] | None = None


class Stack:
    """Trials that take turns in one process and meet at every optimizer step (see the module's doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trials: dict[int, _Trial] = {}
        self._order: list[int] = []  # the live trials, in the sweep's order
        self.signum = 0

    # --- running the trials ---------------------------------------------------------------------------------

    def run(self, tasks: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run every task (a trial's whole run) as a trial of this stack; return their results in order, an
        exception (SystemExit included) in place of the result of a task that raised one."""
        results: list[Any] = [None] * len(tasks)
        self._trials = {i: _Trial() for i in range(len(tasks))}
        self._order = list(range(len(tasks)))

        def body(i: int) -> None:
            _local.stack, _local.trial = self, i
            self._take(i)
            try:
                results[i] = tasks[i]()
            except BaseException as e:  # a trial's end, whatever it is (SystemExit included), is its result
                results[i] = e
            finally:
                self._leave(i)

        threads = [threading.Thread(target=body, args=(i,), name=f"trial-{i}", daemon=True) for i in self._order]
        with self._signals():
            for t in threads:
                t.start()
            if threads:
                self._trials[0].wake.set()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # a timeout, so that the main thread runs its signal handler promptly
        wandb = sys.modules.get("wandb")
        if wandb is not None:  # the trials' W&B runs share one service, which waits here for their files
            wandb.teardown()
        return results

    @property
    def size(self) -> int:
        """The trials it was given, ended ones included: what its memory must hold."""
        return len(self._trials)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM reach the process's main thread only: it tells every trial's InterruptCheckpoint.
        A second signal acts at once (the previous handlers are back)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            for s, h in previous.items():
                signal.signal(s, h)
            self.signum = signum
            for trial in list(self._trials.values()):
                if trial.on_signal is not None:
                    trial.on_signal(signum, frame)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def listen(self, on_signal: Callable[[int, Any], None]) -> None:
        """Have this thread's trial told of SIGINT/SIGTERM, as a signal handler is (at once if the stack got one
        already)."""
        self._trials[_local.trial].on_signal = on_signal
        if self.signum:
            on_signal(self.signum, None)

    # --- the baton ------------------------------------------------------------------------------------------

    def _take(self, i: int) -> None:
        """Wait for the baton, then put back what trial i owns process-wide."""
        trial = self._trials[i]
        trial.wake.wait()
        trial.wake.clear()
        saved = trial.saved
        if saved is not None:
            from hydra.core.hydra_config import HydraConfig

            _set_rng_state(saved["rng"])
            HydraConfig.instance().cfg = saved["hydra"]
            logging.root.handlers = saved["handlers"]

    def _give(self, i: int) -> None:
        """Keep what trial i owns process-wide, and hand the baton to the next trial that can run."""
        from hydra.core.hydra_config import HydraConfig

        self._trials[i].saved = {
            "rng": _rng_state(),
            "hydra": HydraConfig.instance().cfg,
            "handlers": list(logging.root.handlers),
        }
        with self._lock:
            nxt = self._next(i)
        if nxt is not None:
            self._trials[nxt].wake.set()

    def _next(self, i: int) -> int | None:
        """After trial i, the first live trial not waiting at a meeting; if all are waiting, the first of them
        (it runs the step); None when no trial is left."""
        if not self._order:
            return None
        later = [j for j in self._order if j > i] + [j for j in self._order if j <= i]
        running = [j for j in later if self._trials[j].step is None]
        return running[0] if running else later[0]

    def _leave(self, i: int) -> None:
        with self._lock:
            self._order.remove(i)
            self._trials[i].step = None
            self._trials[i].on_signal = None
            nxt = self._next(i)
        if nxt is not None:
            self._trials[nxt].wake.set()

    # --- the meeting ----------------------------------------------------------------------------------------

    def step(self, module: CharLM, X: torch.Tensor, Y: torch.Tensor, carry: bool) -> torch.Tensor:
        """This trial's forward and backward on batch (X, Y), done with every live trial's at once: returns its
        loss, with its gradients in its parameters and its carried state in `module.state`."""
        i = _local.trial
        request = _Step(module, X, Y, carry)
        with self._lock:
            self._trials[i].step = request
            complete = all(self._trials[j].step is not None for j in self._order)
        if not complete:
            self._give(i)
            self._take(i)  # woken with the step done, or, all having met, to do it
        if request.loss is None and request.error is None:
            self._meet(i)
        if request.error is not None:
            raise request.error
        assert request.loss is not None
        return request.loss

    def _meet(self, runner: int) -> None:
        """Every waiting trial's step, run in trial `runner`'s thread (inside its training step)."""
        with self._lock:
            waiting = [(j, self._trials[j].step) for j in self._order]
            for j, _ in waiting:
                self._trials[j].step = None
        steps = [s for _, s in waiting if s is not None]
        own = _rng_state()
        rngs = {j: (own if j == runner else self._trials[j].saved["rng"]) for j, _ in waiting}
        order = [j for j, _ in waiting]

        @contextmanager
        def rng(k: int) -> Iterator[None]:
            _set_rng_state(rngs[order[k]])
            try:
                yield
            finally:
                rngs[order[k]] = _rng_state()

        try:
            states = [m.module.carried_state(m.X, m.carry) for m in steps]
            outs = forward_all([s.module.net for s in steps], [s.X for s in steps], states, rng)
            losses = [token_loss(logits, s.Y) for (logits, _), s in zip(outs, steps, strict=True)]
            torch.autograd.backward(losses)
        except Exception as e:  # every trial at this meeting fails with the step's error
            for s in steps:
                s.error = e
        else:
            for s, loss, (_, state) in zip(steps, losses, outs, strict=True):
                s.module.state = state.detach() if s.carry else None
                s.loss = loss.detach()
        finally:
            for j, _ in waiting:
                if j != runner:
                    self._trials[j].saved["rng"] = rngs[j]
            _set_rng_state(rngs[runner])


# --- which jobs stack -----------------------------------------------------------------------------------------

# Keys whose values differ between trials of one stack: each trial's own optimizer, clipping, RNG and dropout.
STACKABLE = ("seed", "model.dropout", "trainer.gradient_clip_val")
# and every number (or list of numbers: Adam's betas) under these groups: the optimizer's and scheduler's options
STACKABLE_GROUPS = ("optimizer", "scheduler")


def _numeric(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_numeric(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def group_key(overrides: Sequence[str]) -> str:
    """What jobs must share to train as one stack: their overrides less the stackable ones (the rest of their
    config is the sweep's, the same for all). A shape, the data, the variant, the precision or the devices
    differing start another group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        stackable = key in STACKABLE or (key.split(".")[0] in STACKABLE_GROUPS and "." in key and _numeric(o.value()))
        if key.startswith("hydra."):  # the job's own Hydra settings (Optuna's trial in hydra.job.env_set): no shape
            continue
        if not stackable:
            kept.append(o.input_line)
    return "\n".join(sorted(kept))


def groups(keys: Sequence[str], most: int | None) -> list[list[int]]:
    """Jobs (their group keys, in sweep order) as stacks: those of one key together, in order, at most `most`
    (None: all) a stack."""
    by_key: dict[str, list[int]] = {}
    for k, key in enumerate(keys):
        by_key.setdefault(key, []).append(k)
    size = most or len(keys) or 1
    return [members[i : i + size] for members in by_key.values() for i in range(0, len(members), size)]
