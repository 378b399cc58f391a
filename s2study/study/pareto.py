"""Multi-objective studies: the Pareto front of the trials.

With ``metric: [val_ncm, val_cmr]`` and ``mode: [max, max]`` Optuna optimises both (NSGA-II or
multi-objective TPE); each trial's values are those of its best epoch by the first metric, the
epoch of its best checkpoint (logged as ``best_val_ncm`` and ``at_best/val_cmr`` in its MLflow
run). A trial is on the front when no other trial is at least as good in every metric and
better in one. ``s2study run`` and ``s2study report`` print the front; the parent run holds it as
``study/pareto_front.csv`` and ``plots/pareto_front.png``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one."""
    better = [x > y if m == "max" else x < y for x, y, m in zip(a, b, modes)]
    worse = [x < y if m == "max" else x > y for x, y, m in zip(a, b, modes)]
    return any(better) and not any(worse)


def pareto_front(points: Sequence[Sequence[float] | None], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated ``points`` (points with a missing or non-finite value never
    are), in the order given."""
    valid = [i for i, p in enumerate(points) if p is not None and all(math.isfinite(v) for v in p)]
    return [i for i in valid if not any(dominates(points[j], points[i], modes) for j in valid if j != i)]


def front_rows(names: Sequence[str], points: Sequence[Sequence[float] | None], sampled: Sequence[dict],
               objectives: Sequence[tuple[str, str]]) -> list[dict]:
    """The front as table rows (trial, each objective's value, sampled values), best first by
    the first objective."""
    modes = [m for _, m in objectives]
    index = pareto_front(points, modes)
    sign = -1 if modes[0] == "max" else 1
    index.sort(key=lambda i: sign * points[i][0])
    return [{"trial": names[i], **{m: points[i][k] for k, (m, _) in enumerate(objectives)}, **sampled[i]}
            for i in index]


def format_front(rows: list[dict], objectives: Sequence[tuple[str, str]]) -> str:
    from s2study.report import text_table

    if not rows:
        return "Pareto front: no trial has a value of every objective"
    headers = list(rows[0])
    title = ", ".join(f"{m} ({d})" for m, d in objectives)
    return (f"Pareto front over {title}, each trial at its best epoch by {objectives[0][0]} "
            f"({len(rows)} trial(s)):\n\n" + text_table(headers, [[r[h] for h in headers] for r in rows]))
