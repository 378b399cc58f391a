"""Search spaces: the ``space:`` section of a study file, as Optuna define-by-run sampling.

A space maps dotted :class:`~s2study.config.schema.TrainConfig` keys to specs::

    lambda_ssl:        {type: float, low: 0.0, high: 1.2}
    lr:                {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    crop_size:         {type: int, low: 64, high: 256, step: 32}
    method.name:       {type: categorical, choices: [r2d2, d2net]}
    method.weights:    {type: constant, value: official, when: {method.name: r2d2}}
    ssl.scale[1]:      {type: float, low: 1.0, high: 1.5}     # one element of a tuple key

``when`` makes a spec conditional: it is sampled (or set) only when every named key has one
of the given values (``{method.name: r2d2}`` or ``{method.name: [r2d2, d2net]}``). A
condition key is a base value or a key sampled earlier in the space (YAML order is kept).
Sampling is Optuna's define-by-run API (:class:`DefineByRun`), the only form that supports
conditionals; fixed values (``constant``) are returned to Tune as constants.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from s2study.config.load import build_dataclass, set_dotted
from s2study.config.schema import TrainConfig
from s2study.errors import ConfigError
from s2study.registry import unknown_name_message

KINDS = ("float", "int", "categorical", "constant")
#: keys a study may not sample: ASHA owns the epoch budget (``asha.max_epochs``)
RESERVED_KEYS = ("epochs",)
_INDEX = re.compile(r"^(?P<path>[A-Za-z_][\w.]*?)(?:\[(?P<index>\d+)\])?$")
Primitive = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class _FloatSpec:
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    when: dict | None = None

    def __post_init__(self) -> None:
        _check_range(self.low, self.high, self.log, self.step)


@dataclass(frozen=True)
class _IntSpec:
    low: int | None = None
    high: int | None = None
    log: bool = False
    step: int = 1
    when: dict | None = None

    def __post_init__(self) -> None:
        _check_range(self.low, self.high, self.log, self.step)
        if self.log and self.step != 1:
            raise ValueError(f"step: {self.step} is not allowed with log: true (Optuna needs step 1)")


@dataclass(frozen=True)
class _CategoricalSpec:
    choices: Any = None
    when: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.choices, list) or not self.choices:
            raise ValueError(f"choices: {self.choices!r} is not allowed; expected a non-empty list")
        for c in self.choices:
            if not isinstance(c, Primitive):
                raise ValueError(  # noqa: TRY004 - build_dataclass turns ValueError into a ConfigError
                    f"choices: {c!r} is not allowed; choices are strings, numbers, true/false or "
                    "null (sample a tuple element with a key like ssl.scale[0])"
                )
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise ValueError(f"choices: {self.choices!r} has duplicates")


@dataclass(frozen=True)
class _ConstantSpec:
    value: Any = None
    when: dict | None = None


_SPEC_CLASSES = {"float": _FloatSpec, "int": _IntSpec, "categorical": _CategoricalSpec,
                 "constant": _ConstantSpec}


def _check_range(low: Any, high: Any, log: bool, step: Any) -> None:
    if low is None or high is None:
        missing = "low" if low is None else "high"
        raise ValueError(f"{missing}: required (a range needs low and high)")
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"low/high: [{low}, {high}] must be finite numbers")
    if low >= high:
        raise ValueError(
            f"low/high: [{low}, {high}] is an empty or inverted range; need low < high "
            "(use {type: constant, value: ...} for a fixed value)"
        )
    if log and low <= 0:
        raise ValueError(f"low: {low} is not allowed with log: true; need low > 0")
    if step is not None and not (0 < step <= high - low):
        raise ValueError(f"step: {step} is not allowed; need 0 < step <= high - low = {high - low}")


@dataclass(frozen=True)
class ParamSpec:
    """One entry of a search space.

    Attributes:
        key: the dotted TrainConfig key, optionally with a tuple index (``ssl.scale[1]``).
        kind: ``float``, ``int``, ``categorical`` or ``constant``.
        low / high / log / step: the range of ``float`` and ``int`` specs.
        choices: the values of a ``categorical`` spec.
        value: the value of a ``constant`` spec.
        when: conditions ``((key, (allowed values...)), ...)``, all of which must hold.
    """

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()
    value: Any = None
    when: tuple[tuple[str, tuple], ...] = field(default_factory=tuple)

    @property
    def sampled(self) -> bool:
        return self.kind != "constant"

    def active(self, values: Mapping[str, Any]) -> bool:
        """Whether every condition holds for the flat ``values`` (base + sampled so far)."""
        return all(values.get(k) in allowed for k, allowed in self.when)

    def suggest(self, trial: Any) -> Any:
        """Draw this spec's value from an Optuna trial (``trial.suggest_*``)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        return self.value

    def check_value(self, value: Any) -> None:
        """Raise ValueError (naming what is allowed) where sampling could not give ``value``."""
        if self.kind == "categorical":
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of the choices {list(self.choices)}")
            return
        if self.kind == "constant":
            if value != self.value:
                raise ValueError(f"{value!r} is not the constant {self.value!r}")
            return
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (self.kind == "int" and not float(value).is_integer()):
            raise ValueError(f"{value!r} is not {'an int' if self.kind == 'int' else 'a number'}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{value!r} is outside [{self.low:g}, {self.high:g}]")
        if self.step is not None and not math.isclose((value - self.low) / self.step,
                                                      round((value - self.low) / self.step), abs_tol=1e-9):
            raise ValueError(f"{value!r} is not on the grid low + k * step (step {self.step:g})")

    def distribution(self) -> Any:
        """The Optuna distribution sampling draws from (for trials added from elsewhere)."""
        import optuna.distributions as d

        if self.kind == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        if self.kind == "categorical":
            return d.CategoricalDistribution(list(self.choices))
        raise ValueError(f"space.{self.key}: a constant has no distribution")

    def extremes(self) -> tuple:
        """The values that bound what sampling can produce (used to validate a space)."""
        if self.kind in ("float", "int"):
            return (self.low, self.high)
        if self.kind == "categorical":
            return self.choices
        return (self.value,)

    def describe(self) -> dict[str, Any]:
        """A plain mapping for logs and the resolved-space artifact."""
        out: dict[str, Any] = {"type": self.kind}
        if self.kind in ("float", "int"):
            out.update(low=self.low, high=self.high)
            if self.log:
                out["log"] = True
            if self.step is not None and not (self.kind == "int" and self.step == 1):
                out["step"] = self.step
        elif self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out["value"] = self.value
        if self.when:
            out["when"] = {k: list(v) if len(v) > 1 else v[0] for k, v in self.when}
        return out


