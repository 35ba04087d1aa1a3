"""A tiny Hydra app for the launcher tests: each job records what its process sees, then sleeps, fails or dies.

python tests/helpers/launcher_app.py -m hydra/launcher=local hydra.searchpath=[file://<repo>/conf] x=0,1,2 crash=0
Test-only; its config is made here (no yaml): `x` names the job, `crash` picks the job that dies.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@dataclass
class AppConf:
    x: int = 0
    crash: int = -1  # the job whose x equals this dies (os._exit: no result, like a killed process)
    fail: int = -1  # the job whose x equals this raises
    wide: int = -1  # the job whose x equals this wants trainer.devices=2
    sleep: float = 1.0
    # read by the launcher (in the sweep's process) to lend each job its GPUs
    trainer: Any = field(default_factory=lambda: {"accelerator": "auto", "devices": "${app_devices:${x},${wide}}"})


OmegaConf.register_new_resolver("app_devices", lambda x, wide: 2 if x == wide else 1)


ConfigStore.instance().store(name="app", node=AppConf)


@hydra.main(version_base="1.3", config_path=None, config_name="app")
def main(cfg: AppConf) -> float:
    import torch

    out = HydraConfig.get().runtime.output_dir
    seen = {
        "x": cfg.x,
        "start": time.time(),
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if cfg.x not in (cfg.crash, cfg.fail):
        time.sleep(cfg.sleep)
    seen["end"] = time.time()
    with open(os.path.join(out, "seen.json"), "w") as f:
        json.dump(seen, f)
    if cfg.x == cfg.crash:
        os._exit(3)
    if cfg.x == cfg.fail:
        raise RuntimeError(f"job x={cfg.x} failed on purpose")
    return float(cfg.x)


if __name__ == "__main__":
    main()
