"""The resolver and its downloads against real HTTP (and S3) servers on 127.0.0.1 serving the
real files of ``../shared`` in the mirror layout (tests/mirror.py).

In-process tests hide ``../shared`` from the resolver (``dev_shared`` patched to None) and give
it an empty cache; the fresh-machine tests (tests/test_fresh_machine.py) hide it for real.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mirror import FileServer, build_mirror, write_sums, zip_dataset

from s2study import download as download_module
from s2study import resolver
from s2study.cli import main
from s2study.data.datasets import RoadScene
from s2study.download import Unreachable, download
from s2study.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "r2d2_WASF_N16.pt"


@pytest.fixture(scope="module")
def mirror_dir(tmp_path_factory, roadscene, official_r2d2) -> Path:
    return build_mirror(tmp_path_factory.mktemp("mirror"), roadscene, {WEIGHTS: official_r2d2})


@pytest.fixture
def fresh(tmp_path, monkeypatch) -> Path:
    """An empty cache, no variables, and no ``../shared`` for the resolver; fast retries."""
    for env in (resolver.DATA_ENV, resolver.WEIGHTS_ENV, resolver.MIRROR_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(resolver.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(resolver, "dev_shared", lambda: None)
    monkeypatch.setattr(download_module, "BACKOFF_S", 0.01)
    return tmp_path / "cache"


@pytest.fixture
def server(mirror_dir, monkeypatch):
    with FileServer(mirror_dir) as srv:
        monkeypatch.setenv(resolver.MIRROR_ENV, srv.url)
        yield srv


# ----------------------------------------------------------------------------- order


def test_resolution_order(tmp_path, monkeypatch, roadscene):
    monkeypatch.delenv(resolver.MIRROR_ENV, raising=False)
    env, cache = tmp_path / "env", tmp_path / "cache"
    for folder in (env / "RoadScene", cache / "data" / "RoadScene", tmp_path / "mine"):
        folder.mkdir(parents=True)
    monkeypatch.setenv(resolver.DATA_ENV, str(env))
    monkeypatch.setenv(resolver.CACHE_ENV, str(cache))
    assert resolver.resolve_dataset("roadscene", tmp_path / "mine") == tmp_path / "mine"  # explicit
    assert resolver.resolve_dataset("roadscene") == env / "RoadScene"
    monkeypatch.delenv(resolver.DATA_ENV)
    assert resolver.resolve_dataset("roadscene") == cache / "data" / "RoadScene"
    (cache / "data" / "RoadScene").rmdir()
    shared = resolver.dev_shared()
    assert shared is not None and shared == REPO.parent / "shared"  # this is a checkout
    assert resolver.resolve_dataset("roadscene") == (shared / "data" / "RoadScene").resolve()
    with pytest.raises(DataError, match="the folder .* given as its root does not exist"):
        resolver.resolve_dataset("roadscene", tmp_path / "absent")


def test_unknown_names_and_paths(fresh):
    with pytest.raises(ConfigError, match=r"unknown dataset 'roadscen' \(did you mean 'roadscene'\?\)"):
        resolver.resolve_dataset("roadscen")
    with pytest.raises(DataError, match="not a weights name; names: aliked-n16, .*official"):
        resolver.resolve_weights("/no/such/file.pt")
    assert resolver.weights_entry("official").name == "r2d2_WASF_N16"
    assert resolver.dataset_entry("rgb-nir").name == "rgbnir"
    with pytest.raises(DataError, match="Run `s2study fetch r2d2_WASF_N16`"):
        resolver.resolve_weights("official", fetch=False)


def test_installed_package_does_not_look_beside_itself(tmp_path, monkeypatch):
    """``dev_shared`` answers only for a checkout (a ``pyproject.toml`` beside the package)."""
    site = tmp_path / "site-packages"
    (site / "s2study").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    monkeypatch.setattr(resolver, "__file__", str(site / "s2study" / "resolver.py"))
    assert resolver.dev_shared() is None


# ----------------------------------------------------------------------------- downloads


def test_first_use_downloads_then_the_cache_serves_offline(fresh, server, official_r2d2, capfd):
    path = resolver.resolve_weights("official")
    assert path == fresh / "weights" / WEIGHTS and path.read_bytes() == official_r2d2.read_bytes()
    err = capfd.readouterr().err
    assert WEIGHTS in err and "100%" in err and "B/s" in err  # the progress bar: size and speed
    folder = resolver.resolve_dataset("roadscene")
    assert folder == fresh / "data" / "RoadScene"
    assert "fetching dataset roadscene" in capfd.readouterr().err
    assert (len(RoadScene(folder, "train")), len(RoadScene(folder, "val"))) == (156, 20)  # the project's split
    assert not list((fresh / "downloads").glob("*.zip")) and not list(fresh.rglob("*.part"))  # unpacked
    server.stop()  # offline from here on
    assert resolver.resolve_weights("r2d2_WASF_N16") == path
    assert resolver.resolve_dataset("roadscene") == folder


def test_wrong_digest_fails_and_keeps_nothing(fresh, tmp_path, mirror_dir, monkeypatch, official_r2d2):
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    (bad / WEIGHTS).write_bytes(official_r2d2.read_bytes()[:-10] + b"0123456789")
    (bad / "RoadScene.zip").write_bytes((mirror_dir / "RoadScene.zip").read_bytes())
    (bad / "SHA256SUMS").write_text(f"{'0' * 64}  RoadScene.zip\n")
    with FileServer(bad) as srv:
        monkeypatch.setenv(resolver.MIRROR_ENV, srv.url)
        with pytest.raises(DataError, match=f"sha256 mismatch: got [0-9a-f]{{64}}, expected "
                                            f"{resolver.WEIGHTS['r2d2_WASF_N16'].sha256}; the file was deleted"):
            resolver.resolve_weights("official")
        with pytest.raises(DataError, match="sha256 mismatch.*expected 0{64}"):
            resolver.resolve_dataset("roadscene")
    leftovers = [p for p in fresh.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == [] and not (fresh / "data" / "RoadScene").exists()


def test_a_cut_transfer_resumes_where_it_stopped(fresh, server):
    server.cut_next = True
    path = resolver.resolve_weights("official")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == resolver.WEIGHTS["r2d2_WASF_N16"].sha256
    (_, no_range), (_, rng) = [e for e in server.log if e[0] == WEIGHTS]
    size = path.stat().st_size
    assert no_range is None and rng.startswith("bytes=") and 0 < int(rng[6:-1]) < size


def test_transient_errors_are_retried_then_reported_in_one_line(fresh, server, capsys):
    server.fail_next = 2
    assert resolver.resolve_weights("official").is_file()
    assert server.gets(WEIGHTS) == 3
    server.fail_next = 99
    capsys.readouterr()
    assert main(["fetch", "r2d2_WAF_N16", "--quiet"]) == 2
    *retries, line = capsys.readouterr().err.strip().splitlines()
    assert len(retries) == 4 and all("HTTP 503 Service Unavailable; retrying in" in r for r in retries)
    assert line.startswith("s2study: error: weights r2d2_WAF_N16 is needed")
    assert f"{server.url}/r2d2_WAF_N16.pt: HTTP 503" in line and "after 5 attempts" in line
    assert f"Download {server.url}/r2d2_WAF_N16.pt to {fresh / 'weights' / 'r2d2_WAF_N16.pt'}" in line
    assert "S2STUDY_MIRROR" in line and "S2STUDY_WEIGHTS" in line


def test_no_server_and_no_cache_is_one_line_and_exit_2(fresh, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv(resolver.MIRROR_ENV, url)
    assert main(["fetch", "official", "--quiet"]) == 2
    *retries, line = capsys.readouterr().err.strip().splitlines()  # retry notices, then the error
    assert len(retries) == 4 and line.startswith("s2study: error: weights r2d2_WASF_N16 is needed")
    assert f"{url}/{WEIGHTS}" in line and "Connection refused" in line and str(fresh) in line
    assert not list(fresh.rglob("*.pt"))


def test_missing_file_at_the_source_fails_at_once(fresh, server):
    with pytest.raises(DataError, match="r2d2_WAF_N16.pt: HTTP 404"):
        resolver.resolve_weights("r2d2_WAF_N16")
    assert server.gets("r2d2_WAF_N16.pt") == 1  # not retried


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.ranges = False
    dest = tmp_path / WEIGHTS
    dest.with_name(WEIGHTS + ".part").write_bytes(b"stale bytes from another file")
    download(f"{server.url}/{WEIGHTS}", dest, sha256=resolver.WEIGHTS["r2d2_WASF_N16"].sha256, progress=False)
    assert server.log[-1] == (WEIGHTS, "bytes=29-")  # asked to resume, got the whole file
    assert dest.read_bytes() == (server.root / WEIGHTS).read_bytes()


def test_file_urls_and_unsupported_schemes(tmp_path, mirror_dir):
    dest = download(f"file://{mirror_dir / WEIGHTS}", tmp_path / "w.pt", progress=False)
    assert dest.read_bytes() == (mirror_dir / WEIGHTS).read_bytes()
    with pytest.raises(Unreachable, match="no such file"):
        download(f"file://{tmp_path / 'nothing'}", tmp_path / "x", progress=False)
    with pytest.raises(Unreachable, match="unsupported address"):
        download("ftp://example.org/x", tmp_path / "y", progress=False)


def test_two_processes_fetching_one_file_download_it_once(server, tmp_path):
    server.delay_s = 0.02  # about 1 s for the file: the two processes overlap
    dest = tmp_path / "shared-cache" / WEIGHTS
    code = ("import sys; from s2study.download import download; "
            "print(download(sys.argv[1], __import__('pathlib').Path(sys.argv[2]), progress=False))")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"{server.url}/{WEIGHTS}", str(dest)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert [out.strip() for out, _ in results] == [str(dest)] * 2
    assert server.gets(WEIGHTS) == 1
    assert any("waiting for another process" in err for _, err in results)
    assert dest.read_bytes() == (server.root / WEIGHTS).read_bytes()


# ----------------------------------------------------------------------------- datasets


def test_public_roadscene_archive_gets_the_projects_split(fresh, tmp_path, roadscene, monkeypatch, capfd):
    """The GitHub archive layout (``RoadScene-<commit>/...``, no splits) from a stand-in URL."""
    public = tmp_path / "public"
    public.mkdir()
    top = f"RoadScene-{resolver.ROADSCENE_COMMIT}"
    zip_dataset(roadscene, top, public / "archive.zip", only=["cropinfrared", "crop_LR_visible"])
    with FileServer(public) as srv:
        entry = dataclasses.replace(resolver.DATASETS["roadscene"], url=f"{srv.url}/archive.zip")
        monkeypatch.setitem(resolver.DATASETS, "roadscene", entry)
        folder = resolver.resolve_dataset("roadscene", progress=False)
    digest = hashlib.sha256((public / "archive.zip").read_bytes()).hexdigest()
    assert f"sha256 of roadscene-archive.zip: {digest} (the source pins none)" in capfd.readouterr().err
    assert not (folder / "splits").exists()
    val = RoadScene(folder, "val")
    assert val.ids == (REPO / "s2study/data/splits/roadscene/val.txt").read_text().split()
    with pytest.raises(DataError, match="split 'test' .* is empty: this copy holds only the train and val"):
        RoadScene(folder, "test")


def test_roadscene_test_split_is_every_other_pair(tmp_path, roadscene):
    folder = tmp_path / "RoadScene"
    for sub in ("cropinfrared", "crop_LR_visible"):
        (folder / sub).mkdir(parents=True)
        for name in ("FLIR_00006.jpg", "FLIR_00548.jpg"):  # a train and a val id
            (folder / sub / name).write_bytes((roadscene / sub / name).read_bytes())
        for extra in ("FLIR_99990.jpg", "FLIR_99991.jpg"):  # pairs of neither split
            (folder / sub / extra).write_bytes((roadscene / sub / "FLIR_00006.jpg").read_bytes())
    assert RoadScene(folder, "test").ids == ["FLIR_99990", "FLIR_99991"]
    with pytest.raises(DataError, match="FLIR_00018"):  # train lists ids this folder lacks
        RoadScene(folder, "train")


def test_package_split_is_the_shared_split(roadscene):
    for split in ("train", "val"):
        ours = (REPO / "s2study" / "data" / "splits" / "roadscene" / f"{split}.txt").read_text().split()
        assert ours == (roadscene / "splits" / f"{split}.txt").read_text().split()


# ----------------------------------------------------------------------------- fetch and mirrors


def test_fetch_a_study_file_fills_the_cache(fresh, server, capsys):
    assert main(["fetch", str(REPO / "search_spaces" / "smoke.yaml"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"dataset roadscene: {fresh / 'data' / 'RoadScene'}" in out
    assert f"weights r2d2_WASF_N16: {fresh / 'weights' / WEIGHTS}" in out


def test_mirror_to_writes_what_the_mirror_reader_reads(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "written"
    assert main(["fetch", "--mirror-to", str(mirror), "roadscene", "official", "--quiet"]) == 0  # from ../shared
    assert sorted(p.name for p in mirror.iterdir()) == ["RoadScene.zip", "SHA256SUMS", WEIGHTS]
    sums = resolver.parse_sums((mirror / "SHA256SUMS").read_text(), "SHA256SUMS")
    assert sums[WEIGHTS] == resolver.WEIGHTS["r2d2_WASF_N16"].sha256
    assert f"export S2STUDY_MIRROR={mirror}" in capsys.readouterr().out
    for env in (resolver.DATA_ENV, resolver.WEIGHTS_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv(resolver.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(resolver, "dev_shared", lambda: None)
    monkeypatch.setenv(resolver.MIRROR_ENV, f"file://{mirror}")
    folder = resolver.resolve_dataset("roadscene", progress=False)
    assert len(RoadScene(folder, "val")) == 20 and resolver.resolve_weights("official", progress=False).is_file()


def test_s3_mirror(fresh, tmp_path, monkeypatch, mirror_dir):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        endpoint = f"http://127.0.0.1:{srv._server.server_port}"
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mirror")
        from s2study.fetch import _upload

        _upload({p.name: p for p in mirror_dir.iterdir()}, "s3://mirror/s2study")
        monkeypatch.setenv(resolver.MIRROR_ENV, "s3://mirror/s2study")
        assert resolver.resolve_weights("official", progress=False).read_bytes() == (mirror_dir / WEIGHTS).read_bytes()
        assert len(RoadScene(resolver.resolve_dataset("roadscene", progress=False), "train")) == 156
    finally:
        srv.stop()


def test_data_download_writes_where_the_resolver_looks(fresh, server, tmp_path, capsys):
    assert main(["data", "download", "roadscene", "--quiet"]) == 0
    assert f"roadscene is ready at {fresh / 'data' / 'RoadScene'}" in capsys.readouterr().out
    assert main(["data", "download", "roadscene", "--to", str(tmp_path / "elsewhere"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "RoadScene" / "cropinfrared").is_dir()
    assert f"export S2STUDY_DATA={tmp_path / 'elsewhere'}" in out


def test_mirror_sums_must_list_the_archive(fresh, tmp_path, mirror_dir, monkeypatch):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / WEIGHTS).write_bytes((mirror_dir / WEIGHTS).read_bytes())
    write_sums(partial)
    with FileServer(partial) as srv:
        monkeypatch.setenv(resolver.MIRROR_ENV, srv.url)
        with pytest.raises(DataError, match="SHA256SUMS does not list RoadScene.zip"):
            resolver.resolve_dataset("roadscene")


def test_a_configs_mirror_key_is_used_for_its_needs(fresh, mirror_dir, tmp_path, capsys):
    with FileServer(mirror_dir) as srv:
        config = tmp_path / "train.yaml"
        config.write_text(f"method: {{name: r2d2, weights: official}}\nmirror: {srv.url}/\n")
        assert main(["fetch", str(config), "--quiet"]) == 0
        assert srv.gets(WEIGHTS) == 1 and srv.gets("RoadScene.zip") == 1
    assert resolver.MIRROR_ENV not in os.environ  # only within the config's own work
    assert f"weights r2d2_WASF_N16: {fresh / 'weights' / WEIGHTS}" in capsys.readouterr().out
    config.write_text("mirror: ftp://example.org\n")
    assert main(["fetch", str(config)]) == 2
    assert "mirror: 'ftp://example.org' is not allowed" in capsys.readouterr().err
