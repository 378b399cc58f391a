"""Fuzzing the config validators: mutated study and train files are accepted or refused.

A seeded generator mutates the shipped study files (``search_spaces/*.yaml``) and presets
(``s2study/presets/*.yaml``): deleted keys, typo-renamed keys, swapped types, negative, huge
and non-finite numbers, swapped ``low``/``high``, empty lists and mappings, random nesting,
non-string keys, hostile strings (a NUL byte, ``~unknown-user`` paths, a broken IPv6 URL)
and random ``--set`` overrides. Each mutant goes through the function ``s2study run`` uses
before Ray starts (:func:`s2study.study.config.load_study`) or through
:func:`s2study.config.load.train_config_from_dict`. The only allowed outcomes are success or
an :class:`~s2study.errors.S2StudyError` (what the CLI turns into one line and exit code 2);
anything else would reach the user as a traceback. An accepted config must also hold only
finite numbers (a ``.nan`` or ``.inf`` that passes every range check is a bad input that got
through).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from s2study.config.load import PRESET_DIR, set_dotted, train_config_from_dict
from s2study.errors import S2StudyError
from s2study.methods import build_method
from s2study.study.config import load_study

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "search_spaces").glob("*.yaml"))
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
SEED = 20240611
N_STUDIES = 400
N_TRAIN = 500

NUMBERS = [
    -1,
    0,
    1,
    2,
    -0.5,
    0.5,
    1.5,
    -1e9,
    1e9,
    10**20,
    -(2**63),
    1e308,
    math.nan,
    math.inf,
    -math.inf,
]
STRINGS = [
    "",
    "x",
    "r2d2",
    "d2net",
    "official",
    "roadscene",
    "val",
    "tpe",
    "max",
    "1e-4",
    "ünïcødé",
    "a\x00b",
    "~no_such_user_s2study/data",
    "http://[",
    "sqlite://",
    "sqlite:///:memory:",
    "s3://bucket/prefix",
    "file://",
    "../../../etc/passwd",
    "x" * 300,
    "{type: float}",
]
CONTAINERS = [
    [],
    {},
    [1],
    [0.0, 1.0],
    [1.0, 0.0],
    ["a", "a"],
    [[1, 2]],
    [{}],
    {"type": "float"},
    {"type": "float", "low": 1, "high": 0},
    {"type": "categorical", "choices": []},
    {"type": "constant"},
    {"preset": "r2d2-roadscene"},
    {"x": {"y": {"z": 1}}},
]
OVERRIDES = [
    "asha.max_epochs=-1",
    "asha.max_epochs=0",
    "trials=0",
    "trials=abc",
    "space=[]",
    "space.lambda_ssl.low=abc",
    "space.lambda_ssl.high=-5",
    "base=",
    "base=[1, 2]",
    "=3",
    "trials",
    "a.b.c.d=1",
    "resources.gpu=.nan",
    "base.lr=.inf",
    "name=a b",
    "tracking.uri=http://[",
    "storage=~no_such_user_s2study/x",
    "base.data.root=a\x00b",
    "evaluate.ks=[]",
    "sampler.name=grid",
    "base.preset=nosuch",
    "space.x.y[3]=1",
]

#: direct hostile values for train configs (``set_dotted`` key, value)
TRAIN_SETS = [
    ("lr", math.inf),
    ("lambda_ssl", math.inf),
    ("val_threshold_px", math.inf),
    ("ssl.noise_std", math.nan),
    ("ssl.scale", [math.nan, 1.0]),
    ("sl.scale", [1.0, math.inf]),
    ("crop_size", 10**20),
    ("epochs", True),
    ("data.root", "a\x00b"),
    ("method.params", {"dim": -1}),
    ("method.params", {"margin": "x"}),
    ("method.params", {"safe_radius": 2.5}),
    ("method.params", {"ap_nq": 1}),
    ("method.params", []),
]


def _random_value(rng: random.Random) -> Any:
    pool = rng.choice((NUMBERS, STRINGS, CONTAINERS, [True, False, None]))
    return copy.deepcopy(rng.choice(pool))


def _typo(rng: random.Random, key: Any) -> Any:
    s = str(key)
    if not s:
        return "x"
    i = rng.randrange(len(s))
    op = rng.randrange(4)
    if op == 0:
        return s[:i] + s[i + 1 :] or "_"
    if op == 1:
        return s[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz_.[]0") + s[i:]
    if op == 2 and len(s) > 1:
        j = min(i + 1, len(s) - 1)
        return s[:i] + s[j] + s[i] + s[j + 1 :]
    return s.upper()


def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    """Paths to every mapping entry and list element below ``doc``."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(path + (k,))
            out.extend(_nodes(v, path + (k,)))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.append(path + (i,))
            out.extend(_nodes(v, path + (i,)))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


