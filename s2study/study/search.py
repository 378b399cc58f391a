"""The study's searcher: Ray's OptunaSearch with the study's sampler, told each trial's best
value, its Optuna study in the storage :mod:`s2study.study.optuna_store` prepared.

Tune hands a searcher the trial's *last* result when it ends, and a trial that ASHA stopped
ends on an early epoch; s2study ranks, evaluates and reports trials by their *best* epoch. So
that the sampler models the objective the study optimises, :class:`StudySearch` replaces the
last value by the best one (:func:`s2study.study.tracking.improves`, the rule the trial's
best checkpoint and the study's ranking use). Intermediate values still reach Optuna per epoch.
In a multi-objective study (``metric: [val_ncm, val_cmr]``) a trial's values are those of its
best epoch by the first metric, the epoch of its best checkpoint (Optuna takes no intermediate
values there).
"""

from __future__ import annotations

import warnings
from typing import Any

from s2study.study import tracking
from s2study.study.config import StudyConfig
from s2study.study.space import DefineByRun, grid_values


def _optuna_search_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class StudySearch(_optuna_search_class()):
    """OptunaSearch whose trials end with their best value of the metric (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._best_values: dict[str, dict[str, float]] = {}  # trial -> its best epoch's objective values
        self._last_steps: dict[str, int] = {}

    @property
    def _objectives(self) -> list[str]:
        return list(self.metric) if isinstance(self.metric, (list, tuple)) else [self.metric]

    def _kept(self, name: str) -> dict:
        return self.__dict__.setdefault(name, {})  # a searcher restored from an older state lacks it

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        step, last = result.get("training_iteration"), self._kept("_last_steps").get(trial_id)
        if step is not None and last is not None and step <= last:
            return  # reported already
        if self._finished_in_storage(trial_id):
            return
        super().on_trial_result(trial_id, result)
        self._last_steps[trial_id] = step
        best = self._kept("_best_values")
        first, mode = self._objectives[0], self.mode[0] if isinstance(self.mode, (list, tuple)) else self.mode
        held = best.get(trial_id)
        if isinstance(held, (int, float)):  # a searcher saved before values were kept per objective
            held = {first: float(held)}
        if tracking.improves(result.get(first), (held or {}).get(first), mode) and all(
                m in result for m in self._objectives):
            best[trial_id] = {m: float(result[m]) for m in self._objectives}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if (result and not error and self._objectives[0] in result and "training_iteration" in result
                and trial_id not in self._completed_trials):
            self.on_trial_result(trial_id, result)  # Tune hands a trial's last epoch to this call only
        best = self._kept("_best_values").pop(trial_id, None)
        self._kept("_last_steps").pop(trial_id, None)
        if self._finished_in_storage(trial_id):
            self._completed_trials.add(trial_id)
            return
        if isinstance(best, (int, float)):
            best = {self._objectives[0]: float(best)}
        if best is not None and result and self._objectives[0] in result:
            result = {**result, **best}
        super().on_trial_complete(trial_id, result, error)

    def _finished_in_storage(self, trial_id: str) -> bool:
        """Whether the Optuna storage already holds this trial as finished: a trial that ended
        after Tune's last snapshot, whose driver then died. Tune reruns it from its checkpoint;
        the value it ended with first stands (a finished Optuna trial cannot be updated)."""
        trial = self._ot_trials.get(trial_id)
        if trial is None or trial_id in self._completed_trials:
            return False
        return self._ot_study._storage.get_trial(trial._trial_id).state.is_finished()

    def restore(self, checkpoint_path: str) -> None:
        """Tune's saved state, as a resumed study reads it; in a database storage, the Optuna
        trials asked after that save (their Tune trials died with the driver, unrecorded)
        are marked FAIL instead of staying RUNNING forever."""
        super().restore(checkpoint_path)
        from optuna.trial import TrialState

        known = {t._trial_id for t in self._ot_trials.values()}  # Optuna's own trial ids
        storage = self._ot_study._storage
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id not in known:
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def _nsga2_class() -> type:
    from optuna.samplers import NSGAIISampler

    return NSGAIISampler


class PicklableNSGAII(_nsga2_class()):
    """Optuna's NSGA-II sampler, picklable: Tune saves the searcher (and its sampler) with the
    experiment state, and Optuna's holds a thread lock, made anew on loading."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import threading

        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def build_sampler(cfg: StudyConfig):
    """The Optuna sampler named by ``cfg.sampler`` (seeded)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = cfg.sampler
    n_startup = s.n_startup_trials if s.n_startup_trials is not None else max(1, cfg.trials // 4)
    conditional = any(spec.when for spec in cfg.space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.name == "tpe":
            return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=n_startup, multivariate=True,
                                              group=conditional)
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=s.seed)
        if s.name == "gp":
            return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=n_startup)
        if s.name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=s.seed, n_startup_trials=n_startup)
        if s.name == "grid":
            return optuna.samplers.GridSampler(grid_values(cfg.space, cfg.source), seed=s.seed)
        if s.name == "nsga2":
            return PicklableNSGAII(seed=s.seed)
        return optuna.samplers.BruteForceSampler(seed=s.seed)


def build_searcher(cfg: StudyConfig, storage: Any | None) -> StudySearch:
    """The searcher of a new study: the space, the sampler, the enqueued configurations first,
    its Optuna study in ``storage`` (from :func:`~s2study.study.optuna_store.prepare_study`;
    None: a new in-memory one)."""
    metric, mode = ([m for m, _ in cfg.objectives], [d for _, d in cfg.objectives]) if cfg.multi_objective else (
        cfg.metric, cfg.mode)
    return StudySearch(DefineByRun(cfg.space, cfg.base_flat), metric=metric, mode=mode,
                       sampler=build_sampler(cfg), study_name=cfg.name, storage=storage,
                       points_to_evaluate=[dict(p) for p in cfg.enqueue] or None)
