"""The study's searcher: Ray's OptunaSearch with the study's sampler, told each trial's best
value, keeping its Optuna study in a database (``optuna.storage``) where one is given.

Tune hands a searcher the trial's *last* result when it ends, and a trial that ASHA stopped
ends on an early epoch; s2study ranks, evaluates and reports trials by their *best* epoch. So
that the sampler models the objective the study optimises, :class:`StudySearch` replaces the
last value by the best one (:func:`s2study.study.tracking.improves`, the rule the trial's
best checkpoint and the study's ranking use). Intermediate values still reach Optuna per epoch.
"""

from __future__ import annotations

import warnings
from typing import Any

from s2study.errors import ConfigError, EnvironmentProblem
from s2study.study import tracking
from s2study.study.config import StudyConfig
from s2study.study.space import DefineByRun, grid_values

#: the Optuna study's user attribute naming the Ray experiment folder it belongs to
ATTR_STORAGE = "s2study.storage"


def _optuna_search_class() -> type:
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class StudySearch(_optuna_search_class()):
    """OptunaSearch whose trials end with their best value of the metric (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._best_values: dict[str, float] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        super().on_trial_result(trial_id, result)
        best = self.__dict__.setdefault("_best_values", {})
        value = result.get(self.metric)
        if tracking.improves(value, best.get(trial_id), self.mode):
            best[trial_id] = float(value)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        best = self.__dict__.setdefault("_best_values", {}).pop(trial_id, None)
        if best is not None and result and self.metric in result:
            result = {**result, self.metric: best}
        super().on_trial_complete(trial_id, result, error)

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
        return optuna.samplers.BruteForceSampler(seed=s.seed)


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` (tables created where missing).

    Raises:
        EnvironmentProblem: the database cannot be reached or opened (one line, naming it).
    """
    import optuna

    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors for every kind of database
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EnvironmentProblem(f"optuna.storage: cannot open {safe_url(url)} ({detail}); start the database or "
                                 "set optuna.storage to another URL (or memory)") from None


def safe_url(url: str) -> str:
    """``url`` without a password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    return url


def prepare_study(cfg: StudyConfig, experiment_path: str, echo: Any = print) -> Any:
    """The storage holding a new study's Optuna study, created there (warm-started from an
    earlier study where ``warm_start`` names one).

    ``optuna.storage: memory`` gives an in-memory storage (kept in Tune's searcher state). In a
    database, an Optuna study of the same name left by an earlier attempt at the same Ray
    experiment folder (which holds no restorable state, or the study would be resumed) is
    replaced; one that belongs to another experiment folder is refused.

    Raises:
        ConfigError: the storage holds another study of that name; the warm-start study does
            not exist.
        EnvironmentProblem: the storage cannot be opened.
    """
    import optuna

    if cfg.optuna.storage == "memory":
        storage = optuna.storages.InMemoryStorage()
    else:
        storage = open_storage(cfg.optuna.storage)
        try:
            existing = optuna.load_study(study_name=cfg.name, storage=storage)
        except KeyError:
            existing = None
        if existing is not None:
            owner = existing.user_attrs.get(ATTR_STORAGE)
            if owner != experiment_path:
                raise ConfigError(
                    f"{cfg.source}: optuna.storage: {safe_url(cfg.optuna.storage)} already holds an Optuna study "
                    f"{cfg.name!r} ({len(existing.trials)} trials, of {owner or 'another program'}); pick another "
                    "study name or optuna.storage, or delete it: optuna delete-study --study-name "
                    f"{cfg.name} --storage URL")
            optuna.delete_study(study_name=cfg.name, storage=storage)
    study = optuna.create_study(storage=storage, study_name=cfg.name,
                                direction="maximize" if cfg.mode == "max" else "minimize")
    study.set_user_attr(ATTR_STORAGE, experiment_path)
    study.set_user_attr("s2study.metric", cfg.metric)
    if cfg.warm_start.study:
        echo(warm_start(study, cfg))
    return storage


def warm_trials(cfg: StudyConfig, record: Any) -> tuple[list[Any], dict[str, int]]:
    """The earlier study's finished trials as Optuna trials of this space (each with its best
    value), and how many were skipped for each reason."""
    import json

    import optuna

    from s2study.study.space import assignments

    specs = {s.key: s for s in cfg.space if s.sampled}
    best_key = f"best_{cfg.metric}"
    added, skipped = [], {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    earlier_metric = record.parent.tags.get("s2study.metric", cfg.metric)
    for run in record.trials:
        if run.s2status not in ("finished", "stopped_early") or best_key not in run.metrics:
            skip("not finished" if earlier_metric == cfg.metric else f"it optimised {earlier_metric}")
            continue
        params = json.loads(run.tags.get("s2study.sampled", "{}"))
        unknown = sorted(set(params) - set(specs))
        if unknown:
            skip(f"{unknown[0]} is not sampled here")
            continue
        bad = next((k for k, v in params.items() if _refused(specs[k], v)), None)
        if bad is not None:
            skip(f"{bad} outside this space")
            continue
        active = {k for k in assignments(cfg.space, cfg.base_flat, params) if k in specs}
        if active - set(params):
            skip(f"no value for {min(active - set(params))}")
            continue
        added.append(optuna.trial.create_trial(
            params={k: params[k] for k in active}, distributions={k: specs[k].distribution() for k in active},
            value=run.metrics[best_key], user_attrs={"s2study.warm_start_run": run.run_id}))
    return added, skipped


def _refused(spec: Any, value: Any) -> bool:
    try:
        spec.check_value(value)
    except ValueError:
        return True
    return False


def warm_start(study: Any, cfg: StudyConfig) -> str:
    """Add the earlier study's fitting trials to ``study``; returns the line that says what it took."""
    from s2study.study.tracking import fetch_study

    try:
        record = fetch_study(cfg.warm_start.tracking, cfg.warm_start.study)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: warm_start.study: {exc}") from None
    trials, skipped = warm_trials(cfg, record)
    study.add_trials(trials)
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    return (f"warm start: {len(trials)} trial(s) of study {cfg.warm_start.study} seed the sampler"
            + (f" (skipped {sum(skipped.values())}: {why})" if skipped else ""))


def build_searcher(cfg: StudyConfig, storage: Any | None) -> StudySearch:
    """The searcher of a new study: the space, the sampler, the enqueued configurations first,
    its Optuna study in ``storage`` (from :func:`prepare_study`; None: a new in-memory one)."""
    return StudySearch(DefineByRun(cfg.space, cfg.base_flat), metric=cfg.metric, mode=cfg.mode,
                       sampler=build_sampler(cfg), study_name=cfg.name, storage=storage,
                       points_to_evaluate=[dict(p) for p in cfg.enqueue] or None)


def param_importances(storage_url: str, study_name: str) -> dict[str, float]:
    """Optuna's parameter importances (its default evaluator) over the study's completed
    trials; empty where fewer than two trials completed or nothing varied."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. no parameter common to the completed trials
        return {}