def mutate(rng: random.Random, doc: dict, n: int) -> dict:
    """``doc`` with ``n`` random mutations (deep copy; ``doc`` is not touched)."""
    doc = copy.deepcopy(doc)
    for _ in range(n):
        nodes = _nodes(doc)
        if not nodes:
            doc[_random_value(rng) if rng.random() < 0.1 else "x"] = _random_value(rng)
            continue
        path = rng.choice(nodes)
        parent, key = _parent(doc, path), path[-1]
        value = parent[key]
        op = rng.randrange(10)
        if op == 0:  # delete
            del parent[key]
        elif op == 1 and isinstance(parent, dict):  # typo in a key
            parent[_typo(rng, key)] = parent.pop(key)
        elif op == 2:  # another type
            parent[key] = _random_value(rng)
        elif op == 3:  # extreme number
            base = value if isinstance(value, (int, float)) and not isinstance(value, bool) else 1
            parent[key] = rng.choice([-base, base * 10 ** rng.randint(3, 30), *NUMBERS])
        elif op == 4:  # swap low/high, or reverse a list
            if isinstance(value, dict) and "low" in value and "high" in value:
                value["low"], value["high"] = value["high"], value["low"]
            elif isinstance(value, list):
                value.reverse()
            else:
                parent[key] = rng.choice(NUMBERS)
        elif op == 5:  # empty
            parent[key] = rng.choice([[], {}, "", None])
        elif op == 6:  # nest
            parent[key] = rng.choice([[value], {"x": value}, {str(key): value}])
        elif op == 7 and isinstance(parent, dict):  # extra key beside this one
            parent[_typo(rng, key)] = _random_value(rng)
        elif op == 8 and isinstance(parent, dict):  # non-string key
            parent[rng.choice([1, True, None, 2.5])] = parent.pop(key)
        elif op == 9 and isinstance(value, str):  # hostile string
            parent[key] = rng.choice(STRINGS)
        else:
            parent[key] = _random_value(rng)
    return doc


def _non_finite(obj: Any, path: str = "") -> list[str]:
    """Dotted paths of NaN / infinite floats inside an accepted config."""
    if dataclasses.is_dataclass(obj):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{path}{k}.")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{path}{i}.")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [f"{path.rstrip('.')}={obj}"]
    return []


class Tally:
    """Counts of tried / accepted / rejected inputs and the crashes (with a repro)."""

    def __init__(self) -> None:
        self.tried = self.accepted = self.rejected = 0
        self.crashes: list[str] = []
        self.accepted_non_finite: list[str] = []
        self.unbuildable: list[str] = []

    def check(self, what: str, fn, *args, then=None) -> None:
        """Call ``fn(*args)``; ``then(result)`` (the next step a run takes) must not raise."""
        self.tried += 1
        try:
            result = fn(*args)
        except S2StudyError:
            self.rejected += 1
            return
        except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
            self.crashes.append(f"{type(exc).__name__}: {str(exc)[:160]} <- {what[:600]}")
            return
        self.accepted += 1
        bad = _non_finite(result)
        if bad:
            self.accepted_non_finite.append(f"{', '.join(bad)} <- {what[:300]}")
        if then is not None:
            try:
                then(result)
            except Exception as exc:  # noqa: BLE001
                self.unbuildable.append(f"{type(exc).__name__}: {str(exc)[:160]} <- {what[:300]}")

    def summary(self, name: str, seconds: float) -> str:
        return (
            f"{name}: tried {self.tried}, rejected {self.rejected} (S2StudyError), accepted "
            f"{self.accepted}, crashed {len(self.crashes)}, accepted with NaN/inf "
            f"{len(self.accepted_non_finite)}, accepted but unbuildable {len(self.unbuildable)} "
            f"({seconds:.1f}s)"
        )


