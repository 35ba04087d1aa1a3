"""gruexp's Hydra plugins (Hydra loads plugins only from the `hydra_plugins` package, every module of it).

- optuna_sweeper.py: the Optuna sweeper behind `hparams_search=optuna` (ask/tell on Optuna >= 4, pruning).
- launcher.py: LocalLauncher, submitit's local launcher with jobs side by side bounded by `array_parallelism`,
  CPU threads per job and one GPU pool; `conf/hydra/launcher/local.yaml` builds on its schema.
"""

from hydra_plugins.gruexp_plugins.launcher import GruexpLocalConf, LocalLauncher  # noqa: F401 (registers the schema)
from hydra_plugins.gruexp_plugins.stacked import GruexpStackedConf, StackedLauncher  # noqa: F401