# --------------------------------------------------------------------------- parsing


def parse_space(raw: Any, source: str, base_flat: Mapping[str, Any]) -> tuple[ParamSpec, ...]:
    """Validate the ``space:`` mapping of a study file.

    Args:
        raw: the YAML value of ``space``.
        source: the file name, for messages.
        base_flat: the base TrainConfig, flattened (``{"method.name": "r2d2", ...}``); used to
            check condition keys.

    Returns:
        The specs, in file order.

    Raises:
        ConfigError: unknown spec keys or types, bad ranges, keys that are not TrainConfig
            keys, reserved keys, conditions on unknown or later keys.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: space: expected a mapping of TrainConfig keys to specs, got {raw!r}")
    specs: list[ParamSpec] = []
    for key, entry in raw.items():
        where = f"space.{key}"
        if not isinstance(key, str):
            raise ConfigError(f"{source}: space: key {key!r} is not allowed; expected a dotted TrainConfig key")
        check_train_key(key, source, where)
        if _INDEX.match(key).group("path") in RESERVED_KEYS:
            raise ConfigError(
                f"{source}: {where}: cannot be sampled; the epoch budget is asha.max_epochs"
            )
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{source}: {where}: {entry!r} is not allowed; expected a spec such as "
                "{type: float, low: 0, high: 1} or {type: constant, value: ...}"
            )
        entry = dict(entry)
        kind = entry.pop("type", None)
        if kind not in KINDS:
            msg = unknown_name_message("type", kind, list(KINDS)) if kind is not None else \
                f"type: required; one of {', '.join(KINDS)}"
            raise ConfigError(f"{source}: {where}.type: {msg}" if kind is not None else f"{source}: {where}.{msg}")
        spec = build_dataclass(_SPEC_CLASSES[kind], entry, source, prefix=f"{where}.")
        when = parse_when(spec.when, source, where, specs, base_flat)
        specs.append(ParamSpec(
            key=key,
            kind=kind,
            low=getattr(spec, "low", None),
            high=getattr(spec, "high", None),
            log=getattr(spec, "log", False),
            step=getattr(spec, "step", None),
            choices=tuple(getattr(spec, "choices", None) or ()),
            value=getattr(spec, "value", None),
            when=when,
        ))
        _check_kind_matches_field(specs[-1], source, where)
    for i, spec in enumerate(specs):
        later = {s.key for s in specs[i:]}
        for key, _ in spec.when:
            if key in later:
                raise ConfigError(f"{source}: space.{spec.key}.when.{key}: {key} is sampled at or after "
                                  f"{spec.key}; a condition key must be sampled earlier in the space (YAML order)")
    return tuple(specs)


def parse_when(
    when: dict | None, source: str, where: str, earlier: list[ParamSpec], base_flat: Mapping[str, Any]
) -> tuple[tuple[str, tuple], ...]:
    """A ``when:`` mapping (key -> a value or a list of values) as conditions; each key must be
    sampled by an ``earlier`` spec or be a base value."""
    if not when:
        return ()
    out = []
    earlier_keys = {s.key for s in earlier}
    for key, allowed in when.items():
        check_train_key(str(key), source, f"{where}.when.{key}")
        if key not in earlier_keys and key not in base_flat:
            raise ConfigError(
                f"{source}: {where}.when.{key}: a condition key must be sampled earlier in the "
                "space (YAML order) or be a base value"
            )
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not values:
            raise ConfigError(f"{source}: {where}.when.{key}: expected a value or a non-empty list")
        out.append((str(key), values))
    return tuple(out)


def _field_type(key: str) -> Any:
    """The annotation of a dotted TrainConfig key (``Any`` inside ``method.params``)."""
    m = _INDEX.match(key)
    parts = m.group("path").split(".")
    tp: Any = TrainConfig
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return Any  # a free-form mapping such as method.params
        tp = typing.get_type_hints(tp)[part]
    if m.group("index") is not None:
        tp = typing.get_args(tp)[int(m.group("index"))]
    return tp


def check_train_key(key: str, source: str, where: str) -> None:
    """``key`` names a TrainConfig field (``method.params.<name>`` and tuple indices allowed).

    Raises:
        ConfigError: naming ``where``, with a "did you mean" at the first unknown part.
    """
    m = _INDEX.match(key)
    if not m:
        raise ConfigError(f"{source}: {where}: {key!r} is not a dotted TrainConfig key such as ssl.noise_std")
    tp: Any = TrainConfig
    parts = m.group("path").split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            if (typing.get_origin(tp) is dict or tp is dict) and i == len(parts) - 1:
                break  # method.params.<name>: checked against the method(s) later
            raise ConfigError(f"{source}: {where}: {'.'.join(parts[:i])} has no sub-key {part!r}")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            prefix = ".".join(parts[:i])
            what = f"key of {prefix}" if prefix else "TrainConfig key"
            raise ConfigError(f"{source}: {where}: " + unknown_name_message(what, part, sorted(hints)))
        tp = hints[part]
    else:
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: {where}: {key} is a section; sample one of its keys "
                              f"({', '.join(sorted(typing.get_type_hints(tp)))})")
    index = m.group("index")
    if index is not None:
        args = typing.get_args(tp)
        if typing.get_origin(tp) is not tuple or int(index) >= len(args):
            raise ConfigError(f"{source}: {where}: [{index}] is not allowed; {m.group('path')} "
                              f"is not a tuple with an element {index}")


def _check_kind_matches_field(spec: ParamSpec, source: str, where: str) -> None:
    tp = _field_type(spec.key)
    args = set(typing.get_args(tp)) or {tp}
    if spec.kind == "float" and Any not in args and float not in args:
        raise ConfigError(f"{source}: {where}.type: float is not allowed; {spec.key} takes "
                          f"{_describe_type(tp)} (use int or categorical)")
    if spec.kind == "int" and Any not in args and not args & {int, float}:
        raise ConfigError(f"{source}: {where}.type: int is not allowed; {spec.key} takes {_describe_type(tp)}")


def _describe_type(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


# --------------------------------------------------------------------------- sampling


def overlay(base: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``base`` with dotted ``values`` set (``ssl.scale[1]`` sets an element).

    Args:
        base: a nested TrainConfig mapping (tuples as lists).
        values: ``{"lambda_ssl": 0.8, "ssl.scale[1]": 1.4, ...}``.
    """
    import copy

    out = copy.deepcopy(base)
    for key, value in values.items():
        m = _INDEX.match(key)
        path, index = m.group("path"), m.group("index")
        if index is None:
            set_dotted(out, path, value)
            continue
        node = out
        for part in path.split(".")[:-1]:
            node = node.setdefault(part, {})
        seq = list(node[path.split(".")[-1]])
        seq[int(index)] = value
        node[path.split(".")[-1]] = seq
    return out


