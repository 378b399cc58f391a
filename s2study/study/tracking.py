"""MLflow tracking for studies: the only s2study module that imports mlflow.

Layout: one experiment per study (``tracking.experiment``), one parent run per study
(tag ``s2study.role = study``) and one nested child run per trial (tags
``mlflow.parentRunId``, ``s2study.trial_id``, run name = the Tune trial name) holding the
trial's TrainConfig as flattened params, the per-epoch metrics (``step`` = epoch), the best
checkpoint, and after the study the evaluation metrics, curves and plots.

Every call goes through :class:`mlflow.MlflowClient` with an explicit run id (never the
global "active run"), so it is safe in Tune's trial threads and with actor reuse. A run is
reopened, not duplicated, when a trial resumes: its id travels in the trial checkpoint, and a
trial without a checkpoint finds its run by the ``s2study.trial_id`` tag.

``s2study.status`` on a trial run is ``running``, ``finished``, ``stopped_early`` (ASHA),
``failed`` (with ``s2study.failure_reason``) or ``killed``; MLflow's own status is
FINISHED for the first two, FAILED and KILLED for the others.
"""

from __future__ import annotations

import functools
import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from s2study.errors import ConfigError, EnvironmentProblem

REMOTE_SCHEMES = ("http", "https", "databricks")
DB_SCHEMES = ("postgresql", "mysql", "mssql")
MLFLOW_STATUS = {"finished": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
TAG_ROLE, TAG_TRIAL, TAG_STATUS, TAG_REASON, TAG_STUDY = (
    "s2study.role", "s2study.trial_id", "s2study.status", "s2study.failure_reason", "s2study.study",
)
PARENT = "mlflow.parentRunId"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. :/]")
_MAX_PARAM_LEN = 6000


def metric_key(name: str) -> str:
    """An MLflow-legal metric name: ``eval/ncm@3px_k1024`` -> ``eval/ncm_3px_k1024``."""
    return _BAD_KEY_CHARS.sub("_", name)


# --------------------------------------------------------------------------- URIs


def normalize_tracking_uri(uri: str | None, cwd: Path) -> str:
    """An absolute tracking URI (trials run in other directories).

    ``None`` -> ``sqlite:///<cwd>/mlflow.db``; a relative sqlite path is made absolute;
    http(s), databricks and database URIs pass unchanged.

    Raises:
        ConfigError: the MLflow file store (``./mlruns``, ``file:``), in-memory sqlite, an
            unknown scheme, or a malformed URI (``http://[::1``, a NUL byte).
    """
    try:
        return _normalize_tracking_uri(uri, cwd)
    except (OSError, ValueError, RuntimeError) as exc:  # a malformed URL, a NUL byte in the path
        raise ConfigError(f"{uri!r} is not a usable tracking URI ({exc})") from None


