"""Shared fixtures: the real data and weights (through the project's resolver), and the
environment for Ray/MLflow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray 2.60 enables token auth for local clusters; tests run without it, and without telemetry.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def _resolved(resolve, name: str) -> Path:
    """``resolve(name)``: a local copy (``$S2STUDY_DATA``/``$S2STUDY_WEIGHTS``, the cache,
    ``../shared`` of this checkout) or a download by the project's resolver."""
    from s2study.errors import S2StudyError

    try:
        return resolve(name)
    except S2StudyError as exc:
        pytest.fail(f"the real {name} this test needs cannot be had: {exc}")


@pytest.fixture(scope="session")
def roadscene() -> Path:
    """The real RoadScene folder (``cropinfrared/``, ``crop_LR_visible/``)."""
    from s2study.resolver import resolve_dataset

    return _resolved(resolve_dataset, "roadscene")


@pytest.fixture(scope="session")
def rgbnir() -> Path:
    """The real RGB-NIR folder (category folders such as ``country/``)."""
    from s2study.resolver import resolve_dataset

    return _resolved(resolve_dataset, "rgbnir")


@pytest.fixture(scope="session")
def shared_data(roadscene, rgbnir) -> None:
    """Both real datasets resolve by name (for tests that open them through configs)."""


@pytest.fixture(scope="session")
def official_r2d2() -> Path:
    """The official R2D2 checkpoint ``r2d2_WASF_N16.pt``."""
    from s2study.resolver import resolve_weights

    return _resolved(resolve_weights, "official")