class DefineByRun:
    """Optuna define-by-run space: ``space(trial) -> constants``.

    A module-level class rather than a closure, so the searcher state (which holds it) pickles
    for ``Tuner.restore``. Keeps no state between calls and does no computation.

    Args:
        specs: the parsed space.
        base_flat: the flattened base config, for conditions on fixed keys.
    """

    def __init__(self, specs: tuple[ParamSpec, ...], base_flat: Mapping[str, Any]) -> None:
        self.specs = specs
        self.base_flat = {k: base_flat[k] for s in specs for k, _ in s.when if k in base_flat}

    def __call__(self, trial: Any) -> dict[str, Any]:
        current = dict(self.base_flat)
        constants: dict[str, Any] = {}
        for spec in self.specs:
            if not spec.active(current):
                continue
            current[spec.key] = spec.suggest(trial)
            if not spec.sampled:
                constants[spec.key] = spec.value
        return constants


def assignments(specs: tuple[ParamSpec, ...], base_flat: Mapping[str, Any],
                choose: Mapping[str, Any]) -> dict[str, Any]:
    """The values a trial would get if each spec drew ``choose[key]`` (inactive specs skipped)."""
    current = dict(base_flat)
    out: dict[str, Any] = {}
    for spec in specs:
        if spec.active(current):
            current[spec.key] = out[spec.key] = choose.get(spec.key, spec.value)
    return out


