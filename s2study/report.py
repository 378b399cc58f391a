"""Study reports: the ranked trial table and the paper's tables, read back from MLflow.

``s2study report STUDY_NAME|RUN_ID`` prints

1. every trial of the study ranked by its best value of the study metric, with its status
   (finished / stopped_early / failed / killed), epochs and sampled values;
2. for the evaluated trials, the paper's Tables I-III (NC, NCM, CMR): one row per method
   (``R2D2`` when lambda = 0, ``R2D2+SSL (λ=0.4)`` otherwise), one column per dataset and K.
   A lambda sweep (``search_spaces/paper.yaml``) gives the paper's Fig. 3 as these rows.

Between them, Optuna's parameter importances, read from the study's Optuna storage.

Evaluation metrics are stored as ``eval/nc_k1024``, ``eval/ncm_3px_k1024``,
``eval/cmr_3px_k1024`` (MLflow does not allow ``@`` in names, so ``ncm@3px`` becomes
``ncm_3px``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2study.errors import ConfigError
from s2study.study.repeats import format_spreads
from s2study.study.tracking import TAG_REPEAT_OF, TAG_TRIAL

DATASET_LABELS = {"roadscene": "RoadScene", "rgbnir": "RGB-NIR"}
_EVAL_KEY = re.compile(r"^eval/(?:(?P<p>warped)/)?(?P<m>nc|ncm|cmr|rep)(?:_(?P<t>[\d.]+px))?_k(?P<k>\d+)$")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        # large values and small nonzero ones (learning rates) in significant digits
        return f"{value:.{digits}f}" if value == 0 or 10**-digits <= abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def format_trials(rows: list[dict[str, Any]], metric: str) -> str:
    """Ranked trials: ``rows`` hold trial, status, epochs, best and the sampled values, best first."""
    if not rows:
        return "(no trials)"
    fixed = ["trial", "status", "epochs", "best"]
    extra = [k for k in rows[0] if k not in fixed]
    headers = ["rank", "trial", "status", "epochs", f"best {metric}", *extra]
    return text_table(headers, [[i, *(r.get(k) for k in fixed), *(r.get(k) for k in extra)]
                                for i, r in enumerate(rows, 1)])


def method_labels() -> dict[str, str]:
    """Method name -> report label, read from the method classes (``Method.label``)."""
    from s2study.methods import load_methods

    return {name: cls.label for name, cls in load_methods().items()}


def _label(method: str) -> str:
    """The label of a method (its name where no installed class has it, e.g. a plug-in
    that this machine lacks)."""
    return method_labels().get(method, method)


def method_label(method: str, lambda_ssl: float | None) -> str:
    """``R2D2`` for lambda = 0 (the method's own loss), ``R2D2+SSL (λ=0.4)`` otherwise."""
    name = _label(method)
    if lambda_ssl is None or lambda_ssl == 0:
        return name
    return f"{name}+SSL (λ={lambda_ssl:.3g})"


def paper_tables(evaluated: list[dict[str, Any]]) -> str:
    """Tables I-III of the paper (NC, NCM, CMR) from evaluated trials; warped-protocol
    evaluations (``eval/warped/...``) get columns of their own beside the aligned ones.

    Args:
        evaluated: one entry per trial: ``method``, ``dataset``, ``lambda_ssl``, ``name`` and
            ``metrics`` (``eval/...`` keys).

    Returns:
        Three text tables, rows = method labels, columns = dataset x K.
    """
    cells: dict[tuple[str, str], dict[tuple[str, str, int], float]] = {}
    labels: dict[tuple[str, str], str] = {}
    tags: dict[str, str] = {}
    for e in evaluated:
        label = method_label(e["method"], e.get("lambda_ssl"))
        key = (label, e["dataset"])
        if key in cells:  # the same setting twice (top_n > 1 with fixed lambda): keep both rows
            label = f"{label} [{e['name']}]"
            key = (label, e["dataset"])
        labels[key] = label
        values: dict[tuple[str, str, int], float] = {}
        for k, v in e["metrics"].items():
            m = _EVAL_KEY.match(k)
            if m:
                values[(m["m"], m["p"] or "", int(m["k"]))] = v
                if m["t"]:
                    tags[m["m"]] = m["t"]
        cells[key] = values
    if not cells:
        return "(no evaluated trials)"
    datasets = sorted({d for _, d in cells}, key=lambda d: list(DATASET_LABELS).index(d) if d in DATASET_LABELS else 99)
    ks = sorted({k for v in cells.values() for _, _, k in v})
    protocols = sorted({p for v in cells.values() for _, p, _ in v})  # "" (aligned) first, then "warped"
    columns = [(d, p, k) for d in datasets for p in protocols for k in ks]
    rows_labels = sorted({lab for lab, _ in cells}, key=_label_order)
    out = []
    titles = (("nc", "TABLE I: number of correspondences (NC)"),
              ("ncm", f"TABLE II: number of correct matches (NCM@{tags.get('ncm', '3px')})"),
              ("cmr", f"TABLE III: ratio of correct matches, % (CMR@{tags.get('cmr', '3px')})"))
    for metric, title in titles:
        headers = ["method", *(" ".join([DATASET_LABELS.get(d, d), *([p] if p else []), f"K={k}"])
                               for d, p, k in columns)]
        rows = [[lab, *(cells.get((lab, d), {}).get((metric, p, k)) for d, p, k in columns)] for lab in rows_labels]
        out.append(f"{title}\n{text_table(headers, rows, digits=1 if metric != 'cmr' else 2)}")
    return "\n\n".join(out)


def lambda_curves(evaluated: list[dict[str, Any]], metric: str = "ncm"
                  ) -> dict[str, dict[int, list[tuple[float, float, float | None]]]]:
    """The paper's Fig. 3 data: per method and dataset, per K, ``(lambda, mean, std)`` by lambda.

    Runs at the same lambda (repeats with other seeds) give one point: their mean and sample
    standard deviation (None for one run). Only series with at least two lambda values are
    returned (a curve needs two points).
    """
    from s2study.study.repeats import mean_std

    values: dict[str, dict[int, dict[float, list[float]]]] = {}
    for e in evaluated:
        if e.get("lambda_ssl") is None:
            continue
        name = f"{_label(e['method'])} {DATASET_LABELS.get(e['dataset'], e['dataset'])}"
        for key, value in e["metrics"].items():
            m = _EVAL_KEY.match(key)
            if m and m["m"] == metric and not m["p"]:
                values.setdefault(name, {}).setdefault(int(m["k"]), {}).setdefault(e["lambda_ssl"], []).append(value)
    return {
        name: {k: [(lam, *mean_std(v)) for lam, v in sorted(by_lambda.items())] for k, by_lambda in sorted(by_k.items())}
        for name, by_k in values.items()
        if len({lam for by_lambda in by_k.values() for lam in by_lambda}) >= 2
    }


def _label_order(label: str) -> tuple:
    m = re.search(r"λ=([\d.e-]+)", label)
    return (label.split("+")[0].split(" ")[0], float(m.group(1)) if m else 0.0, label)


def study_report(uri: str, study_or_run: str, lambda_plot: str | None = None) -> str:
    """The report of a study stored in MLflow (see the module docstring).

    With ``lambda_plot``, the NCM-versus-lambda curves of the evaluated trials (the paper's
    Fig. 3) are also drawn into that PNG file.

    Raises:
        ConfigError: no such study (lists those that exist).
    """
    from s2study.study.tracking import fetch_study

    rec = fetch_study(uri, study_or_run)
    tags = rec.parent.tags
    metric, mode = tags.get("s2study.metric", "val_ncm"), tags.get("s2study.mode", "max")
    keys = [k for k in tags.get("s2study.space_keys", "").split(",") if k]
    best_key = f"best_{metric}"
    sign = -1 if mode == "max" else 1
    ranked = sorted(rec.trials, key=lambda r: (best_key not in r.metrics, sign * r.metrics.get(best_key, 0.0)))
    trials = [r for r in ranked if TAG_REPEAT_OF not in r.tags]
    repeat_runs = [r for r in ranked if TAG_REPEAT_OF in r.tags]
    rows, evaluated = [], []
    for r in trials:
        sampled = json.loads(r.tags.get("s2study.sampled", "{}"))
        rows.append({"trial": r.name, "status": r.s2status, "epochs": _int(r.metrics.get("epoch")),
                     "best": r.metrics.get(best_key), **{k: sampled.get(k) for k in keys}})
    for r in ranked:
        if any(k.startswith("eval/") for k in r.metrics):
            lam = r.params.get("lambda_ssl")
            evaluated.append({"name": r.name, "method": r.params.get("method.name", "?"),
                              "dataset": r.params.get("data.dataset", "?"), "repeat": TAG_REPEAT_OF in r.tags,
                              "lambda_ssl": float(lam) if lam is not None else None, "metrics": r.metrics})
    head = (f"study {rec.parent.tags.get('s2study.study', rec.parent.name)} (experiment {rec.experiment}, "
            f"run {rec.parent.run_id}, {rec.parent.s2status}); {len(trials)} trials ranked by {metric} ({mode})")
    parts = [head, format_trials(rows, metric)]
    objectives = [tuple(o.split(":")) for o in tags.get("s2study.objectives", "").split(",") if ":" in o]
    if len(objectives) > 1:
        parts.append(_front(trials, objectives, keys))
    if repeat_runs:
        parts.append(format_spreads(_spreads(trials, repeat_runs, metric), metric, keys))
    importances = _importances(tags.get("s2study.optuna_storage", ""), tags.get("s2study.study", rec.parent.name))
    if importances:
        parts.append(importances)
    if evaluated:
        split = next((r.tags.get("s2study.eval_split") for r in trials if "s2study.eval_split" in r.tags), "")
        parts.append(f"evaluation ({split}):\n\n" + paper_tables([e for e in evaluated if not e["repeat"]]))
    if lambda_plot:
        from s2study.plots import plot_lambda_curves

        curves = lambda_curves(evaluated)
        if not curves:
            raise ConfigError(f"--lambda-plot: study {study_or_run!r} has no evaluated trials at two or more "
                              "lambda values; nothing to plot")
        name = rec.parent.tags.get("s2study.study", rec.parent.name)
        parts.append(f"lambda curve written to {plot_lambda_curves(curves, lambda_plot, f'{name}: NCM vs lambda')}")
    return "\n\n".join(parts)


def _front(trials: list[Any], objectives: list[tuple[str, str]], keys: list[str]) -> str:
    """The Pareto front of a multi-objective study from its trial runs (each at its best epoch:
    ``best_<first metric>``, ``at_best/<other>``)."""
    from s2study.study.pareto import format_front, front_rows
    from s2study.study.tracking import AT_BEST

    names = [f"best_{objectives[0][0]}", *(f"{AT_BEST}{m}" for m, _ in objectives[1:])]
    points = [tuple(r.metrics[n] for n in names) if all(n in r.metrics for n in names) else None for r in trials]
    sampled = [json.loads(r.tags.get("s2study.sampled", "{}")) for r in trials]
    return format_front(front_rows([r.name for r in trials], points, [{k: v.get(k) for k in keys} for v in sampled],
                                   objectives), objectives)


def _spreads(trials: list[Any], repeat_runs: list[Any], metric: str) -> list[Any]:
    """Mean and spread per repeated configuration from the runs MLflow holds (search runs
    ranked best first, repeat runs): each configuration's complete runs."""
    from s2study.study.repeats import Member, spreads

    repeated = {r.tags[TAG_REPEAT_OF] for r in repeat_runs}
    originals = {r.tags.get(TAG_TRIAL, ""): (r.name, json.loads(r.tags.get("s2study.sampled", "{}")))
                 for r in trials if r.tags.get(TAG_TRIAL) in repeated}
    members = [Member(r.tags.get(TAG_REPEAT_OF) or r.tags.get(TAG_TRIAL, ""), r.metrics.get(f"best_{metric}"), r.metrics)
               for r in [*trials, *repeat_runs] if r.s2status == "finished"]
    return spreads(members, originals, metric)


def _importances(storage: str, study: str) -> str:
    """Optuna's parameter importances for the study (one line where they cannot be had)."""
    if not storage or storage == "memory":
        return ""
    if "***" in storage:
        return f"parameter importances: the Optuna storage ({storage}) needs its password; open it with optuna-dashboard"
    if storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
        return f"parameter importances: not available (the Optuna storage {storage} is not on this machine)"
    from s2study.errors import EnvironmentProblem
    from s2study.study.optuna_store import param_importances

    try:
        values = param_importances(storage, study)
    except (EnvironmentProblem, KeyError) as exc:
        return f"parameter importances: not available ({str(exc).strip(chr(39))})"
    if not values:
        return "parameter importances: fewer than two completed trials"
    rows = [(k, v) for k, v in sorted(values.items(), key=lambda kv: -kv[1])]
    return f"parameter importances (Optuna, {storage}):\n\n" + text_table(["parameter", "importance"], rows, 3)


def _int(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None
