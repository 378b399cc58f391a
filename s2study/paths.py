"""Where data and weights live: an explicit value > an environment variable > ``../shared``.

Every function returns an absolute path, so nothing depends on the working directory later
(Ray trials change it). When nothing exists, the error names every place that was tried and
the environment variable that overrides them.
"""

from __future__ import annotations

import os
from pathlib import Path

from s2study.errors import DataError

DATA_ENV = "S2STUDY_DATA"
WEIGHTS_ENV = "S2STUDY_WEIGHTS"


def _shared_candidates(name: str) -> list[Path]:
    """``<repo>/../shared/<name>`` (from the package location), then ``<cwd>/../shared/<name>``."""
    repo = Path(__file__).resolve().parents[1]
    return [repo.parent / "shared" / name, Path.cwd().resolve().parent / "shared" / name]


def _locate(explicit: str | os.PathLike | None, env: str, shared: str, child: str, what: str) -> Path:
    """The first existing of ``explicit``; ``$env/child``; ``../shared/<shared>/child``."""
    if explicit is not None:
        tried = [("explicit path", Path(explicit).expanduser().absolute())]
    else:
        tried = []
        if os.environ.get(env):
            tried.append((f"${env}", Path(os.environ[env]).expanduser().absolute() / child))
        tried += [(f"shared {shared}", p / child) for p in _shared_candidates(shared)]
    for _, path in tried:
        if path.exists():
            return path.resolve()
    places = "; ".join(f"{path} ({how})" for how, path in tried)
    raise DataError(f"{what} not found; looked in: {places}. Set {env} or pass the path explicitly")


def data_root(dirname: str, explicit: str | os.PathLike | None = None) -> Path:
    """Absolute path of a dataset folder such as ``RoadScene`` or ``RGB-NIR``.

    Args:
        dirname: the dataset's folder name inside a data folder.
        explicit: a flag or config value; when given it is the dataset folder itself and the
            only place looked at.

    Returns:
        The first existing of: ``explicit``; ``$S2STUDY_DATA/<dirname>``;
        ``<repo>/../shared/data/<dirname>``; ``<cwd>/../shared/data/<dirname>``.

    Raises:
        DataError: none exists (the message lists every place tried).
    """
    return _locate(explicit, DATA_ENV, "data", dirname, f"dataset folder {dirname!r}")


def shared_weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Absolute path of the folder holding shared weights (e.g. the official R2D2 checkpoint).

    Order: ``explicit``; ``$S2STUDY_WEIGHTS``; ``<repo>/../shared/weights``;
    ``<cwd>/../shared/weights``.

    Raises:
        DataError: none exists (the message lists every place tried).
    """
    return _locate(explicit, WEIGHTS_ENV, "weights", "", "weights folder")


def output_dir(path: str | os.PathLike, flag: str = "--out", what: str = "output folder") -> Path:
    """``path`` as an absolute folder that can be created and written, checked before any work.

    Raises:
        EnvironmentProblem: an existing part of the path is a file, or not writable.
    """
    from s2study.errors import EnvironmentProblem

    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise EnvironmentProblem(f"{flag} {target}: cannot create the {what} ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EnvironmentProblem(f"{flag} {target}: cannot create the {what} ({existing} is not writable)")
    return target

