"""Run a study: Ray Tune (OptunaSearch + ASHA) over the S2 trainer, tracked in MLflow.

:func:`run_study` checks everything that can fail cheaply first (resources, data, the
tracking store, an existing study in the storage folder), creates the MLflow experiment and
the study's parent run on the driver, starts or joins Ray, then builds (or restores) the
``Tuner``::

    Tuner(with_resources(with_parameters(run_trial, settings), {cpu, gpu}),
          TuneConfig(metric, mode, search_alg=StudySearch(define-by-run space, metric, mode,
                     sampler, optuna storage, enqueued points),
                     scheduler=ASHAScheduler(training_iteration, max_t, grace,
                     reduction), num_samples, max_concurrent_trials, reuse_actors=True),
          RunConfig(name, storage_path, CheckpointConfig(num_to_keep=2), FailureConfig(max_failures),
                    callbacks=[StudyProgress, JSON and CSV loggers]))

``StudySearch`` (:mod:`s2study.study.search`) is Ray's OptunaSearch told each trial's best
value; its Optuna study lives in ``optuna.storage`` (by default an SQLite file beside a local
study's state), so ``optuna-dashboard`` and ``s2study report`` can read it.

Tune keeps each trial's two most recent checkpoints; each holds the epoch's full training state
and the trial's best weights so far (see :mod:`s2study.study.trainable`), so the latest one is
all that resuming and the final evaluation need.

After ``fit`` the ``evaluate.top_n`` best trials are evaluated (a Ray task with the trial
resources, so on a GPU node of a cluster) and logged into their runs; the parent run gets the
study file, the resolved space, the ranked trial table and the best trial.

The study state, ``<storage>/<name>/s2study_study.json`` (:data:`STATE_FILE`), keeps the parent
run id, the tracking URI and the resolved study. ``--resume`` needs Tune's experiment state
there (nothing to restore is an error), refuses a study file that differs from the stored one
(naming the keys; raising ``trials`` extends the study), finds the parent run in the tracking
store by its tags (the study name and ``<storage>/<name>``, so a new head whose MLflow server
has another address reattaches to it), and checks that the store still holds the trial runs
Tune's results record; all before any trial starts. SIGTERM (``ray job stop``) stops a study
like Ctrl-C does (:class:`StopSignals`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import yaml
from ray import tune

from s2study.config.load import build_dataclass, config_to_dict, flatten
from s2study.config.schema import DataConfig
from s2study.errors import ConfigError, DataError, EnvironmentProblem
from s2study.study import optuna_store, repeats, tracking
from s2study.study.budget import BudgetWatch, Spent, interrupt_fit
from s2study.study.config import (
    StudyConfig,
    check_resources,
    cuda_corners,
    local_node_resources,
    trial_resources,
)
from s2study.study.space import corner_cases, overlay
from s2study.study.trainable import (
    BEST_FILE,
    CHECKPOINT_FILE,
    TrialSettings,
    apply_share,
    assigned_share,
    run_repeat,
    run_trial,
    trial_config,
)

STATE_FILE = "s2study_study.json"
#: resolved-study keys a resume may change: the tracking store's address (a new head) and the
#: storage spelling (the state was found there); ``trials`` may be raised
RESUME_FREE_KEYS = ("tracking.uri", "storage", "budget.wall", "budget.gpu_hours", "register.name",
                    "repeats.top_n", "repeats.seeds")
Echo = Callable[[str], None]


def _echo(line: str) -> None:
    print(line, flush=True)


@dataclass
class TrialSummary:
    """One trial after the study, as ranked in the summary table."""

    trial_id: str
    name: str
    status: str  # finished | stopped_early | failed | incomplete
    epochs: int
    best: float | None
    last: float | None
    sampled: dict[str, Any]
    run_id: str | None = None
    error: str | None = None
    repeat_of: str | None = None  # a repeat's search trial (:mod:`s2study.study.repeats`)
    objectives: tuple[float, ...] | None = None  # each objective's value at the best epoch (multi-objective)


@dataclass
class StudyOutcome:
    """What :func:`run_study` returns."""

    name: str
    experiment_path: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    trials: list[TrialSummary] = field(default_factory=list)
    evaluated: dict[str, dict[str, float]] = field(default_factory=dict)
    repeats: list[TrialSummary] = field(default_factory=list)  # the repeats' runs, by round
    interrupted: bool = False
    stopped_by: str | None = None  # "SIGTERM" or "budget" when one stopped it (else Ctrl-C or none)


# --------------------------------------------------------------------------- checks


def resolve_eval_split(data: DataConfig, choice: str) -> str:
    """The split name the post-study evaluation uses: ``auto`` is test where the dataset
    has one (the shared RoadScene copy has none), else val."""
    if choice != "auto":
        return data.test_split if choice == "test" else data.val_split
    from s2study.data.datasets import open_dataset

    try:
        open_dataset(data, data.test_split)
    except DataError:
        return data.val_split
    return data.test_split


def preflight_data(cfg: StudyConfig) -> None:
    """Every dataset split and weights file the trials and the evaluation use resolves here.

    Datasets and weights given by name are fetched into this machine's cache when no local
    copy exists (:mod:`s2study.resolver`), for every configuration the space can produce.

    Raises:
        DataError: naming the dataset, split, weights and path (or the failed download).
    """
    from s2study.data.datasets import open_dataset
    from s2study.resolver import resolve_weights, using_mirror

    seen: set[str] = set()
    for values in corner_cases(cfg.space, cfg.base_flat):
        train = overlay(cfg.base, values)
        data = build_dataclass(DataConfig, train["data"], cfg.source, prefix="base.data.")
        key = json.dumps(config_to_dict(data), sort_keys=True)
        with using_mirror(train.get("mirror")):
            if key not in seen:
                seen.add(key)
                splits = {data.train_split, data.val_split}
                if cfg.evaluate.top_n:
                    splits.add(resolve_eval_split(data, cfg.evaluate.split))
                for split in sorted(splits):
                    open_dataset(data, split)
            if train["method"].get("weights"):
                resolve_weights(train["method"]["weights"])


def preflight_on_worker(cfg: StudyConfig, echo: Echo) -> None:
    """:func:`preflight_data` in a Ray task with one trial's resources, so on a node where
    trials run (the autoscaler may have to start one first); it fills that node's cache.

    Raises:
        DataError: the worker's message, naming the node.
    """
    import ray

    echo("checking that a worker node resolves the study's data and weights "
         "(downloading them into its cache if needed) ...")

    def check() -> tuple[str, str | None]:
        from s2study.errors import S2StudyError

        node = ray.util.get_node_ip_address()
        try:
            preflight_data(cfg)
        except S2StudyError as exc:
            return node, str(exc)
        return node, None

    task = ray.remote(check).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)
    ip, problem = ray.get(task.remote())
    if problem:
        raise DataError(f"on worker node {ip}: {problem}")


def check_local_cuda(cfg: StudyConfig) -> None:
    """A local study whose space trains on ``device: cuda`` needs CUDA on this machine.

    Raises:
        EnvironmentProblem: naming the corner that asks for ``cuda``.
    """
    import torch

    corners = cuda_corners(cfg.space, cfg.base)
    if corners and not torch.cuda.is_available():
        raise EnvironmentProblem(f"{cfg.source}: device: 'cuda' is requested (at {corners[0]}) but no CUDA "
                                 "GPU is available here; use device: auto or cpu, or --address a cluster "
                                 "with GPUs")


def check_local_storage(path: str) -> None:
    """The local storage folder can be created: its nearest existing ancestor is a writable folder.

    Raises:
        EnvironmentProblem: naming the storage path and the ancestor in the way.
    """
    from s2study.paths import output_dir

    output_dir(path, "storage:", "study folder")


def _cluster_checks(cfg: StudyConfig, storage_vouched: bool = False) -> None:
    """Multi-node refusals and the resource fit, on the cluster Ray is connected to.

    ``storage_vouched``: the caller handed Tune a filesystem object for the storage path
    (``storage_filesystem``), which every trial receives; its reach is the caller's to vouch for.
    """
    import ray

    from s2study.cluster import (
        alive_node_count,
        autoscaler_worker_types,
        check_storage_for_cluster,
        check_tracking_for_cluster,
    )

    # On an autoscaling cluster (clusters/gpu.yaml: GPU workers from 0) the nodes that will
    # run the trials may not be up yet: count the worker types the autoscaler can add.
    workers = autoscaler_worker_types()
    n = max(alive_node_count(), 1 + sum(w.max_workers for w in workers))
    check_storage_for_cluster(cfg.storage, n, shared_fs=storage_vouched)
    check_tracking_for_cluster(cfg.tracking.uri, n)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    nodes += [w.resources for w in workers]
    check_resources(cfg, nodes, where="the Ray cluster")


# --------------------------------------------------------------------------- storage state


def experiment_path(cfg: StudyConfig) -> str:
    """``<storage>/<name>``: Tune's experiment folder (local path or URI)."""
    return f"{cfg.storage.rstrip('/')}/{cfg.name}"


