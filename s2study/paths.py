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


def _first_existing(tried: list[tuple[str, Path]], what: str, env: str) -> Path:
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
    if explicit is not None:
        tried = [("explicit path", Path(explicit).expanduser().absolute())]
    else:
        tried = []
        if os.environ.get(DATA_ENV):
            env = Path(os.environ[DATA_ENV]).expanduser().absolute()
            tried.append((f"${DATA_ENV}", env / dirname))
        tried += [("shared data", p / dirname) for p in _shared_candidates("data")]
    return _first_existing(tried, f"dataset folder {dirname!r}", DATA_ENV)


def shared_weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Absolute path of the folder holding shared weights (e.g. the official R2D2 checkpoint).

    Order: ``explicit``; ``$S2STUDY_WEIGHTS``; ``<repo>/../shared/weights``;
    ``<cwd>/../shared/weights``.

    Raises:
        DataError: none exists (the message lists every place tried).
    """
    if explicit is not None:
        tried = [("explicit path", Path(explicit).expanduser().absolute())]
    else:
        tried = []
        if os.environ.get(WEIGHTS_ENV):
            tried.append((f"${WEIGHTS_ENV}", Path(os.environ[WEIGHTS_ENV]).expanduser().absolute()))
        tried += [("shared weights", p) for p in _shared_candidates("weights")]
    return _first_existing(tried, "weights folder", WEIGHTS_ENV)


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

