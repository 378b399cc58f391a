"""``s2study fetch``: what studies and configs need, fetched ahead of time; mirrors written.

    s2study fetch search_spaces/lambda.yaml r2d2-rgbnir aliked-n16   # into the cache
    s2study fetch --mirror-to /srv/mirror roadscene rgbnir official   # a mirror for offline sites
    s2study data download roadscene [--to DIR]                       # one dataset

A target is a study file, a train config file, a preset name, a dataset name or a weights
name. What they need resolves through :mod:`s2study.resolver` (local copies first, then a
download into the cache). ``--mirror-to DIR|s3://bucket/prefix`` writes, from the local
copies, the mirror layout that ``S2STUDY_MIRROR`` reads: the weight files under their official
names, ``RoadScene.zip`` / ``RGB-NIR.zip`` (one top folder each, in the loader's layout) and
``SHA256SUMS`` listing every file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2study import resolver
from s2study.errors import ConfigError


@dataclass(frozen=True, order=True)
class Need:
    """One thing a config needs: a dataset or weights by name (``root``: an explicit folder;
    ``mirror``: the config's mirror)."""

    kind: str  # "dataset" | "weights"
    name: str
    root: str | None = None
    mirror: str | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" at {self.root}" if self.root else "")


def train_needs(train: dict[str, Any]) -> set[Need]:
    """What one TrainConfig mapping needs: its named dataset and its named weights."""
    needs = set()
    data, method, mirror = train.get("data") or {}, train.get("method") or {}, train.get("mirror")
    if data.get("dataset") in resolver.DATASETS:
        needs.add(Need("dataset", data["dataset"], data.get("root"), mirror))
    weights = method.get("weights") if method.get("weights") is not None else _default_weights(method)
    if resolver.is_weights_name(weights):
        needs.add(Need("weights", resolver.weights_entry(weights).name, mirror=mirror))
    return needs


def _default_weights(method: dict[str, Any]) -> str | None:
    """The weights a method starts from when the config names none (``Method.default_weights``:
    ALIKED's official file of its ``model_name``); None where the method has none or the
    config is invalid (its validation says why)."""
    if not isinstance(method.get("name"), str):
        return None
    from s2study.errors import ConfigError
    from s2study.methods import load_methods

    methods = load_methods()
    if method["name"] not in methods:
        return None
    cls = methods.get(method["name"])
    try:
        return cls.default_weights(cls.validate_params(dict(method.get("params") or {})))
    except (ConfigError, TypeError, ValueError):
        return None


def study_needs(cfg: Any) -> set[Need]:
    """What every configuration a study can sample needs (every corner of its space)."""
    from s2study.study.space import corner_cases, overlay

    needs = set()
    for values in corner_cases(cfg.space, cfg.base_flat):
        needs |= train_needs(overlay(cfg.base, values))
    return needs


def target_needs(target: str) -> set[Need]:
    """What a command-line target needs (see the module docstring).

    Raises:
        ConfigError: not a file, a preset, a dataset or a weights name.
    """
    from s2study.config.load import config_to_dict, load_train_config, preset_names, read_yaml

    if target in resolver.DATASETS or target in resolver.DATASET_ALIASES:
        return {Need("dataset", resolver.dataset_entry(target).name)}
    if resolver.is_weights_name(target):
        return {Need("weights", resolver.weights_entry(target).name)}
    path = Path(target)
    if path.suffix in (".yaml", ".yml") and path.is_file() and "space" in read_yaml(path):
        from s2study.study.config import load_study

        return study_needs(load_study(path))
    if path.is_file() or target in preset_names():
        return train_needs(config_to_dict(load_train_config(target)))
    known = sorted([*resolver.DATASETS, *resolver.weights_names(), *preset_names()])
    from s2study.registry import unknown_name_message

    raise ConfigError(f"{target}: not a study or config file, and "
                      + unknown_name_message("name", target, known))


def resolve_need(need: Need, *, fetch: bool = True, progress: bool = True) -> Path:
    """The local path of ``need`` (downloaded into the cache when ``fetch`` and not local)."""
    with resolver.using_mirror(need.mirror):
        if need.kind == "dataset":
            return resolver.resolve_dataset(need.name, need.root, fetch=fetch, progress=progress)
        return resolver.resolve_weights(need.name, fetch=fetch, progress=progress)


# ----------------------------------------------------------------------------- mirrors


