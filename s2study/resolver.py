"""Datasets and weights by name: one resolver from a name to a local path, fetching on demand.

A dataset name (``roadscene``, ``rgbnir``) or a weights name (``official``, ``r2d2_WASF_N16``,
``faster2d2_WASF_N16``, ``aliked-n16``, ...) resolves to the first place that has it:

1. an explicit path (a flag or a config value): the only place looked at when given;
2. ``$S2STUDY_DATA/<folder>`` (a folder holding ``RoadScene/`` and ``RGB-NIR/``) or
   ``$S2STUDY_WEIGHTS/<file>``;
3. the user cache, ``$S2STUDY_CACHE`` (default: the platform's user cache folder + ``s2study``,
   e.g. ``~/.cache/s2study``): ``data/<folder>`` and ``weights/<file>``;
4. ``../shared/data`` and ``../shared/weights`` beside a development checkout of s2study (found
   from the package's own location, only when it is a checkout with ``pyproject.toml``);
5. a download into the cache from the pinned public source, or from ``$S2STUDY_MIRROR`` (a URL
   prefix, ``http(s)://``, ``file://`` or ``s3://``, that replaces every public URL).

A mirror holds the weight files under their official names, the dataset archives
``RoadScene.zip`` and ``RGB-NIR.zip`` (each one top folder in the loader's layout) and
``SHA256SUMS`` (``sha256sum`` format) listing the archives. Weights must match their pinned
digests wherever they come from; mirrored archives must match ``SHA256SUMS``. ``s2study fetch``
fills the cache ahead of time and writes mirrors (:mod:`s2study.fetch`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from s2study.download import Unreachable, download, sha256_of
from s2study.errors import ConfigError, DataError
from s2study.registry import unknown_name_message

DATA_ENV = "S2STUDY_DATA"
WEIGHTS_ENV = "S2STUDY_WEIGHTS"
CACHE_ENV = "S2STUDY_CACHE"
MIRROR_ENV = "S2STUDY_MIRROR"
SUMS_FILE = "SHA256SUMS"

R2D2_COMMIT = "0ff8f6afcbea91f19613d0cb7d93143a977830f5"  # naver/r2d2
ALIKED_COMMIT = "683d7c65197395c0b3f01ebe76e1084a27e73a65"  # Shiaoming/ALIKED
ROADSCENE_COMMIT = "ab71420f8fc96396eeb97eecf3694909b3feb656"  # hanna-xu/RoadScene


@dataclass(frozen=True)
class Weights:
    """A third-party weights file: its official name, pinned source and digest."""

    name: str
    file: str
    url: str
    sha256: str
    method: str
    licence: str


@dataclass(frozen=True)
class Dataset:
    """A public dataset: the folder the loader reads, its mirror archive and public source.

    ``sha256`` is None where the public archive's bytes are not pinned: GitHub builds its
    archives on request (the commit id pins the content, not the zip's bytes), and the EPFL
    archive publishes a size only. The computed digest is printed after such a download.
    """

    name: str
    dirname: str
    archive: str
    url: str
    size: int | None
    sha256: str | None
    homepage: str


def _r2d2(name: str, sha256: str) -> Weights:
    return Weights(name, f"{name}.pt", f"https://github.com/naver/r2d2/raw/{R2D2_COMMIT}/models/{name}.pt",
                   sha256, "r2d2", "CC BY-NC-SA 3.0 (naver/r2d2)")


def _aliked(name: str, sha256: str) -> Weights:
    return Weights(name, f"{name}.pth",
                   f"https://github.com/Shiaoming/ALIKED/raw/{ALIKED_COMMIT}/models/{name}.pth",
                   sha256, "aliked", "BSD-3-Clause (Shiaoming/ALIKED)")


WEIGHTS: dict[str, Weights] = {w.name: w for w in (
    _r2d2("r2d2_WASF_N16", "9ae90e02a9a133d100ca7aeaa32f4d4d7736a6dd222a530a25c8f7da5e508528"),
    _r2d2("r2d2_WAF_N16", "27cebd6608317b35198a76f60f87492110dee3e88ca382586a729dadb1a16b90"),
    _r2d2("r2d2_WASF_N8_big", "597dc13998e211e827c550bdc8f76dbb4aca32747846f96962c9168586cec418"),
    _r2d2("faster2d2_WASF_N16", "217daa3a166bfe9bf2b68c05c1607a09dd4d552ae1bbeda885479d504eefc14b"),
    _aliked("aliked-t16", "56782336919db220144a884e710e2b6af13b3b8f8da15b915a239078ab471085"),
    _aliked("aliked-n16", "5be8704840ed662d9d8c561bf7279c222092674e7eb05fd0feab94899e9d82f2"),
    _aliked("aliked-n16rot", "ddf3abbf38e86f6a74540d214e1a9712c54b2d8551abc864542199f2347d7332"),
    _aliked("aliked-n32", "055283fd1624d3ab46a05c3b617b1a79a3f28d1f551737eef2d653e8c8232890"),
)}
#: other names users type for a weights file
WEIGHTS_ALIASES = {"official": "r2d2_WASF_N16"}

DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("roadscene", "RoadScene", "RoadScene.zip",
            f"https://github.com/hanna-xu/RoadScene/archive/{ROADSCENE_COMMIT}.zip", None, None,
            "https://github.com/hanna-xu/RoadScene"),
    Dataset("rgbnir", "RGB-NIR", "RGB-NIR.zip",
            "https://ivrlwww.epfl.ch/supplementary_material/cvpr11/nirscene1.zip", 952_431_486, None,
            "https://www.epfl.ch/labs/ivrl/research/downloads/rgb-nir-scene-dataset/"),
)}
DATASET_ALIASES = {"rgb-nir": "rgbnir"}


# ----------------------------------------------------------------------------- places


def cache_dir() -> Path:
    """``$S2STUDY_CACHE``, else the platform's user cache folder + ``s2study``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("s2study", appauthor=False))


def dev_shared() -> Path | None:
    """``../shared`` beside a development checkout of s2study (None for an installed package)."""
    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared"
    return shared if (repo / "pyproject.toml").is_file() and shared.is_dir() else None


def mirror_url() -> str | None:
    """``$S2STUDY_MIRROR`` without a trailing slash (None when unset)."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    return value.rstrip("/") or None


@contextmanager
def using_mirror(url: str | None) -> Iterator[None]:
    """Within the block, ``url`` (a config's ``mirror``) is the mirror; None changes nothing."""
    if url is None:
        yield
        return
    before = os.environ.get(MIRROR_ENV)
    os.environ[MIRROR_ENV] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MIRROR_ENV, None)
        else:
            os.environ[MIRROR_ENV] = before


def _env_dir(env: str) -> Path | None:
    return Path(os.environ[env]).expanduser().absolute() if os.environ.get(env) else None


def _places(env: str, cache_sub: str, shared_sub: str) -> list[tuple[str, Path]]:
    """(label, folder) in resolution order, for a kind of resource."""
    places = []
    if (env_dir := _env_dir(env)) is not None:
        places.append((f"${env}", env_dir))
    places.append(("cache", cache_dir() / cache_sub))
    if (shared := dev_shared()) is not None:
        places.append(("../shared", shared / shared_sub))
    return places


# ----------------------------------------------------------------------------- names


def dataset_entry(name: str) -> Dataset:
    """The catalogue entry of a dataset name (``rgb-nir`` is accepted for ``rgbnir``).

    Raises:
        ConfigError: unknown name (with the known ones).
    """
    key = DATASET_ALIASES.get(name, name)
    if key not in DATASETS:
        raise ConfigError(unknown_name_message("dataset", name, sorted(DATASETS)))
    return DATASETS[key]


def is_weights_name(value: object) -> bool:
    """True for ``official`` and every official weights name."""
    return isinstance(value, str) and (value in WEIGHTS or value in WEIGHTS_ALIASES)


def weights_entry(name: str) -> Weights:
    """The catalogue entry of a weights name or alias.

    Raises:
        ConfigError: unknown name (with the known ones).
    """
    key = WEIGHTS_ALIASES.get(name, name)
    if key not in WEIGHTS:
        raise ConfigError(unknown_name_message("weights name", name, weights_names()))
    return WEIGHTS[key]


def weights_names() -> list[str]:
    return sorted([*WEIGHTS, *WEIGHTS_ALIASES])


# ----------------------------------------------------------------------------- lookup


def find_dataset(name: str) -> Path | None:
    """The dataset folder where one exists locally (steps 2-4), else None."""
    entry = dataset_entry(name)
    for _, folder in _places(DATA_ENV, "data", "data"):
        if (folder / entry.dirname).is_dir():
            return (folder / entry.dirname).resolve()
    return None


def find_weights(name: str) -> Path | None:
    """The weights file where one exists locally (steps 2-4), else None."""
    entry = weights_entry(name)
    for _, folder in _places(WEIGHTS_ENV, "weights", "weights"):
        if (folder / entry.file).is_file():
            return (folder / entry.file).resolve()
    return None


def resolve_dataset(name: str, explicit: str | os.PathLike | None = None, *, fetch: bool = True,
                    progress: bool = True) -> Path:
    """The local folder of dataset ``name`` (see the module docstring for the order).

    Raises:
        ConfigError: unknown name.
        DataError: ``explicit`` does not exist; or nothing local and ``fetch`` is False; or a
            download failed (the message names the URL, the cache path and the manual step).
    """
    entry = dataset_entry(name)
    if explicit is not None:
        path = Path(explicit).expanduser().absolute()
        if not path.is_dir():
            raise DataError(f"dataset {entry.name}: the folder {path} given as its root does not exist "
                            f"(leave the root unset to find or fetch {entry.name} by name)")
        return path.resolve()
    found = find_dataset(name)
    if found is not None:
        return found
    target = cache_dir() / "data" / entry.dirname
    if not fetch:
        raise DataError(f"dataset {entry.name} not found; looked in: {_looked_in(DATA_ENV, 'data', 'data', entry.dirname)}"
                        f". Run `s2study fetch {entry.name}` or set {DATA_ENV}")
    return fetch_dataset(entry, target, progress)


def resolve_weights(value: str | os.PathLike, *, fetch: bool = True, progress: bool = True) -> Path:
    """The local file of a weights name, or ``value`` itself when it is an existing file.

    Raises:
        DataError: neither an existing file nor a weights name; nothing local and ``fetch``
            False; a download failed or does not match the pinned sha256.
    """
    if not is_weights_name(value):
        path = Path(value).expanduser().absolute()
        if path.is_file():
            return path
        raise DataError(f"weights {str(value)!r}: no such file ({path}), and not a weights name; "
                        f"names: {', '.join(weights_names())}")
    entry = weights_entry(str(value))
    found = find_weights(entry.name)
    if found is not None:
        return found
    target = cache_dir() / "weights" / entry.file
    if not fetch:
        raise DataError(f"weights {entry.name} not found; looked in: "
                        f"{_looked_in(WEIGHTS_ENV, 'weights', 'weights', entry.file)}. "
                        f"Run `s2study fetch {entry.name}` or set {WEIGHTS_ENV}")
    mirror = mirror_url()
    url = f"{mirror}/{entry.file}" if mirror else entry.url
    try:
        return download(url, target, sha256=entry.sha256, progress=progress)
    except Unreachable as exc:
        raise DataError(_manual_step(f"weights {entry.name}", exc, url, target, WEIGHTS_ENV)) from None


def _looked_in(env: str, cache_sub: str, shared_sub: str, child: str) -> str:
    return "; ".join(f"{folder / child} ({label})" for label, folder in _places(env, cache_sub, shared_sub))


def _manual_step(what: str, problem: Exception, url: str, dest: Path, env: str) -> str:
    """One line: what was needed, what failed, and how to put it in place by hand."""
    return (f"{what} is needed but could not be fetched ({problem}); cache: {cache_dir()}. "
            f"Download {url} to {dest} and run again, set {MIRROR_ENV} to a reachable mirror, "
            f"or set {env} to a folder that has it")


# ----------------------------------------------------------------------------- datasets


def mirror_sums(mirror: str, dest: Path) -> dict[str, str]:
    """``file name -> sha256`` of the mirror's ``SHA256SUMS`` (fetched afresh to ``dest``)."""
    dest.unlink(missing_ok=True)
    download(f"{mirror}/{SUMS_FILE}", dest, progress=False)
    try:
        return parse_sums(dest.read_text(), f"{mirror}/{SUMS_FILE}")
    finally:
        dest.unlink()


def parse_sums(text: str, source: str) -> dict[str, str]:
    """Parse ``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>`` per line)."""
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().removeprefix("*")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise DataError(f"{source}: line {number} is not '<sha256>  <file name>': {line[:80]!r}")
        sums[name] = digest.lower()
    return sums


def fetch_dataset(entry: Dataset, target: Path, progress: bool) -> Path:
    """Download the archive into the cache, unpack it beside ``target``, rename into place."""
    from filelock import FileLock

    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads / f"{entry.name}.unpack.lock")):
        if target.is_dir():  # another process finished it while we waited
            return target.resolve()
        mirror = mirror_url()
        url = f"{mirror}/{entry.archive}" if mirror else entry.url
        archive = downloads / f"{entry.name}-{Path(url).name}"
        try:
            size, sha256 = entry.size, entry.sha256
            if mirror:
                sums = mirror_sums(mirror, downloads / f"{entry.name}.{SUMS_FILE}")
                if entry.archive not in sums:
                    raise DataError(f"{mirror}/{SUMS_FILE} does not list {entry.archive}; the mirror "
                                    f"must hold it (`s2study fetch --mirror-to` writes both)")
                size, sha256 = None, sums[entry.archive]
            print(f"s2study: fetching dataset {entry.name} from {url} into {target}", file=sys.stderr)
            download(url, archive, sha256=sha256, size=size, progress=progress)
        except Unreachable as exc:
            raise DataError(_manual_step(f"dataset {entry.name}", exc, url, archive, DATA_ENV)) from None
        if sha256 is None:
            print(f"s2study: sha256 of {archive.name}: {sha256_of(archive)} (the source pins none)",
                  file=sys.stderr)
        unpack_dataset(entry, archive, target)
        archive.unlink()
    return target.resolve()