def _fs_and_dir(cfg: StudyConfig, storage_filesystem: Any | None) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if storage_filesystem is not None:
        return storage_filesystem, f"{cfg.storage.rstrip('/')}/{cfg.name}"
    if "://" in cfg.storage:
        fs, path = pafs.FileSystem.from_uri(cfg.storage)
        return fs, f"{path.rstrip('/')}/{cfg.name}"
    return pafs.LocalFileSystem(), experiment_path(cfg)


def _read_state(fs: Any, folder: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(f"{folder}/{STATE_FILE}") as f:
            return json.loads(f.read().decode())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_state(fs: Any, folder: str, state: dict[str, Any]) -> None:
    fs.create_dir(folder, recursive=True)
    with fs.open_output_stream(f"{folder}/{STATE_FILE}") as f:
        f.write(json.dumps(state, indent=1, default=str).encode())


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def study_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys of the resolved study ``current`` that differ from ``stored`` (the one the
    study started with), as ``key (old -> new)``; empty when a resume may go on.

    Free: :data:`RESUME_FREE_KEYS`, and ``trials`` raised. Keys outside ``space`` that only
    one side has (a setting a newer s2study added, or dropped) are not compared.
    """
    old, new = flatten(_jsonable(stored)), flatten(_jsonable(current))
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if key in RESUME_FREE_KEYS or a == b:
            continue
        if (a is missing or b is missing) and not key.startswith("space."):
            continue
        if key == "trials" and isinstance(a, int) and isinstance(b, int) and b > a:
            continue
        out.append(f"{key} ({_shown(a, missing)} -> {_shown(b, missing)})")
    return out


def _shown(value: Any, missing: Any) -> str:
    text = "absent" if value is missing else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class ResumePlan:
    """What ``--resume`` found before anything starts."""

    parent_run_id: str
    stored_trials: int | None  # the study's trials before this resume (None: not recorded)
    moved_from: str | None  # the tracking URI the study used before, where it differs


def plan_resume(cfg: StudyConfig, state: dict[str, Any] | None, storage_filesystem: Any | None = None) -> ResumePlan:
    """Check that a restorable study can be resumed as asked (see the module docstring).

    Raises:
        ConfigError: the study file differs from the stored one (names the keys).
        EnvironmentProblem: the tracking store lacks the study's parent run, or trial runs
            that Tune's results record.
    """
    state = state or {}
    exp_path, uri = experiment_path(cfg), cfg.tracking.uri
    if isinstance(state.get("study"), dict):
        changed = study_changes(state["study"], resolved_study(cfg))
        if changed:
            raise ConfigError(
                f"{cfg.source}: --resume: the study differs from the one started at {exp_path}: "
                f"{', '.join(changed)}; only trials may be raised. Resume it as it was, or start a new study "
                "(another name or --storage)")
    parent = tracking.find_study_run(uri, cfg.tracking.experiment, cfg.name, exp_path,
                                     prefer=state.get("parent_run_id"))
    if parent is None:
        raise EnvironmentProblem(
            f"--resume: the tracking store {uri} holds no run of study {cfg.name!r} kept at {exp_path} (experiment "
            f"{cfg.tracking.experiment!r}, tags {tracking.TAG_STUDY} and {tracking.TAG_STORAGE}); its runs were lost "
            "or this is another store: pass the --tracking-uri of the store the study used, or restore it")
    recorded = recorded_trial_runs(exp_path, storage_filesystem)
    lost = set(tracking.missing_runs(uri, sorted(set(recorded.values()))))
    if lost:
        trials = sorted(t for t, r in recorded.items() if r in lost)
        raise EnvironmentProblem(
            f"--resume: the tracking store {uri} lacks the MLflow runs of {len(trials)} trial(s) that Tune's "
            f"checkpoints at {exp_path} record ({', '.join(trials[:5])}{', ...' if len(trials) > 5 else ''}); its "
            "runs were lost: restore the store, or start a new study (another name or --storage)")
    stored = (state.get("study") or {}).get("trials")
    before = state.get("tracking_uri")
    return ResumePlan(parent, stored if isinstance(stored, int) else None,
                      before if before and before != uri else None)


def recorded_trial_runs(exp_path: str, storage_filesystem: Any | None = None) -> dict[str, str]:
    """Trial id -> the MLflow run id in the trial's last result in Tune's newest experiment
    state (trials with a checkpoint only: a trial without one finds or creates its run)."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(exp_path, storage_filesystem=storage_filesystem)
    except Exception:  # noqa: BLE001 - Tune.restore reports an unreadable state itself
        return {}
    out = {}
    for trial in analysis.trials:
        run_id = (trial.last_result or {}).get(tracking.RESULT_RUN_ID)
        if isinstance(run_id, str) and run_id and trial.checkpoint is not None:
            out[trial.trial_id] = run_id
    return out


def extend_search(fs: Any, folder: str, trials: int) -> int | None:
    """Raise the number of trials Tune's search generator will create, in its newest saved
    state (``search_gen_state-*.json``; a restored Tuner keeps the number it started with).
    Returns the number it had (None: no such state)."""
    import pyarrow.fs as pafs
    from ray import cloudpickle

    infos = fs.get_file_info(pafs.FileSelector(folder))
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File
                   and i.base_name.startswith("search_gen_state-") and i.base_name.endswith(".json"))
    if not paths:
        return None
    with fs.open_input_stream(paths[-1]) as f:
        state = cloudpickle.loads(f.read())
    total = state.get("total_samples")
    if isinstance(total, int) and total < trials:
        state["total_samples"] = trials
        with fs.open_output_stream(paths[-1]) as f:
            f.write(cloudpickle.dumps(state))
    return total if isinstance(total, int) else None


