"""Fetching one file into place: resumable, retried, hash-checked, atomic, one process at a time.

:func:`download` copies ``http(s)://``, ``file://`` or ``s3://`` sources (``s3://`` through
pyarrow, which reads ``AWS_ENDPOINT_URL`` and the usual AWS credentials) into ``dest``:

- bytes stream into ``dest.part`` with a progress bar (size and speed); an interrupted transfer
  resumes from the end of the ``.part`` file (an HTTP Range request, or a seek);
- transient failures (connection refused or reset, timeouts, HTTP 5xx/429, a transfer that
  broke off) are retried with exponential backoff, resuming each time; a missing file (HTTP
  404/403/410, no such path) fails at once;
- the complete file is checked against the expected size and sha256; a mismatch deletes it and
  says so; only a checked file is renamed to ``dest`` (``os.replace``), so a reader never sees
  a half-written file;
- a lock file (:mod:`filelock`) beside ``dest`` makes concurrent callers (trials sharing a node)
  wait for the first one's download instead of fetching the same bytes again.

Why not pooch: it cannot resume a partial download, reads neither ``file://`` nor ``s3://``
mirrors, and does not serialise concurrent downloads of one file across processes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from s2study.errors import DataError, EnvironmentProblem

CHUNK = 1 << 20
#: seconds before the first retry; doubled for each further one
BACKOFF_S = 1.0
RETRIES = 4
TIMEOUT_S = 60


class Unreachable(EnvironmentProblem):
    """The source cannot be reached or does not have the file (the message names the URL)."""


class _Transient(Exception):
    """A failure worth retrying (the text says what happened)."""


@dataclass
class _Stream:
    """An open source: ``read(n)`` from ``start``; ``total`` bytes in all when known."""

    file: BinaryIO
    start: int
    total: int | None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- sources


def _open_http(url: str, start: int) -> _Stream | None:
    headers = {"User-Agent": "s2study"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the partial file already holds everything
            return None
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise Unreachable(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise _Transient(str(getattr(exc, "reason", exc))) from None
    resumed = start > 0 and response.status == 206
    length = response.headers.get("Content-Length")
    start = start if resumed else 0
    return _Stream(response, start, start + int(length) if length is not None else None)


def _open_seekable(file: BinaryIO, start: int, total: int) -> _Stream | None:
    if start >= total:
        file.close()
        return None if start == total else _Stream(file, 0, total)  # longer: a stale .part
    file.seek(start)
    return _Stream(file, start, total)


def _open_file(url: str, start: int) -> _Stream | None:
    path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if not path.is_file():
        raise Unreachable(f"{url}: no such file {path}")
    return _open_seekable(open(path, "rb"), start, path.stat().st_size)


def _open_s3(url: str, start: int) -> _Stream | None:
    import pyarrow.fs

    try:
        fs, key = pyarrow.fs.FileSystem.from_uri(url)
        info = fs.get_file_info(key)
    except (OSError, ValueError) as exc:
        raise _Transient(str(exc).splitlines()[0]) from None
    if info.type != pyarrow.fs.FileType.File:
        raise Unreachable(f"{url}: no such object")
    try:
        return _open_seekable(fs.open_input_file(key), start, info.size)
    except OSError as exc:
        raise _Transient(str(exc).splitlines()[0]) from None


_OPENERS = {"http": _open_http, "https": _open_http, "file": _open_file, "s3": _open_s3}


def supported(url: str) -> bool:
    """True for the URL schemes :func:`download` reads."""
    return urllib.parse.urlparse(url).scheme in _OPENERS


# ----------------------------------------------------------------------------- download


def _check(path: Path, url: str, size: int | None, sha256: str | None) -> None:
    """Compare ``path`` with the expected size and sha256; a mismatch deletes it."""
    got = path.stat().st_size
    if size is not None and got != size:
        path.unlink()
        raise DataError(f"{url}: {got} bytes arrived, expected {size}; the file was deleted "
                        "(run again to download it afresh)")
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256.lower():
            path.unlink()
            raise DataError(f"{url}: sha256 mismatch: got {digest}, expected {sha256}; the file was "
                            "deleted (a corrupted transfer or a different file at that address)")


def _transfer(url: str, part: Path, progress: bool, label: str) -> None:
    """Append the rest of ``url`` to ``part`` (one attempt)."""
    from tqdm import tqdm

    start = part.stat().st_size if part.exists() else 0
    stream = _OPENERS[urllib.parse.urlparse(url).scheme](url, start)
    if stream is None:
        return
    with stream.file, open(part, "ab" if stream.start else "wb") as out, tqdm(
        total=stream.total, initial=stream.start, unit="B", unit_scale=True, unit_divisor=1024,
        desc=label, disable=not progress, file=sys.stderr, mininterval=0.5,
    ) as bar:
        try:
            while block := stream.file.read(CHUNK):
                out.write(block)
                bar.update(len(block))
        except (http.client.IncompleteRead, OSError) as exc:
            raise _Transient(f"the transfer broke off after {out.tell()} bytes ({exc})") from None
        if stream.total is not None and out.tell() < stream.total:
            raise _Transient(f"the transfer stopped at {out.tell()} of {stream.total} bytes")


def download(url: str, dest: Path, *, sha256: str | None = None, size: int | None = None,
             progress: bool = True, retries: int = RETRIES, backoff_s: float | None = None) -> Path:
    """Put the file at ``url`` at ``dest`` (see the module docstring); returns ``dest``.

    When ``dest`` exists already (a process before us put it there after its checks, or a user
    by hand) it is checked, not fetched again.

    Raises:
        Unreachable: the source does not have the file, or stayed unreachable through every
            retry (the ``.part`` file is kept: the next call resumes it).
        DataError: size or sha256 mismatch (the file was deleted).
    """
    from filelock import FileLock

    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in _OPENERS:
        raise Unreachable(f"{url}: unsupported address (allowed: http://, https://, file://, s3://)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    lock = FileLock(str(dest.with_name(dest.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        print(f"s2study: waiting for another process that is downloading {dest.name}", file=sys.stderr)
        lock.acquire()
    try:
        if dest.exists():
            _check(dest, url, size, sha256)
            return dest
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, progress, dest.name)
                break
            except _Transient as exc:
                if attempt == retries:
                    raise Unreachable(f"{url}: {exc} (after {retries + 1} attempts)") from None
                wait = (BACKOFF_S if backoff_s is None else backoff_s) * 2**attempt
                print(f"s2study: {dest.name}: {exc}; retrying in {wait:g} s", file=sys.stderr)
                time.sleep(wait)
        _check(part, url, size, sha256)
        os.replace(part, dest)
        return dest
    finally:
        lock.release()