def _normalize_tracking_uri(uri: str | None, cwd: Path) -> str:
    if uri is None:
        return f"sqlite:///{(cwd / 'mlflow.db').resolve()}"
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or uri[len("sqlite:///"):] in ("", ":memory:"):
            raise ConfigError(f"{uri!r} is not allowed; trials run in other processes, so use a file: "
                              "sqlite:///path/to/mlflow.db")
        return f"sqlite:///{(cwd / uri[len('sqlite:///'):]).resolve()}"
    if scheme in REMOTE_SCHEMES or scheme in DB_SCHEMES:
        return uri
    if scheme in ("", "file"):
        raise ConfigError(f"{uri!r} is not allowed; MLflow 3 refuses the file store (./mlruns); use "
                          "sqlite:///path/to/mlflow.db or an http:// tracking server")
    raise ConfigError(f"{uri!r}: unknown scheme {scheme!r}; allowed: sqlite:///FILE, http(s)://HOST:PORT, "
                      "databricks, postgresql://..., mysql://...")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_tracking_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any trial, when the tracking store cannot be used.

    http(s): ``GET <uri>/health`` must answer 200 within ``timeout`` seconds; sqlite: the
    database's folder must exist and be writable.

    Raises:
        EnvironmentProblem: naming the URI and what failed.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status == 200:
                    return
                reason = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = str(getattr(exc, "reason", exc))
        raise EnvironmentProblem(f"MLflow tracking server {uri} is not reachable (GET {url}: {reason}); "
                                 "start it (mlflow server ...) or pass --tracking-uri")
    db = sqlite_path(uri)
    if db is not None:
        import os

        folder = db.parent
        if not folder.is_dir():
            raise EnvironmentProblem(f"tracking URI {uri}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise EnvironmentProblem(f"tracking URI {uri}: folder {folder} is not writable")


@functools.lru_cache(maxsize=8)
def client(uri: str):
    """A cached :class:`mlflow.MlflowClient` for ``uri`` (one store per process)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------- driver side


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created when missing (on the driver, before any trial).

    With a sqlite store, artifacts go to ``<db folder>/mlartifacts/<name>`` (absolute), not
    to ``./mlruns`` of whatever directory a trial runs in; a server picks its own location.
    """
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise EnvironmentProblem(f"MLflow experiment {name!r} is deleted; restore it or pick another "
                                     "tracking.experiment")
        return exp.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    return c.create_experiment(name, artifact_location=location)


def start_study_run(uri: str, experiment_id: str, study: str, params: dict[str, Any],
                    tags: dict[str, str] | None = None) -> str:
    """Create the parent run of a study; returns its id."""
    c = client(uri)
    run = c.create_run(experiment_id, run_name=study,
                       tags={TAG_ROLE: "study", TAG_STUDY: study, TAG_STATUS: "running", **(tags or {})})
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed study or trial continues its own run)."""
    c = client(uri)
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, TAG_STATUS, "running")


def finish_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run: ``status`` is an ``s2study.status`` (finished, stopped_early, failed, killed)."""
    c = client(uri)
    c.set_tag(run_id, TAG_STATUS, status)
    if reason:
        c.set_tag(run_id, TAG_REASON, reason[:5000])
    c.set_terminated(run_id, status=MLFLOW_STATUS[status])


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params the run does not have yet (params are immutable in MLflow)."""
    from mlflow.entities import Param

    c = client(uri)
    have = c.get_run(run_id).data.params
    items = [Param(k, _param_value(v)) for k, v in params.items() if k not in have]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])


def _param_value(v: Any) -> str:
    return (str(v) if not isinstance(v, float) else repr(v))[:_MAX_PARAM_LEN]


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite numeric metrics at ``step`` in one request (names made MLflow-legal)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(items), 1000):
        client(uri).log_batch(run_id, metrics=items[i:i + 1000])


def log_curve(uri: str, run_id: str, key: str, steps: list[int], values: list[float]) -> None:
    """A curve as one metric with the x value as step (e.g. CMR over thresholds 1..10 px)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_key(key), float(v), now, int(s)) for s, v in zip(steps, values) if math.isfinite(v)]
    client(uri).log_batch(run_id, metrics=items)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    """Upload a file (or a folder's files) into the run's artifacts."""
    path = Path(path)
    if path.is_dir():
        client(uri).log_artifacts(run_id, str(path), artifact_dir)
    else:
        client(uri).log_artifact(run_id, str(path), artifact_dir)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v)[:5000])