# --------------------------------------------------------------------------- Tune pieces


class StudyProgress(tune.Callback):
    """One line per trial event: trials running / stopped early / done, best metric so far."""

    def __init__(self, metric: str, mode: str, max_epochs: int, total: int) -> None:
        self.metric, self.mode, self.max_epochs, self.total = metric, mode, max_epochs, total
        self.best: float | None = None
        self.best_trial = ""
        self.t0 = time.time()

    def setup(self, **info: Any) -> None:
        self.t0 = time.time()  # also after Tuner.restore, which unpickles this callback

    def _counts(self, trials: list, ending: Any = None, status: str = "") -> str:
        # Tune calls on_trial_complete/on_trial_error before it updates the trial's status
        states = [status if t is ending else t.status for t in trials]
        running = states.count("RUNNING")
        ended = [t for t, s in zip(trials, states) if s == "TERMINATED"]
        # ended without any result: it failed itself (trainable: no usable GPU), ASHA stops after one
        failed = states.count("ERROR") + sum(not t.last_result.get("training_iteration") for t in ended)
        ended = [t for t in ended if t.last_result.get("training_iteration")]
        early = sum(t.last_result.get("training_iteration", 0) < self.max_epochs for t in ended)
        return (f"running {running}, stopped early {early}, done {len(ended) - early}, failed {failed} "
                f"of {self.total}")

    def _line(self, text: str, trials: list, ending: Any = None, status: str = "") -> None:
        best = f"best {self.metric} {self.best:.2f} ({self.best_trial})" if self.best is not None else "no result yet"
        print(f"[{time.time() - self.t0:6.0f}s] {text} | {best} | {self._counts(trials, ending, status)}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value) and (
                self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
            self.best, self.best_trial = float(value), trial.trial_id
        shown = f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"
        self._line(f"{trial.trial_id} epoch {result.get('training_iteration')}/{self.max_epochs} "
                   f"{self.metric} {shown}", trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = trial.last_result.get("training_iteration", 0)
        how = "finished" if epochs >= self.max_epochs else f"stopped early by ASHA after {epochs} epochs"
        how = how if epochs else "ended without an epoch (see s2study.failure_reason in its MLflow run)"
        self._line(f"{trial.trial_id} {how}", trials, trial, "TERMINATED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(f"{trial.trial_id} FAILED (see {trial.path})", trials, trial, "ERROR")


def build_tuner(cfg: StudyConfig, trainable: Any, storage_filesystem: Any | None = None,
                optuna_storage: Any | None = None, watch: BudgetWatch | None = None):
    """The Tuner of a new study (see the module docstring); its Optuna study in
    ``optuna_storage`` (:func:`s2study.study.optuna_store.prepare_study`; None: in memory)."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from s2study.study.search import build_searcher

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # the loggers are listed below
    searcher = build_searcher(cfg, optuna_storage)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=cfg.max_epochs,
                               grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
                 if cfg.asha.enabled else FIFOScheduler())
    return Tuner(
        trainable,
        tune_config=TuneConfig(metric=cfg.metric, mode=cfg.mode, search_alg=searcher, scheduler=scheduler,
                               num_samples=cfg.trials, max_concurrent_trials=cfg.max_concurrent,
                               reuse_actors=True),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=cfg.storage,
            storage_filesystem=storage_filesystem,
            # By recency, not by score: Tune forces a state snapshot every num_to_keep checkpoints
            # of a trial, which keeps the snapshot's "latest checkpoint" on storage; a score-ranked
            # deletion can remove it between snapshots, and a killed driver's trial could then not
            # be resumed. The best weights travel inside every checkpoint instead.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            # Tune's JSON and CSV result files, but no TensorBoard writer per trial: MLflow is
            # the tracker, and the writers cost time on every trial (see benchmarks/README.md)
            callbacks=[StudyProgress(cfg.metric, cfg.mode, cfg.max_epochs, cfg.trials),
                       JsonLoggerCallback(), CSVLoggerCallback(),
                       watch or BudgetWatch(None, None, cfg.resources.gpu, Spent())],
            verbose=0,
        ),
    )


# --------------------------------------------------------------------------- the study


def study_params(cfg: StudyConfig) -> dict[str, Any]:
    """Parent-run params: the study settings and the fixed base values (``base.*``)."""
    settings = {
        "trials": cfg.trials, "max_concurrent": cfg.max_concurrent, "metric": cfg.metric, "mode": cfg.mode,
        "objectives": ",".join(f"{m}:{d}" for m, d in cfg.objectives),
        "resources": config_to_dict(cfg.resources), "asha": config_to_dict(cfg.asha),
        "sampler": config_to_dict(cfg.sampler), "evaluate": config_to_dict(cfg.evaluate),
        "max_failures": cfg.failure.max_failures, "storage": cfg.storage,
    }
    return {**{f"study.{k}": v for k, v in flatten(settings).items()},
            **{f"base.{k}": v for k, v in cfg.base_flat.items()}}


def resolved_study(cfg: StudyConfig) -> dict[str, Any]:
    """The study as run: base, space and settings with every default filled in."""
    out = {k: config_to_dict(v) if hasattr(v, "__dataclass_fields__") else v
           for k, v in vars(cfg).items() if k not in ("space", "source", "resources_when", "objectives")}
    out["objectives"] = [list(o) for o in cfg.objectives]
    out["resources_when"] = [{"when": {k: list(v) for k, v in r.when}, **config_to_dict(r.resources)}
                             for r in cfg.resources_when]
    out["space"] = {s.key: s.describe() for s in cfg.space}
    return _jsonable(out)


def run_study(
    cfg: StudyConfig,
    *,
    address: str | None = None,
    resume: bool = False,
    storage_filesystem: Any | None = None,
    study_text: str | None = None,
    echo: Echo = _echo,
) -> StudyOutcome:
    """Run (or resume) a study end to end.

    Args:
        cfg: a validated study.
        address: a Ray cluster (``auto``, ``ray://host:10001``); None starts a local instance.
        resume: continue the study stored at ``<storage>/<name>`` (``Tuner.restore``).
        storage_filesystem: a pyarrow filesystem for ``cfg.storage`` (tests, custom stores).
            On a cluster every trial writes through it, so it must reach the same store
            from every node (S3, GCS, a SubTree over a shared mount): passing it lifts the
            refusal of a storage path without a URI scheme.
        study_text: the study file's text, logged on the parent run.
        echo: where progress lines go.

    Returns:
        A :class:`StudyOutcome` (trials ranked by their best metric).

    Raises:
        ConfigError / DataError / EnvironmentProblem: before anything starts.
        Terminated: a SIGTERM outside Tune's fit (inside it, the study ends interrupted,
            ``stopped_by`` "SIGTERM").
    """
    import ray
    from ray.tune import Tuner

    uri = cfg.tracking.uri
    if address is None:
        check_local_cuda(cfg)
        check_resources(cfg, local_node_resources())
        preflight_data(cfg)
    if storage_filesystem is None and "://" not in cfg.storage:
        check_local_storage(cfg.storage)
    tracking.check_tracking_reachable(uri)
    exp_path = experiment_path(cfg)
    fs, folder = _fs_and_dir(cfg, storage_filesystem)
    restorable = Tuner.can_restore(exp_path, storage_filesystem=storage_filesystem)
    if restorable and not resume:
        raise ConfigError(f"{cfg.source}: name: {exp_path} already holds study {cfg.name!r}; add --resume to "
                          "continue it, or pick another --storage or name")
    state = _read_state(fs, folder)
    plan = None
    if resume:
        if not restorable:
            why = ("an earlier attempt stopped before Tune saved any state" if state
                   else "no study was started there")
            raise ConfigError(f"{cfg.source}: --resume: nothing to resume at {exp_path} ({why}); run it without "
                              "--resume to start the study, or pass the --storage it was started with")
        plan = plan_resume(cfg, state, storage_filesystem)
    optuna_url = optuna_store.storage_url(cfg, storage_filesystem)
    if optuna_url != "memory" and not optuna_url.startswith("sqlite:"):
        optuna_store.open_storage(optuna_url)  # a database server that cannot be reached: say so before Ray
    watch = BudgetWatch(cfg.budget.wall_s, cfg.budget.gpu_s, cfg.resources.gpu,
                        Spent.from_state(state if resume else None))
    if resume and (spent := watch.exhausted()):
        raise ConfigError(f"{cfg.source}: budget: the {spent} by the study's earlier attempts; resume it with a "
                          "larger one: --resume --set budget.wall=... (or budget.gpu_hours=...)")
    _drop_tune_restore_hint()
    with StopSignals() as stop:
        started = not ray.is_initialized()
        if started and address:
            ray.init(address=address, logging_level=logging.WARNING)
        elif started:  # "local": never join a cluster started with `ray start` on this machine
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        stop.install()  # again: ray.init puts its own SIGTERM handlers in place (exit at once)
        try:
            if address:
                _cluster_checks(cfg, storage_vouched=storage_filesystem is not None)
                preflight_on_worker(cfg, echo)
            # after every refusal: a new study's Optuna study is created (and warm-started) here
            optuna_storage = None if resume else optuna_store.prepare_study(cfg, exp_path, optuna_url, echo)
            experiment_id = tracking.ensure_experiment(uri, cfg.tracking.experiment)
            parent = _study_run(cfg, fs, folder, experiment_id, plan, state, study_text, optuna_url, echo)
            outcome = StudyOutcome(cfg.name, exp_path, uri, experiment_id, parent)
            try:
                outcome = _fit(cfg, outcome, plan is not None, storage_filesystem, optuna_storage, watch, echo)
                outcome.stopped_by = stop.received or outcome.stopped_by
                return outcome
            except KeyboardInterrupt as exc:
                how = "SIGTERM" if isinstance(exc, Terminated) else "KeyboardInterrupt"
                _end(uri, experiment_id, parent, "killed", f"interrupted ({how})")
                raise
            except BaseException as exc:
                _end(uri, experiment_id, parent, "failed", f"{type(exc).__name__}: {exc}")
                raise
            finally:
                watch.stop()
                if watch.active:  # the count a --resume goes on from
                    _write_state(fs, folder, {**(_read_state(fs, folder) or {}),
                                              "budget_spent": watch.spent.as_state()})
        finally:
            if started:
                ray.shutdown()


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``ray job stop``, ``docker stop``, ``kill``) during a study, outside Tune's
    fit: handled like Ctrl-C (the CLI exits 143)."""


class StopSignals:
    """While a study runs, SIGTERM does what Ctrl-C (SIGINT) does.

    Inside ``Tuner.fit`` that is Tune's SIGINT handler (stop the trials, save the experiment
    state, return: the study ends interrupted and resumable); elsewhere it raises
    :class:`Terminated`. ``received`` says whether a SIGTERM came. Only the main thread can
    install handlers; elsewhere this does nothing. ``ray.init`` installs handlers of its own
    (Python's ``sys.exit`` and, in C++, a fatal-signal handler that aborts the driver), so
    :meth:`install` runs again after it; leaving restores the handler found first.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> Self:
        self.install()
        return self

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if not self._installed:
            self._previous, self._installed = previous, True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.received = "SIGTERM"
        interrupt_fit(Terminated("SIGTERM"))


class _NoTunerRestoreHint(logging.Filter):
    """Cuts Tune's "Resume experiment with: Tuner.restore(...)" line from its interrupt warning:
    s2study prints its own resume command (``s2study run ... --resume``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Tuner.restore(" in message:
            record.msg, record.args = message.split("\n", 1)[0], ()
        return True


def _drop_tune_restore_hint() -> None:
    logger = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoTunerRestoreHint) for f in logger.filters):
        logger.addFilter(_NoTunerRestoreHint())


def _study_run(cfg: StudyConfig, fs: Any, folder: str, experiment_id: str, plan: ResumePlan | None,
               state: dict[str, Any] | None, study_text: str | None, optuna_url: str, echo: Echo) -> str:
    """The study's parent run: the one ``plan`` found (``--resume``), else a new one (an
    earlier attempt's run, which never got as far as a Tune snapshot, is superseded)."""
    uri = cfg.tracking.uri
    exp_path = experiment_path(cfg)
    study = resolved_study(cfg)
    if plan is not None:
        parent = plan.parent_run_id
        tracking.reopen_run(uri, parent)
        moved = f"; its tracking store was {plan.moved_from}" if plan.moved_from else ""
        echo(f"resuming study {cfg.name} (MLflow run {parent}{moved})")
        if plan.stored_trials is not None and cfg.trials > plan.stored_trials:
            echo(f"extending study {cfg.name} from {plan.stored_trials} to {cfg.trials} trials")
        if plan.stored_trials is None or cfg.trials > plan.stored_trials:
            extend_search(fs, folder, cfg.trials)
        _write_state(fs, folder, {**(state or {}), "parent_run_id": parent, "tracking_uri": uri,
                                  "experiment_id": experiment_id, "study": study})
    else:
        earlier = (tracking.find_study_run(uri, cfg.tracking.experiment, cfg.name, exp_path,
                                           prefer=state.get("parent_run_id")) if state else None)
        parent = tracking.start_study_run(uri, experiment_id, cfg.name, study_params(cfg), tags={
            "s2study.space_keys": ",".join(s.key for s in cfg.space if s.sampled),
            "s2study.metric": cfg.metric, "s2study.mode": cfg.mode, tracking.TAG_STORAGE: exp_path,
            "s2study.objectives": ",".join(f"{m}:{d}" for m, d in cfg.objectives),
            tracking.TAG_OPTUNA: optuna_store.safe_url(optuna_url)})
        if earlier is not None and earlier != parent:
            tracking.close_running_children(uri, experiment_id, earlier, "killed", "superseded")
            tracking.finish_run(uri, earlier, "killed", "superseded by a new attempt")
            tracking.set_tags(uri, earlier, {tracking.TAG_SUPERSEDED: parent})
        _write_state(fs, folder, {"parent_run_id": parent, "tracking_uri": uri, "experiment_id": experiment_id,
                                  "study": study})
    tracking.log_text(uri, parent, yaml.safe_dump(study, sort_keys=False), "study/resolved.yaml")
    if study_text is not None:
        tracking.log_text(uri, parent, study_text, "study/study.yaml")
    return parent


def _fit(cfg: StudyConfig, outcome: StudyOutcome, restore: bool, storage_filesystem: Any | None,
         optuna_storage: Any | None, watch: BudgetWatch, echo: Echo) -> StudyOutcome:
    """Build or restore the Tuner, fit, settle the trial runs, evaluate, summarise."""
    from ray.tune import Tuner

    uri, experiment_id, parent = outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id
    # a trial that ends itself failed (no usable GPU; not raised, so not retried) has no result
    # with the metric, which Tune's strict check would turn into an error of the whole study
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    trainable = _trainable(cfg, outcome, run_trial)
    if restore:
        tuner = Tuner.restore(outcome.experiment_path, trainable, resume_errored=True,
                              storage_filesystem=storage_filesystem)
        _update_callbacks(tuner, cfg.trials, watch)
    else:
        tuner = build_tuner(cfg, trainable, storage_filesystem, optuna_storage, watch)
    echo(f"study {cfg.name}: {cfg.trials} trials, storage {outcome.experiment_path}, MLflow {uri} "
         f"(experiment {cfg.tracking.experiment}, run {parent})")
    grid = _timed_fit(tuner, watch)
    if watch.active:
        tracking.log_metrics(uri, parent, watch.spent.as_metrics())
    if watch.reason:
        outcome.stopped_by = "budget"
    outcome.trials = summarize(cfg, grid, uri, experiment_id, parent)
    dropped = tracking.drop_orphan_runs(uri, experiment_id, parent, {t.trial_id for t in outcome.trials})
    if dropped:
        echo(f"deleted {dropped} MLflow run(s) of trials lost when the driver died (Tune never recorded them)")
    outcome.interrupted = len(grid) < cfg.trials or any(t.status == "incomplete" for t in outcome.trials)
    _settle(cfg, outcome, outcome.trials, grid, echo)
    repeat_grid: list[Any] = []
    if not outcome.interrupted and cfg.repeats.top_n:
        repeat_grid = _fit_repeats(cfg, outcome, storage_filesystem, watch, echo)
        outcome.stopped_by = "budget" if watch.reason else outcome.stopped_by
    if outcome.interrupted:
        if watch.reason:
            larger = "budget.wall" if watch.reason.startswith("wall") else "budget.gpu_hours"
            _end(uri, experiment_id, parent, "killed", f"{watch.reason}; continue with s2study run --resume")
            echo(f"study stopped: {watch.reason}; continue it with: s2study run {cfg.source} --resume "
                 f"--set {larger}=LARGER")
        else:
            _end(uri, experiment_id, parent, "killed", "study interrupted; continue with s2study run --resume")
            echo(f"study interrupted; continue it with: s2study run {cfg.source} --resume")
        return outcome
    results = {r.metrics.get("trial_id"): r for r in [*grid, *repeat_grid]}
    outcome.evaluated = evaluate_trials(cfg, evaluation_choice(cfg, outcome), results, uri, echo)
    log_study_summary(cfg, outcome)
    if cfg.register.name:
        register_best_trial(cfg, outcome, echo)
    _end(uri, experiment_id, parent, "finished")
    echo(summary_text(cfg, outcome))
    return outcome


def _timed_fit(tuner: Any, watch: BudgetWatch) -> Any:
    """``tuner.fit()``, its wall time counted by the budget watch."""
    watch.start()
    try:
        return tuner.fit()
    finally:
        watch.stop()


def _trainable(cfg: StudyConfig, outcome: StudyOutcome, function: Callable[..., None],
               sampled_of: Callable[[dict], dict] = dict) -> Any:
    """``function`` (:func:`run_trial` or :func:`run_repeat`, whose Tune config gives the
    trial's values through ``sampled_of``) as a Tune trainable of this study, each trial
    asking for its own resources (``resources_when``)."""
    from ray.tune import PlacementGroupFactory

    settings = TrialSettings(cfg.base, outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id,
                             cfg.metric, cfg.mode, cfg.resources.gpu, cfg.system_metrics.interval_s,
                             also=tuple(m for m, _ in cfg.objectives[1:]))
    trainable = tune.with_parameters(function, settings=settings)
    if not cfg.resources_when:
        return tune.with_resources(trainable, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})

    def resources(config: dict) -> PlacementGroupFactory:
        res = trial_resources(cfg, sampled_of(config))
        return PlacementGroupFactory([{"CPU": res.cpu, "GPU": res.gpu}])

    return tune.with_resources(trainable, resources)


def _repeat_config(config: dict) -> dict:
    """A repeat's values (with its seed) from its Tune config (:func:`run_repeat`)."""
    return config["repeat"]["config"]


def _settle(cfg: StudyConfig, outcome: StudyOutcome, trials: list[TrialSummary], grid: Any, echo: Echo) -> None:
    """End the runs of ``trials`` that are still RUNNING (``tracking.settle_trial_runs``), first
    logging from its checkpoint what a trial that ended without ending its run could not."""
    uri = outcome.tracking_uri
    by_trial = {r.metrics.get("trial_id"): r for r in grid}

    def complete(run: Any, status: str) -> None:
        # a trial that ended without ending its run: its last writes may have died with it
        result = by_trial.get(run.data.tags.get(tracking.TAG_TRIAL))
        if status != "killed" and result is not None and result.checkpoint is not None:
            try:
                added = complete_from_checkpoint(uri, run.info.run_id, result.checkpoint, cfg.metric, cfg.mode,
                                                 also=tuple(m for m, _ in cfg.objectives[1:]))
            except Exception as exc:  # noqa: BLE001 - the study's result does not depend on it
                echo(f"could not complete MLflow run {run.info.run_id} from its checkpoint: {_last_line(exc)}")
                return
            if added:
                echo(f"logged {added} epoch(s) of {run.info.run_name} that its trial could not (from its checkpoint)")

    tracking.settle_trial_runs(uri, outcome.experiment_id, outcome.parent_run_id, {
        t.trial_id: ("killed" if t.status == "incomplete" else t.status, t.error) for t in trials},
        before_end=complete)


def _fit_repeats(cfg: StudyConfig, outcome: StudyOutcome, storage_filesystem: Any | None, watch: BudgetWatch,
                 echo: Echo) -> list[Any]:
    """Train the repeats the search's ranking asks for (:mod:`s2study.study.repeats`), round by
    round; their trials go to ``outcome.repeats``; returns their Tune results."""
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    fs, folder = _fs_and_dir(cfg, storage_filesystem)
    state = _read_state(fs, folder) or {}
    rounds = list(state.get("repeats") or [])
    wanted = repeats.plan_points(outcome.trials, cfg.repeats.top_n, cfg.repeats.seeds, int(cfg.base.get("seed", 0)))
    missing = repeats.missing_points(wanted, rounds)
    if missing:
        rounds.append({"name": f"repeats-{len(rounds) + 1}", "points": missing})
        _write_state(fs, folder, {**state, "repeats": rounds})
    trainable = _trainable(cfg, outcome, run_repeat, sampled_of=_repeat_config)
    results: list[Any] = []
    for number, rnd in enumerate(rounds, 1):
        path, points = f"{experiment_path(cfg)}/{rnd['name']}", rnd["points"]
        if Tuner.can_restore(path, storage_filesystem=storage_filesystem):
            tuner = Tuner.restore(path, trainable, resume_errored=True, storage_filesystem=storage_filesystem)
            _update_callbacks(tuner, len(points), watch)
        else:
            tuner = Tuner(trainable, param_space={"repeat": tune.grid_search(points)},
                          tune_config=TuneConfig(metric=cfg.metric, mode=cfg.mode, reuse_actors=True,
                                                 max_concurrent_trials=cfg.max_concurrent),
                          run_config=RunConfig(
                              name=rnd["name"], storage_path=experiment_path(cfg),
                              storage_filesystem=storage_filesystem,
                              checkpoint_config=CheckpointConfig(num_to_keep=2),
                              failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
                              callbacks=[StudyProgress(cfg.metric, cfg.mode, cfg.max_epochs, len(points)),
                                         JsonLoggerCallback(), CSVLoggerCallback(), watch],
                              verbose=0))
        if number == len(rounds) or not missing:
            echo(f"repeats, round {number}: {len(points)} run(s) of the {cfg.repeats.top_n} best configurations "
                 f"(seeds per configuration: {cfg.repeats.seeds})")
        grid = _timed_fit(tuner, watch)
        trials = summarize(cfg, grid, outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id,
                           sampled_of=_repeat_config)
        by_id = {r.metrics.get("trial_id"): r for r in grid}
        for t in trials:
            t.repeat_of = by_id[t.trial_id].config["repeat"]["of"]
        outcome.repeats += trials
        results += list(grid)
        if len(grid) < len(points) or any(t.status == "incomplete" for t in trials):
            outcome.interrupted = True
            break
    if watch.active:
        tracking.log_metrics(outcome.tracking_uri, outcome.parent_run_id, watch.spent.as_metrics())
    tracking.drop_orphan_runs(outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id,
                              {t.trial_id for t in outcome.repeats}, repeats=True)
    _settle(cfg, outcome, outcome.repeats, results, echo)
    return results


def complete_from_checkpoint(uri: str, run_id: str, checkpoint: Any, metric: str, mode: str,
                             also: tuple[str, ...] = ()) -> int:
    """Log into ``run_id`` the epochs of a trial's latest Tune checkpoint (its ``history``)
    that the run lacks, and its best weights where the run has none; returns how many epochs.

    For a trial whose process died with writes still queued (a stopped trial's actor is
    killed 30 s after Tune lets it go), once no process of the trial is left.
    """
    from s2study.checkpoint import load_checkpoint

    with checkpoint.as_directory() as d:
        history = list(load_checkpoint(Path(d) / CHECKPOINT_FILE).get("history") or [])
        run = tracking.TrialRun.attach(uri, run_id, metric, mode)
        run.also = also
        before = run.last_step
        run.backfill(history)
        run.flush()
        if (Path(d) / BEST_FILE).is_file() and not tracking.has_artifact(uri, run_id, f"checkpoints/{BEST_FILE}"):
            tracking.log_artifact(uri, run_id, Path(d) / BEST_FILE, "checkpoints")
    return max(run.last_step - before, 0)


def _update_callbacks(tuner: Any, trials: int, watch: BudgetWatch) -> None:
    """A restored Tuner brings back the callbacks it was built with: give its
    :class:`StudyProgress` the (possibly raised) number of trials, and put this attempt's
    budget in place of the first attempt's."""
    try:
        callbacks = tuner._local_tuner.get_run_config().callbacks
    except AttributeError:  # another Tune layout: the progress lines keep the old total
        callbacks = None
    if callbacks is None:
        if watch.active:
            raise EnvironmentProblem("this Ray Tune does not let a resumed study change its callbacks; "
                                     "the budget cannot be applied (drop budget: or resume without it)")
        return
    for callback in callbacks:
        if isinstance(callback, StudyProgress):
            callback.total = trials
    callbacks[:] = [c for c in callbacks if not isinstance(c, BudgetWatch)] + [watch]


def _end(uri: str, experiment_id: str, parent: str, status: str, reason: str | None = None) -> None:
    """End the parent run and any trial run left RUNNING (no run stays RUNNING)."""
    child_status = "killed" if status != "failed" else "failed"
    tracking.close_running_children(uri, experiment_id, parent, child_status, reason or "study ended")
    tracking.finish_run(uri, parent, status, reason)


def summarize(cfg: StudyConfig, grid: Any, uri: str, experiment_id: str, parent: str,
              sampled_of: Callable[[dict], dict] = dict) -> list[TrialSummary]:
    """Trials ranked by their best metric value (never-reported trials last); ``sampled_of``
    reads a trial's configuration from its Tune config.

    The status comes from Tune (the trial runs may not have ended yet): ``failed``,
    ``finished``, ``stopped_early``, or ``incomplete`` for a study that was interrupted.
    """
    runs = {r.data.tags.get(tracking.TAG_TRIAL): r for r in tracking.child_runs(uri, experiment_id, parent)}
    out = []
    for result in grid:
        trial_id = result.metrics.get("trial_id", "?")
        df = result.metrics_dataframe
        values = [] if df is None or cfg.metric not in df else [v for v in df[cfg.metric].tolist() if math.isfinite(v)]
        epochs = int(result.metrics.get("training_iteration") or 0)
        run = runs.get(trial_id)
        if result.error is not None:
            status = "failed"
        elif result.metrics.get("done") and run is not None and run.data.tags.get(tracking.TAG_STATUS) == "failed":
            status = "failed"  # ended itself without raising (trainable: a GPU it cannot use), not retried
        elif result.metrics.get("done"):  # Tune sets it when a trial ends: ASHA stop or last epoch
            status = "finished" if epochs >= cfg.max_epochs else "stopped_early"
        else:
            status = "incomplete"
        best = tracking.best_of(values, cfg.mode)
        objectives = None
        if cfg.multi_objective and best is not None and all(m in df for m, _ in cfg.objectives):
            row = df[df[cfg.metric] == best].iloc[0]  # the best epoch: the first reaching the best value
            objectives = tuple(float(row[m]) for m, _ in cfg.objectives)
        out.append(TrialSummary(
            trial_id=trial_id, name=run.info.run_name if run else trial_id, status=status, epochs=epochs,
            best=best, last=values[-1] if values else None,
            sampled=sampled_of(result.config or {}), run_id=run.info.run_id if run else None,
            error=_last_line(result.error) if result.error else (
                run.data.tags.get(tracking.TAG_REASON) if status == "failed" else None),
            objectives=objectives,
        ))
    sign = -1 if cfg.mode == "max" else 1
    return sorted(out, key=lambda t: (t.best is None, sign * (t.best or 0.0)))


def _last_line(error: BaseException) -> str:
    """The line of a (Ray-wrapped) trial error that names it: ``CheckpointError: ...``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


# --------------------------------------------------------------------------- evaluation


def _evaluate_trial(checkpoint: Any, data: DataConfig, split: str, ks: tuple[int, ...], uri: str,
                    max_pairs: int | None = None, warp: int | None = None) -> dict[str, Any]:
    """Ray task: evaluate a trial's best weights and log the result into the trial's MLflow run.

    ``checkpoint`` is the trial's latest Tune checkpoint (its best weights, or the epoch state
    where it has none). The whole split at full size (up to ``max_pairs``), not the per-epoch
    validation's subset; with ``warp`` also on the warped protocol (``eval/warped/...``).
    """
    import tempfile

    import torch

    from s2study.checkpoint import load_checkpoint
    from s2study.evaluate import evaluate_checkpoint, format_table, write_outputs

    apply_share(*assigned_share())  # the trial's threads and GPU memory cap (a fractional GPU is shared)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    headline: dict[str, float] = {}
    tables = []
    with checkpoint.as_directory() as d:
        path = Path(d) / BEST_FILE if (Path(d) / BEST_FILE).is_file() else Path(d) / CHECKPOINT_FILE
        run_id = (load_checkpoint(path).get("extra") or {}).get("mlflow_run_id")
        split_name = resolve_eval_split(data, split)
        data = replace(data, max_val_pairs=None, val_max_size=None)
        for seed in (None, warp) if warp is not None else (None,):
            prefix = "eval/" if seed is None else "eval/warped/"
            with tempfile.TemporaryDirectory(prefix="s2study-eval-") as tmp:
                result = evaluate_checkpoint(path, data, split_name, ks=ks, device=device, max_pairs=max_pairs,
                                             warp=seed)
                tables.append(format_table(result))
                metrics = _eval_headline(result, prefix)
                headline.update(metrics)
                if run_id:
                    _log_evaluation(uri, run_id, result, metrics, write_outputs(result, Path(tmp)), prefix)
        if run_id:
            tracking.set_tags(uri, run_id, {"s2study.eval_split": f"{data.dataset}/{split}",
                                            "s2study.eval_pairs": len(result.pair_ids),
                                            "s2study.eval_protocols": ",".join(
                                                ["aligned"] + ([f"warped:{warp}"] if warp is not None else []))})
    return {"run_id": run_id, "metrics": headline, "table": "\n\n".join(tables)}


def _eval_headline(result: Any, prefix: str) -> dict[str, float]:
    """NC, NCM, CMR and repeatability at each K of a one-method result, named ``<prefix>ncm@3px_k1024``."""
    from s2study.metrics import metric_name

    method, out = result.methods[0], {}
    for k in result.ks:
        m = result.means[method][k]
        out.update({f"{prefix}{metric_name('nc', k)}": m.nc, f"{prefix}{metric_name('ncm', k, m.threshold)}": m.ncm,
                    f"{prefix}{metric_name('cmr', k, m.threshold)}": m.cmr,
                    f"{prefix}{metric_name('rep', k, m.threshold)}": m.repeatability})
    return out


def _log_evaluation(uri: str, run_id: str, result: Any, metrics: dict[str, float], files: dict[str, Path],
                    prefix: str) -> None:
    """An evaluation into its trial's run: metrics, CMR/NCM curves (step = threshold), tables, plots."""
    tracking.log_metrics(uri, run_id, metrics)
    method = result.methods[0]
    for k in result.ks:
        m = result.means[method][k]
        steps = [round(t) for t in m.thresholds]
        tracking.log_curve(uri, run_id, f"{prefix}cmr_curve_k{k}", steps, list(m.cmr_curve))
        tracking.log_curve(uri, run_id, f"{prefix}ncm_curve_k{k}", steps, list(m.ncm_curve))
    folder = prefix.rstrip("/")
    for name in ("json", "csv"):
        tracking.log_artifact(uri, run_id, files[name], folder)
    for name in ("cmr_curve", "ncm_curve"):
        tracking.log_artifact(uri, run_id, files[name], "plots" if folder == "eval" else "plots/warped")


def evaluation_choice(cfg: StudyConfig, outcome: StudyOutcome) -> list[TrialSummary]:
    """The trials to evaluate: the ``evaluate.top_n`` best, and with repeats every complete run
    of a repeated configuration (so each configuration's evaluation has its spread)."""
    if not cfg.evaluate.top_n:
        return []
    chosen = [t for t in outcome.trials if t.best is not None][: cfg.evaluate.top_n]
    repeated = {t.repeat_of for t in outcome.repeats}
    chosen += [t for t in outcome.trials if t.trial_id in repeated and t.status == "finished" and t not in chosen]
    return chosen + [t for t in outcome.repeats if t.best is not None]


def evaluate_trials(cfg: StudyConfig, chosen: list[TrialSummary], results: dict[str, Any], uri: str,
                    echo: Echo) -> dict[str, dict]:
    """Evaluate ``chosen`` trials (their Tune ``results`` by trial id) at ``evaluate.ks`` on
    ``evaluate.split``, as Ray tasks with the trial resources, all at once.

    Returns:
        trial id -> headline metrics (``eval/ncm@3px_k1024`` ...). A failed evaluation is
        reported and skipped; it does not fail the study.
    """
    import ray

    pending = {}
    for t in chosen:
        ckpt = results[t.trial_id].checkpoint  # the latest; it carries the trial's best weights
        if ckpt is None:
            continue
        data = trial_config(cfg.base, t.sampled, t.name).data
        res = trial_resources(cfg, t.sampled)
        task = ray.remote(_evaluate_trial).options(num_cpus=res.cpu, num_gpus=res.gpu, max_retries=0)
        pending[t.trial_id] = task.remote(ckpt, data, cfg.evaluate.split, cfg.evaluate.ks, uri,
                                          cfg.evaluate.max_pairs, cfg.evaluate.warp)
    out = {}
    for trial_id, ref in pending.items():
        try:
            res = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - one failed evaluation must not lose the study
            echo(f"evaluation of {trial_id} failed: {str(exc).strip().splitlines()[-1][:300]}")
            continue
        out[trial_id] = res["metrics"]
        echo(f"evaluation of {trial_id} ({cfg.evaluate.split} split):\n{res['table']}")
    return out


# --------------------------------------------------------------------------- summary


def trials_csv(cfg: StudyConfig, trials: list[TrialSummary]) -> str:
    """The ranked trial table as CSV (rank, trial, status, epochs, best, last, sampled values)."""
    keys = [s.key for s in cfg.space if s.sampled]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "trial_id", "name", "status", "epochs", f"best_{cfg.metric}", f"last_{cfg.metric}",
                *keys, "mlflow_run_id", "error"])
    for i, t in enumerate(trials, 1):
        w.writerow([i, t.trial_id, t.name, t.status, t.epochs, t.best, t.last,
                    *(t.sampled.get(k, "") for k in keys), t.run_id or "", t.error or ""])
    return buf.getvalue()


