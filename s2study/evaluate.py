"""Evaluation of extractors on a pair dataset at several K, with a feature cache and writers.

:func:`evaluate` extracts features once per image at the largest K (smaller K are prefixes of
the score-sorted list), computes the metrics of :mod:`s2study.metrics` per pair and K, and
returns an :class:`EvalResult` of per-method, per-K means and curves. Features are cached on
disk as ``.npz`` files keyed by the extractor's ``cache_key``, a hash of the image content and
K, so a re-run (or another method added to a table) extracts nothing twice, and a cache can
never be stale: a changed checkpoint, option or image gives a new key.

Every result names its protocol: ``aligned`` (the dataset's own ground truth, the identity for
pixel-aligned pairs) or ``warped:SEED`` (image B of each pair offset by a homography drawn from
the seed and the pair id, :mod:`s2study.data.warp`; ``--warp SEED`` on the command line).

Also here: the JSON / CSV / table writers, :func:`evaluate_checkpoint` (used by the study
after training), and the ``eval``, ``match`` and ``extract`` subcommands.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from s2study.config.schema import DataConfig
from s2study.errors import ConfigError, DataError
from s2study.features import Extractor, Features
from s2study.metrics import (
    DEFAULT_THRESHOLD,
    DEFAULT_THRESHOLDS,
    MeanMetrics,
    PairMetrics,
    mean_metrics,
    pair_metrics,
    threshold_tag,
)

DEFAULT_KS: tuple[int, ...] = (1024, 2048, 4096)


@dataclass
class EvalResult:
    """Evaluation of several methods on one dataset split.

    Attributes:
        dataset: dataset description (e.g. ``roadscene``); split: split name.
        pair_ids: the pairs evaluated, in order.
        ks: keypoint budgets; threshold: main threshold (px); thresholds: curve thresholds.
        methods: table names, in order; cache_keys: method -> extractor cache key.
        means: method -> K -> :class:`~s2study.metrics.MeanMetrics`.
        pairs: method -> K -> per-pair :class:`~s2study.metrics.PairMetrics` (pair_ids order).
        protocol: ``"aligned"`` or ``"warped:SEED"`` (:mod:`s2study.data.warp`).
    """

    dataset: str
    split: str
    pair_ids: list[str]
    ks: tuple[int, ...]
    threshold: float
    thresholds: tuple[float, ...]
    methods: list[str] = field(default_factory=list)
    cache_keys: dict[str, str] = field(default_factory=dict)
    means: dict[str, dict[int, MeanMetrics]] = field(default_factory=dict)
    pairs: dict[str, dict[int, list[PairMetrics]]] = field(default_factory=dict)
    protocol: str = "aligned"

    def metrics(self, method: str) -> dict[str, float]:
        """Flat named means of one method over every K (``ncm@3px_k1024``, ...)."""
        out: dict[str, float] = {}
        for k in self.ks:
            out.update(self.means[method][k].as_dict())
        return out

    def to_dict(self) -> dict:
        """JSON-ready form (per-pair numbers included)."""
        return {
            "dataset": self.dataset,
            "split": self.split,
            "protocol": self.protocol,
            "num_pairs": len(self.pair_ids),
            "pair_ids": self.pair_ids,
            "ks": list(self.ks),
            "threshold": self.threshold,
            "thresholds": list(self.thresholds),
            "methods": {
                m: {
                    "cache_key": self.cache_keys.get(m, ""),
                    "metrics": self.metrics(m),
                    "means": {str(k): asdict(self.means[m][k]) for k in self.ks},
                    "pairs": {str(k): [asdict(p) for p in self.pairs[m][k]] for k in self.ks},
                }
                for m in self.methods
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """Inverse of :meth:`to_dict` (e.g. for ``s2study report`` on an eval folder)."""

        def tuples(d: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        result = cls(
            dataset=data["dataset"],
            split=data["split"],
            pair_ids=list(data["pair_ids"]),
            ks=tuple(int(k) for k in data["ks"]),
            threshold=float(data["threshold"]),
            thresholds=tuple(float(t) for t in data["thresholds"]),
            protocol=str(data.get("protocol", "aligned")),  # files older than the field
        )
        for name, entry in data["methods"].items():
            result.methods.append(name)
            result.cache_keys[name] = entry.get("cache_key", "")
            result.means[name] = {
                int(k): MeanMetrics(**tuples(v)) for k, v in entry["means"].items()
            }
            result.pairs[name] = {
                int(k): [PairMetrics(**tuples(p)) for p in v] for k, v in entry["pairs"].items()
            }
        return result


# ----------------------------------------------------------------------------- evaluation


def image_digest(image: np.ndarray) -> str:
    """Short hash of an image's content and shape (the cache's image identity)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr((image.shape, str(image.dtype))).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80] or "_"