def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The trial runs under a study run (all statuses)."""
    return list(_search(uri, [experiment_id], f"tags.{PARENT} = '{parent_run_id}'"))


def close_running_children(uri: str, experiment_id: str, parent_run_id: str,
                           status: str = "killed", reason: str | None = None) -> int:
    """End trial runs left RUNNING (a trial that never resumed); returns how many."""
    n = 0
    for run in child_runs(uri, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            finish_run(uri, run.info.run_id, status, reason)
            n += 1
    return n


def settle_trial_runs(uri: str, experiment_id: str, parent_run_id: str,
                      final: dict[str, tuple[str, str | None]], wait_s: float = 20.0) -> int:
    """After a study: end the trial runs still RUNNING with the status Tune reports.

    A trial ends its own run in its ``finally`` block, possibly just after ``Tuner.fit``
    returned, or never (a worker killed mid-write); trials known to have ended get ``wait_s``
    seconds to do it themselves, then the driver ends what is left.

    Args:
        final: Tune trial id -> (``s2study.status``, failure reason); runs of unknown trials
            end as ``killed``.

    Returns:
        How many runs the driver ended.
    """
    deadline = time.monotonic() + wait_s
    while True:
        running = [r for r in child_runs(uri, experiment_id, parent_run_id) if r.info.status == "RUNNING"]
        ending = [r for r in running if final.get(r.data.tags.get(TAG_TRIAL), ("killed",))[0] != "killed"]
        if not ending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for run in running:
        status, reason = final.get(run.data.tags.get(TAG_TRIAL), ("killed", "study ended"))
        finish_run(uri, run.info.run_id, status, reason)
    return len(running)


def drop_orphan_runs(uri: str, experiment_id: str, parent_run_id: str, trial_ids: set[str]) -> int:
    """Delete trial runs of trials Tune does not know (after ``--resume``); returns how many.

    A driver killed between a trial's start and Tune's next experiment snapshot (at most every
    10 s) leaves a run whose trial the restored study never had; Optuna suggests a new trial
    in its place. The run is ended as ``killed`` and soft-deleted (``mlflow gc`` purges it,
    ``mlflow runs restore`` brings it back), so each trial of the study has exactly one run.
    """
    n = 0
    for run in child_runs(uri, experiment_id, parent_run_id):
        if run.data.tags.get(TAG_TRIAL) in trial_ids:
            continue
        if run.info.status == "RUNNING":
            finish_run(uri, run.info.run_id, "killed", "lost: the driver died before Tune recorded this trial")
        client(uri).delete_run(run.info.run_id)
        n += 1
    return n


def _search(uri: str, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None):
    token = None
    while True:
        page = client(uri).search_runs(experiment_ids, filter_string, max_results=1000,
                                       order_by=order_by, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


# --------------------------------------------------------------------------- trial side


def improves(value: float | None, best: float | None, mode: str) -> bool:
    """Whether a finite ``value`` beats ``best`` (None: nothing yet) in ``mode`` (max or min)."""
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


class TrialRun:
    """The MLflow run of one Tune trial, opened (or reopened) inside the trainable.

    Args:
        uri: tracking URI (absolute).
        run_id: the run.
        metric / mode: the study metric; ``best_<metric>`` is logged alongside it.
        last_step: the last epoch already logged (a resumed trial skips epochs <= it).
        best: the best metric value logged so far.
    """

    def __init__(self, uri: str, run_id: str, metric: str, mode: str,
                 last_step: int = 0, best: float | None = None) -> None:
        self.uri, self.run_id, self.metric, self.mode = uri, run_id, metric, mode
        self.last_step, self.best = last_step, best

    @classmethod
    def open(cls, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str,
             params: dict[str, Any], metric: str, mode: str, run_id: str | None = None) -> TrialRun:
        """Reopen ``run_id`` (from the trial checkpoint) or the run tagged with ``trial_id``,
        else create a child run of ``parent_run_id``; then log ``params``."""
        c = client(uri)
        if run_id is None:
            found = list(_search(uri, [experiment_id],
                                 f"tags.{PARENT} = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'"))
            run_id = found[0].info.run_id if found else None
        if run_id is None:
            run = c.create_run(experiment_id, run_name=trial_name, tags={
                PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_STATUS: "running"})
            run_id = run.info.run_id
        else:
            reopen_run(uri, run_id)
        log_params(uri, run_id, params)
        history = c.get_metric_history(run_id, metric_key(metric))
        last = max((m.step for m in history), default=0)
        values = [m.value for m in history]
        best = (max(values) if mode == "max" else min(values)) if values else None
        return cls(uri, run_id, metric, mode, last, best)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> bool:
        """Log one epoch's metrics at ``step=epoch``; returns whether the metric improved.

        Epochs already logged (a trial resumed from an earlier checkpoint) are skipped, so
        each metric history has steps 1..n without duplicates.
        """
        value = metrics.get(self.metric)
        improved = improves(value, self.best, self.mode)
        if epoch <= self.last_step:
            return False
        if improved:
            self.best = float(value)
        out = dict(metrics)
        if self.best is not None:
            out[f"best_{self.metric}"] = self.best
        log_metrics(self.uri, self.run_id, out, step=epoch)
        self.last_step = epoch
        return improved

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        log_artifact(self.uri, self.run_id, path, artifact_dir)

    def finish(self, status: str, reason: str | None = None) -> None:
        finish_run(self.uri, self.run_id, status, reason)


# --------------------------------------------------------------------------- reading back


@dataclass
class RunRecord:
    """A run read back from MLflow, as plain values."""

    run_id: str
    name: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int = 0

    @property
    def s2status(self) -> str:
        return self.tags.get(TAG_STATUS, self.status.lower())


@dataclass
class StudyRecord:
    """A study's parent run and its trial runs."""

    experiment: str
    parent: RunRecord
    trials: list[RunRecord] = field(default_factory=list)


def _record(run: Any) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, dict(run.data.tags),
                     dict(run.data.params), dict(run.data.metrics), run.info.start_time or 0)


def fetch_study(uri: str, study_or_run: str) -> StudyRecord:
    """A study read back from MLflow: by parent run id, or the latest study run of that name.

    Raises:
        ConfigError: nothing matches (lists the studies that exist).
    """
    from mlflow.exceptions import MlflowException

    c = client(uri)
    parent = None
    if re.fullmatch(r"[0-9a-f]{32}", study_or_run):
        try:
            parent = c.get_run(study_or_run)
        except MlflowException:
            parent = None
    if parent is None:
        exps = [e.experiment_id for e in c.search_experiments()]
        runs = list(_search(uri, exps, f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{study_or_run}'",
                            order_by=["attributes.start_time DESC"])) if exps else []
        if not runs:
            known = sorted({r.data.tags.get(TAG_STUDY, "") for r in
                            _search(uri, exps, f"tags.`{TAG_ROLE}` = 'study'")} - {""}) if exps else []
            raise ConfigError(f"no study {study_or_run!r} in {uri}; studies there: {', '.join(known) or '(none)'}")
        parent = runs[0]
    exp = c.get_experiment(parent.info.experiment_id)
    trials = [_record(r) for r in child_runs(uri, exp.experiment_id, parent.info.run_id)]
    return StudyRecord(exp.name, _record(parent), trials)
