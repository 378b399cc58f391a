"""Cross-modality pair datasets: RoadScene, RGB-NIR and a plain folder of pairs.

Every dataset hands out :class:`~s2study.data.pairs.PairSample` objects: both images uint8
RGB ``(H, W, 3)`` (gray infrared replicated to 3 channels) and the 3x3 homography A -> B.
Images are read lazily in ``__getitem__``; the existence of every file is checked when the
dataset is built, so a broken dataset fails at once with the file, split file and id named.

Layouts and splits:

- ``roadscene`` (root ``RoadScene/``): ``crop_LR_visible/<ID>.jpg`` (or, when that folder is
  absent, ``crop_HR_visible/<ID>.jpg``, resized onto the infrared grid) with
  ``cropinfrared/<ID>.jpg``; pixel-aligned. The split is the project's (package data, the
  same on every machine; not the paper's, which is unpublished): ``train`` and ``val`` list 156
  and 20 scene-disjoint IDs, ``test`` is every other pair of the folder (45 of the full 221;
  a copy holding only train and val has an empty test split, which raises
  :class:`DataError`). A ``splits/<split>.txt`` file in the root (one ID per line, ``#``
  comments allowed) overrides a split.
- ``rgbnir`` (root ``RGB-NIR/``, holding category folders, or a single category folder such
  as ``country/``): ``NNNN_rgb.<ext>`` with ``NNNN_nir.<ext>`` (``.tiff``, ``.tif``, ``.jpg``,
  ``.png``, ``.bmp``); pixel-aligned; pair ids ``<category>/NNNN``.
- ``folder`` (any root, given explicitly): ``<name>_a.<ext>`` with ``<name>_b.<ext>``, or
  subfolders ``a/`` and ``b/`` with equal file names; an optional ground truth
  ``<name>.npy`` or ``<name>.txt`` (3x3 homography or 2x3 affine, A -> B) in the root; without
  one the pair must be pixel-aligned.

``rgbnir`` splits each category as the paper does (it names no pairs, only the rule: "We
randomly select 171 images for testing (19 per scene) and train on the rest"), with a
validation split apart from the test split, the same on every machine:

- ``test``: 19 pairs per category (:data:`RGBNIR_TEST_PER_CATEGORY`; at most half of a
  category's pairs, for a category of fewer than 38) drawn at random with a seed fixed in
  code (:data:`RGBNIR_SPLIT_SEED`): the pairs whose SHA-256 of ``"<seed>:<category>/NNNN"``
  ranks lowest. No Python ``hash``, numpy generator or file order enters, so the draw is the
  same on every machine and Python, and adding a pair to a category moves at most one pair
  of its test split.
- ``val``: of the category's other pairs, sorted by name, every 5th (positions 0, 5, 10, ...):
  for per-epoch validation and checkpoint choice, never trained on, never tested on.
- ``train``: the rest.

The shared ``country`` category (52 pairs) gives test 19, val 7 and train 26 pairs; the full
dataset (477 pairs in 9 categories) 171 test pairs. Every category folder a user adds is
split by the same rule. ``all`` is every pair.

``folder`` keeps a plain index rule (it has no categories and any number of pairs): sorted by
name, the pairs with ``index % 5 == 0`` form ``val``, the others ``train``; ``test`` is the
same as ``val``, so give a folder a ``splits/test.txt`` to test on pairs that did not choose
the checkpoint. ``all`` is every pair.

For both, a ``splits/<split>.txt`` file in the root, when present, overrides that split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from s2study.config.schema import DataConfig
from s2study.data.pairs import PairDataset, PairSample
from s2study.errors import DataError
from s2study.geometry import check_transform
from s2study.registry import Registry
from s2study.resolver import DATASETS as RESOLVABLE
from s2study.resolver import resolve_dataset

DATASETS: Registry[Callable[..., PairDataset]] = Registry("dataset")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tiff", ".tif", ".bmp")
INDEX_SPLITS = ("train", "val", "test", "all")


# ----------------------------------------------------------------------------- image IO


def read_image(path: Path, gray: bool = False) -> np.ndarray:
    """Read an image file as uint8 RGB ``(H, W, 3)``; ``gray`` reads one channel, replicated.

    Raises:
        DataError: the file is missing, unreadable or truncated.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc.strerror or exc}") from None
    if data.size == 0:  # cv2.imdecode asserts on an empty buffer
        raise DataError(
            f"cannot decode image {path}: unreadable, truncated or not an image (the file is empty)"
        )
    image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot decode image {path}: unreadable, truncated or not an image")
    if gray:
        return np.repeat(image[:, :, None], 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_matrix(old: tuple[int, int], new: tuple[int, int]) -> np.ndarray:
    """3x3 map of pixel coordinates when an image of ``old`` (H, W) is resized to ``new``.

    Pixel centres are at integers, as in ``cv2.resize``: ``x' = (x + 0.5) * s - 0.5``.
    """
    sy, sx = new[0] / old[0], new[1] / old[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]], dtype=np.float64)