def log_study_summary(cfg: StudyConfig, outcome: StudyOutcome) -> None:
    """Parent run: ranked trial table, best trial (id, config, value), space."""
    uri, parent = outcome.tracking_uri, outcome.parent_run_id
    tracking.log_text(uri, parent, trials_csv(cfg, outcome.trials), "study/trials.csv")
    tracking.log_text(uri, parent, yaml.safe_dump({s.key: s.describe() for s in cfg.space}, sort_keys=False),
                      "study/space.yaml")
    best = next((t for t in outcome.trials if t.best is not None), None)
    if best is None:
        return
    info = {"trial_id": best.trial_id, "name": best.name, "mlflow_run_id": best.run_id,
            cfg.metric: best.best, "epochs": best.epochs, "sampled": best.sampled,
            "evaluation": outcome.evaluated.get(best.trial_id, {}),
            "config": config_to_dict(trial_config(cfg.base, best.sampled, best.name))}
    tracking.log_text(uri, parent, json.dumps(info, indent=1, default=str), "study/best_trial.json")
    tracking.set_tags(uri, parent, {"s2study.best_trial_id": best.trial_id, "s2study.best_run_id": best.run_id or ""})
    counts = {s: sum(t.status == s for t in outcome.trials) for s in ("finished", "stopped_early", "failed")}
    tracking.log_metrics(uri, parent, {f"best_{cfg.metric}": best.best, **{f"trials_{k}": v for k, v in counts.items()},
                                       **outcome.evaluated.get(best.trial_id, {})})
    if cfg.multi_objective:
        _log_pareto_front(cfg, outcome)
    rows = repeat_spreads(cfg, outcome)
    if rows:
        tracking.log_metrics(uri, parent, repeats.parent_metrics(rows))
        tracking.log_text(uri, parent, repeats.format_spreads(rows, cfg.metric, _sampled_keys(cfg)),
                          "study/repeats.txt")