class FeatureCache:
    """Features on disk: ``<root>/<cache_key>/<image id>_<content hash>_k<K>.npz``.

    Args:
        root: cache folder, or None for no caching.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root).absolute() if root is not None else None

    def path(self, extractor: Extractor, image_id: str, image: np.ndarray, k: int) -> Path | None:
        if self.root is None:
            return None
        name = f"{_safe(image_id)}_{image_digest(image)}_k{k}.npz"
        return self.root / _safe(extractor.cache_key) / name

    def features(self, extractor: Extractor, image_id: str, image: np.ndarray, k: int) -> Features:
        """The cached features of ``image``, extracting (and storing) them on a miss."""
        path = self.path(extractor, image_id, image, k)
        if path is not None and path.is_file():
            try:
                with np.load(path) as data:
                    return Features(data["keypoints"], data["scores"], data["descriptors"])
            except (OSError, ValueError, KeyError):
                pass  # unreadable entry (e.g. from a killed run): extract again and replace it
        feats = extractor(image, max_keypoints=k)
        if path is not None:
            save_features(path, feats)
        return feats


def save_features(path: Path, feats: Features) -> None:
    """Write features as ``.npz`` (keypoints, scores, descriptors), atomically."""
    from s2study.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, keypoints=feats.keypoints, scores=feats.scores, descriptors=feats.descriptors)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))


def to_keypoints(feats: Features) -> Features:
    """Features (numpy) as float32 CPU tensors, what the metrics read."""
    return feats.as_tensors()


def check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Sorted unique K values; raises :class:`ConfigError` unless all are positive integers."""
    ks = list(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0]
    if not ks or bad:
        raise ConfigError(f"K (number of keypoints) must be positive integers, got {ks}")
    return tuple(sorted({int(k) for k in ks}))


def check_thresholds(main: float, thresholds: Iterable[float]) -> tuple[float, tuple[float, ...]]:
    """Validated (main threshold, curve thresholds); all must be > 0 px."""
    curve = tuple(float(t) for t in thresholds)
    if not curve or min(curve) <= 0 or not main > 0:
        raise ConfigError(
            f"pixel thresholds must be > 0, got threshold {main} and curve thresholds {list(curve)}"
        )
    return float(main), curve


def _unique_names(extractors: Sequence[Extractor]) -> list[str]:
    names: list[str] = []
    for ex in extractors:
        base = str(getattr(ex, "name", type(ex).__name__))
        name, n = base, 2
        while name in names:
            name, n = f"{base}#{n}", n + 1
        names.append(name)
    return names


