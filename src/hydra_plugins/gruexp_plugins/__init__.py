"""gruexp's Hydra plugins (Hydra loads plugins only from the `hydra_plugins` package, every module of it).

- optuna_sweeper.py: the Optuna sweeper behind `hparams_search=optuna`.
- LocalLauncher: submitit's local launcher with `array_parallelism` (submitit's LocalExecutor has none: every
  job would start at once and a 12-job sweep would oversubscribe a 2-core box).
`conf/hydra/launcher/local.yaml` builds on the schema registered here (the plugin's local schema has no
`array_parallelism`, and Hydra re-runs plugin modules on its scan, so the plugin's own names cannot be redefined).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocalLauncher

log = logging.getLogger("gruexp.launch")


class LocalLauncher(_SubmititLocalLauncher):
    """submitit's local launcher that runs at most `array_parallelism` jobs at a time (0: all at once)."""

    def __init__(self, array_parallelism: int = 0, **params: Any) -> None:
        super().__init__(**params)
        self.array_parallelism = array_parallelism

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        n = self.array_parallelism if self.array_parallelism > 0 else len(job_overrides)
        returns: list[JobReturn] = []
        for start in range(0, len(job_overrides), n):  # waves of n jobs: the next wave starts when this one ends
            returns += super().launch(job_overrides[start : start + n], initial_job_idx + start)
        return returns


@dataclass
class GruexpLocalConf(LocalQueueConf):
    """The schema of hydra/launcher=local: the plugin's local launcher fields plus `array_parallelism`."""

    _target_: str = "hydra_plugins.gruexp_plugins.LocalLauncher"
    array_parallelism: int = 2


ConfigStore.instance().store(group="hydra/launcher", name="gruexp_local", node=GruexpLocalConf, provider="gruexp")