def unpack_dataset(entry: Dataset, archive: Path, target: Path) -> None:
    """Unpack ``archive`` into the loader's layout at ``target`` (staged, then one rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{entry.dirname}-unpack-") as tmp:
        unpacked, staged = Path(tmp) / "archive", Path(tmp) / entry.dirname
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(unpacked)  # zipfile drops absolute paths and '..' components
        except zipfile.BadZipFile:
            archive.unlink()
            raise DataError(f"{archive} is not a valid zip archive; it was deleted, run again") from None
        LAYOUTS[entry.name](unpacked, staged)
        staged.rename(target)


def _find_dir(root: Path, accept: Callable[[Path], bool]) -> Path | None:
    """The shallowest folder under ``root`` (itself included) for which ``accept`` is true."""
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())],
                         key=lambda p: (len(p.parts), str(p))):
        if accept(folder):
            return folder
    return None


def _layout_roadscene(unpacked: Path, target: Path) -> None:
    """``cropinfrared/`` and ``crop_LR_visible/`` (or ``crop_HR_visible/``) of the archive.

    The archive's own ``splits/`` (a mirror's) is kept; without one, the project's split
    applies (:mod:`s2study.data.datasets`).
    """
    source = _find_dir(unpacked, lambda d: (d / "cropinfrared").is_dir())
    if source is None:
        raise DataError("the RoadScene archive has no cropinfrared/ folder")
    if not any((source / n).is_dir() for n in ("crop_LR_visible", "crop_HR_visible")):
        raise DataError("the RoadScene archive has no crop_LR_visible/ or crop_HR_visible/ folder")
    target.mkdir()
    for name in ("cropinfrared", "crop_LR_visible", "crop_HR_visible", "splits"):
        if (source / name).is_dir():
            shutil.move(str(source / name), str(target / name))


def _layout_rgbnir(unpacked: Path, target: Path) -> None:
    """The archive's category folders of ``NNNN_rgb.*`` / ``NNNN_nir.*`` images."""
    def has_pairs(d: Path) -> bool:
        return any(p.stem.endswith("_rgb") for p in d.iterdir() if p.is_file())

    parent = _find_dir(unpacked, lambda d: any(c.is_dir() and has_pairs(c) for c in d.iterdir()))
    if parent is None:
        raise DataError("the RGB-NIR archive has no category folders of NNNN_rgb.* images")
    target.mkdir()
    for category in sorted(parent.iterdir()):
        if category.is_dir() and has_pairs(category):
            shutil.move(str(category), str(target / category.name))


LAYOUTS = {"roadscene": _layout_roadscene, "rgbnir": _layout_rgbnir}
