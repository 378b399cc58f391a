"""A mirror of the project's public sources on 127.0.0.1, and a user's machine without
``../shared``, for the resolver tests.

:func:`build_mirror` lays out files in the mirror layout (written here by hand, independently
of ``s2study fetch --mirror-to``): weight files under their official names, ``RoadScene.zip``
(one top folder ``RoadScene/``) and ``SHA256SUMS``. :class:`FileServer` serves a folder over
HTTP with Range support, logs every request, and can cut a transfer half-way or answer 503.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import sys
import threading
import zipfile
from pathlib import Path
from typing import Self

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def hidden_shared(command: list[str]) -> list[str]:
    """``command`` run where ``../shared`` is an empty folder (needs root and ``unshare``)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding ../shared needs root and unshare(1)")
    script = 'mount -t tmpfs s2study-no-shared "$0" && test -z "$(ls -A "$0")" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(SHARED), *command]


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment as a new user would have it: own HOME, no s2study variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S2STUDY_", "MLFLOW_", "XDG_"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", **extra)
    return env


def zip_dataset(folder: Path, top: str, dest: Path, only: list[str] | None = None) -> Path:
    """``dest``: the files under ``folder`` as ``top/<relative path>`` (``only``: these
    sub-folders)."""
    with zipfile.ZipFile(dest, "w") as z:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder)
            if only is None or rel.parts[0] in only:
                z.write(path, f"{top}/{rel.as_posix()}")
    return dest


def write_sums(folder: Path) -> None:
    """``SHA256SUMS`` of every other file in ``folder`` (the ``sha256sum`` format)."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != "SHA256SUMS"]
    (folder / "SHA256SUMS").write_text("".join(lines))


def build_mirror(dest: Path, roadscene: Path, weights: dict[str, Path]) -> Path:
    """A mirror folder holding ``RoadScene.zip`` (images only: the project's split applies),
    the given weight files under their names, and ``SHA256SUMS``."""
    dest.mkdir(parents=True, exist_ok=True)
    zip_dataset(roadscene, "RoadScene", dest / "RoadScene.zip", only=["cropinfrared", "crop_LR_visible"])
    for name, path in weights.items():
        (dest / name).write_bytes(path.read_bytes())
    write_sums(dest)
    return dest


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv: FileServer = self.server  # type: ignore[assignment]
        name = self.path.lstrip("/")
        srv.log.append((name, self.headers.get("Range")))
        if srv.fail_next:
            srv.fail_next -= 1
            self.send_error(503)
            return
        path = srv.root / name
        if not name or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start, rng = 0, self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.cut_next:
            srv.cut_next = False
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        for i in range(0, len(payload), 1 << 16):
            self.wfile.write(payload[i:i + (1 << 16)])
            if srv.delay_s:
                srv.stopped.wait(srv.delay_s)


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1 (``url``) in a thread until :meth:`stop`.

    Attributes:
        log: ``(file name, Range header)`` per request.
        ranges: honour Range requests (False: always the whole file with 200).
        cut_next: send half of the next response body, then close the connection.
        fail_next: answer the next N requests with 503.
        delay_s: pause after each 64 KiB sent (slow transfers, to overlap two clients).
    """

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.log: list[tuple[str, str | None]] = []
        self.ranges, self.cut_next, self.fail_next, self.delay_s = True, False, 0, 0.0
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, name: str) -> int:
        return sum(1 for n, _ in self.log if n == name)

    def stop(self) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
