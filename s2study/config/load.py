"""YAML (and ``--set key=value`` overrides) onto the typed config schema, strictly.

Every rejection is a :class:`~s2study.errors.ConfigError` whose one-line message names the
file, the dotted key, the value and what is allowed, e.g.::

    smoke.yaml: base.lambda_sl: unknown key (did you mean 'lambda_ssl'?); allowed: ...
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from s2study.config.schema import TrainConfig
from s2study.errors import ConfigError
from s2study.registry import unknown_name_message

#: keys of earlier versions, with what replaced them
RENAMED_KEYS = {"amp": "renamed to 'precision': one of auto, fp32, bf16, fp16"}

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats such as ``1e-4`` as numbers.

    YAML 1.1 requires a dot in the mantissa, so PyYAML reads ``lr: 1e-4`` as a string.
    """


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml_text(text: str) -> Any:
    """Parse YAML text with :class:`YamlLoader` (safe: plain data types only)."""
    return yaml.load(text, Loader=YamlLoader)


def preset_paths() -> dict[str, Path]:
    """Preset name -> file: those shipped with the package (``s2study/presets/``), then those
    of plug-in methods (``<method>-*.yaml`` beside the plug-in's module; see
    :meth:`s2study.methods.base.Method.preset_paths`), found without importing them."""
    from s2study.registry import plugin_preset_paths

    found = {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}
    for name, path in plugin_preset_paths().items():
        found.setdefault(name, path)
    return found


def preset_names() -> list[str]:
    """Names of the presets (``r2d2-roadscene``, ...; plug-in methods' included)."""
    return sorted(preset_paths())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = load_yaml_text(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of config keys")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the bare name of a shipped preset.

    Raises:
        ConfigError: neither a file nor a preset (lists the presets).
    """
    path = Path(name_or_path)
    if _is_file(path):
        return path.resolve()
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if _is_file(preset):
        return preset
    plugin = preset_paths().get(name_or_path)
    if plugin is not None and _is_file(plugin):
        return plugin
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        raise ConfigError(f"{name_or_path}: no such file")
    raise ConfigError(unknown_name_message("preset", name_or_path, preset_names()))


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the OS refuses the name (too long, NUL byte)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def parse_override(item: str) -> tuple[str, Any]:
    """``"method.params.dim=64"`` -> ``("method.params.dim", 64)`` (the value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. lambda_ssl=0.8")
    try:
        value = load_yaml_text(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key = "a.b"``, creating mappings on the way."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A copy of ``data`` with ``KEY=VALUE`` overrides applied."""
    out = _deepcopy(data)
    for item in overrides or []:
        set_dotted(out, *parse_override(item))
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        allowed = " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
        raise ConfigError(f"{source}: {key}: {value!r} is not allowed; expected {allowed}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping of keys, got {value!r}")
        return build_dataclass(tp, value, source, prefix=f"{key}.")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(
                f"{source}: {key}: {value!r} is not allowed; expected a list of {len(args)} numbers"
            )
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(
                    f"{source}: {key}: {value!r} is not allowed; expected a finite number"
                )
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{source}: {key}: {value!r} is not allowed; expected {_type_name(tp)}")


def build_dataclass(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from ``data``, strictly.

    Raises:
        ConfigError: unknown key (with a "did you mean"), wrong type, out-of-range value.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            msg = RENAMED_KEYS.get(f"{prefix}{key}") or unknown_name_message("key", key, sorted(fields))
            raise ConfigError(f"{source}: {prefix}{key}: {msg}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{source}: {prefix}{exc}") from None


def train_config_from_dict(data: dict[str, Any], source: str = "<config>") -> TrainConfig:
    """Validate a plain mapping as a :class:`TrainConfig` (method parameters included)."""
    cfg = build_dataclass(TrainConfig, data, source)
    check_dataset(cfg, source)
    check_method(cfg, source)
    return cfg


def check_dataset(cfg: TrainConfig, source: str) -> None:
    """``data.dataset`` names a registered dataset."""
    from s2study.data.datasets import DATASETS

    if cfg.data.dataset not in DATASETS:
        msg = unknown_name_message("dataset", cfg.data.dataset, DATASETS.names())
        raise ConfigError(f"{source}: data.dataset: {msg}")


def check_method(cfg: TrainConfig, source: str) -> None:
    """The method exists, every ``method.params`` key is one of its parameters and the
    method accepts every value (checked by the method class, without building the network)."""
    from s2study.methods import load_methods

    methods = load_methods()
    if cfg.method.name not in methods:
        msg = unknown_name_message("method", cfg.method.name, methods.names())
        raise ConfigError(f"{source}: method.name: {msg}")
    _check_param_values(methods.get(cfg.method.name), dict(cfg.method.params), source)


def _check_param_values(cls: Any, params: dict[str, Any], source: str) -> None:
    """``cls.validate_params(params)`` (:class:`~s2study.methods.base.Method`), its
    rejection re-worded as ``<source>: method.params.<key>: <what is wrong>``."""
    from s2study.methods import ParamError

    try:
        cls.validate_params(params)
    except ParamError as exc:
        raise ConfigError(f"{source}: method.params.{exc.key}: {exc.detail}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: method.params: {exc}") from None


def load_train_config(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Load a train config file or preset, apply ``--set`` overrides, validate."""
    path = resolve_config_path(name_or_path)
    data = apply_overrides(read_yaml(path), overrides)
    return train_config_from_dict(data, source=path.name if path.parent == PRESET_DIR else str(path))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain, YAML/JSON-friendly types (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method": {"name": "r2d2"}}`` -> ``{"method.name": "r2d2"}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
