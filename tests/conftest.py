"""Shared fixtures: the real data in ../shared, and environment for Ray/MLflow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray 2.60 enables token auth for local clusters; tests run without it, and without telemetry.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def _shared(sub: str, env: str) -> Path:
    root = Path(os.environ.get(env) or REPO.parent / "shared" / sub)
    if not root.is_dir():
        pytest.fail(
            f"the real {sub} this test needs is missing: looked in {root} "
            f"(set {env} or place the project's shared/ folder beside the repository)"
        )
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$S2STUDY_DATA``): holds ``RoadScene/`` and ``RGB-NIR/``."""
    return _shared("data", "S2STUDY_DATA")


@pytest.fixture(scope="session")
def roadscene(shared_data) -> Path:
    return shared_data / "RoadScene"


@pytest.fixture(scope="session")
def official_r2d2() -> Path:
    path = _shared("weights", "S2STUDY_WEIGHTS") / "r2d2_WASF_N16.pt"
    if not path.is_file():
        pytest.fail(f"the official R2D2 checkpoint is missing: {path}")
    return path
