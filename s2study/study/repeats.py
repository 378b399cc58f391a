"""Repeats: the search's best configurations trained again with other seeds.

Validation NCM on a few pairs is noisy, so a difference of a few matches between two trials
may be chance. With ``repeats: {top_n: 3, seeds: 3}`` the study, once its search has ended,
trains each of the 3 best configurations until it has 3 runs that trained every epoch: the
search's own run (seed ``seed``) where ASHA did not stop it, and new runs with seeds
``seed + 1``, ``seed + 2``, ... The repeats are one Tune experiment per round
(``<storage>/<name>/repeats-1``, a grid over the planned runs, no early stopping, no searcher:
Optuna never sees them), their MLflow runs are children of the study's parent run tagged
``s2study.repeat_of`` (the search trial they repeat). A resumed study finishes an
interrupted round and plans a new round for the configurations the grown search ranks
among its best that have no repeats yet.

Each configuration's runs give a mean and a sample standard deviation of the best value of
the study metric and of every evaluation metric (when the runs were evaluated), printed by
``s2study run`` and ``s2study report`` and logged on the parent run
(``repeats/<trial id>/best_val_ncm_mean`` ...).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

#: per-configuration figures: the best value of the study metric and the evaluation metrics
EVAL_PREFIX = "eval/"


def point_key(point: dict[str, Any]) -> str:
    """The identity of one planned run (its configuration with seed, and the trial it repeats)."""
    return json.dumps(point, sort_keys=True, default=str)


def plan_points(ranked: list[Any], top_n: int, seeds: int, base_seed: int) -> list[dict[str, Any]]:
    """The runs that give the ``top_n`` best configurations ``seeds`` complete runs each.

    Args:
        ranked: the search's trials, best first (``TrialSummary``: ``trial_id``, ``status``,
            ``best``, ``sampled``).
        base_seed: the seed every search trial ran with.

    Returns:
        ``{"config": {sampled values, "seed": s}, "of": trial id}`` per run to train, in
        rank order; seeds ``base_seed + 1 ...``.
    """
    points = []
    for trial in [t for t in ranked if t.best is not None and t.status != "failed"][:top_n]:
        new = seeds - 1 if trial.status == "finished" else seeds
        points += [{"config": {**trial.sampled, "seed": base_seed + i}, "of": trial.trial_id}
                   for i in range(1, new + 1)]
    return points


def missing_points(wanted: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``wanted`` runs that no earlier round (``{"name", "points"}``) planned."""
    planned = {point_key(p) for r in rounds for p in r["points"]}
    return [p for p in wanted if point_key(p) not in planned]


@dataclass
class Member:
    """One complete run of a repeated configuration."""

    of: str  # the search trial's id (the configuration's name in the tables)
    best: float | None
    metrics: dict[str, float] = field(default_factory=dict)  # eval/... of the run, where evaluated


@dataclass
class Spread:
    """A configuration's runs: how many, mean and sample standard deviation per figure."""

    of: str
    name: str
    sampled: dict[str, Any]
    n: int
    mean: dict[str, float]
    std: dict[str, float | None]  # None for one run


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def spreads(members: list[Member], originals: dict[str, tuple[str, dict[str, Any]]], metric: str) -> list[Spread]:
    """Group ``members`` by the trial they repeat, in the order of ``originals``.

    Args:
        originals: search trial id -> (its name, its sampled values), best first.
        metric: the study metric (``best_<metric>`` is the figure of each run's best value).
    """
    out = []
    for of, (name, sampled) in originals.items():
        group = [m for m in members if m.of == of and m.best is not None and math.isfinite(m.best)]
        if not group:
            continue
        figures: dict[str, list[float]] = {f"best_{metric}": [m.best for m in group]}
        for key in sorted({k for m in group for k in m.metrics if k.startswith(EVAL_PREFIX) and "curve" not in k}):
            values = [m.metrics[key] for m in group if key in m.metrics]
            if len(values) == len(group):  # a figure only where every run has it
                figures[key] = values
        stats = {k: mean_std(v) for k, v in figures.items()}
        out.append(Spread(of, name, sampled, len(group), {k: s[0] for k, s in stats.items()},
                          {k: s[1] for k, s in stats.items()}))
    return out


def parent_metrics(rows: list[Spread]) -> dict[str, float]:
    """What the parent run records: ``repeats/<trial id>/<figure>_mean|_std`` and ``_n``."""
    out: dict[str, float] = {}
    for row in rows:
        out[f"repeats/{row.of}/n"] = row.n
        for key, mean in row.mean.items():
            name = key.replace("@", "_")
            out[f"repeats/{row.of}/{name}_mean"] = mean
            if row.std[key] is not None:
                out[f"repeats/{row.of}/{name}_std"] = row.std[key]
    return out


def format_spreads(rows: list[Spread], metric: str, keys: list[str]) -> str:
    """The table of repeated configurations: values, runs, mean ± std of the best value and
    of NCM and CMR at each evaluated K."""
    from s2study.report import text_table

    if not rows:
        return "(no repeated configuration has a complete run)"
    figures = [f"best_{metric}"] + sorted({k for r in rows for k in r.mean if _headline(k)}, key=_eval_order)
    headers = ["trial", *keys, "runs", *(_short(f) for f in figures)]
    body = [[r.name, *(r.sampled.get(k) for k in keys), r.n,
             *(_pm(r.mean.get(f), r.std.get(f)) for f in figures)] for r in rows]
    return f"repeats (mean ± sample std over each configuration's complete runs):\n\n{text_table(headers, body)}"


def _headline(key: str) -> bool:
    return key.startswith(EVAL_PREFIX) and key.removeprefix(EVAL_PREFIX).removeprefix("warped/").startswith(
        ("ncm", "cmr"))


def _eval_order(key: str) -> tuple:
    name = key.removeprefix(EVAL_PREFIX)
    warped = name.startswith("warped/")
    name = name.removeprefix("warped/")
    return (warped, name.split("_")[0], int(name.rsplit("_k", 1)[-1]) if "_k" in name else 0)


def _short(figure: str) -> str:
    return figure.removeprefix(EVAL_PREFIX)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