def corner_cases(specs: tuple[ParamSpec, ...], base_flat: Mapping[str, Any],
                 limit: int = 256) -> Iterator[dict[str, Any]]:
    """Value assignments that bound the space, to validate it before any trial runs.

    Every combination of categorical choices (up to ``limit``; beyond that, each choice once)
    is paired with all ranges at their low ends and at their high ends; conditions are
    applied as sampling would apply them.

    Yields:
        ``{dotted key: value}`` for the active specs.
    """
    cats = [s for s in specs if s.kind == "categorical"]
    ranges = [s for s in specs if s.kind in ("float", "int")]
    n_combos = math.prod(len(s.choices) for s in cats)
    if n_combos <= limit:
        combos = (dict(zip([s.key for s in cats], c)) for c in itertools.product(*(s.choices for s in cats)))
    else:
        first = {s.key: s.choices[0] for s in cats}
        combos = ({**first, s.key: c} for s in cats for c in s.choices)
    for combo in combos:
        for end in (0, 1):
            choose = {**combo, **{s.key: s.extremes()[end] for s in ranges}}
            yield assignments(specs, base_flat, choose)


def grid_values(specs: tuple[ParamSpec, ...], source: str) -> dict[str, list]:
    """The grid of a space for Optuna's GridSampler: every sampled spec must be categorical.

    Raises:
        ConfigError: a sampled spec is a range or conditional (use ``bruteforce`` then).
    """
    grid = {}
    for s in specs:
        if not s.sampled:
            continue
        if s.kind != "categorical" or s.when:
            raise ConfigError(
                f"{source}: space.{s.key}: sampler 'grid' needs unconditional categorical specs; "
                "use sampler 'bruteforce' for ranges with a step or conditional specs"
            )
        grid[s.key] = list(s.choices)
    return grid


def grid_size(specs: tuple[ParamSpec, ...]) -> int:
    """Number of combinations of the categorical specs (``28`` for the paper's grid)."""
    return math.prod(len(s.choices) for s in specs if s.kind == "categorical")
