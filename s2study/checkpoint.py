"""Self-describing checkpoints: weights plus everything needed to rebuild the extractor.

A checkpoint is a ``torch.save``-d dict of plain types and tensors only, so it loads with
``torch.load(..., weights_only=True)`` and no code from a file is ever executed::

    {"format": "s2study-checkpoint", "version": 1, "s2study_version": "0.1.0",
     "method": {"name": "r2d2", "params": {...}},      # rebuilds the network
     "model": state_dict, "config": {...},               # the full TrainConfig as a dict
     "epoch": 3, "metrics": {"val_ncm": ...},
     "optimizer": state_dict | absent, "rng": {...} | absent, "extra": {...}}

Writes are atomic (temporary file, then rename), so a kill during a write never leaves a
corrupt checkpoint behind.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from s2study.errors import CheckpointError

FORMAT = "s2study-checkpoint"
VERSION = 1

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (method, model, config, epoch, metrics, ...) as a checkpoint."""
    from s2study import __version__

    data = {"format": FORMAT, "version": VERSION, "s2study_version": __version__, **payload}
    atomic_write_bytes(Path(path), lambda f: torch.save(data, f))
    return Path(path)


def _defaultdict_as_dict(default_factory: Any = None) -> dict:
    """Stand-in for ``collections.defaultdict(list)`` while unpickling with ``weights_only``.

    The official ``faster2d2_WASF_N16.pt`` keeps its training losses in ``defaultdict(list)``
    objects, which PyTorch's weights-only unpickler cannot rebuild (even allowlisted it fills
    only plain dicts). Read as a plain dict they are data like any other; no factory is called.
    """
    if default_factory is not None and default_factory is not list:
        raise pickle.UnpicklingError(f"a defaultdict with factory {default_factory!r} is not plain data")
    return {}


#: allowed only inside :func:`safe_torch_load`: ``list`` as the factory argument (calling it on
#: unpickled data runs no code of the file's choosing) and the defaultdict stand-in
_PLAIN_DATA_STAND_INS = [list, (_defaultdict_as_dict, "collections.defaultdict")]


def safe_torch_load(path: str | Path, what: str = "checkpoint", map_location="cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain types only, no code run.

    Raises:
        CheckpointError: the file is missing or not a readable ``what`` (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such {what} file")
    try:
        with torch.serialization.safe_globals(_PLAIN_DATA_STAND_INS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or foreign files
        reason = load_failure_reason(exc, _starts_as_zip(path))
        raise CheckpointError(f"{path}: not a readable {what}: {reason}") from None


def _starts_as_zip(path: Path) -> bool:
    """The file begins like the zip archive ``torch.save`` writes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _global_name(name: str) -> str:
    """``io.open`` -> ``io.open, i.e. builtins.open`` where it is that builtin (no import)."""
    module, _, attr = name.rpartition(".")
    loaded = sys.modules.get(module)
    if (
        module != "builtins"
        and loaded is not None
        and getattr(builtins, attr, None) is getattr(loaded, attr, object())
    ):
        return f"{name}, i.e. builtins.{attr}"
    return name


def load_failure_reason(exc: BaseException, is_zip: bool) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one line, for the user.

    ``is_zip``: the file starts like a ``torch.save`` archive, so a read failure means it is
    cut short or damaged. Never relays torch's advice to retry with ``weights_only=False``
    (that would run code from the file) and drops its terminal escape codes.
    """
    text = _ANSI_ESCAPE.sub("", str(exc))
    refused = _REFUSED_GLOBAL.search(text)
    if isinstance(exc, pickle.UnpicklingError) and refused:
        return (
            "refused: the file holds Python objects that are not plain data (Unsupported "
            f"global: GLOBAL {_global_name(refused.group(1))}); s2study loads files with "
            "weights_only=True and never runs code from a file"
        )
    if isinstance(exc, EOFError) and not text.strip():
        return "the file is empty"
    if is_zip or "central directory" in text:
        return "the file is truncated or corrupted (its zip archive cannot be read)"
    return "not a PyTorch file (expected a file written by torch.save)"


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Load an s2study checkpoint safely (``weights_only=True``).

    Raises:
        CheckpointError: missing, truncated, not a checkpoint, or from an incompatible version.
    """
    path = Path(path)
    data = safe_torch_load(path, "checkpoint", map_location)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(data).__name__}, expected a dict)")
    if data.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an s2study checkpoint (keys: {', '.join(sorted(map(str, data))[:8])})"
        )
    if data.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {data.get('version')!r} is not supported "
            f"(this s2study reads version {VERSION})"
        )
    for key in ("method", "model"):
        if key not in data:
            raise CheckpointError(f"{path}: checkpoint lacks the {key!r} entry")
    return data
