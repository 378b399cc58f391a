"""``s2study data download``: fetch RoadScene or RGB-NIR and unpack it where the loaders look.

Downloads stream into ``<to>/.downloads/<archive>.part`` with a progress bar and resume with an
HTTP Range request after an interruption; the archive is renamed from ``.part`` only once it
is complete and its size and sha256 match :data:`SOURCES` (where known: otherwise the computed
sha256 is printed). The archive is then unpacked into the layout the loaders of
:mod:`s2study.data.datasets` read:

- ``<to>/RoadScene/``: ``cropinfrared/``, ``crop_LR_visible/`` and/or ``crop_HR_visible/``
  (whichever the archive has; the loader prefers LR), and ``splits/``. The RoadScene repository
  publishes no splits, so when the archive has no ``splits/`` folder, split files are written:
  sorted ids in contiguous blocks, the first 70 % ``train``, the next 10 % ``val``, the last 20 %
  ``test`` (ids are FLIR frame numbers, so contiguous blocks keep scenes mostly apart). These
  are not the paper's (unpublished) splits.
- ``<to>/RGB-NIR/<category>/NNNN_rgb.tiff`` + ``NNNN_nir.tiff``: the archive's nine category
  folders; the loader splits them by index.

Point the loaders at the result with ``S2STUDY_DATA=<to>``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from s2study.data.datasets import IMAGE_EXTENSIONS
from s2study.errors import DataError, EnvironmentProblem
from s2study.paths import DATA_ENV

CHUNK = 1 << 20
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.1), ("test", 0.2))


@dataclass(frozen=True)
class Source:
    """Where a dataset's archive comes from; ``size``/``sha256`` None when not known."""

    url: str
    archive: str
    dirname: str
    size: int | None = None
    sha256: str | None = None


SOURCES = {
    # the repository's master branch as a zip (GitHub sends no length: size unknown)
    "roadscene": Source(
        "https://github.com/hanna-xu/RoadScene/archive/refs/heads/master.zip",
        "RoadScene-master.zip", "RoadScene"),
    # linked from https://ivrl.epfl.ch/research-2/research-downloads/supplementary_material-cvpr11-index-html/
    "rgb-nir": Source(
        "https://ivrlwww.epfl.ch/supplementary_material/cvpr11/nirscene1.zip",
        "nirscene1.zip", "RGB-NIR", size=952_431_486),
}