def _zip_folder(folder: Path, top: str, dest: Path) -> None:
    """``dest``: every file under ``folder``, stored as ``top/<relative path>`` (sorted)."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:  # images are compressed already
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            z.write(path, f"{top}/{path.relative_to(folder).as_posix()}")


def write_mirror(dest: str, needs: set[Need], progress: bool = True) -> list[str]:
    """Write the mirror layout for ``needs`` from their local copies to ``dest``.

    Args:
        dest: a local folder, ``file://`` URL or ``s3://bucket/prefix``.

    Returns:
        The file names written (``SHA256SUMS`` last).

    Raises:
        DataError: a need has no local copy (fetch it first).
    """
    from s2study.download import sha256_of

    with tempfile.TemporaryDirectory(prefix="s2study-mirror-") as tmp:
        staged: dict[str, Path] = {}
        for need in sorted(needs):
            local = resolve_need(need, fetch=False)
            if need.kind == "dataset":
                entry = resolver.dataset_entry(need.name)
                staged[entry.archive] = Path(tmp) / entry.archive
                print(f"s2study: packing {local} into {entry.archive}", file=sys.stderr)
                _zip_folder(local, entry.dirname, staged[entry.archive])
            else:
                entry = resolver.weights_entry(need.name)
                staged[entry.file] = local
        sums = "".join(f"{sha256_of(path)}  {name}\n" for name, path in sorted(staged.items()))
        (Path(tmp) / resolver.SUMS_FILE).write_text(sums)
        staged[resolver.SUMS_FILE] = Path(tmp) / resolver.SUMS_FILE
        _upload(staged, dest)
    return list(staged)


def _upload(files: dict[str, Path], dest: str) -> None:
    """Copy ``name -> local file`` into the folder or object prefix ``dest``."""
    if dest.startswith("s3://"):
        import pyarrow.fs

        fs, prefix = pyarrow.fs.FileSystem.from_uri(dest)
        for name, path in files.items():
            with path.open("rb") as src, fs.open_output_stream(f"{prefix.rstrip('/')}/{name}") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        return
    folder = Path(dest.removeprefix("file://")).expanduser().absolute()
    from s2study.paths import output_dir

    output_dir(folder, "--mirror-to", "mirror folder").mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        partial = folder / f".{name}.part"
        shutil.copyfile(path, partial)
        os.replace(partial, folder / name)


# ----------------------------------------------------------------------------- CLI


def _cmd_fetch(args: argparse.Namespace) -> int:
    needs: set[Need] = set()
    for target in args.targets:
        needs |= target_needs(target)
    if not needs and not args.mirror_to:
        raise ConfigError("nothing to fetch: name study files, configs, presets, datasets or weights")
    if args.mirror_to:
        if not needs:
            needs = {Need("dataset", n) for n in resolver.DATASETS if resolver.find_dataset(n)}
            needs |= {Need("weights", n) for n in resolver.WEIGHTS if resolver.find_weights(n)}
        for need in sorted(needs):
            resolve_need(need, progress=not args.quiet)
        names = write_mirror(args.mirror_to, needs, progress=not args.quiet)
        print(f"mirror written to {args.mirror_to}: {', '.join(names)}")
        print(f"use it with: export {resolver.MIRROR_ENV}={args.mirror_to}")
        return 0
    for need in sorted(needs):
        print(f"{need}: {resolve_need(need, progress=not args.quiet)}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    entry = resolver.dataset_entry(args.dataset)
    if args.to is None:
        print(f"{entry.name} is ready at {resolver.resolve_dataset(entry.name, progress=not args.quiet)}")
        return 0
    to = Path(args.to).expanduser().absolute()
    target = to / entry.dirname
    if target.exists():
        print(f"{target} already exists")
    else:
        from s2study.paths import output_dir

        output_dir(to, "--to", "data folder")
        resolver.fetch_dataset(entry, target, progress=not args.quiet)
        print(f"{entry.name} is ready at {target}")
    if os.environ.get(resolver.DATA_ENV) != str(to):
        print(f"s2study finds it there with: export {resolver.DATA_ENV}={to}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``fetch`` and ``data download`` to the ``s2study`` command line."""
    p = subparsers.add_parser("fetch", help="fetch the data and weights of studies or configs; write mirrors",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="study file, config file, preset, dataset name or weights name")
    p.add_argument("--mirror-to", metavar="DIR|s3://...",
                   help="write a mirror of the targets (default: of everything held locally) there")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_fetch)

    data = subparsers.add_parser("data", help="dataset utilities")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = sub.add_parser("download", help="download RoadScene or RGB-NIR where s2study looks for it")
    d.add_argument("dataset", choices=sorted([*resolver.DATASETS, *resolver.DATASET_ALIASES]))
    d.add_argument("--to", help=f"a data folder to put it in (then set {resolver.DATA_ENV}); "
                                "default: the cache, where the resolver looks")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_download)