def pareto_rows(cfg: StudyConfig, outcome: StudyOutcome) -> list[dict]:
    """The search's trials on the Pareto front of a multi-objective study (:mod:`pareto`)."""
    from s2study.study.pareto import front_rows

    keys = _sampled_keys(cfg)
    return front_rows([t.name for t in outcome.trials], [t.objectives for t in outcome.trials],
                      [{k: t.sampled.get(k) for k in keys} for t in outcome.trials], cfg.objectives)


def _log_pareto_front(cfg: StudyConfig, outcome: StudyOutcome) -> None:
    """The front as ``study/pareto_front.csv`` and, for two objectives, ``plots/pareto_front.png``."""
    import tempfile

    from s2study.plots import plot_pareto_front
    from s2study.study.pareto import pareto_front

    uri, parent = outcome.tracking_uri, outcome.parent_run_id
    rows = pareto_rows(cfg, outcome)
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    tracking.log_text(uri, parent, buf.getvalue(), "study/pareto_front.csv")
    tracking.log_metrics(uri, parent, {"pareto_front_trials": len(rows)})
    points = [t.objectives for t in outcome.trials if t.objectives is not None]
    if len(cfg.objectives) == 2 and points:
        with tempfile.TemporaryDirectory(prefix="s2study-pareto-") as tmp:
            path = plot_pareto_front(points, pareto_front(points, [m for _, m in cfg.objectives]),
                                     (cfg.objectives[0][0], cfg.objectives[1][0]), Path(tmp) / "pareto_front.png",
                                     f"{cfg.name}: Pareto front")
            tracking.log_artifact(uri, parent, path, "plots")


