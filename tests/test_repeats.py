"""Repeats: which runs a study plans after its search, and the spread it reports per configuration."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import pytest

from s2study.study.repeats import (
    Member,
    format_spreads,
    missing_points,
    parent_metrics,
    plan_points,
    spreads,
)


@dataclass
class Trial:
    trial_id: str
    status: str
    best: float | None
    sampled: dict = field(default_factory=dict)


RANKED = [Trial("a", "finished", 9.0, {"lambda_ssl": 0.4}), Trial("b", "stopped_early", 8.0, {"lambda_ssl": 0.8}),
          Trial("c", "failed", None, {"lambda_ssl": 0.1}), Trial("d", "finished", 7.0, {"lambda_ssl": 1.0})]


def test_a_complete_search_run_counts_as_one_seed_and_a_stopped_one_does_not():
    points = plan_points(RANKED, top_n=2, seeds=3, base_seed=5)
    assert points == [
        {"config": {"lambda_ssl": 0.4, "seed": 6}, "of": "a"}, {"config": {"lambda_ssl": 0.4, "seed": 7}, "of": "a"},
        {"config": {"lambda_ssl": 0.8, "seed": 6}, "of": "b"}, {"config": {"lambda_ssl": 0.8, "seed": 7}, "of": "b"},
        {"config": {"lambda_ssl": 0.8, "seed": 8}, "of": "b"}]


def test_failed_trials_are_never_repeated_and_top_n_beyond_the_trials_takes_them_all():
    points = plan_points(RANKED, top_n=10, seeds=2, base_seed=0)
    assert [p["of"] for p in points] == ["a", "b", "b", "d"]


def test_a_grown_search_plans_only_the_runs_no_earlier_round_planned():
    first = plan_points(RANKED[:1], top_n=1, seeds=3, base_seed=0)
    rounds = [{"name": "repeats-1", "points": first}]
    assert missing_points(first, rounds) == []
    grown = plan_points(RANKED, top_n=2, seeds=3, base_seed=0)
    assert missing_points(grown, rounds) == [p for p in grown if p["of"] == "b"]


def test_spreads_give_mean_and_sample_std_per_configuration_in_rank_order():
    members = [Member("b", 4.0, {"eval/ncm_3px_k1024": 10.0}), Member("a", 9.0, {"eval/ncm_3px_k1024": 20.0}),
               Member("a", 7.0, {"eval/ncm_3px_k1024": 30.0}), Member("a", 8.0, {"eval/ncm_3px_k1024": 40.0}),
               Member("b", 6.0, {})]  # b's second run was not evaluated: b has no evaluation figure
    rows = spreads(members, {"a": ("trial_a", {"lambda_ssl": 0.4}), "b": ("trial_b", {"lambda_ssl": 0.8})}, "val_ncm")
    assert [(r.of, r.n) for r in rows] == [("a", 3), ("b", 2)]
    assert rows[0].mean == {"best_val_ncm": 8.0, "eval/ncm_3px_k1024": 30.0}
    assert rows[0].std["best_val_ncm"] == pytest.approx(statistics.stdev([9.0, 7.0, 8.0]))
    assert rows[1].mean == {"best_val_ncm": 5.0}
    metrics = parent_metrics(rows)
    assert metrics["repeats/a/n"] == 3 and metrics["repeats/a/eval/ncm_3px_k1024_std"] == pytest.approx(10.0)
    text = format_spreads(rows, "val_ncm", ["lambda_ssl"])
    assert "8.00 ± 1.00" in text and "30.00 ± 10.00" in text and "5.00 ± 1.41" in text


def test_a_configuration_with_one_complete_run_has_no_spread():
    (row,) = spreads([Member("a", 3.0)], {"a": ("t", {})}, "val_ncm")
    assert row.n == 1 and row.std["best_val_ncm"] is None
    assert "repeats/a/best_val_ncm_std" not in parent_metrics([row])
