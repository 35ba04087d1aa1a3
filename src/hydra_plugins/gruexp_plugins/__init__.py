"""gruexp's two Hydra plugins (Hydra loads plugins only from the `hydra_plugins` package).

- ResumableOptunaSweeper: the Optuna sweeper, with `n_trials` counted over the whole study in its storage, so
  re-running an interrupted search finishes it instead of starting over, and trial k always runs in folder k.
- LocalLauncher: submitit's local launcher with `array_parallelism` (submitit's LocalExecutor has none: every
  job would start at once and a 12-job sweep would oversubscribe a 2-core box).
`conf/hydra/launcher/local.yaml` builds on the schema registered here (the plugin's local schema has no
`array_parallelism`, and Hydra re-runs plugin modules on its scan, so the plugin's own names cannot be redefined).
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocalLauncher

log = logging.getLogger("gruexp.launch")


class ResumableOptunaSweeper(OptunaSweeper):
    """OptunaSweeper whose study resumes from its storage: runs only the trials still missing of `n_trials`."""

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        Path(str(impl.sweep_dir)).mkdir(parents=True, exist_ok=True)  # an SQLite file needs its folder first
        if impl.storage is not None:
            import optuna

            try:
                study = optuna.load_study(study_name=impl.study_name, storage=impl.storage)
            except KeyError:  # a new study
                study = None
            if study is not None:
                finished = [t for t in study.trials if t.state.is_finished()]
                impl.job_idx = len(study.trials)  # trial k -> job folder k; an interrupted trial keeps its folder
                impl.n_trials = max(0, impl.n_trials - len(finished))
                if study.trials and hasattr(impl.sampler, "reseed_rng"):
                    impl.sampler.reseed_rng()  # a seeded sampler would otherwise repeat the first trials' params
                log.info(
                    "resuming study %s: %d trials finished, %d to go", impl.study_name, len(finished), impl.n_trials
                )
        if impl.n_trials == 0:
            return
        super().sweep(arguments)


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
