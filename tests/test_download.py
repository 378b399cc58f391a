"""``s2study data download`` against a real HTTP server on 127.0.0.1 serving archives built
here from a few real RoadScene / RGB-NIR files."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from s2study.cli import main
from s2study.data.datasets import RGBNIR, RoadScene
from s2study.data.download import download_dataset, fetch
from s2study.errors import DataError, EnvironmentProblem


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless ``server.ignore_range``;
    ``server.break_next`` sends the full length header but only half the body, then closes."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
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
        if srv.break_next:
            srv.break_next = False
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.log, srv.ignore_range, srv.break_next = {}, [], False, False
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url_of(srv, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def roadscene_zip(roadscene: Path, n: int = 10) -> bytes:
    """A zip laid out like the GitHub archive: ``RoadScene-master/<folders>``, no splits."""
    ids = sorted(p.stem for p in (roadscene / "cropinfrared").glob("*.jpg"))[:n]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("RoadScene-master/README.md", "RoadScene\n")
        for i in ids:
            for folder in ("cropinfrared", "crop_LR_visible"):
                z.write(roadscene / folder / f"{i}.jpg", f"RoadScene-master/{folder}/{i}.jpg")
    return buf.getvalue()


def test_download_roadscene_resumes_and_loads(server, roadscene, tmp_path):
    body = roadscene_zip(roadscene)
    server.files["/rs.zip"] = body
    server.break_next = True
    with pytest.raises(EnvironmentProblem, match="run the command again to resume"):
        download_dataset("roadscene", tmp_path, url=url_of(server, "/rs.zip"), progress=False)
    part = tmp_path / ".downloads" / "RoadScene-master.zip.part"
    assert 0 < part.stat().st_size < len(body)
    half = part.stat().st_size

    target = download_dataset("roadscene", tmp_path, url=url_of(server, "/rs.zip"), progress=False)
    assert server.log[-1] == ("/rs.zip", f"bytes={half}-")  # resumed, not restarted
    archive = tmp_path / ".downloads" / "RoadScene-master.zip"
    assert archive.read_bytes() == body and not part.exists()

    assert target == tmp_path / "RoadScene"
    splits = {s: (target / "splits" / f"{s}.txt").read_text().split()
              for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [7, 1, 2]
    assert splits["train"] == sorted(splits["train"]) and splits["train"][-1] < splits["val"][0]
    train = RoadScene(target, "train")
    sample = train[0]
    assert sample.image_a.shape == sample.image_b.shape and len(train) == 7
    # already there: nothing is fetched again
    n_requests = len(server.log)
    download_dataset("roadscene", tmp_path, url=url_of(server, "/rs.zip"), progress=False)
    assert len(server.log) == n_requests


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    body = bytes(range(256)) * 400
    server.files["/f.bin"] = body
    server.ignore_range = True
    dest = tmp_path / "f.bin"
    dest.with_name("f.bin.part").write_bytes(b"stale bytes from another file")
    fetch(url_of(server, "/f.bin"), dest, progress=False)
    assert dest.read_bytes() == body
    assert server.log[-1][1] == "bytes=29-"  # asked to resume, got the whole file


def test_checksum_mismatch_is_a_clear_error(server, tmp_path, capsys):
    body = b"archive bytes" * 1000
    server.files["/a.zip"] = body
    dest = tmp_path / "a.zip"
    with pytest.raises(DataError, match="sha256 mismatch: got [0-9a-f]{64}, expected 0{64}"):
        fetch(url_of(server, "/a.zip"), dest, sha256="0" * 64, progress=False)
    assert not dest.exists() and not dest.with_name("a.zip.part").exists()
    with pytest.raises(DataError, match="expected 5"):
        fetch(url_of(server, "/a.zip"), dest, size=5, progress=False)
    digest = hashlib.sha256(body).hexdigest()
    fetch(url_of(server, "/a.zip"), dest, sha256=digest, progress=False)
    fetch(url_of(server, "/a.zip"), tmp_path / "b.zip", progress=False)
    assert digest in capsys.readouterr().out  # unknown checksum: the computed one is printed


def test_unreachable_and_missing(server, tmp_path):
    with pytest.raises(EnvironmentProblem, match="HTTP 404"):
        fetch(url_of(server, "/nope.zip"), tmp_path / "x.zip", progress=False)
    server.files["/bad.zip"] = b"this is not a zip archive"
    with pytest.raises(DataError, match="not a valid zip archive"):
        download_dataset("roadscene", tmp_path, url=url_of(server, "/bad.zip"), progress=False)


def test_cli_download_rgb_nir(server, shared_data, tmp_path, capsys):
    country = shared_data / "RGB-NIR" / "country"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(6):
            for kind in ("rgb", "nir"):
                z.write(country / f"{i:04d}_{kind}.jpg", f"nirscene1/country/{i:04d}_{kind}.jpg")
    server.files["/nirscene1.zip"] = buf.getvalue()
    code = main(["data", "download", "rgb-nir", "--to", str(tmp_path), "--quiet",
                 "--url", url_of(server, "/nirscene1.zip")])
    assert code == 0
    assert "S2STUDY_DATA" in capsys.readouterr().out
    val = RGBNIR(tmp_path / "RGB-NIR", "val")
    assert val.ids == ["country/0000", "country/0005"]
    assert main(["data", "download", "rgb-nir", "--to", str(tmp_path), "--quiet",
                 "--url", url_of(server, "/missing.zip"), "--force"]) == 2
