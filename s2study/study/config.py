"""Study files: the typed, validated :class:`StudyConfig` and its loader.

A study file is YAML with these top-level keys (all but ``space`` optional)::

    name: lambda-r2d2-roadscene        # default: the file name without .yaml
    base:                              # the TrainConfig every trial starts from:
      preset: r2d2-roadscene           #   a preset name or a train YAML path (optional),
      data: {max_val_pairs: 20}        #   then TrainConfig keys merged on top of it
    space:                             # dotted TrainConfig keys -> specs (study/space.py)
      lambda_ssl: {type: float, low: 0.0, high: 1.2}
    trials: 16                         # Tune num_samples
    max_concurrent: 4                  # default: as many as the resources allow
    resources: {cpu: 4, gpu: 1}        # per trial; gpu in [0, 1]: a fraction (0.25) shares one GPU
    resources_when:                    # per-trial resources by configuration (first match wins)
      - {when: {method.name: r2d2}, cpu: 2, gpu: 0.5}
    asha: {max_epochs: 30, grace_period: 3, reduction_factor: 2}   # enabled: false = no early stop
    metric: val_ncm                    # or a list: [val_ncm, val_cmr] (a Pareto front; ASHA on the first)
    mode: max                          # with a metric list, a mode per metric: [max, max]
    sampler: {name: tpe, seed: 0, n_startup_trials: 4}  # tpe|random|gp|cmaes|grid|bruteforce|nsga2
    storage: ./s2study_results         # Ray storage_path: a local folder or s3://bucket/prefix
    tracking: {uri: sqlite:///mlflow.db, experiment: my-study}
    evaluate: {top_n: 1, split: auto, ks: [1024, 2048, 4096], warp: 0}   # auto: test, else val;
                                       # warp: also on warped pairs (seed 0)
    failure: {max_failures: 2}
    system_metrics: {interval_s: 15}   # MLflow system/* metrics per trial run; 0: off
    optuna: {storage: postgresql://user@db/optuna}   # default: <storage>/<name>/optuna.db
    budget: {wall: 8h, gpu_hours: 40}  # stop cleanly (resumable) once spent
    register: {name: s2-r2d2-roadscene}  # the best checkpoint as a version of this MLflow model
    warm_start: {study: lambda-v1}     # the sampler starts from that study's finished trials
    repeats: {top_n: 3, seeds: 3}      # after the search: the 3 best configurations, 3 seeds each
    enqueue:                           # configurations to run first (space keys -> values)
      - {lambda_ssl: 0.4}

``base: r2d2-roadscene`` is shorthand for ``base: {preset: r2d2-roadscene}``. Each trial trains
for ``asha.max_epochs`` epochs (it overrides the base's ``epochs``; default: the base's).
Relative paths (``storage``, a sqlite tracking URI, ``base.data.root``, a
``base.method.weights`` file) are resolved against the current directory at load time, so
nothing depends on the directory a Ray trial runs in.

Everything is checked before Ray starts: unknown keys (with a suggestion), types, ranges,
space keys against the TrainConfig schema, and every corner of the space (each categorical
combination with all ranges at their low and at their high ends) must give a valid
TrainConfig, including method parameters that the sampled method does not have.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s2study.config.load import (
    apply_overrides,
    build_dataclass,
    config_to_dict,
    flatten,
    preset_names,
    read_yaml,
    resolve_config_path,
    train_config_from_dict,
)
from s2study.errors import ConfigError, EnvironmentProblem
from s2study.registry import unknown_name_message
from s2study.resolver import is_weights_name
from s2study.study.space import (
    ParamSpec,
    assignments,
    corner_cases,
    grid_size,
    grid_values,
    overlay,
    parse_space,
    parse_when,
)

METRICS = ("val_ncm", "val_nc", "val_cmr", "val_rep", "loss/total")
SAMPLERS = ("tpe", "random", "gp", "cmaes", "grid", "bruteforce", "nsga2")
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "nsga2", "random", "grid", "bruteforce")  # Optuna's with several objectives
EVAL_SPLITS = ("auto", "test", "val")  # auto: test where the dataset has one, else val
DEFAULT_STORAGE = "s2study_results"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial asks Ray for: CPU cores and at most one GPU, or a share of one.

    The trainer uses one device, so ``gpu`` is in [0, 1]: 1 is a whole GPU, a fraction such
    as 0.25 shares one GPU between trials (each capped to its share of the GPU's memory,
    see :func:`s2study.study.trainable.limit_gpu_memory`).
    """

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if not self.cpu > 0:
            raise ValueError(f"cpu: must be > 0, got {self.cpu}")
        if not 0 <= self.gpu <= 1:
            raise ValueError(f"gpu: must be in [0, 1], got {self.gpu:g}; the trainer uses one device, so a "
                             "trial takes one GPU (1) or a share of one (e.g. 0.5 or 0.25)")