# ----------------------------------------------------------------------------- fetching


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _open(url: str, start: int):
    headers = {"User-Agent": "s2study-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the partial file already holds everything
            return None
        raise EnvironmentProblem(
            f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EnvironmentProblem(f"cannot reach {url}: {reason}") from None


def _check(path: Path, url: str, size: int | None, sha256: str | None) -> str:
    """Compare ``path`` with the expected size and sha256; returns the computed sha256."""
    got = path.stat().st_size
    if size is not None and got != size:
        path.unlink()
        raise DataError(f"{url}: downloaded {got} bytes, expected {size}; the partial file was "
                        "removed, run the command again (or pass --url if the source moved)")
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256.lower():
        path.unlink()
        raise DataError(f"{url}: sha256 mismatch: got {digest}, expected {sha256}; the download "
                        "was removed (corrupted or a different file)")
    return digest


def fetch(url: str, dest: Path, *, size: int | None = None, sha256: str | None = None,
          progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if an earlier run was interrupted.

    Args:
        url: http(s) URL.
        dest: final file; when it exists already it is verified and kept.
        size: expected size in bytes (None: not checked).
        sha256: expected hex digest (None: not checked; the computed one is printed).
        progress: show a tqdm progress bar.

    Returns:
        ``dest``.

    Raises:
        EnvironmentProblem: the server cannot be reached or the transfer broke off (run again
            to resume).
        DataError: size or sha256 mismatch.
    """
    from tqdm import tqdm

    if dest.exists():
        _check(dest, url, size, sha256)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    response = _open(url, start)
    if response is not None:
        with response:
            resumed = start > 0 and response.status == 206
            start = start if resumed else 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True,
                desc=dest.name, disable=not progress,
            ) as bar:
                try:
                    while block := response.read(CHUNK):
                        f.write(block)
                        bar.update(len(block))
                except (http.client.IncompleteRead, OSError) as exc:
                    raise EnvironmentProblem(
                        f"download of {url} broke off after {f.tell()} bytes ({exc}); "
                        "run the command again to resume") from None
        if total is not None and part.stat().st_size != total:
            raise EnvironmentProblem(f"download of {url} stopped at {part.stat().st_size} of "
                                     f"{total} bytes; run the command again to resume")
    digest = _check(part, url, size, sha256)
    if sha256 is None:
        print(f"sha256 of {dest.name}: {digest} (no expected value to compare with)")
    part.rename(dest)
    return dest


# ----------------------------------------------------------------------------- unpacking


def _extract(archive: Path, into: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)  # zipfile drops absolute paths and '..' components
    except zipfile.BadZipFile:
        raise DataError(
            f"{archive} is not a valid zip archive; delete it and download again") from None


def _find_dir(root: Path, accept) -> Path | None:
    """The shallowest folder under ``root`` (itself included) for which ``accept`` is true."""
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())],
                         key=lambda p: (len(p.parts), str(p))):
        if accept(folder):
            return folder
    return None


def _stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}


def write_block_splits(root: Path) -> None:
    """Write ``splits/{train,val,test}.txt`` of a RoadScene folder as contiguous id blocks."""
    ir = _stems(root / "cropinfrared")
    vis = set()
    for name in ("crop_LR_visible", "crop_HR_visible"):
        if (root / name).is_dir():
            vis |= _stems(root / name)
    ids = sorted(ir & vis)
    if not ids:
        raise DataError(f"{root}: no id has both an infrared and a visible image")
    (root / "splits").mkdir(exist_ok=True)
    start = 0
    for i, (name, fraction) in enumerate(SPLIT_FRACTIONS):
        end = len(ids) if i == len(SPLIT_FRACTIONS) - 1 else start + round(fraction * len(ids))
        (root / "splits" / f"{name}.txt").write_text("".join(f"{x}\n" for x in ids[start:end]))
        start = end


def _layout_roadscene(unpacked: Path, target: Path) -> None:
    source = _find_dir(unpacked, lambda d: (d / "cropinfrared").is_dir())
    if source is None:
        raise DataError("the RoadScene archive has no cropinfrared/ folder; is the URL right?")
    target.mkdir(parents=True)
    for name in ("cropinfrared", "crop_LR_visible", "crop_HR_visible", "splits"):
        if (source / name).is_dir():
            shutil.move(str(source / name), str(target / name))
    if not any((target / n).is_dir() for n in ("crop_LR_visible", "crop_HR_visible")):
        raise DataError("the RoadScene archive has no crop_LR_visible/ or crop_HR_visible/ folder")
    if not (target / "splits").is_dir():
        write_block_splits(target)


def _layout_rgbnir(unpacked: Path, target: Path) -> None:
    def has_pairs(d: Path) -> bool:
        return any(p.stem.endswith("_rgb") for p in d.iterdir() if p.is_file())

    parent = _find_dir(unpacked, lambda d: any(c.is_dir() and has_pairs(c) for c in d.iterdir()))
    if parent is None:
        raise DataError("the RGB-NIR archive has no category folders of NNNN_rgb.* images")
    target.mkdir(parents=True)
    for category in sorted(parent.iterdir()):
        if category.is_dir() and has_pairs(category):
            shutil.move(str(category), str(target / category.name))


LAYOUTS = {"roadscene": _layout_roadscene, "rgb-nir": _layout_rgbnir}


def download_dataset(name: str, to: Path, *, url: str | None = None, sha256: str | None = None,
                     force: bool = False, progress: bool = True) -> Path:
    """Download and unpack dataset ``name`` (``roadscene`` or ``rgb-nir``) into ``to``.

    Args:
        name: a key of :data:`SOURCES`.
        to: the data folder (what ``S2STUDY_DATA`` points at).
        url: overrides the archive URL (then the table's size and sha256 are not used).
        sha256: expected digest of the archive (overrides the table).
        force: download again and replace an existing dataset folder.
        progress: show a progress bar.

    Returns:
        The dataset folder, e.g. ``<to>/RoadScene``.
    """
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    to = Path(to).expanduser().absolute()
    target = to / source.dirname
    if target.exists() and not force:
        print(f"{target} already exists; pass --force to replace it")
        return target
    size, expected = (source.size, source.sha256) if url is None else (None, None)
    archive = to / ".downloads" / source.archive
    if force:
        archive.unlink(missing_ok=True)
        archive.with_name(archive.name + ".part").unlink(missing_ok=True)
    fetch(url or source.url, archive, size=size, sha256=sha256 or expected, progress=progress)
    with tempfile.TemporaryDirectory(dir=to, prefix=f".{source.dirname}-unpack-") as tmp:
        _extract(archive, Path(tmp) / "archive")
        staged = Path(tmp) / source.dirname
        LAYOUTS[name](Path(tmp) / "archive", staged)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


# ----------------------------------------------------------------------------- CLI


def _default_to() -> Path:
    return Path(os.environ.get(DATA_ENV) or "data").expanduser().absolute()


def _run(args: argparse.Namespace) -> int:
    to = Path(args.to).absolute() if args.to else _default_to()
    target = download_dataset(args.dataset, to, url=args.url, sha256=args.sha256,
                              force=args.force, progress=not args.quiet)
    print(f"{args.dataset} is ready at {target}")
    if os.environ.get(DATA_ENV) != str(to):
        print(f"point the loaders at it with: export {DATA_ENV}={to}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``data download`` to the ``s2study`` command line."""
    data = subparsers.add_parser("data", help="dataset utilities")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser("download", help="download RoadScene or RGB-NIR and unpack it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(SOURCES))
    p.add_argument("--to", help=f"data folder (default: ${DATA_ENV}, else ./data)")
    p.add_argument("--url", help="download from this URL instead (e.g. a mirror)")
    p.add_argument("--sha256", help="expected sha256 of the archive")
    p.add_argument("--force", action="store_true",
                   help="download again and replace an existing dataset folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
