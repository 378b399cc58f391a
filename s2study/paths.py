"""Output folders checked before any work starts (datasets and weights: :mod:`s2study.resolver`)."""

from __future__ import annotations

import os
from pathlib import Path


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

