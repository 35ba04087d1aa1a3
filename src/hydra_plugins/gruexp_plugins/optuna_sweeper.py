"""ResumableOptunaSweeper: the Optuna sweeper, with `n_trials` counted over the whole study in its storage, so
re-running an interrupted search finishes it instead of starting over, and trial k always runs in folder k."""

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

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
