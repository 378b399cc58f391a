"""The best model of a study as a version of a named model in MLflow's model registry.

A study with ``register: {name: NAME}`` registers its best trial's checkpoint folder
(``checkpoints/best.pt`` of the trial's run) as a new version of ``NAME``, tagged with the
study, its parent run, the trial's metric and its evaluation. ``models:/NAME/3``,
``models:/NAME/latest`` and ``models:/NAME@ALIAS`` are then checkpoint names that
:func:`s2study.load_extractor` and ``s2study eval --checkpoint`` accept: the version is
downloaded once into the user cache (``<cache>/models/NAME/VERSION``; versions never change)
from the tracking store ``$MLFLOW_TRACKING_URI`` names (default ``./mlflow.db``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from s2study.errors import ConfigError

CHECKPOINT = "best.pt"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+|latest)|@(?P<alias>[\w-]+))$")


def is_model_uri(text: str) -> bool:
    return str(text).startswith("models:/")


def register_best(uri: str, name: str, run_id: str, parent_run_id: str, tags: dict[str, Any]) -> int:
    """Register the ``checkpoints`` folder of run ``run_id`` as a new version of model ``name``
    (created where missing); returns the version number."""
    from mlflow.exceptions import MlflowException

    from s2study.study.tracking import client

    c = client(uri)
    try:
        c.create_registered_model(name, description="S2-Net detect-and-describe models registered by s2study "
                                                    "studies (checkpoints/best.pt of each version's run)")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/checkpoints"
    version = c.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
        description=f"best trial of study {tags.get('s2study.study', '?')} (parent run {parent_run_id})")
    return int(version.version)


def _tracking_uri(tracking_uri: str | None) -> str:
    from s2study.study.tracking import normalize_tracking_uri

    return normalize_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None, Path.cwd())


def resolve_model_uri(model_uri: str, tracking_uri: str | None = None) -> Path:
    """The local ``best.pt`` of a registered model version (downloaded on first use).

    Raises:
        ConfigError: a malformed URI, or no such model or version in the tracking store.
    """
    from mlflow.exceptions import MlflowException

    from s2study.resolver import cache_dir
    from s2study.study.tracking import client

    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ConfigError(f"{model_uri!r} is not a model URI; use models:/NAME/VERSION, models:/NAME/latest or "
                          "models:/NAME@ALIAS")
    uri = _tracking_uri(tracking_uri)
    name, c = match["name"], client(uri)
    try:
        if match["alias"]:
            version = c.get_model_version_by_alias(name, match["alias"])
        elif match["version"] == "latest":
            versions = c.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ConfigError(f"{model_uri}: model {name!r} has no version in {uri}")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = c.get_model_version(name, match["version"])
    except MlflowException as exc:
        known = sorted(m.name for m in c.search_registered_models())
        raise ConfigError(f"{model_uri}: not in the model registry of {uri} ({exc.message.splitlines()[0]}); "
                          f"registered models: {', '.join(known) or 'none'}") from None
    folder = cache_dir() / "models" / name / str(version.version)
    if not (folder / CHECKPOINT).is_file():
        import mlflow.artifacts

        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                dst_path=str(partial), tracking_uri=uri)
            found = sorted(partial.rglob(CHECKPOINT))
            if not found:
                raise ConfigError(f"{model_uri}: version {version.version} of {name!r} holds no {CHECKPOINT}")
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            os.replace(found[0], folder / CHECKPOINT)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder / CHECKPOINT
