"""A real ``mlflow server`` for the tests that need the UI's REST API, started and stopped here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def mlflow_server(options: list[str], url: str, env: dict[str, str], cwd: Path | None = None) -> Iterator[str]:
    """Run ``mlflow server OPTIONS`` until its ``/health`` at ``url`` answers; yield ``url``.

    The server runs in its own process group, so stopping it stops its workers too.
    """
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", *options],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.read().strip() == b"OK":
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, "mlflow server did not come up"
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
