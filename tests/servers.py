"""Real servers for the tests that need them, started on free ports of 127.0.0.1 and stopped here.

- :func:`mlflow_server` / :class:`MlflowServer`: ``mlflow server`` (stopped and started again by
  the outage tests, on the same port or another one);
- :func:`postgres_server`: a PostgreSQL cluster made by ``initdb`` in a temporary folder and run
  by ``pg_ctl`` (as an unprivileged user when the tests run as root: PostgreSQL refuses root);
- :func:`s3_server`: moto's standalone S3-compatible server (``python -m moto.server``).

:func:`postgres_binaries` says where ``initdb`` and ``pg_ctl`` are (``PATH``, then
``/usr/lib/postgresql/*/bin``), or None.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(ready, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} exited with code {proc.returncode} before it was ready")
        if time.time() > deadline:
            raise AssertionError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (started in its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


# --------------------------------------------------------------------------- MLflow


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.read().strip() == b"OK"
    except OSError:
        return False


class MlflowServer:
    """``mlflow server --workers 1 OPTIONS --host 127.0.0.1 --port PORT``, startable again.

    Args:
        options: the server's options other than host and port.
        env: its environment.
        port: default a free one.
        log: a file its output is appended to (default: discarded).
    """

    def __init__(self, options: list[str], env: dict[str, str], port: int | None = None,
                 cwd: Path | None = None, log: Path | None = None) -> None:
        self.options, self.env, self.cwd, self.log = list(options), env, cwd, log
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None, timeout: float = 300) -> str:
        """Start (on ``port``, default the current one) and wait for ``/health``; returns the URL."""
        self.port = port or self.port
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--workers", "1", *self.options,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log:
                out.close()
        _wait_until(lambda: _healthy(self.url), self.proc, timeout, f"mlflow server on port {self.port}")
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@contextmanager
def mlflow_server(options: list[str], url: str, env: dict[str, str], cwd: Path | None = None) -> Iterator[str]:
    """Run ``mlflow server OPTIONS`` until its ``/health`` at ``url`` answers; yield ``url``.

    ``options`` name the host and port (``url`` is where they make it listen). The server
    runs in its own process group, so stopping it stops its workers too.
    """
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", *options],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_until(lambda: _healthy(url), server, 180, "mlflow server")
        yield url
    finally:
        _stop(server)


@contextmanager
def optuna_dashboard(storage: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``optuna-dashboard STORAGE`` on a free port of 127.0.0.1 until its API answers; yields its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("optuna-dashboard")), storage, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
         "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/studies", timeout=2):
                return True
        except OSError:
            return False

    try:
        _wait_until(answers, server, 120, "optuna-dashboard")
        yield url
    finally:
        _stop(server)


# --------------------------------------------------------------------------- PostgreSQL


def postgres_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's layout), or None."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root: the user to run it as (None: we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise AssertionError("running as root and there is neither a 'postgres' nor a 'nobody' user for PostgreSQL")


@contextmanager
def postgres_server(binaries: Path, database: str = "mlflow") -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (TCP only, trust authentication) holding an
    empty ``database``; yields ``postgresql://postgres@127.0.0.1:PORT/DATABASE``."""
    import psycopg

    user = _unprivileged_user()
    # not under pytest's tmp_path: an unprivileged server must be able to reach its folder
    root = Path(tempfile.mkdtemp(prefix="s2study-pg-"))
    data, log = root / "data", root / "server.log"
    prefix: list[str] = []
    if user is not None:
        info = pwd.getpwnam(user)
        os.chown(root, info.pw_uid, info.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    port = free_port()
    server_options = (f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
                      "-c fsync=off -c full_page_writes=off")
    try:
        subprocess.run([*prefix, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--no-sync"], check=True, capture_output=True, text=True, timeout=300)
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120",
                        "-o", server_options, "start"], check=True, capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as exc:
        server_log = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"PostgreSQL did not start: {exc.cmd}: {exc.stderr}\n{server_log}") from None
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       check=False, capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- S3


@contextmanager
def s3_server(log: Path | None = None) -> Iterator[str]:
    """moto's S3-compatible server on 127.0.0.1; yields its endpoint URL (any credentials work)."""
    port = free_port()
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log:
            out.close()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    try:
        _wait_until(ready, proc, 120, "moto S3 server")
        yield url
    finally:
        _stop(proc)
