"""A fresh machine: the README's first command with nothing beside the project.

The study runs as a user's would: a clean ``HOME`` (so an empty ``~/.cache/s2study``), no
``S2STUDY_*`` variables, a working folder of its own, and ``../shared`` hidden for real: the
command runs in its own mount namespace (``unshare -m``) with an empty tmpfs mounted over the
checkout's ``../shared``, so the package cannot find it through its own location either.
Datasets and weights come from a mirror on 127.0.0.1 (``S2STUDY_MIRROR``) serving the real
files in the mirror layout, as an air-gapped site's mirror would.

About 2 minutes on 2 cores (a 2-trial smoke study).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from mirror import FileServer, build_mirror, hidden_shared, user_env
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, roadscene, official_r2d2):
    folder = build_mirror(tmp_path_factory.mktemp("mirror"), roadscene, {"r2d2_WASF_N16.pt": official_r2d2})
    with FileServer(folder) as srv:
        yield srv


def test_the_first_readme_command_on_a_fresh_machine(mirror, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    (work / "search_spaces").mkdir(parents=True)
    shutil.copy(REPO / "search_spaces" / "smoke.yaml", work / "search_spaces")
    env = user_env(home, S2STUDY_MIRROR=mirror.url)

    # nothing is there without the resolver: the same command offline fails in one line
    offline = subprocess.run(hidden_shared(["s2study", "fetch", "official"]), cwd=work, text=True, check=False,
                             capture_output=True, env=user_env(home, S2STUDY_MIRROR="http://127.0.0.1:9"),
                             timeout=300)
    assert offline.returncode == 2, offline.stderr
    assert offline.stderr.strip().splitlines()[-1].startswith("s2study: error: weights r2d2_WASF_N16 is needed")

    proc = subprocess.run(
        hidden_shared(["s2study", "run", "search_spaces/smoke.yaml", "--set", "trials=2",
                       "--set", "asha.max_epochs=2"]),
        cwd=work, env=env, text=True, capture_output=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fetching dataset roadscene" in proc.stderr and "r2d2_WASF_N16.pt" in proc.stderr

    cache = home / ".cache" / "s2study"
    assert (cache / "weights" / "r2d2_WASF_N16.pt").read_bytes() == (mirror.root / "r2d2_WASF_N16.pt").read_bytes()
    assert {p.name for p in (cache / "data" / "RoadScene").iterdir()} == {"cropinfrared", "crop_LR_visible"}
    assert mirror.gets("RoadScene.zip") == 1 and mirror.gets("r2d2_WASF_N16.pt") == 1  # once, then the cache

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("s2study.role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" and "val_ncm" in r.data.metrics for r in children)
    assert (work / "s2study_results" / "smoke").is_dir()
