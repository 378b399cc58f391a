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

The parent run carries the study name (``s2study.study``) and the study's storage path
(``s2study.storage``, ``<storage>/<name>``): ``--resume`` finds it by those tags, so a study
resumed on a new head, whose tracking server has another address, continues its own run.

**Outages.** Every call retries what fails transiently (connection refused or reset,
timeouts, HTTP 429 and 5xx, a database that is unavailable) with backoff from 0.5 s up to
10 s between attempts, for up to :data:`OUTAGE_LIMIT_S` (10 min) of continuous failure, then
raises :class:`TrackingUnavailable`. MLflow's own per-request retries (7, about 4 min during
which the caller is blocked) are turned off in processes that talk to an http(s) server
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless it is set), so this is the one retry loop and a
returning server is seen within 10 s. A trial's writes (metrics, tags, artifacts, its end)
go through a per-run FIFO (:class:`WriteQueue`) drained by a background thread: training
does not wait for an unreachable server, the writes land in order once it is back, each
exactly once (a metric keeps the timestamp it was created with, so a retried batch is
recognised by the store; params and tags are idempotent; a run is created only after
looking for it), and :meth:`TrialRun.finish` waits for the queue to drain (except in a trial
Tune stopped, which must let go at once: its process drains the queue while Ray keeps it).
While the server answers, each write is waited for (up to :data:`WRITE_THROUGH_S`) before
training goes on, so a Tune checkpoint is not ahead of MLflow. Epochs that a Tune checkpoint
holds but MLflow never got (queued in a process that died: a head lost with its tracking
server, a stopped trial's actor killed during an outage) are logged from the checkpoint's
history (:meth:`TrialRun.backfill`): by the trial when it resumes, by the driver
(:func:`s2study.study.runner.complete_from_checkpoint`) for a trial that ended.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from s2study.errors import ConfigError, EnvironmentProblem

REMOTE_SCHEMES = ("http", "https", "databricks")
DB_SCHEMES = ("postgresql", "mysql", "mssql")
MLFLOW_STATUS = {"finished": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
TAG_ROLE, TAG_TRIAL, TAG_STATUS, TAG_REASON, TAG_STUDY = (
    "s2study.role", "s2study.trial_id", "s2study.status", "s2study.failure_reason", "s2study.study",
)
TAG_STORAGE, TAG_ATTEMPT, TAG_SUPERSEDED = "s2study.storage", "s2study.attempt", "s2study.superseded_by"
TAG_OPTUNA = "s2study.optuna_storage"  # the study's Optuna storage URL (password masked) or memory
TAG_REPEAT_OF = "s2study.repeat_of"  # a repeat's run: the trial id of the search trial it repeats
#: a multi-objective study's other metrics at each trial's best epoch: ``at_best/val_cmr``
AT_BEST = "at_best/"
PARENT = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment by its kind: this one on the runs table (an untagged
# experiment opens on the GenAI traces overview)
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
#: the key of a trial's run id in its Tune results (the run a resumed trial continues)
RESULT_RUN_ID = "mlflow_run_id"
#: how long a tracking store may fail continuously before a write gives up (seconds)
OUTAGE_LIMIT_S = 600.0
#: how long a trial waits for each write while the store answers, before training goes on
WRITE_THROUGH_S = 5.0
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 10.0
T = TypeVar("T")
log = logging.getLogger(__name__)
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
    """A cached :class:`mlflow.MlflowClient` for ``uri`` (one store per process).

    For an http(s) server, MLflow's own request retries are turned off (unless
    ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` is set): :func:`retry` is the retry loop.
    """
    from mlflow import MlflowClient

    if urlparse(uri).scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------- outages


class TrackingUnavailable(EnvironmentProblem):
    """The tracking store failed transiently for longer than the outage limit."""


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that waiting may cure: the connection (refused, reset,
    timed out), HTTP 429 or 5xx from the server, a database that is unavailable or locked."""
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TrackingUnavailable):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        name = f"{type(e).__module__}.{type(e).__name__}"
        if name in ("requests.exceptions.ConnectionError", "requests.exceptions.Timeout",
                    "requests.exceptions.ReadTimeout", "requests.exceptions.ConnectTimeout",
                    "requests.exceptions.ChunkedEncodingError", "sqlalchemy.exc.OperationalError",
                    "sqlalchemy.exc.DisconnectionError", "sqlalchemy.exc.TimeoutError",
                    "urllib3.exceptions.ProtocolError", "urllib3.exceptions.MaxRetryError"):
            return True
        if isinstance(e, MlflowException) and _server_said(e):
            try:
                status = int(e.get_http_status_code())
            except (TypeError, ValueError):
                status = 500
            return status == 429 or status >= 500
        e = e.__cause__ or e.__context__
    return False


def _server_said(exc: BaseException) -> bool:
    """An MLflow error that is the server's answer (not one raised by the client itself)."""
    from mlflow.exceptions import RestException

    return isinstance(exc, RestException) or (
        str(exc).startswith("API request to endpoint") and "failed with error code" in str(exc))


def retry(fn: Callable[[], T], what: str, uri: str, limit_s: float | None = None,
          sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """``fn()``, retried with backoff (0.5 s doubling to 10 s) while it fails transiently.

    ``fn`` must be safe to repeat (see the module docstring). Other errors pass through.

    Raises:
        TrackingUnavailable: it kept failing for ``limit_s`` (default :data:`OUTAGE_LIMIT_S`).
    """
    limit = OUTAGE_LIMIT_S if limit_s is None else limit_s
    delay, since = _BACKOFF_FIRST_S, None
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc):
                raise
            now = clock()
            since = now if since is None else since
            if now - since >= limit:
                raise TrackingUnavailable(
                    f"MLflow tracking store {uri} did not answer for {now - since:.0f} s ({what}): "
                    f"{_first_line(exc)}") from exc
            sleep(min(delay, max(limit - (now - since), 0.0)))
            delay = min(delay * 2, _BACKOFF_MAX_S)


def _retried(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: the whole call (``uri`` its first argument) is retried as one unit."""
    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(uri: str, *args: Any, **kwargs: Any) -> T:
            return retry(lambda: fn(uri, *args, **kwargs), what, uri)
        return call
    return wrap


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


class WriteQueue:
    """A run's MLflow writes, in order, by one background thread (see the module docstring).

    ``put`` queues a write (a callable that is safe to repeat) and returns; the thread runs
    each write through :func:`retry` before the next. The thread exists only while writes
    are queued, and it is not a daemon: a process asked to exit (a Ray actor Tune let go)
    first drains its queue. A write that fails for good (not transient) is kept as the
    queue's error and raised by the next ``put`` or ``flush``; a store that stayed away past
    the outage limit drops the writes still queued and fails every later call.
    """

    def __init__(self, uri: str, run_id: str, limit_s: float | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.limit_s = OUTAGE_LIMIT_S if limit_s is None else limit_s
        self._ops: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._broken: BaseException | None = None
        self._failing = False
        self.written = 0

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._ops)

    @property
    def failing(self) -> bool:
        """Whether the write at the head of the queue has failed (an outage, probably)."""
        return self._failing

    def put(self, what: str, fn: Callable[[], Any], wait_s: float = 0.0) -> None:
        """Queue ``fn``; with ``wait_s``, wait that long for the queue to drain unless the
        store is already failing (write-through while it answers)."""
        with self._cv:
            self._raise_error()
            self._ops.append((what, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name=f"s2study-mlflow-{self.run_id[:8]}",
                                                daemon=False)
                self._thread.start()
            if wait_s > 0 and not self._failing:
                self._cv.wait_for(lambda: not self._ops or self._failing or self._broken, wait_s)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write landed (at most ``timeout`` s, default twice the
        outage limit).

        Raises:
            TrackingUnavailable: the store stayed away (writes are lost) or the wait timed out.
            The error of a write that failed for good.
        """
        timeout = 2 * self.limit_s if timeout is None else timeout
        with self._cv:
            drained = self._cv.wait_for(lambda: not self._ops or self._broken, timeout)
            self._raise_error()
            if not drained:
                raise TrackingUnavailable(f"MLflow tracking store {self.uri}: {len(self._ops)} write(s) of run "
                                          f"{self.run_id} still queued after {timeout:.0f} s")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (like :meth:`flush`) without raising; returns whether the queue is empty."""
        timeout = 2 * self.limit_s if timeout is None else timeout
        with self._cv:
            return self._cv.wait_for(lambda: not self._ops or self._broken, timeout) and not self._ops

    def take_error(self) -> BaseException | None:
        """The error of a write that failed for good since the last call (cleared)."""
        with self._cv:
            error, self._error = self._error, None
            return error

    def _raise_error(self) -> None:
        if self._broken is not None:
            raise TrackingUnavailable(str(self._broken)) from self._broken
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _drain(self) -> None:
        while True:
            with self._cv:
                if not self._ops:
                    self._thread = None
                    self._cv.notify_all()
                    return
                what, fn = self._ops[0]

            def attempt(fn: Callable[[], Any] = fn) -> Any:
                try:
                    return fn()
                except Exception as exc:
                    if transient(exc) and not self._failing:
                        with self._cv:
                            self._failing = True
                            self._cv.notify_all()
                    raise

            try:
                retry(attempt, what, self.uri, self.limit_s)
            except TrackingUnavailable as exc:
                with self._cv:
                    lost = [w for w, _ in self._ops]
                    self._ops.clear()
                    self._broken = TrackingUnavailable(f"{exc}; {len(lost)} write(s) of run {self.run_id} "
                                                       f"are lost: {', '.join(lost[:5])}")
                    self._thread, self._failing = None, False
                    self._cv.notify_all()
                log.error("%s", self._broken)
                return
            except Exception as exc:  # noqa: BLE001 - kept for the trial's next call
                log.error("MLflow run %s: %s failed: %s: %s", self.run_id, what, type(exc).__name__, _first_line(exc))
                with self._cv:
                    self._error = self._error or exc
            with self._cv:
                self._ops.popleft()
                self._failing = False
                self.written += 1
                self._cv.notify_all()


def snapshot(path: str | Path) -> tuple[Path, Path]:
    """A private copy of ``path`` for a queued upload, in the system's temporary folder (the
    trial's own folder may be gone before the upload runs); a hard link where the file system
    allows it (the trainer replaces its files, it does not change them in place). Returns
    ``(copy, folder to remove after the upload)``."""
    path = Path(path)
    folder = Path(tempfile.mkdtemp(prefix="s2study-upload-"))
    dst = folder / path.name
    if path.is_dir():
        shutil.copytree(path, dst)
    else:
        try:
            os.link(path, dst)
        except OSError:
            shutil.copy2(path, dst)
    return dst, folder


# --------------------------------------------------------------------------- driver side


@_retried("find or create the experiment")
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
        if EXPERIMENT_KIND not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return exp.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / "mlartifacts" / name).as_uri() if db else None
    return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})


def start_study_run(uri: str, experiment_id: str, study: str, params: dict[str, Any],
                    tags: dict[str, str] | None = None) -> str:
    """Create the parent run of a study; returns its id.

    The run gets a fresh ``s2study.attempt`` tag, so a retried create finds the run an
    earlier attempt made (its answer lost) instead of making a second one.
    """
    attempt = uuid.uuid4().hex
    tags = {TAG_ROLE: "study", TAG_STUDY: study, TAG_STATUS: "running", TAG_ATTEMPT: attempt, **(tags or {})}

    def find_or_create() -> str:
        found = list(_search(uri, [experiment_id], f"tags.`{TAG_ATTEMPT}` = '{attempt}'"))
        if found:
            return found[0].info.run_id
        return client(uri).create_run(experiment_id, run_name=study, tags=tags).info.run_id

    run_id = retry(find_or_create, "create the study run", uri)
    log_params(uri, run_id, params)
    return run_id


def find_study_run(uri: str, experiment: str, study: str, storage: str,
                   prefer: str | None = None) -> str | None:
    """The parent run of the study kept at ``storage`` (``<storage>/<name>``), found by its
    tags in experiment ``experiment``; None when the store has none (or no such experiment).

    Among several (earlier attempts superseded by a new one), ``prefer`` (the id the storage
    folder recorded) wins, then the newest that was not superseded.
    """
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None  # an empty store: not created just to look

    def find() -> str | None:
        exp = client(uri).get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage == "deleted":
            return None
        runs = list(_search(uri, [exp.experiment_id],
                            f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{_quote(study)}' "
                            f"and tags.`{TAG_STORAGE}` = '{_quote(storage)}'",
                            order_by=["attributes.start_time DESC"]))
        if prefer and any(r.info.run_id == prefer for r in runs):
            return prefer
        live = [r for r in runs if TAG_SUPERSEDED not in r.data.tags]
        return live[0].info.run_id if live else None

    return retry(find, "find the study run", uri)


def _quote(value: str) -> str:
    if "'" in value:
        raise ConfigError(f"{value!r}: a study name or storage path with a ' cannot be looked up in MLflow")
    return value


@_retried("look the trial runs up")
def missing_runs(uri: str, run_ids: list[str]) -> list[str]:
    """The ids among ``run_ids`` that the store does not hold (or holds as deleted)."""
    from mlflow.exceptions import MlflowException

    c, out = client(uri), []
    for run_id in run_ids:
        try:
            if c.get_run(run_id).info.lifecycle_stage == "deleted":
                out.append(run_id)
        except MlflowException as exc:
            if transient(exc):
                raise
            out.append(run_id)
    return out


@_retried("reopen a run")
def reopen_run(uri: str, run_id: str) -> None:
    """Mark a run RUNNING again (a resumed study or trial continues its own run); the reason
    its last attempt ended with no longer holds."""
    c = client(uri)
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, TAG_STATUS, "running")
    if TAG_REASON in c.get_run(run_id).data.tags:
        c.delete_tag(run_id, TAG_REASON)


def finish_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """End a run: ``status`` is an ``s2study.status`` (finished, stopped_early, failed, killed)."""
    retry(lambda: _finish_once(uri, run_id, status, reason), "end a run", uri)


@_retried("log params")
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


def metric_items(metrics: dict[str, float], step: int = 0) -> list[Any]:
    """MLflow ``Metric`` entities of the finite numeric ``metrics`` at ``step``, stamped now
    (names made MLflow-legal); the same entities can be sent again without duplicates."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def log_metric_items(uri: str, run_id: str, items: list[Any]) -> None:
    """Send ``Metric`` entities in batches of 1000 (each batch retried on its own)."""
    for i in range(0, len(items), 1000):
        chunk = items[i:i + 1000]
        retry(lambda chunk=chunk: client(uri).log_batch(run_id, metrics=chunk), "log metrics", uri)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite numeric metrics at ``step`` in one request (names made MLflow-legal)."""
    log_metric_items(uri, run_id, metric_items(metrics, step))


def log_curve(uri: str, run_id: str, key: str, steps: list[int], values: list[float]) -> None:
    """A curve as one metric with the x value as step (e.g. CMR over thresholds 1..10 px)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_key(key), float(v), now, int(s)) for s, v in zip(steps, values) if math.isfinite(v)]
    log_metric_items(uri, run_id, items)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    """Upload a file (or a folder's files) into the run's artifacts."""
    retry(lambda: _upload_once(uri, run_id, Path(path), artifact_dir), "upload an artifact", uri)


@_retried("upload a text artifact")
def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    client(uri).log_text(run_id, text, artifact_file)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    values = {k: str(v)[:5000] for k, v in tags.items()}
    retry(lambda: _set_tags_once(uri, run_id, values), "set tags", uri)


@_retried("list the trial runs")
def child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The trial runs under a study run (all statuses)."""
    return list(_search(uri, [experiment_id], f"tags.{PARENT} = '{parent_run_id}'"))


@_retried("list the running trial runs")
def running_child_runs(uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The trial runs under a study run that are still RUNNING, selected by the store: after a
    large study nearly all runs have ended, and reading each of them (its params, tags and
    metrics) to find the few left cost the driver milliseconds per trial, per call."""
    return list(_search(uri, [experiment_id],
                        f"tags.{PARENT} = '{parent_run_id}' and attributes.status = 'RUNNING'"))


def close_running_children(uri: str, experiment_id: str, parent_run_id: str,
                           status: str = "killed", reason: str | None = None) -> int:
    """End trial runs left RUNNING (a trial that never resumed); returns how many."""
    n = 0
    for run in running_child_runs(uri, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            finish_run(uri, run.info.run_id, status, reason)
            n += 1
    return n


def settle_trial_runs(uri: str, experiment_id: str, parent_run_id: str,
                      final: dict[str, tuple[str, str | None]], wait_s: float = 40.0,
                      before_end: Callable[[Any, str], None] | None = None) -> int:
    """After a study: end the trial runs still RUNNING with the status Tune reports.

    A trial ends its own run in its ``finally`` block, possibly after ``Tuner.fit`` returned:
    a trial Tune stopped (ASHA) lets go at once and its process drains the run's write queue
    while Ray lets it (an actor Tune no longer needs gets 30 s, Ray's
    ``actor_graceful_shutdown_timeout_ms``, before it is killed), or never (a worker killed
    mid-write). Trials known to have ended get ``wait_s`` seconds, counted from the first
    answer of the store, to do it themselves; by then no trial process of the study is alive,
    and the driver ends what is left, after ``before_end(run, status)`` (which may log what
    the run lacks).

    Args:
        final: Tune trial id -> (``s2study.status``, failure reason); runs of unknown trials
            end as ``killed``.

    Returns:
        How many runs the driver ended.
    """
    deadline = None
    while True:
        running = [r for r in running_child_runs(uri, experiment_id, parent_run_id)
                   if r.info.status == "RUNNING"]
        deadline = deadline if deadline is not None else time.monotonic() + wait_s
        ending = [r for r in running if final.get(r.data.tags.get(TAG_TRIAL), ("killed",))[0] != "killed"]
        if not ending or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for run in running:
        status, reason = final.get(run.data.tags.get(TAG_TRIAL), ("killed", "study ended"))
        if before_end is not None:
            before_end(run, status)
        finish_run(uri, run.info.run_id, status, reason)
    return len(running)


@_retried("list artifacts")
def has_artifact(uri: str, run_id: str, path: str) -> bool:
    """Whether run ``run_id`` has the artifact file ``path`` (``checkpoints/best.pt``)."""
    folder = path.rsplit("/", 1)[0] if "/" in path else None
    return any(f.path == path for f in client(uri).list_artifacts(run_id, folder))


def is_repeat(run: Any) -> bool:
    """Whether an MLflow trial run is a repeat (:mod:`s2study.study.repeats`), not a search trial."""
    return TAG_REPEAT_OF in run.data.tags


def drop_orphan_runs(uri: str, experiment_id: str, parent_run_id: str, trial_ids: set[str],
                     repeats: bool = False) -> int:
    """Delete trial runs of trials Tune does not know (after ``--resume``); returns how many.
    Only the search's trial runs are looked at, or with ``repeats`` only the repeats' runs.

    A driver killed between a trial's start and Tune's next experiment snapshot (at most every
    10 s) leaves a run whose trial the restored study never had; Optuna suggests a new trial
    in its place. The run is ended as ``killed`` and soft-deleted (``mlflow gc`` purges it,
    ``mlflow runs restore`` brings it back), so each trial of the study has exactly one run.
    """
    n = 0
    for run in child_runs(uri, experiment_id, parent_run_id):
        if run.data.tags.get(TAG_TRIAL) in trial_ids or is_repeat(run) != repeats:
            continue
        if run.info.status == "RUNNING":
            finish_run(uri, run.info.run_id, "killed", "lost: the driver died before Tune recorded this trial")
        retry(lambda run_id=run.info.run_id: _delete_run(uri, run_id), "delete a lost trial's run", uri)
        n += 1
    return n


def _delete_run(uri: str, run_id: str) -> None:
    c = client(uri)
    if c.get_run(run_id).info.lifecycle_stage != "deleted":
        c.delete_run(run_id)


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
    """Whether a finite ``value`` beats ``best`` (None: nothing yet) in ``mode`` (max or min).

    The one rule for a trial's best epoch: its best checkpoint, its rank in the study and the
    value Optuna learns from (:class:`s2study.study.search.StudySearch`) all follow it.
    """
    if value is None or not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def best_of(values: Iterable[float | None], mode: str) -> float | None:
    """The best of ``values`` by :func:`improves` (None where none is finite)."""
    best = None
    for value in values:
        if improves(value, best, mode):
            best = float(value)
    return best


class TrialRun:
    """The MLflow run of one Tune trial, opened (or reopened) inside the trainable.

    Opening waits for the store (with :func:`retry`); the writes after it go through the
    run's :class:`WriteQueue`, and :meth:`finish` waits for them to land.

    Args:
        uri: tracking URI (absolute).
        run_id: the run.
        metric / mode: the study metric; ``best_<metric>`` is logged alongside it.
        last_step: the last epoch already logged (a resumed trial skips epochs <= it).
        best: the best metric value logged so far.
        limit_s: the outage limit of its writes (default :data:`OUTAGE_LIMIT_S`).

    ``also``: other metrics (a multi-objective study's) logged as ``at_best/<name>`` with each
    epoch that improves the metric: their values at the trial's best epoch.
    """

    also: tuple[str, ...] = ()

    def __init__(self, uri: str, run_id: str, metric: str, mode: str,
                 last_step: int = 0, best: float | None = None, limit_s: float | None = None) -> None:
        self.uri, self.run_id, self.metric, self.mode = uri, run_id, metric, mode
        self.last_step, self.best = last_step, best
        self.writes = WriteQueue(uri, run_id, limit_s)

    @classmethod
    def open(cls, uri: str, experiment_id: str, parent_run_id: str, trial_id: str, trial_name: str,
             params: dict[str, Any], metric: str, mode: str, run_id: str | None = None,
             limit_s: float | None = None, tags: dict[str, str] | None = None) -> TrialRun:
        """Reopen ``run_id`` (from the trial checkpoint) or the run tagged with ``trial_id``,
        else create a child run of ``parent_run_id`` (with ``tags``); then log ``params``."""
        c = client(uri)

        def find_or_create() -> str:
            if run_id is not None:
                return run_id
            found = list(_search(uri, [experiment_id],
                                 f"tags.{PARENT} = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'"))
            if found:
                reopen_run(uri, found[0].info.run_id)
                return found[0].info.run_id
            return c.create_run(experiment_id, run_name=trial_name, tags={
                **(tags or {}), PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_STATUS: "running"}).info.run_id

        if run_id is not None:
            reopen_run(uri, run_id)
        run_id = retry(find_or_create, "open the trial run", uri, limit_s)
        log_params(uri, run_id, params)
        return cls.attach(uri, run_id, metric, mode, limit_s)

    @classmethod
    def attach(cls, uri: str, run_id: str, metric: str, mode: str, limit_s: float | None = None) -> TrialRun:
        """Run ``run_id`` as the store has it (its last step and best value), not reopened."""
        history = retry(lambda: client(uri).get_metric_history(run_id, metric_key(metric)),
                        "read the trial's metrics", uri, limit_s)
        last = max((m.step for m in history), default=0)
        values = [m.value for m in history]
        best = (max(values) if mode == "max" else min(values)) if values else None
        return cls(uri, run_id, metric, mode, last, best, limit_s)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> bool:
        """Log one epoch's metrics at ``step=epoch``; returns whether the metric improved.

        Epochs already logged (a trial resumed from an earlier checkpoint) are skipped, so
        each metric history has steps 1..n without duplicates. The write is queued; while
        the store answers it is waited for (up to :data:`WRITE_THROUGH_S`).
        """
        value = metrics.get(self.metric)
        improved = improves(value, self.best, self.mode)
        if epoch <= self.last_step:
            return False
        out = dict(metrics)
        if improved:
            self.best = float(value)
            out.update({f"{AT_BEST}{m}": metrics[m] for m in self.also if m in metrics})
        if self.best is not None:
            out[f"best_{self.metric}"] = self.best
        items = metric_items(out, step=epoch)
        uri, run_id = self.uri, self.run_id
        self.writes.put(f"epoch {epoch} metrics", lambda: _log_batch_once(uri, run_id, items), WRITE_THROUGH_S)
        self.last_step = epoch
        return improved

    def backfill(self, history: list[dict[str, float]]) -> bool:
        """Log the epochs of ``history`` (a checkpoint's per-epoch metrics, ``epoch`` in each)
        that the run lacks: a trial resumed from a checkpoint whose last epochs never reached
        the store (queued when the process died). Returns whether any of them improved."""
        improved = False
        for entry in sorted(history, key=lambda h: h.get("epoch", 0)):
            epoch = int(entry.get("epoch", 0))
            if epoch > self.last_step:
                improved = self.log_epoch(entry, epoch) or improved
        return improved

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        """Queue the upload of (a snapshot of) ``path``."""
        copy, folder = snapshot(path)
        uri, run_id = self.uri, self.run_id

        def upload() -> None:
            try:
                _upload_once(uri, run_id, copy, artifact_dir)
            except Exception as exc:
                if not transient(exc):  # retried otherwise: keep the copy
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)

        self.writes.put(f"upload {Path(path).name}", upload, WRITE_THROUGH_S)

    def set_tags(self, tags: dict[str, Any]) -> None:
        uri, run_id, values = self.uri, self.run_id, {k: str(v)[:5000] for k, v in tags.items()}
        self.writes.put("set tags", lambda: _set_tags_once(uri, run_id, values), WRITE_THROUGH_S)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the queued writes (see :meth:`WriteQueue.flush`)."""
        self.writes.flush(timeout)

    def finish(self, status: str, reason: str | None = None, wait: bool = True) -> None:
        """End the run after every queued write.

        With ``wait`` (a trial that ends by itself: Tune waits for it), this waits for the
        queue (see :meth:`WriteQueue.flush`), and a queued write that failed for good turns
        the status into ``failed`` with its reason and is raised after the run ended. Without
        (a trial Tune stopped, whose thread must end at once so that Tune can reuse its
        actor), the end is queued and the queue's thread sends it; the process does not exit
        before that thread is done.
        """
        if wait:
            self.writes.wait()
        error = self.writes.take_error()
        if error is not None:
            status, reason = "failed", f"an MLflow write failed: {type(error).__name__}: {_first_line(error)}"
        uri, run_id = self.uri, self.run_id
        self.writes.put(f"end the run ({status})", lambda: _finish_once(uri, run_id, status, reason))
        if not wait:
            return
        self.writes.flush()
        if error is not None:
            raise error


# the queued writes: one attempt each (the queue retries)


def _log_batch_once(uri: str, run_id: str, items: list[Any]) -> None:
    for i in range(0, len(items), 1000):
        client(uri).log_batch(run_id, metrics=items[i:i + 1000])


def _upload_once(uri: str, run_id: str, path: Path, artifact_dir: str | None) -> None:
    if path.is_dir():
        client(uri).log_artifacts(run_id, str(path), artifact_dir)
    else:
        client(uri).log_artifact(run_id, str(path), artifact_dir)


def _set_tags_once(uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = client(uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)


def _finish_once(uri: str, run_id: str, status: str, reason: str | None) -> None:
    c = client(uri)
    c.set_tag(run_id, TAG_STATUS, status)
    if reason:
        c.set_tag(run_id, TAG_REASON, reason[:5000])
    c.set_terminated(run_id, status=MLFLOW_STATUS[status])


def start_system_metrics(uri: str, run_id: str, interval_s: float) -> Any | None:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network;
    GPU use and memory with ``nvidia-ml-py`` and a driver) sampled every ``interval_s`` s
    into ``run_id`` by a thread of this process; continues the steps of a reopened run.

    Returns:
        The monitor (``finish()`` stops and flushes it), or None without ``psutil``.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:  # psutil is missing
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


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


def fetch_study(uri: str, study_or_run: str, limit_s: float = 30.0) -> StudyRecord:
    """A study read back from MLflow: by parent run id, or the latest study run of that name
    (superseded attempts of a study are skipped). A store that fails transiently is retried
    for ``limit_s`` seconds (a report need not wait for a long outage).

    Raises:
        ConfigError: nothing matches (lists the studies that exist).
        TrackingUnavailable: the store did not answer.
    """
    return retry(lambda: _fetch_study(uri, study_or_run), "read the study", uri, limit_s)


def _fetch_study(uri: str, study_or_run: str) -> StudyRecord:
    from mlflow.exceptions import MlflowException

    c = client(uri)
    parent = None
    if re.fullmatch(r"[0-9a-f]{32}", study_or_run):
        try:
            parent = c.get_run(study_or_run)
        except MlflowException as exc:
            if transient(exc):
                raise
            parent = None
    if parent is None:
        exps = [e.experiment_id for e in c.search_experiments()]
        runs = list(_search(uri, exps, f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{study_or_run}'",
                            order_by=["attributes.start_time DESC"])) if exps else []
        runs = [r for r in runs if TAG_SUPERSEDED not in r.data.tags] or runs
        if not runs:
            known = sorted({r.data.tags.get(TAG_STUDY, "") for r in
                            _search(uri, exps, f"tags.`{TAG_ROLE}` = 'study'")} - {""}) if exps else []
            raise ConfigError(f"no study {study_or_run!r} in {uri}; studies there: {', '.join(known) or '(none)'}")
        parent = runs[0]
    exp = c.get_experiment(parent.info.experiment_id)
    children = _search(uri, [exp.experiment_id], f"tags.{PARENT} = '{parent.info.run_id}'")
    return StudyRecord(exp.name, _record(parent), [_record(r) for r in children])