def _sampled_keys(cfg: StudyConfig) -> list[str]:
    return [s.key for s in cfg.space if s.sampled]


def repeat_spreads(cfg: StudyConfig, outcome: StudyOutcome) -> list[repeats.Spread]:
    """Mean and spread per repeated configuration: its complete search run and its repeats."""
    repeated = {t.repeat_of for t in outcome.repeats}
    originals = {t.trial_id: (t.name, t.sampled) for t in outcome.trials if t.trial_id in repeated}
    members = [repeats.Member(t.repeat_of or t.trial_id, t.best, outcome.evaluated.get(t.trial_id, {}))
               for t in [*outcome.trials, *outcome.repeats]
               if t.status == "finished" and (t.repeat_of or t.trial_id) in originals]
    return repeats.spreads(members, originals, cfg.metric)


def register_best_trial(cfg: StudyConfig, outcome: StudyOutcome, echo: Echo) -> int | None:
    """The best trial's checkpoint as a new version of model ``register.name``; its version."""
    from s2study.model_registry import register_best

    best = next((t for t in outcome.trials if t.best is not None and t.run_id), None)
    if best is None:
        echo(f"no trial reported {cfg.metric}; nothing registered as {cfg.register.name}")
        return None
    evaluation = {tracking.metric_key(k): v for k, v in outcome.evaluated.get(best.trial_id, {}).items()}
    tags = {"s2study.study": cfg.name, "s2study.parent_run_id": outcome.parent_run_id,
            "s2study.trial_id": best.trial_id, cfg.metric: best.best, **evaluation}
    from mlflow.exceptions import MlflowException

    try:
        version = register_best(outcome.tracking_uri, cfg.register.name, best.run_id, outcome.parent_run_id, tags)
    except MlflowException as exc:  # the study itself is complete and recorded: say so, go on
        echo(f"could not register {best.name} as model {cfg.register.name}: {_last_line(exc)}")
        return None
    tracking.set_tags(outcome.tracking_uri, outcome.parent_run_id,
                      {"s2study.registered_model": f"models:/{cfg.register.name}/{version}"})
    echo(f"registered {best.name} as models:/{cfg.register.name}/{version}")
    return version


def summary_text(cfg: StudyConfig, outcome: StudyOutcome) -> str:
    """The final table printed after a study."""
    from s2study.report import format_trials

    rows = [{"trial": t.name, "status": t.status, "epochs": t.epochs, "best": t.best,
             **{k: t.sampled.get(k) for k in (s.key for s in cfg.space if s.sampled)}} for t in outcome.trials]
    failures = "".join(f"\n{t.name} failed: {t.error}" for t in [*outcome.trials, *outcome.repeats]
                       if t.status == "failed")
    spread = repeat_spreads(cfg, outcome)
    table = "\n\n" + repeats.format_spreads(spread, cfg.metric, _sampled_keys(cfg)) if outcome.repeats else ""
    if cfg.multi_objective:
        from s2study.study.pareto import format_front

        table += "\n\n" + format_front(pareto_rows(cfg, outcome), cfg.objectives)
    return (f"\nstudy {cfg.name}: {len(outcome.trials)} trials; MLflow {outcome.tracking_uri} "
            f"(parent run {outcome.parent_run_id})\n" + format_trials(rows, cfg.metric) + table + failures)
