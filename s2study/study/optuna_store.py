"""The study's Optuna storage: where its Optuna study lives (``optuna.storage``), how a new
study's Optuna study is prepared there (an earlier attempt's replaced, another's refused, a
warm start from an earlier study added), and what reports read back from it.

No Ray here: ``s2study report`` and the CLI's checks import it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from s2study.errors import ConfigError, EnvironmentProblem
from s2study.study.config import StudyConfig

#: the Optuna study's user attribute naming the Ray experiment folder it belongs to
ATTR_STORAGE = "s2study.storage"


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


def storage_url(cfg: StudyConfig, storage_filesystem: Any | None = None) -> str:
    """The study's Optuna storage: ``optuna.storage``, else an SQLite file beside a local Ray
    storage (``<storage>/<name>/optuna.db``), else ``memory`` (an ``s3://`` storage or a custom
    filesystem: a file there would not be on the driver's disk)."""
    if cfg.optuna.storage is not None:
        return cfg.optuna.storage
    if "://" in cfg.storage or storage_filesystem is not None:
        return "memory"
    return f"sqlite:///{Path(cfg.storage) / cfg.name / 'optuna.db'}"


def prepare_study(cfg: StudyConfig, experiment_path: str, url: str | None = None, echo: Any = print) -> Any:
    """The storage holding a new study's Optuna study, created there (warm-started from an
    earlier study where ``warm_start`` names one); ``url`` default :func:`storage_url`.

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

    url = url or storage_url(cfg)
    if url == "memory":
        storage = optuna.storages.InMemoryStorage()
    else:
        storage = open_storage(url)
        try:
            existing = optuna.load_study(study_name=cfg.name, storage=storage)
        except KeyError:
            existing = None
        if existing is not None:
            owner = existing.user_attrs.get(ATTR_STORAGE)
            if owner != experiment_path:
                raise ConfigError(
                    f"{cfg.source}: optuna.storage: {safe_url(url)} already holds an Optuna study "
                    f"{cfg.name!r} ({len(existing.trials)} trials, of {owner or 'another program'}); pick another "
                    "study name or optuna.storage, or delete it: optuna delete-study --study-name "
                    f"{cfg.name} --storage URL")
            optuna.delete_study(study_name=cfg.name, storage=storage)
    study = optuna.create_study(storage=storage, study_name=cfg.name,
                                directions=["maximize" if mode == "max" else "minimize" for _, mode in cfg.objectives])
    study.set_user_attr(ATTR_STORAGE, experiment_path)
    study.set_user_attr("s2study.metric", cfg.metric)
    if cfg.warm_start.study:
        echo(warm_start(study, cfg))
    return storage


def warm_trials(cfg: StudyConfig, record: Any) -> tuple[list[Any], dict[str, int]]:
    """The earlier study's finished search trials (not its repeats) as Optuna trials of this
    space (each with its best value), and how many were skipped for each reason."""
    import json

    import optuna

    from s2study.study.space import assignments
    from s2study.study.tracking import AT_BEST, TAG_REPEAT_OF

    specs = {s.key: s for s in cfg.space if s.sampled}
    best_key = f"best_{cfg.metric}"
    added, skipped = [], {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    earlier_metric = record.parent.tags.get("s2study.metric", cfg.metric)
    for run in [r for r in record.trials if TAG_REPEAT_OF not in r.tags]:
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
        others = [f"{AT_BEST}{m}" for m, _ in cfg.objectives[1:]]
        if any(k not in run.metrics for k in others):
            skip(f"no {next(k for k in others if k not in run.metrics)} (its values at its best epoch)")
            continue
        added.append(optuna.trial.create_trial(
            params={k: params[k] for k in active}, distributions={k: specs[k].distribution() for k in active},
            values=[run.metrics[best_key], *(run.metrics[k] for k in others)],
            user_attrs={"s2study.warm_start_run": run.run_id}))
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
            # several objectives: the importances for the first, the study's metric
            target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
            return dict(optuna.importance.get_param_importances(study, target=target))
    except (RuntimeError, ValueError):  # e.g. no parameter common to the completed trials
        return {}