def evaluate(
    extractors: Sequence[Extractor],
    dataset,
    ks: Iterable[int] = DEFAULT_KS,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    main_threshold: float = DEFAULT_THRESHOLD,
    max_pairs: int | None = None,
    dataset_name: str | None = None,
    split: str = "",
    protocol: str | None = None,
) -> EvalResult:
    """Evaluate extractors on every pair of ``dataset`` at each K (design.md section 2).

    Args:
        extractors: :class:`~s2study.features.Extractor` objects (``name`` labels the rows).
        dataset: a :class:`~s2study.data.pairs.PairDataset` (image A visible, B infrared,
            ``homography`` A -> B).
        ks: keypoint budgets; features are extracted once at ``max(ks)``.
        thresholds: pixel thresholds of the NCM/CMR curves.
        out_dir: when given, ``eval.json``, ``eval.csv``, ``cmr_curve.png`` and
            ``ncm_curve.png`` are written there.
        cache_dir: feature cache folder (None: no cache).
        progress: show a progress bar over pairs.
        main_threshold: threshold of NCM, CMR and repeatability (px).
        max_pairs: evaluate only the first pairs.
        dataset_name / split: labels stored in the result.
        protocol: ``"aligned"`` or ``"warped:SEED"``, stored in the result; default the
            dataset's ``protocol`` attribute (a :class:`~s2study.data.warp.WarpedPairs` has
            one), else ``"aligned"``.

    Returns:
        :class:`EvalResult`.
    """
    from tqdm.auto import tqdm

    from s2study.data.warp import check_protocol
    from s2study.geometry import flow_from_homography

    protocol = check_protocol(protocol or str(getattr(dataset, "protocol", "aligned")))
    ks = check_ks(ks)
    main_threshold, curve = check_thresholds(main_threshold, thresholds)
    if not extractors:
        raise ConfigError("evaluate: no extractor given")
    if max_pairs is not None and max_pairs <= 0:
        raise ConfigError(f"max_pairs must be > 0, got {max_pairs}")
    n = len(dataset) if max_pairs is None else min(len(dataset), max_pairs)
    if n == 0:
        raise DataError(
            f"dataset {dataset_name or type(dataset).__name__} split {split!r} has no pairs"
        )
    names = _unique_names(extractors)
    cache = FeatureCache(cache_dir)
    k_max = ks[-1]
    per_pair: dict[str, dict[int, list[PairMetrics]]] = {m: {k: [] for k in ks} for m in names}
    pair_ids: list[str] = []
    for index in tqdm(range(n), desc="evaluating", unit="pair", disable=not progress):
        sample = dataset[index]
        pair_id = sample.pair_id or str(index)
        pair_ids.append(pair_id)
        homography = torch.from_numpy(np.asarray(sample.homography, dtype=np.float64)).float()
        flow, valid = flow_from_homography(
            homography, sample.image_a.shape[:2], sample.image_b.shape[:2]
        )
        for name, extractor in zip(names, extractors):
            kp_a = to_keypoints(cache.features(extractor, f"{pair_id}_a", sample.image_a, k_max))
            kp_b = to_keypoints(cache.features(extractor, f"{pair_id}_b", sample.image_b, k_max))
            for k in ks:
                per_pair[name][k].append(
                    pair_metrics(kp_a, kp_b, flow, valid, k, curve, main_threshold)
                )
    result = EvalResult(
        dataset=dataset_name or str(getattr(dataset, "name", type(dataset).__name__)),
        split=split,
        pair_ids=pair_ids,
        ks=ks,
        threshold=main_threshold,
        thresholds=curve,
        methods=names,
        cache_keys={m: str(getattr(e, "cache_key", "")) for m, e in zip(names, extractors)},
        means={m: {k: mean_metrics(per_pair[m][k]) for k in ks} for m in names},
        pairs=per_pair,
        protocol=protocol,
    )
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    return result


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    data_cfg: DataConfig,
    split: str,
    ks: Iterable[int] = DEFAULT_KS,
    out_dir: Path | None = None,
    device: str = "cpu",
    multiscale: bool = False,
    main_threshold: float = DEFAULT_THRESHOLD,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    max_pairs: int | None = None,
    progress: bool = False,
    warp: int | None = None,
) -> EvalResult:
    """Evaluate one checkpoint (or baseline name) on ``split`` of ``data_cfg``'s dataset.

    The study calls this on the best trial's checkpoint; the outputs of :func:`evaluate` go
    to ``out_dir`` when given. ``warp``: None for the aligned protocol, or a seed for the
    warped one (:class:`~s2study.data.warp.WarpedPairs`).
    """
    from s2study.data.datasets import open_dataset
    from s2study.data.warp import WarpedPairs, check_seed
    from s2study.extractor import load_extractor

    warp = None if warp is None else check_seed(warp)
    extractor = load_extractor(checkpoint_path, device=device, multiscale=multiscale)
    dataset = open_dataset(data_cfg, split)
    if warp is not None:
        dataset = WarpedPairs(dataset, warp)
    return evaluate(
        [extractor],
        dataset,
        ks=ks,
        thresholds=thresholds,
        out_dir=out_dir,
        progress=progress,
        main_threshold=main_threshold,
        max_pairs=max_pairs,
        dataset_name=data_cfg.dataset,
        split=split,
    )


# ----------------------------------------------------------------------------- writers


