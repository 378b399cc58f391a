"""The project's error types.

Every user error (bad config, missing data, unusable checkpoint) is raised as an
:class:`S2StudyError` subclass; the CLI prints its message on one line and exits with
code 2, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class S2StudyError(Exception):
    """Base class of every error that is the user's to fix."""

    exit_code = 2


class ConfigError(S2StudyError):
    """A config or study file is invalid (names the file, key, value and what is allowed)."""


class DataError(S2StudyError):
    """A dataset root, split file, image or ground-truth file is missing or unusable."""


class CheckpointError(S2StudyError):
    """A checkpoint file cannot be used (not a checkpoint, truncated, wrong method/version)."""


class EnvironmentProblem(S2StudyError):
    """The environment cannot run the request (tracking server down, no GPU, unwritable path)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; a trial fails with this reason (not a user error)."""