def _report(title: str, items: list[str]) -> str:
    """The first few offending inputs, one per line, for a failure message."""
    return "\n".join([f"{len(items)} {title}; the first ones:", *items[:8]])


@pytest.fixture(scope="module")
def study_tally(tmp_path_factory) -> Tally:
    """Runs the study fuzz once; both study tests read its tally."""
    folder = tmp_path_factory.mktemp("fuzz-study")
    docs = [yaml.safe_load(p.read_text()) for p in STUDIES]
    rng = random.Random(SEED)
    tally = Tally()
    t0 = time.perf_counter()
    for i in range(N_STUDIES):
        n = rng.choice((0, 1, 1, 1, 2, 3))  # 0: the shipped file with hostile overrides only
        doc = mutate(rng, rng.choice(docs), n)
        overrides = [rng.choice(OVERRIDES)] if n == 0 or rng.random() < 0.2 else []
        path = folder / f"study{i}.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        tally.check(f"--set {overrides} {doc!r}", load_study, path, overrides, None, folder)
    print("\n" + tally.summary("study files (load_study)", time.perf_counter() - t0))
    return tally


def test_mutated_study_files_only_raise_s2study_errors(study_tally):
    assert study_tally.tried == N_STUDIES
    assert study_tally.rejected > N_STUDIES // 2, "the mutations should break most files"
    assert study_tally.accepted > 0, "some mutations (e.g. a deleted optional key) must still load"
    assert not study_tally.crashes, _report("crashes", study_tally.crashes)


def test_accepted_study_files_hold_only_finite_numbers(study_tally):
    assert not study_tally.accepted_non_finite, _report(
        "accepted with NaN/inf", study_tally.accepted_non_finite
    )


def _build(cfg) -> None:
    """What training does first with an accepted config: build the method."""
    build_method(cfg.method.name, **cfg.method.params)


@pytest.fixture(scope="module")
def train_tally() -> Tally:
    docs = [yaml.safe_load(p.read_text()) for p in PRESETS]
    rng = random.Random(SEED + 1)
    tally = Tally()
    t0 = time.perf_counter()
    for _ in range(N_TRAIN):
        n = rng.choice((0, 1, 1, 1, 2, 3))  # 0: a preset with one hostile value
        doc = mutate(rng, rng.choice(docs), n)
        if n == 0:
            set_dotted(doc, *copy.deepcopy(rng.choice(TRAIN_SETS)))
        tally.check(repr(doc), train_config_from_dict, doc, "fuzz.yaml", then=_build)
    print("\n" + tally.summary("train configs (train_config_from_dict)", time.perf_counter() - t0))
    return tally


def test_mutated_train_configs_only_raise_s2study_errors(train_tally):
    assert train_tally.tried == N_TRAIN
    assert train_tally.rejected > N_TRAIN // 3
    assert train_tally.accepted > 0
    assert not train_tally.crashes, _report("crashes", train_tally.crashes)


def test_accepted_train_configs_hold_only_finite_numbers(train_tally):
    assert not train_tally.accepted_non_finite, _report(
        "accepted with NaN/inf", train_tally.accepted_non_finite
    )


def test_accepted_train_configs_build_their_method(train_tally):
    """A method parameter value the method refuses must be refused when the config loads."""
    assert not train_tally.unbuildable, _report("unbuildable", train_tally.unbuildable)


def test_the_generator_is_seeded():
    docs = [yaml.safe_load(p.read_text()) for p in STUDIES]
    a = [mutate(random.Random(SEED), d, 3) for d in docs]
    b = [mutate(random.Random(SEED), d, 3) for d in docs]
    assert repr(a) == repr(b)
    assert any(repr(x) != repr(d) for x, d in zip(a, docs))
