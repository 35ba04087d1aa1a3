"""Multi-device plumbing: DDP ranks that re-run the current Hydra job, one job's state kept from the next.

Lightning's `ddp` strategy starts ranks 1..N-1 by re-executing `sys.argv` (`_hydra_subprocess_cmd`). Under
`-m` that command is the whole sweep (every child re-runs every job, a second multirun folder appears); under
Optuna each child samples its own trial; under submitit `sys.argv` is submitit's `_submit.py`. gruexp keeps
Lightning's strategy and launcher and changes only the command: each child is a single RUN of the current job,
rebuilt from Hydra's own record of it (config name and dirs, the job's overrides, its output folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from gruexp import UserError
from gruexp.threads import THREAD_VARS, threads_per_process, usable_cores, user_threads

log = logging.getLogger("gruexp.launch")

# What Lightning's launcher and seed_everything put into os.environ for one job; restored when the job ends.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")
# Hydra overrides that describe the sweep, not the job: a child must not inherit them.
_SWEEP_KEYS = (
    "hydra.run",
    "hydra.sweep",
    "hydra.mode",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.callbacks",
    "hydra/callbacks",
    "hydra.output_subdir",
    "hydra.job.name",
)

_children: list[subprocess.Popen] = []  # ranks started for the current job, waited for when it ends


def _quote(value: str) -> str:
    """Quote a value for Hydra's override parser (argv elements reach it without a shell)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def job_command(local_rank: int) -> tuple[list[str], str]:
    """The command line that re-creates the current Hydra job alone (RUN mode, same folder) for `local_rank`."""
    hc = HydraConfig.get()
    cmd = [sys.executable, "-m", "gruexp.train", f"--config-name={hc.job.config_name}"]
    cmd += [f"--config-dir={s.path}" for s in hc.runtime.config_sources if s.provider == "command-line"]
    cmd += list(hc.overrides.task)
    cmd += [o for o in hc.overrides.hydra if not o.lstrip("~+").startswith(_SWEEP_KEYS)]
    cmd += [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(hc.runtime.output_dir)}",
        "hydra.output_subdir=null",  # rank 0 wrote the job's .hydra/; a child must not overwrite it
        f"hydra.job.name={hc.job.name}_rank{local_rank}",  # its log file: <job folder>/<name>_rank<k>.log
    ]
    return cmd, hc.runtime.cwd


def share_cores_among_ranks(ranks: int) -> None:
    """DDP on CPU: give this process and the ranks it starts `cores // ranks` torch threads each.

    Unless OMP_NUM_THREADS is set (by the user, or by hydra/launcher=local for its jobs): then every rank keeps it.
    The variables go into os.environ, which the ranks inherit before their Python starts; this process is already
    running, so it sets its own count with torch.set_num_threads (job_scope restores both when the job ends).
    """
    if ranks <= 1 or user_threads() is not None:
        return
    threads = threads_per_process(ranks)
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    torch.set_num_threads(threads)
    log.info("%d DDP ranks on CPU: %d torch threads each (%d cores // %d ranks)", ranks, threads, usable_cores(), ranks)


class JobScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's subprocess launcher, but each child re-runs the current Hydra job only (see the module doc)."""

    def __init__(self, *args: Any, on_cpu: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_cpu = on_cpu

    def _call_children_scripts(self) -> None:
        # Lightning's body, with `job_command` in place of `_hydra_subprocess_cmd` (a module function it calls).
        self._check_can_spawn_children()
        if self.on_cpu:
            share_cores_among_ranks(self.num_processes * self.num_nodes)
        self.procs = _children  # the list Lightning's child observer watches; job_scope empties it at job end
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            if HydraConfig.initialized():
                command, cwd = job_command(local_rank)
            else:
                command, cwd = list(_basic_subprocess_cmd()), None
            self.procs.append(subprocess.Popen(command, env=child_env, cwd=cwd))


class JobDDPStrategy(DDPStrategy):
    """Lightning's DDPStrategy; its `popen` start method (the `ddp` default) uses JobScriptLauncher, and the model is
    wrapped on the stream every forward and backward runs on."""

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        # Lightning 2.6 builds DDP inside a new side stream (for CUDA-graph capture, which gruexp does not do): DDP's
        # AccumulateGrad nodes then belong to another stream than the backward, and torch warns on CUDA of the extra
        # synchronisation this costs on every step (Lightning #21567, fixed after the 2.6 series this project pins).
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method == "popen":
            self._launcher = JobScriptLauncher(
                self.cluster_environment,
                self.num_processes,
                self.num_nodes,
                on_cpu=isinstance(self.accelerator, CPUAccelerator),
            )


def register_strategies() -> None:
    """Put JobDDPStrategy behind Lightning's `ddp` names, so `devices=2` (auto -> "ddp") and `strategy=ddp` use it."""
    for name in list(StrategyRegistry):
        entry = StrategyRegistry[name]
        if entry["strategy"] is DDPStrategy and entry["init_params"].get("start_method", "popen") == "popen":
            StrategyRegistry.register(
                name, JobDDPStrategy, description=entry["description"], override=True, **entry["init_params"]
            )


@contextmanager
def job_scope() -> Iterator[None]:
    """One Hydra job, start to end: our DDP launcher in place, and no DDP or W&B state left for the next job.

    Multirun runs jobs one after another in one process (basic launcher, Optuna). Lightning leaves LOCAL_RANK
    in os.environ (the next job would believe an outside launcher started its ranks and never start them),
    keeps the process group until exit, and W&B keeps its run open (the next job would log into it).
    """
    register_strategies()
    before = {k: os.environ.get(k) for k in (*_DDP_ENV, *THREAD_VARS)}
    threads = torch.get_num_threads()
    started_here = "LOCAL_RANK" not in os.environ  # not torchrun/SLURM: this job owns its process group
    _children.clear()
    try:
        yield
    finally:
        # The job is over: stop Lightning's observer from SIGKILLing this process (it does so as soon as a rank
        # exits non-zero, e.g. 143 after a preemption checkpoint) by emptying its list, then wait for the ranks.
        children = list(_children)
        _children.clear()
        for proc in children:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not exit after its job; killing it", proc.pid)
                proc.kill()
        if started_here and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)  # share_cores_among_ranks may have lowered it for this job's ranks


def config_digest(cfg: DictConfig, seed: int | None) -> str:
    """A short hash of the resolved job config (without the `hydra` node) and the seed actually used."""
    payload = OmegaConf.to_container(cfg, resolve=True)
    payload.pop("hydra", None)
    blob = json.dumps([payload, seed], sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


class SameConfigOnAllRanks(L.Callback):
    """Stops a DDP job whose ranks got different configs (e.g. one Optuna trial each), instead of mixing them."""

    def __init__(self, digest: str, summary: str = ""):
        self.digest, self.summary = digest, summary

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # the end-of-run test runs in the same processes, on the same config
        log.info("rank %d/%d config %s %s", trainer.global_rank, trainer.world_size, self.digest, self.summary)
        if trainer.world_size == 1:
            return
        log.info(
            "rank %d/%d: %d torch threads (OMP_NUM_THREADS=%s)",
            trainer.global_rank,
            trainer.world_size,
            torch.get_num_threads(),
            os.environ.get("OMP_NUM_THREADS", "unset"),
        )
        mine = torch.tensor([int(self.digest, 16)], dtype=torch.long, device=pl_module.device)
        everyone = trainer.strategy.all_gather(mine).flatten().tolist()
        if len(set(everyone)) > 1:
            raise UserError(
                f"the {trainer.world_size} ranks of this job got different configs "
                f"({', '.join(f'{d:012x}' for d in everyone)}): "
                "start DDP through gruexp.train (trainer.devices=N) so every rank re-runs this job's overrides"
            )