def write_json(result: EvalResult, path: Path) -> Path:
    """Write :meth:`EvalResult.to_dict` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1))
    return path


def read_json(path: Path) -> EvalResult:
    """Read a result written by :func:`write_json`.

    Raises:
        DataError: missing or malformed file.
    """
    try:
        return EvalResult.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise DataError(f"{path}: no such evaluation file") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not an s2study evaluation file ({exc})") from None


def write_csv(result: EvalResult, path: Path) -> Path:
    """One row per (method, K): means of NC, NCM, CMR, repeatability and the curves."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = threshold_tag(result.threshold)
    header = ["method", "protocol", "k", "num_pairs", "nc"]
    header += [f"ncm@{tag}", f"cmr@{tag}", f"rep@{tag}"]
    header += [f"ncm@{threshold_tag(t)}" for t in result.thresholds]
    header += [f"cmr@{threshold_tag(t)}" for t in result.thresholds]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for m in result.methods:
            for k in result.ks:
                s = result.means[m][k]
                writer.writerow(
                    [
                        m,
                        result.protocol,
                        k,
                        s.num_pairs,
                        *(f"{v:.4f}" for v in (s.nc, s.ncm, s.cmr, s.repeatability)),
                        *(f"{v:.4f}" for v in s.ncm_curve),
                        *(f"{v:.4f}" for v in s.cmr_curve),
                    ]
                )
    return path


def format_table(result: EvalResult) -> str:
    """The paper's table: rows = methods, columns = K, one block each for NC, NCM and CMR."""
    blocks = (
        ("NC", "nc", "{:.1f}"),
        (f"NCM@{threshold_tag(result.threshold)}", "ncm", "{:.1f}"),
        ("CMR (%)", "cmr", "{:.2f}"),
    )
    width = max(8, *(len(f"K={k}") + 1 for k in result.ks))
    name_w = max(6, *(len(m) for m in result.methods))
    block_w = width * len(result.ks)
    title = f"{result.dataset} {result.split} ({len(result.pair_ids)} pairs)".replace("  ", " ")
    title += f", protocol {result.protocol}"
    head1 = " " * name_w + "".join(f" | {label:^{block_w}}" for label, _, _ in blocks)
    head2 = f"{'method':<{name_w}}" + "".join(
        " | " + "".join(f"{'K=' + str(k):>{width}}" for k in result.ks) for _ in blocks
    )
    lines = [title, head1, head2, "-" * len(head2)]
    for m in result.methods:
        row = f"{m:<{name_w}}"
        for _, attr, fmt in blocks:
            row += " | " + "".join(
                f"{fmt.format(getattr(result.means[m][k], attr)):>{width}}" for k in result.ks
            )
        lines.append(row)
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """``eval.json``, ``eval.csv``, ``cmr_curve.png``, ``ncm_curve.png`` in ``out_dir``."""
    from s2study.plots import plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json(result, out_dir / "eval.json"),
        "csv": write_csv(result, out_dir / "eval.csv"),
        "cmr_curve": plot_curves(result, "cmr", out_dir / "cmr_curve.png"),
        "ncm_curve": plot_curves(result, "ncm", out_dir / "ncm_curve.png"),
    }


# ----------------------------------------------------------------------------- CLI


def parse_data_spec(spec: str) -> DataConfig:
    """``roadscene`` or ``roadscene:/path/to/RoadScene`` -> :class:`DataConfig`.

    Raises:
        ConfigError: empty name or root.
    """
    name, sep, root = spec.partition(":")
    name = name.strip()
    if not name or (sep and not root.strip()):
        raise ConfigError(
            f"--data {spec!r}: expected DATASET or DATASET:ROOT, e.g. roadscene or "
            "roadscene:../shared/data/RoadScene"
        )
    return DataConfig(dataset=name, root=str(Path(root).expanduser().absolute()) if sep else None)


def read_ground_truth(spec: str) -> np.ndarray:
    """``identity``, or a ``.npy`` / text file holding a 3x3 homography or 2x3 affine (A -> B).

    Raises:
        DataError: missing, unreadable or malformed file.
    """
    from s2study.geometry import check_transform

    if spec == "identity":
        return np.eye(3)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--gt {spec}: no such file (expected identity, H.npy or H.txt)")
    try:
        matrix = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(f"--gt {path}: cannot read a matrix ({exc})") from None
    return check_transform(matrix, str(path))