@dataclass(frozen=True)
class ResourceRule:
    """``resources_when`` entry: the resources of the trials whose configuration meets every
    condition of ``when`` (the conditions of the space's ``when:``)."""

    when: tuple[tuple[str, tuple], ...]
    resources: ResourcesConfig

    def holds(self, values: dict[str, Any]) -> bool:
        return all(values.get(k) in allowed for k, allowed in self.when)


def parse_resources_when(raw: Any, default: ResourcesConfig, space: tuple[ParamSpec, ...],
                         base_flat: dict[str, Any], source: str) -> tuple[ResourceRule, ...]:
    """``resources_when: [{when: {KEY: VALUE or [VALUES]}, cpu: N, gpu: G}, ...]``; cpu and gpu
    default to ``resources``."""
    if raw is None or raw == [] or raw == ():
        return ()
    shape = "expected a list of {when: {KEY: VALUE}, cpu: N, gpu: G}"
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{source}: resources_when: {shape}, got {raw!r}")
    rules = []
    for i, item in enumerate(raw):
        where = f"resources_when[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("when"), dict) or not item["when"]:
            raise ConfigError(f"{source}: {where}: {shape}, got {item!r}")
        rest = {k: v for k, v in item.items() if k != "when"}
        if not rest:
            raise ConfigError(f"{source}: {where}: give cpu and/or gpu for the trials it matches")
        resources = build_dataclass(ResourcesConfig, {"cpu": default.cpu, "gpu": default.gpu, **rest},
                                    source, prefix=f"{where}.")
        rules.append(ResourceRule(parse_when(item["when"], source, where, list(space), base_flat), resources))
    return tuple(rules)


def trial_resources(cfg: StudyConfig, sampled: dict[str, Any]) -> ResourcesConfig:
    """What a trial with these sampled values asks Ray for: the first ``resources_when``
    entry that matches, else ``resources``."""
    values = {**cfg.base_flat, **sampled}
    return next((r.resources for r in cfg.resources_when if r.holds(values)), cfg.resources)


def resource_sets(cfg: StudyConfig) -> list[ResourcesConfig]:
    """Every per-trial request the space can reach (over its corners), ``resources`` first."""
    found = [trial_resources(cfg, c) for c in corner_cases(cfg.space, cfg.base_flat)] or [cfg.resources]
    return sorted(set(found), key=lambda r: (r != cfg.resources, r.gpu, r.cpu))