def resize_to(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize ``image`` to ``shape`` (H, W): area averaging when shrinking, linear otherwise."""
    if image.shape[:2] == tuple(shape):
        return image
    shrink = shape[0] * shape[1] < image.shape[0] * image.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interp)


def limit_size(image: np.ndarray, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Shrink ``image`` so its long side is at most ``max_size``; returns it and its 3x3 map."""
    h, w = image.shape[:2]
    if max_size is None or max(h, w) <= max_size:
        return image, np.eye(3)
    s = max_size / max(h, w)
    new = (max(1, round(h * s)), max(1, round(w * s)))
    return resize_to(image, new), resize_matrix((h, w), new)


def _index_files(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem (one directory listing, not one stat per id)."""
    if not folder.is_dir():
        return {}
    return {
        p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
    }


def _read_ids(split_file: Path) -> list[str]:
    lines = split_file.read_text().splitlines()
    return [Path(s).stem if Path(s).suffix.lower() in IMAGE_EXTENSIONS else s
            for s in (line.split("#", 1)[0].strip() for line in lines) if s]


# ----------------------------------------------------------------------------- base


@dataclass(frozen=True)
class PairFiles:
    """Where one pair lives: image files, ground truth and how to read them."""

    pair_id: str
    path_a: Path
    path_b: Path
    homography: np.ndarray | None = None  # None: pixel-aligned
    gray_b: bool = True
    resize_a_to_b: bool = False


class FilePairDataset:
    """A list of :class:`PairFiles` read lazily; the base of every file dataset.

    Args:
        pairs: the pairs of the split, in order.
        max_size: shrink both images so their long side is at most this (homography adjusted).
        modalities: (modality_a, modality_b) written into every sample.
    """

    def __init__(self, pairs: list[PairFiles], max_size: int | None = None,
                 modalities: tuple[str, str] = ("vis", "ir")) -> None:
        for p in pairs:
            for path in (p.path_a, p.path_b):
                if not path.is_file():
                    raise DataError(f"pair {p.pair_id!r}: missing image file {path}")
        self.pairs = pairs
        self.ids = [p.pair_id for p in pairs]
        self.max_size = max_size
        self.modalities = modalities

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PairSample:
        """The pair at ``index``: uint8 RGB images and the A -> B homography."""
        if not -len(self.pairs) <= index < len(self.pairs):
            raise IndexError(f"pair index {index} out of range for {len(self.pairs)} pairs")
        p = self.pairs[index]
        image_a = read_image(p.path_a)
        image_b = read_image(p.path_b, gray=p.gray_b)
        if p.resize_a_to_b:
            image_a = resize_to(image_a, image_b.shape[:2])
        if p.homography is None:
            if image_a.shape != image_b.shape:
                raise DataError(
                    f"pair {p.pair_id!r} should be pixel-aligned but its images differ in size: "
                    f"{p.path_a} is {image_a.shape[1]}x{image_a.shape[0]}, "
                    f"{p.path_b} is {image_b.shape[1]}x{image_b.shape[0]}"
                )
            homography = np.eye(3)
        else:
            homography = p.homography
        image_a, scale_a = limit_size(image_a, self.max_size)
        image_b, scale_b = limit_size(image_b, self.max_size)
        homography = scale_b @ homography @ np.linalg.inv(scale_a)
        return PairSample(image_a, image_b, homography / homography[2, 2], p.pair_id,
                          *self.modalities)


def _cap(pairs: list[PairFiles], max_pairs: int | None) -> list[PairFiles]:
    return pairs if max_pairs is None else pairs[:max_pairs]


def _check_split(split: str) -> None:
    if split not in INDEX_SPLITS:
        raise DataError(f"unknown split {split!r}; allowed: {', '.join(INDEX_SPLITS)} "
                        "(or a splits/<split>.txt file in the dataset root)")


def index_split(names: list[str], split: str) -> list[str]:
    """The folder rule on sorted ``names``: ``val``/``test`` = every 5th, ``train`` = rest."""
    _check_split(split)
    names = sorted(names)
    if split == "all":
        return names
    held_out = split in ("val", "test")
    return [n for i, n in enumerate(names) if (i % 5 == 0) == held_out]


#: RGB-NIR pairs per category held out for ``test`` (the paper: 19 per scene)
RGBNIR_TEST_PER_CATEGORY = 19
#: seed of the RGB-NIR test draw; changing it changes every machine's test split
RGBNIR_SPLIT_SEED = 0


def rgbnir_split(ids: list[str], split: str) -> list[str]:
    """The RGB-NIR rule on the pair ids of one category (see the module docstring).

    ``test``: the ``min(19, len(ids) // 2)`` ids whose SHA-256 of ``"<seed>:<id>"`` ranks
    lowest; ``val``: every 5th of the other ids, sorted; ``train``: the rest; ``all``: every
    id. Each result is sorted.
    """
    _check_split(split)
    ids = sorted(ids)
    if split == "all":
        return ids
    n_test = min(RGBNIR_TEST_PER_CATEGORY, len(ids) // 2)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{RGBNIR_SPLIT_SEED}:{i}".encode()).digest())
    test = set(ranked[:n_test])
    if split == "test":
        return [i for i in ids if i in test]
    rest = [i for i in ids if i not in test]
    return [i for k, i in enumerate(rest) if (k % 5 == 0) == (split == "val")]


def _split_ids(root: Path, split: str, groups: dict[str, list[str]],
               rule: Callable[[list[str], str], list[str]] = index_split) -> list[str]:
    """Ids of ``split``: ``root/splits/<split>.txt`` if present, else ``rule`` per group."""
    split_file = root / "splits" / f"{split}.txt"
    if split_file.is_file():
        return _read_ids(split_file)
    return [i for group in groups.values() for i in rule(group, split)]


# ----------------------------------------------------------------------------- RoadScene


#: the project's RoadScene split (package data): every machine trains and evaluates on these
ROADSCENE_SPLITS = Path(__file__).with_name("splits") / "roadscene"
ROADSCENE_SPLIT_NAMES = ("train", "val", "test")


def roadscene_split(root: Path, split: str, present: list[str]) -> tuple[list[str], str]:
    """Ids of a RoadScene split and where they come from (for messages).

    ``root/splits/<split>.txt`` when the dataset folder has one; else the project's split:
    ``train`` and ``val`` are the package's lists, ``test`` every other pair ``present`` (the
    scenes of neither). Not the paper's split, which is unpublished.
    """
    own = root / "splits" / f"{split}.txt"
    if own.is_file():
        return _read_ids(own), str(own)
    if split in ("train", "val"):
        listed = ROADSCENE_SPLITS / f"{split}.txt"
        return _read_ids(listed), f"the project's split file {listed.name}"
    if split == "test":
        known = {i for name in ("train", "val") for i in _read_ids(ROADSCENE_SPLITS / f"{name}.txt")}
        test = [i for i in present if i not in known]
        if not test:
            raise DataError(f"RoadScene split 'test' of {root} is empty: this copy holds only the "
                            "train and val pairs (the test split is the dataset's other pairs)")
        return test, "the pairs in neither train nor val"
    raise DataError(f"unknown RoadScene split {split!r}; allowed: {', '.join(ROADSCENE_SPLIT_NAMES)} "
                    f"(or a file {root / 'splits' / (split + '.txt')})")


@DATASETS.register("roadscene")
class RoadScene(FilePairDataset):
    """RoadScene visible / thermal-infrared pairs (pixel-aligned), split by ``splits/*.txt``."""

    def __init__(self, root: Path, split: str, max_size: int | None = None,
                 max_pairs: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        infrared = self.root / "cropinfrared"
        visible, from_hr = self.root / "crop_LR_visible", False
        if not visible.is_dir() and (self.root / "crop_HR_visible").is_dir():
            visible, from_hr = self.root / "crop_HR_visible", True
        for folder in (visible, infrared):
            if not folder.is_dir():
                raise DataError(
                    f"RoadScene root {self.root} has no {folder.name}/ folder "
                    "(expected crop_LR_visible/ or crop_HR_visible/, and cropinfrared/)")
        files_a, files_b = _index_files(visible), _index_files(infrared)
        ids, source = roadscene_split(self.root, split, sorted(files_a.keys() & files_b.keys()))
        pairs = []
        for pair_id in ids:
            for files, folder in ((files_a, visible), (files_b, infrared)):
                if pair_id not in files:
                    raise DataError(f"RoadScene id {pair_id!r} listed in {source} has no "
                                    f"image {folder}/{pair_id}.jpg (or another image extension)")
            pairs.append(PairFiles(pair_id, files_a[pair_id], files_b[pair_id],
                                   resize_a_to_b=from_hr))
        if not pairs:
            raise DataError(f"RoadScene split {split!r} of {self.root} is empty ({source})")
        super().__init__(_cap(pairs, max_pairs), max_size, ("vis", "tir"))


# ----------------------------------------------------------------------------- RGB-NIR


def _rgbnir_category(folder: Path) -> dict[str, PairFiles]:
    """Pairs of one category folder by index ``NNNN``."""
    files = _index_files(folder)
    pairs = {}
    for stem, path in files.items():
        if not stem.endswith("_rgb"):
            continue
        index = stem[: -len("_rgb")]
        nir = files.get(f"{index}_nir")
        if nir is None:
            raise DataError(f"RGB-NIR image {path} has no near-infrared partner "
                            f"{folder}/{index}_nir.tiff (or .tif/.jpg/.png)")
        pairs[index] = PairFiles(f"{folder.name}/{index}", path, nir)
    return pairs


@DATASETS.register("rgbnir")
class RGBNIR(FilePairDataset):
    """RGB-NIR scene dataset visible / near-infrared pairs (pixel-aligned), split per category:
    19 seeded-random test pairs (as the paper), every 5th of the others val, the rest train."""

    def __init__(self, root: Path, split: str, max_size: int | None = None,
                 max_pairs: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        single = _rgbnir_category(self.root)
        if single:
            categories = {self.root.name: single}
        else:
            categories = {d.name: c for d in sorted(self.root.iterdir()) if d.is_dir()
                          and (c := _rgbnir_category(d))} if self.root.is_dir() else {}
        if not categories:
            raise DataError(f"RGB-NIR root {self.root} holds no NNNN_rgb.* / NNNN_nir.* pairs, "
                            "neither directly nor in category folders")
        by_id = {p.pair_id: p for c in categories.values() for p in c.values()}
        groups = {name: [p.pair_id for p in c.values()] for name, c in categories.items()}
        ids = _split_ids(self.root, split, groups, rgbnir_split)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"RGB-NIR split {split!r} of {self.root} names pairs that are not "
                            f"there: {', '.join(missing[:5])}")
        pairs = [by_id[i] for i in ids]
        if not pairs:
            raise DataError(f"RGB-NIR split {split!r} of {self.root} is empty")
        super().__init__(_cap(pairs, max_pairs), max_size, ("vis", "nir"))


# ----------------------------------------------------------------------------- folder


def _read_transform(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as exc:
        # numpy's message for a file that is not .npy advises loading it unsafely (allow_pickle)
        reason = "not a .npy file" if "allow_pickle" in str(exc) else exc
        raise DataError(f"cannot read ground-truth transform {path}: {reason}") from None
    return check_transform(matrix, str(path))


def _folder_pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """``name -> (path_a, path_b)`` from ``a/`` + ``b/`` subfolders or ``<name>_a|_b`` files."""
    if (root / "a").is_dir() and (root / "b").is_dir():
        files_a, files_b = _index_files(root / "a"), _index_files(root / "b")
        for name in sorted(set(files_a) ^ set(files_b)):
            have, lacks = ("a", "b") if name in files_a else ("b", "a")
            raise DataError(f"folder dataset {root}: {have}/{name}.* has no partner in {lacks}/")
        return {name: (files_a[name], files_b[name]) for name in files_a}
    files = _index_files(root)
    pairs = {}
    for stem, path in files.items():
        if stem.endswith("_a"):
            name = stem[:-2]
            if f"{name}_b" not in files:
                raise DataError(f"folder dataset image {path} has no partner {root}/{name}_b.*")
            pairs[name] = (path, files[f"{name}_b"])
        elif stem.endswith("_b") and f"{stem[:-2]}_a" not in files:
            raise DataError(f"folder dataset image {path} has no partner {root}/{stem[:-2]}_a.*")
    return pairs


@DATASETS.register("folder")
class FolderPairs(FilePairDataset):
    """Pairs from any folder, with an optional per-pair ground-truth transform A -> B."""

    def __init__(self, root: Path, split: str, max_size: int | None = None,
                 max_pairs: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"folder dataset root {self.root} is not a folder")
        found = _folder_pairs(self.root)
        if not found:
            raise DataError(f"folder dataset {self.root} holds no pairs: expected <name>_a.* with "
                            "<name>_b.*, or subfolders a/ and b/ with equal file names")
        ids = _split_ids(self.root, split, {"": list(found)})
        pairs = []
        for name in ids:
            if name not in found:
                raise DataError(f"folder dataset split {split!r} names pair {name!r}, "
                                f"which is not in {self.root}")
            gt = [self.root / f"{name}{ext}" for ext in (".npy", ".txt")]
            gt = [p for p in gt if p.is_file()]
            homography = _read_transform(gt[0]) if gt else None
            pairs.append(PairFiles(name, *found[name], homography=homography, gray_b=False))
        if not pairs:
            raise DataError(f"folder dataset split {split!r} of {self.root} is empty")
        super().__init__(_cap(pairs, max_pairs), max_size, ("a", "b"))


# ----------------------------------------------------------------------------- factory


def open_dataset(cfg: DataConfig, split: str) -> PairDataset:
    """Open ``split`` of the dataset ``cfg.dataset``.

    The root is ``cfg.root`` or resolved by name (:func:`s2study.resolver.resolve_dataset`:
    fetched into the cache when no local copy exists). The validation
    split is shrunk to ``cfg.val_max_size``; ``max_train_pairs`` / ``max_val_pairs`` cap the
    train and validation splits.

    Raises:
        ConfigError: unknown dataset name.
        DataError: missing root, split file or image.
    """
    cls = DATASETS.get(cfg.dataset)
    if cfg.dataset in RESOLVABLE:
        root = resolve_dataset(cfg.dataset, cfg.root)
    elif cfg.root is None:
        raise DataError(f"dataset {cfg.dataset!r} needs data.root (the folder holding the pairs)")
    else:
        root = Path(cfg.root)
    max_pairs = {cfg.train_split: cfg.max_train_pairs, cfg.val_split: cfg.max_val_pairs}
    max_size = cfg.val_max_size if split == cfg.val_split else None
    return cls(root, split, max_size=max_size, max_pairs=max_pairs.get(split))