def _positive(kind: type, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text}")
        return value

    return parse


def _add_extractor_args(p: argparse.ArgumentParser, many: bool) -> None:
    p.add_argument(
        "--checkpoint",
        "-c",
        required=True,
        nargs="+" if many else None,
        metavar="PATH|NAME",
        help="s2study checkpoint, official R2D2 checkpoint, weights name (r2d2_WASF_N16, aliked-n16, ...), "
        "registered model (models:/NAME/VERSION or models:/NAME/latest, from $MLFLOW_TRACKING_URI), "
        "or baseline (sift, rift)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--multiscale", action="store_true", help="extract on the image pyramid")


def _add_warp_arg(p: argparse.ArgumentParser) -> None:
    # parsed as text and checked by check_seed, so a bad value is the usual one-line error
    p.add_argument(
        "--warp",
        default=None,
        metavar="SEED",
        help="warped protocol: offset each image B by a homography drawn from SEED (a "
        "non-negative integer) and the pair id (rotation up to 10 deg, scale 1-1.2, corners "
        "jittered up to 10%%); the ground truth becomes W @ H",
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    from s2study.data.datasets import open_dataset
    from s2study.data.warp import WarpedPairs, check_seed
    from s2study.extractor import load_extractor
    from s2study.paths import output_dir

    data_cfg = parse_data_spec(args.data)
    ks = check_ks(args.k)
    check_thresholds(args.threshold, DEFAULT_THRESHOLDS)
    warp = None if args.warp is None else check_seed(args.warp, "--warp")
    out = output_dir(args.out)
    dataset = open_dataset(data_cfg, args.split)
    extractors = [
        load_extractor(c, device=args.device, multiscale=args.multiscale) for c in args.checkpoint
    ]
    cache = None if args.no_cache else Path(args.cache_dir or out / "cache")
    if warp is not None:
        dataset = WarpedPairs(dataset, warp, cache_dir=cache)  # warped B PNGs in cache/warp-SEED
    result = evaluate(
        extractors,
        dataset,
        ks=ks,
        out_dir=out,
        cache_dir=cache,
        progress=not args.quiet,
        main_threshold=args.threshold,
        max_pairs=args.max_pairs,
        dataset_name=data_cfg.dataset,
        split=args.split,
    )
    print(format_table(result))
    print(f"wrote {out}/eval.json, eval.csv, cmr_curve.png, ncm_curve.png")
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    from s2study.data.datasets import read_image
    from s2study.data.pairs import PairSample
    from s2study.data.warp import check_seed, protocol_name, warp_sample
    from s2study.extractor import load_extractor
    from s2study.geometry import flow_from_homography
    from s2study.metrics import match_errors, mutual_nearest_neighbours, repeatability
    from s2study.plots import draw_matches

    warp = None if args.warp is None else check_seed(args.warp, "--warp")
    if args.pair_id is not None and warp is None:
        raise ConfigError("--pair-id names the pair a warp is drawn for: it needs --warp SEED")
    image_a, image_b = read_image(Path(args.image_a)), read_image(Path(args.image_b))
    gt = None if args.gt is None else read_ground_truth(args.gt)
    if warp is not None:
        # the eval protocol's warp of this pair (drawn from the seed and the pair id); without
        # --gt the pair is taken as aligned, so the ground truth is W itself
        pair_id = args.pair_id if args.pair_id is not None else Path(args.image_a).stem
        sample = PairSample(image_a, image_b, np.eye(3) if gt is None else gt, pair_id)
        sample = warp_sample(sample, warp)
        image_b, gt = sample.image_b, sample.homography
    extractor = load_extractor(args.checkpoint, device=args.device, multiscale=args.multiscale)
    kp_a = to_keypoints(extractor(image_a, max_keypoints=args.k))
    kp_b = to_keypoints(extractor(image_b, max_keypoints=args.k))
    matches = mutual_nearest_neighbours(kp_a.descriptors, kp_b.descriptors)
    correct = known = None
    summary = f"{extractor.name}: {len(kp_a)} / {len(kp_b)} keypoints, NC={len(matches)}"
    if gt is not None:
        homography = torch.from_numpy(gt).float()
        flow, valid = flow_from_homography(homography, image_a.shape[:2], image_b.shape[:2])
        err = match_errors(kp_a.xy, kp_b.xy, matches, flow, valid)
        correct, known = (err <= args.threshold).numpy(), torch.isfinite(err).numpy()
        ncm = int(correct.sum())
        cmr = 100.0 * ncm / len(matches) if len(matches) else 0.0
        rep = float(repeatability(kp_a.xy, kp_b.xy, flow, valid, args.threshold))
        tag = threshold_tag(args.threshold)
        summary += f", NCM@{tag}={ncm}, CMR@{tag}={cmr:.2f}%, rep@{tag}={rep:.2f}%"
        summary += f", protocol {protocol_name(warp)}"
    draw_matches(
        image_a,
        image_b,
        kp_a.xy.numpy(),
        kp_b.xy.numpy(),
        matches.numpy(),
        correct,
        Path(args.out),
        known_mask=known,
    )
    print(summary)
    print(f"wrote {Path(args.out).absolute()}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from s2study.extractor import extract_features, load_extractor

    images = [Path(p) for p in args.images]
    stems: dict[str, Path] = {}
    for p in images:
        if p.stem in stems:
            raise ConfigError(f"two inputs would write {p.stem}.npz: {stems[p.stem]} and {p}")
        stems[p.stem] = p
    extractor = load_extractor(args.checkpoint, device=args.device, multiscale=args.multiscale)
    out = Path(args.out)
    for p in images:
        feats = extract_features(extractor, p, args.k)
        save_features(out / f"{p.stem}.npz", feats)
        print(f"{p}: {len(feats.keypoints)} keypoints -> {out / (p.stem + '.npz')}")
    return 0


def register_cli(subparsers) -> None:
    """Add the ``eval``, ``match`` and ``extract`` subcommands."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate checkpoints/baselines on a dataset split (NC, NCM, CMR tables)",
        description="Evaluate extractors on a dataset split at several K; prints the table and "
        "writes eval.json, eval.csv, cmr_curve.png and ncm_curve.png.",
    )
    _add_extractor_args(p, many=True)
    p.add_argument(
        "--data",
        required=True,
        metavar="DATASET[:ROOT]",
        help="e.g. roadscene (root found via S2STUDY_DATA or ../shared/data) or "
        "rgbnir:/path/to/RGB-NIR",
    )
    p.add_argument("--split", default="val")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), metavar="K")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="pixels (default 3)")
    p.add_argument("--out", default="eval_out", help="output folder (default eval_out/)")
    p.add_argument("--max-pairs", type=_positive(int, "--max-pairs"), default=None)
    p.add_argument("--cache-dir", default=None, help="feature cache (default OUT/cache)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_warp_arg(p)
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser(
        "match",
        help="match two images and draw the matches (green correct, red wrong)",
        description="Mutual-nearest-neighbour matches between two images, drawn side by side; "
        "with --gt, correct matches are green, wrong red, unknown yellow; with --warp SEED, "
        "IMAGE_B is first warped as eval --warp SEED warps it (ground truth W, or W @ GT).",
    )
    _add_extractor_args(p, many=False)
    p.add_argument("image_a", metavar="IMAGE_A")
    p.add_argument("image_b", metavar="IMAGE_B")
    p.add_argument(
        "--gt",
        default=None,
        metavar="H.npy|H.txt|identity",
        help="ground truth A -> B (3x3 homography or 2x3 affine)",
    )
    p.add_argument("--k", type=_positive(int, "--k"), default=1024)
    p.add_argument("--threshold", type=_positive(float, "--threshold"), default=DEFAULT_THRESHOLD)
    p.add_argument("--out", default="matches.png")
    _add_warp_arg(p)
    p.add_argument(
        "--pair-id",
        default=None,
        metavar="ID",
        help="with --warp: the pair id the warp is drawn for, as eval draws it (default the "
        "file stem of IMAGE_A, the RoadScene id)",
    )
    p.set_defaults(func=_cmd_match)

    p = subparsers.add_parser(
        "extract",
        help="extract features of images into .npz files",
        description="Write OUT/<image stem>.npz with keypoints (N, 2) x,y, scores (N,) and "
        "L2-normalised descriptors (N, D), sorted by score.",
    )
    _add_extractor_args(p, many=False)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--k", type=_positive(int, "--k"), default=4096)
    p.set_defaults(func=_cmd_extract)