@dataclass(frozen=True)
class AshaConfig:
    """ASHA early stopping on the study metric, one rung step per epoch.

    ``max_epochs`` is every trial's epoch budget (None: the base config's ``epochs``).
    """

    enabled: bool = True
    max_epochs: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs: must be >= 1, got {self.max_epochs}")
        if self.grace_period < 1:
            raise ValueError(f"grace_period: must be >= 1, got {self.grace_period}")
        if self.max_epochs is not None and self.grace_period > self.max_epochs:
            raise ValueError(f"grace_period: {self.grace_period} is more than max_epochs {self.max_epochs}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor: must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class SamplerConfig:
    """The Optuna sampler; ``n_startup_trials`` (tpe, gp, cmaes) defaults to a quarter of the trials."""

    name: str = "tpe"
    seed: int | None = 0
    n_startup_trials: int | None = None

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError("name: " + unknown_name_message("sampler", self.name, list(SAMPLERS)))
        if self.n_startup_trials is not None:
            if self.n_startup_trials < 0:
                raise ValueError(f"n_startup_trials: must be >= 0, got {self.n_startup_trials}")
            if self.name not in ("tpe", "gp", "cmaes"):
                raise ValueError(f"n_startup_trials: not used by sampler {self.name!r} (only tpe, gp, cmaes)")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow: tracking URI and experiment (default: the study name).

    The URI defaults to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.
    """

    uri: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class EvaluateConfig:
    """Post-study evaluation of the ``top_n`` best trials on ``split`` at each K in ``ks``.

    The evaluation reads the whole split at full image size, whatever ``base.data`` caps for
    the per-epoch validation (``max_val_pairs``, ``val_max_size``); ``max_pairs`` caps it
    (for quick studies such as the smoke study). With ``warp`` (a seed) each trial is also
    evaluated on the warped protocol (:mod:`s2study.data.warp`), logged as ``eval/warped/...``.
    """

    top_n: int = 1
    split: str = "auto"
    ks: Any = (1024, 2048, 4096)
    max_pairs: int | None = None
    warp: int | None = None

    def __post_init__(self) -> None:
        if self.top_n < 0:
            raise ValueError(f"top_n: must be >= 0 (0 skips evaluation), got {self.top_n}")
        if self.split not in EVAL_SPLITS:
            raise ValueError("split: " + unknown_name_message("split", self.split, list(EVAL_SPLITS)))
        ks = self.ks
        if not isinstance(ks, (list, tuple)) or not ks or not all(
            isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks
        ):
            raise ValueError(f"ks: {ks!r} is not allowed; expected a non-empty list of positive integers")
        object.__setattr__(self, "ks", tuple(ks))
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"max_pairs: must be >= 1 (or null for the whole split), got {self.max_pairs}")
        if self.warp is not None and self.warp < 0:
            raise ValueError(f"warp: must be a non-negative seed (or null: aligned pairs only), got {self.warp}")


@dataclass(frozen=True)
class FailureSettings:
    """How often Tune retries a failed trial (from its last checkpoint)."""

    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.max_failures < 0:
            raise ValueError(f"max_failures: must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class SystemMetricsConfig:
    """MLflow system metrics (``system/cpu_utilization_percentage``, memory, and with
    ``nvidia-ml-py`` and a driver ``system/gpu_0_utilization_percentage`` and GPU memory),
    sampled in each trial's process every ``interval_s`` seconds into its run; 0 turns them off.
    """

    interval_s: float = 15.0

    def __post_init__(self) -> None:
        if not (self.interval_s == 0 or 1 <= self.interval_s <= 3600):
            raise ValueError(f"interval_s: must be 0 (off) or in [1, 3600] seconds, got {self.interval_s:g}")


@dataclass(frozen=True)
class BudgetConfig:
    """Stop the study cleanly (resumable) once spent (see :mod:`s2study.study.budget`).

    ``wall``: study time over every attempt (``8h``, ``90m``, ``1h30m``, ``2d``, seconds);
    ``gpu_hours``: the trials' training time x their GPU share, summed.
    """

    wall: Any = None
    gpu_hours: float | None = None

    def __post_init__(self) -> None:
        from s2study.study.budget import parse_duration

        if self.wall is not None:
            try:
                parse_duration(self.wall)
            except ValueError as exc:
                raise ValueError(f"wall: {exc}") from None
        if self.gpu_hours is not None and not self.gpu_hours > 0:
            raise ValueError(f"gpu_hours: must be > 0, got {self.gpu_hours:g}")

    @property
    def wall_s(self) -> float | None:
        from s2study.study.budget import parse_duration

        return parse_duration(self.wall) if self.wall is not None else None

    @property
    def gpu_s(self) -> float | None:
        return self.gpu_hours * 3600 if self.gpu_hours is not None else None


@dataclass(frozen=True)
class RegisterConfig:
    """Register the best trial's checkpoint as a new version of MLflow model ``name``
    (:mod:`s2study.model_registry`); None: no registration."""

    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not _NAME.match(str(self.name)):
            raise ValueError(f"name: {self.name!r} is not allowed; use letters, digits, '.', '_' and '-'")


@dataclass(frozen=True)
class WarmStartConfig:
    """Seed the sampler with the finished trials of an earlier study (``study``, in the
    tracking store ``tracking``, default this study's) whose parameters fit this space."""

    study: str | None = None
    tracking: str | None = None


@dataclass(frozen=True)
class RepeatsConfig:
    """After the search, run the ``top_n`` best configurations again until each has ``seeds``
    runs that trained every epoch, with seeds ``seed + 1``, ``seed + 2``, ... (the search's
    own run counts where it was not stopped early); ``top_n`` 0: off
    (:mod:`s2study.study.repeats`)."""

    top_n: int = 0
    seeds: int = 3

    def __post_init__(self) -> None:
        if self.top_n < 0:
            raise ValueError(f"top_n: must be >= 0 (0: no repeats), got {self.top_n}")
        if self.seeds < 2:
            raise ValueError(f"seeds: must be >= 2 (runs per configuration, a spread needs two), got {self.seeds}")


@dataclass(frozen=True)
class OptunaConfig:
    """Where the study's Optuna study (each trial's configuration and value) is kept.

    ``storage``: an SQLAlchemy URL (``sqlite:///optuna.db``, ``postgresql://user@host/db``,
    ``mysql+pymysql://...``) that ``optuna-dashboard`` opens, or ``memory`` (only inside Tune's
    searcher state). Default: ``sqlite:///<storage>/<name>/optuna.db`` when the Ray storage is
    a local folder, else ``memory`` (give a database URL on clusters).
    """

    storage: str | None = None


def parse_objectives(metric: Any, mode: Any) -> tuple[tuple[str, str], ...]:
    """``metric`` (a name or a list of names) with ``mode`` (one, or one per metric) as
    ``((metric, mode), ...)``.

    Raises:
        ValueError: an unknown metric or mode, a repeated metric, a mode list of another length.
    """
    metrics = list(metric) if isinstance(metric, (list, tuple)) else [metric]
    modes = list(mode) if isinstance(mode, (list, tuple)) else [mode]
    if not metrics:
        raise ValueError("metric: an empty list; name one metric or several (e.g. [val_ncm, val_cmr])")
    for m in metrics:
        if not isinstance(m, str) or m not in METRICS:
            raise ValueError("metric: " + unknown_name_message("metric", str(m), list(METRICS)))
    if len(set(metrics)) < len(metrics):
        raise ValueError(f"metric: {metrics} names a metric twice")
    if len(modes) != len(metrics):
        raise ValueError(f"mode: {len(metrics)} metric(s) {metrics} need {len(metrics)} mode(s) (max or min, in "
                         f"the same order), got {modes}")
    for m in modes:
        if m not in ("max", "min"):
            raise ValueError(f"mode: {m!r} is not allowed; one of max, min")
    return tuple(zip(metrics, modes))


@dataclass(frozen=True)
class StudyConfig:
    """A validated study.

    Attributes:
        name: study name: Ray experiment folder and default MLflow experiment.
        base: the resolved base TrainConfig as a nested mapping (defaults filled in,
            ``epochs`` = ``asha.max_epochs``, paths absolute).
        space: the search space, in file order.
        trials: number of trials (Tune ``num_samples``).
        max_concurrent: trials running at once (None: as many as resources allow).
        resources_when: per-trial resources by configuration (:class:`ResourceRule`, first match).
        resources / asha / sampler / tracking / evaluate / failure / system_metrics / optuna /
            budget / register / warm_start / repeats: the sections above (``optuna.storage``: None for the
            default, ``memory`` or a URL).
        enqueue: configurations Optuna evaluates first, each ``{space key: value}``.
        metric / mode: the study's (first) metric: what ASHA stops on, the best checkpoint,
            the ranking.
        objectives: ``((metric, mode), ...)``: what Optuna optimises; several give a
            multi-objective study (each trial's values at its best epoch by ``metric``).
        storage: absolute local folder or a URI (``s3://...``) for Ray's experiment state.
        source: the study file (for messages).
    """

    name: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    space: tuple[ParamSpec, ...] = ()
    trials: int = 10
    max_concurrent: int | None = None
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    resources_when: Any = ()
    asha: AshaConfig = field(default_factory=AshaConfig)
    metric: Any = "val_ncm"
    mode: Any = "max"
    objectives: Any = ()
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    storage: str | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    failure: FailureSettings = field(default_factory=FailureSettings)
    system_metrics: SystemMetricsConfig = field(default_factory=SystemMetricsConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    repeats: RepeatsConfig = field(default_factory=RepeatsConfig)
    enqueue: Any = ()
    source: str = ""

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials: must be >= 1, got {self.trials}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1 (or null), got {self.max_concurrent}")
        if not self.objectives or isinstance(self.metric, (list, tuple)):
            object.__setattr__(self, "objectives", parse_objectives(self.metric, self.mode))
        object.__setattr__(self, "metric", self.objectives[0][0])
        object.__setattr__(self, "mode", self.objectives[0][1])

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def max_epochs(self) -> int:
        return int(self.base["epochs"])

    @property
    def base_flat(self) -> dict[str, Any]:
        return flatten(self.base)


_INTERNAL = ("base", "space", "source")


def load_study(
    path: str | Path, overrides: list[str] | None = None, trials: int | None = None,
    cwd: Path | None = None,
) -> StudyConfig:
    """Read, override and validate a study file.

    Args:
        path: the study YAML.
        overrides: ``KEY=VALUE`` items on the study's keys (``asha.max_epochs=3``,
            ``base.lambda_ssl=0.2``, ``space.lambda_ssl.high=1.0``).
        trials: overrides ``trials``.
        cwd: directory relative paths resolve against (default: the current one).

    Raises:
        ConfigError: the message names the file, the key, the value and what is allowed.
    """
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw.get("base"), str):
        raw["base"] = {"preset": raw["base"]}
    raw = apply_overrides(raw, overrides)
    if trials is not None:
        raw["trials"] = trials
    return study_from_dict(raw, source=str(path), study_dir=path.resolve().parent, cwd=cwd)


def study_from_dict(raw: dict[str, Any], source: str, study_dir: Path | None = None,
                    cwd: Path | None = None) -> StudyConfig:
    """Validate a study mapping (see :func:`load_study`)."""
    cwd = (cwd or Path.cwd()).resolve()
    study_dir = study_dir or cwd
    raw = dict(raw)
    for key in ("source", "objectives"):
        if key in raw:
            raise ConfigError(f"{source}: {key}: unknown key {key!r}")
    raw_base, raw_space = raw.pop("base", None), raw.pop("space", None)
    cfg = build_dataclass(StudyConfig, raw, source)
    name = cfg.name or Path(source).stem
    if not _NAME.match(name):
        raise ConfigError(f"{source}: name: {name!r} is not allowed; use letters, digits, '.', '_' and '-'")

    base = _resolve_base(raw_base, source, study_dir, cwd)
    max_epochs = cfg.asha.max_epochs or int(base.get("epochs", 10))
    base["epochs"] = max_epochs
    train = train_config_from_dict(base, source=f"{source}: base")
    base = config_to_dict(train)
    if cfg.asha.grace_period > max_epochs:
        raise ConfigError(f"{source}: asha.grace_period: {cfg.asha.grace_period} is more than the "
                          f"{max_epochs} epochs each trial trains")
    space = parse_space(raw_space, source, flatten(base))
    _check_corners(space, base, source)
    cfg = dataclasses.replace(cfg, base=base, space=space, resources_when=parse_resources_when(
        cfg.resources_when, cfg.resources, space, flatten(base), source))
    _check_cuda_has_gpu(cfg, source)
    _check_sampler(cfg, space, source)
    if cfg.repeats.top_n and any(s.key == "seed" for s in space):
        raise ConfigError(f"{source}: repeats: the space samples seed; repeats vary the seed themselves "
                          "(drop seed from the space, or repeats)")
    if cfg.budget.gpu_hours is not None and not any(r.gpu for r in resource_sets(cfg)):
        raise ConfigError(f"{source}: budget.gpu_hours: {cfg.budget.gpu_hours:g}, but the trials use no GPU "
                          "(resources.gpu: 0); use budget.wall, or give the trials a GPU")
    storage = resolve_storage(cfg.storage, cwd, source)
    tracking_uri = _resolve_tracking_uri(cfg.tracking.uri, cwd, source)
    warm = cfg.warm_start
    if warm.tracking is not None and warm.study is None:
        raise ConfigError(f"{source}: warm_start.study: missing; name the earlier study to start from")
    if warm.study is not None:
        warm = WarmStartConfig(warm.study, _resolve_tracking_uri(warm.tracking, cwd, source, "warm_start.tracking")
                               if warm.tracking else tracking_uri)
    return dataclasses.replace(
        cfg,
        enqueue=parse_enqueue(cfg.enqueue, space, base, source),
        optuna=OptunaConfig(resolve_optuna_storage(cfg.optuna.storage, cwd, source)),
        name=name,
        base=base,
        space=space,
        asha=dataclasses.replace(cfg.asha, max_epochs=max_epochs),
        storage=storage,
        warm_start=warm,
        tracking=TrackingConfig(
            uri=tracking_uri,
            experiment=cfg.tracking.experiment or name,
        ),
        source=source,
    )


def _resolve_base(raw: Any, source: str, study_dir: Path, cwd: Path) -> dict[str, Any]:
    """The base mapping: the preset's keys with the study's keys merged on top."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: base: {raw!r} is not allowed; expected a preset name or a mapping "
                          "of TrainConfig keys (optionally with preset: NAME)")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    data: dict[str, Any] = {}
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"{source}: base.preset: {preset!r} is not allowed; expected a preset name or path")
        try:
            data = read_yaml(_preset_path(preset, study_dir))
        except ConfigError as exc:
            raise ConfigError(f"{source}: base.preset: {exc}") from None
        except (OSError, ValueError):  # a name no file can have (NUL byte, too long)
            raise ConfigError(f"{source}: base.preset: "
                              + unknown_name_message("preset", preset, preset_names())) from None
    data = _merge(data, raw)
    _absolute_paths(data, cwd, source)
    return data


def _preset_path(preset: str, study_dir: Path) -> Path:
    """A file next to the study, else a train YAML path or a shipped preset name."""
    local = study_dir / preset
    return local if local.is_file() else resolve_config_path(preset)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _absolute_paths(base: dict[str, Any], cwd: Path, source: str) -> None:
    data, method = base.get("data"), base.get("method")
    if isinstance(data, dict) and isinstance(data.get("root"), str):
        data["root"] = _absolute(data["root"], cwd, f"{source}: base.data.root")
    if isinstance(method, dict) and isinstance(method.get("weights"), str) and not is_weights_name(method["weights"]):
        method["weights"] = _absolute(method["weights"], cwd, f"{source}: base.method.weights")


def _absolute(path: str, cwd: Path, where: str) -> str:
    """``path`` (``~`` expanded) resolved against ``cwd``.

    Raises:
        ConfigError: ``where`` and the path, for a NUL byte, an unknown ``~user`` or a name
            the filesystem refuses.
    """
    try:
        return str((cwd / Path(path).expanduser()).resolve())
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{where}: {path!r} is not a usable path ({exc})") from None


def resolve_storage(storage: str | None, cwd: Path, source: str = "") -> str:
    """An absolute local folder, or a URI such as ``s3://bucket/prefix`` unchanged.

    Raises:
        ConfigError: a local path that cannot be resolved (NUL byte, unknown ``~user``).
    """
    if storage and "://" in storage and not storage.startswith("file://"):
        return storage
    local = (storage or DEFAULT_STORAGE).removeprefix("file://")
    return _absolute(local, cwd, f"{source}: storage" if source else "storage")


OPTUNA_SCHEMES = ("sqlite", "postgresql", "mysql")


def resolve_optuna_storage(url: str | None, cwd: Path, source: str) -> str | None:
    """``optuna.storage`` checked: None (the default, decided when the study runs:
    :func:`s2study.study.optuna_store.storage_url`), ``memory`` or a database URL (a relative
    sqlite path made absolute).

    Raises:
        ConfigError: an in-memory sqlite URL or a scheme Optuna's RDB storage does not take.
    """
    if url is None or url == "memory":
        return url
    where = f"{source}: optuna.storage"
    scheme = url.split("://", 1)[0].split("+")[0] if "://" in url else ""
    if scheme not in OPTUNA_SCHEMES:
        raise ConfigError(f"{where}: {url!r} is not allowed; use memory or a database URL "
                          "(sqlite:///FILE, postgresql://USER@HOST/DB, mysql://USER@HOST/DB)")
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if url.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            raise ConfigError(f"{where}: {url!r} is not allowed; use a file (sqlite:///path/to/optuna.db) "
                              "or memory")
        return f"sqlite:///{_absolute(path, cwd, where)}"
    return url


def parse_enqueue(raw: Any, space: tuple[ParamSpec, ...], base: dict[str, Any], source: str) -> tuple[dict, ...]:
    """The ``enqueue:`` list: each item maps sampled space keys to values that the space can
    give (keys left out are sampled), and builds a valid TrainConfig.

    Raises:
        ConfigError: naming the item, the key, the value and what the space allows.
    """
    if raw in (None, ()):
        return ()
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{source}: enqueue: {raw!r} is not allowed; expected a list of mappings "
                          "from space keys to values, e.g. [{lambda_ssl: 0.4}]")
    specs = {s.key: s for s in space if s.sampled}
    out = []
    for i, item in enumerate(raw):
        where = f"{source}: enqueue[{i}]"
        if not isinstance(item, dict) or not item:
            raise ConfigError(f"{where}: {item!r} is not allowed; expected a mapping from space keys to values")
        for key, value in item.items():
            if key not in specs:
                raise ConfigError(f"{where}.{key}: " + unknown_name_message("sampled space key", str(key),
                                                                             list(specs)))
            try:
                specs[key].check_value(value)
            except ValueError as exc:
                raise ConfigError(f"{where}.{key}: {exc}") from None
        # the keys left out at their low ends (as the corner checks set them), for the conditions
        values = assignments(space, flatten(base), {**{s.key: s.extremes()[0] for s in space}, **item})
        inactive = sorted(set(item) - set(values))
        if inactive:
            raise ConfigError(f"{where}.{inactive[0]}: not sampled in this configuration (its when: "
                              "condition does not hold); leave it out")
        train_config_from_dict(overlay(base, values), source=where)
        out.append(dict(item))
    return tuple(out)


def _resolve_tracking_uri(uri: str | None, cwd: Path, source: str, key: str = "tracking.uri") -> str:
    """An absolute tracking URI: ``uri``, else ``$MLFLOW_TRACKING_URI``, else ``<cwd>/mlflow.db``."""
    from s2study.study.tracking import normalize_tracking_uri

    try:
        return normalize_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or None, cwd)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {key}: {exc}") from None


def _check_corners(space: tuple[ParamSpec, ...], base: dict[str, Any], source: str) -> None:
    """Every corner of the space builds a valid TrainConfig (method parameters included)."""
    base_flat = flatten(base)
    for values in corner_cases(space, base_flat):
        combo = ", ".join(f"{k}={v!r}" for k, v in values.items())
        train_config_from_dict(overlay(base, values), source=f"{source}: space (at {combo})")


def cuda_corners(space: tuple[ParamSpec, ...], base: dict[str, Any]) -> list[str]:
    """The corners of the space (``key=value, ...``; ``base`` for none) that train on ``device: cuda``."""
    out = []
    for values in corner_cases(space, flatten(base)):
        if overlay(base, values).get("device") == "cuda":
            out.append(", ".join(f"{k}={v!r}" for k, v in values.items()) or "base")
    return out


def _check_cuda_has_gpu(cfg: StudyConfig, source: str) -> None:
    """A trial on ``device: cuda`` must ask Ray for a GPU, else it runs where there is none."""
    base_flat = cfg.base_flat
    for values in corner_cases(cfg.space, base_flat):
        if overlay(cfg.base, values).get("device") == "cuda" and trial_resources(cfg, values).gpu == 0:
            at = ", ".join(f"{k}={v!r}" for k, v in values.items()) or "base"
            raise ConfigError(f"{source}: resources.gpu: 0, but device: 'cuda' is requested (at {at}); "
                              "set resources.gpu (e.g. 1 or 0.25) or use device: auto or cpu")


def _check_sampler(cfg: StudyConfig, space: tuple[ParamSpec, ...], source: str) -> None:
    name = cfg.sampler.name
    if cfg.multi_objective and name not in MULTI_OBJECTIVE_SAMPLERS:
        raise ConfigError(f"{source}: sampler.name: {name!r} optimises one metric, and metric lists "
                          f"{len(cfg.objectives)}; use one of {', '.join(MULTI_OBJECTIVE_SAMPLERS)}")
    if name == "grid":
        grid_values(space, source)
        if cfg.trials > grid_size(space):
            raise ConfigError(f"{source}: trials: {cfg.trials} is more than the {grid_size(space)} "
                              "combinations of the grid; each combination runs once")
    if name == "bruteforce":
        for s in space:
            if s.kind == "float" and s.step is None:
                raise ConfigError(f"{source}: space.{s.key}: sampler 'bruteforce' needs a step on float ranges")
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise EnvironmentProblem("sampler 'cmaes' needs the cmaes package: pip install cmaes")
    if name == "gp" and importlib.util.find_spec("scipy") is None:
        raise EnvironmentProblem("sampler 'gp' needs scipy: pip install scipy")
    if name != "grid" and not any(s.sampled for s in space):
        raise ConfigError(f"{source}: space: nothing is sampled; add at least one float, int or categorical spec")


def local_node_resources() -> list[dict[str, float]]:
    """This machine as a one-node cluster: ``[{"CPU": cores, "GPU": CUDA devices}]``."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def check_resources(cfg: StudyConfig, nodes: list[dict[str, float]], where: str = "this machine") -> None:
    """At least one node can hold one trial of every request the space reaches (Ray never
    splits a trial's request across nodes; :func:`resource_sets`).

    Args:
        nodes: per-node totals such as ``{"CPU": 16, "GPU": 1}`` (``ray.nodes()`` resources,
            or :func:`local_node_resources`).

    Raises:
        ConfigError: naming ``resources`` (or the ``resources_when`` entry) and what the nodes offer.
    """
    for res in resource_sets(cfg):
        need = {"CPU": res.cpu, "GPU": res.gpu}
        if any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
            continue
        offer = ", ".join(f"{{cpu: {n.get('CPU', 0):g}, gpu: {n.get('GPU', 0):g}}}" for n in nodes) or "none"
        key = "resources" if res == cfg.resources else (
            f"resources_when[{next(i for i, r in enumerate(cfg.resources_when) if r.resources == res)}]")
        raise ConfigError(
            f"{cfg.source}: {key}: {{cpu: {res.cpu:g}, gpu: {res.gpu:g}}} per trial "
            f"cannot be met; no node of {where} offers that (nodes: {offer}); lower resources or use "
            "--address to run on a cluster"
        )
