"""Bad input, as the user meets it: one clear line, exit code 2, no traceback, nothing started.

Every case goes through the command line. Most call :func:`s2study.cli.main` in this process
(what ``python -m s2study`` runs, with stdout/stderr captured), which also lets a test check
that Ray was not initialised; the cases about the process itself (fail-fast timing, a
traceback printed by Python, Ray starting) run ``python -m s2study`` as a subprocess and are
marked ``slow``. Each case checks that the message names the file, key or value at fault and
what is allowed, and that nothing was created in the working directory (no output folder, no
``s2study_results/``, no ``mlflow.db``).

Cases already covered at the CLI level elsewhere are not repeated here: an unknown top-level
study key, impossible trial resources (tests/test_study_config.py), an unknown train key
(tests/test_config.py), ``eval --k 0`` / ``--threshold -1`` / unknown dataset or split
(tests/test_evaluate.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from s2study.checkpoint import save_checkpoint
from s2study.cli import main
from s2study.config.load import load_train_config, preset_names, read_yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "search_spaces" / "smoke.yaml"
#: a data root that does not exist: a config that should be refused but is accepted stops at the
#: data (a different message, so the test still fails) instead of training for real
NO_DATA = "/nonexistent/s2study-guard/RoadScene"
GUARD = ["--set", f"data.root={NO_DATA}"]


# ----------------------------------------------------------------------------- helpers


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        """The one ``s2study: error:`` line (stderr split on newlines and carriage returns)."""
        lines = [s for s in re.split(r"[\r\n]", self.err) if "s2study: error:" in s]
        assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{self.err[-3000:]}"
        return lines[0]


def cli(capsys, *args) -> Outcome:
    """Run the CLI in this process; an exception escaping it is what a user sees as a traceback."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException as exc:  # noqa: BLE001
        captured = capsys.readouterr()
        pytest.fail(
            f"{type(exc).__name__} escaped the CLI, so the user gets a traceback: "
            f"{str(exc)[:500]}\nstderr: {captured.err[-1500:]}"
        )
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def assert_user_error(o: Outcome, *fragments: str) -> str:
    """Exit code 2, one line starting ``s2study: error:``, no traceback, every fragment in it."""
    assert o.code == 2, (
        f"exit code {o.code}, expected 2\nstderr: {o.err[-2000:]}\nstdout: {o.out[-1000:]}"
    )
    assert "Traceback" not in o.err, o.err[-3000:]
    line = o.error_line
    assert line.startswith("s2study: error: "), f"the message does not start its own line: {line!r}"
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def assert_nothing_created(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [], "the failed command created files"


def assert_ray_not_started() -> None:
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), (
        "Ray was started for a command that failed validation"
    )


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """An empty working directory (relative outputs such as runs/train land here)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return folder


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def smoke_study(**changes) -> dict:
    """The smoke study with ``changes``; its base data root is :data:`NO_DATA` unless set."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(changes)
    if isinstance(data.get("base"), str):
        data["base"] = {"preset": data["base"]}
    data["base"].setdefault("data", {}).setdefault("root", NO_DATA)
    return data


def _env() -> dict[str, str]:
    # RAY_ADDRESS=local: a fresh Ray instance, never a `ray start` cluster found on this machine
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.update(PYTHONUNBUFFERED="1", RAY_ADDRESS="local")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid`` (a command that ran past its timeout)."""
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[3]) == sid:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def cli_process(cwd: Path, *args, timeout: float = 240) -> tuple[Outcome, float]:
    """``python -m s2study ARGS`` as a user runs it; returns the outcome and the seconds it took.

    The command runs in its own session; past ``timeout`` everything it started is killed
    (Ray's processes included) and the test fails.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "s2study", *map(str, args)],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"s2study {' '.join(map(str, args))} ran past {timeout}s:\n{(out + err)[-3000:]}"
        )
    finally:
        _kill_session(proc.pid)
    return Outcome(proc.returncode, out, err), time.perf_counter() - t0


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("command", ["train", "run"])
@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01\x02 binary \xff\xfe", "not valid YAML"),
        (b"lambda_ssl: [0.4\nepochs: 3\n", "not valid YAML (line 2, column 7)"),
        (b"", "the file is empty; expected a mapping of config keys"),
        (b"# only a comment\n", "the file is empty"),
        (b"- lambda_ssl\n- 0.4\n", "expected a mapping of config keys, got list"),
    ],
    ids=["binary", "syntax", "empty", "comment-only", "a-list"],
)
def test_file_that_is_not_a_yaml_mapping(capsys, cwd, tmp_path, command, content, message):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    extra = GUARD if command == "train" else []
    assert_user_error(cli(capsys, command, path, *extra), str(path), message)
    assert_nothing_created(cwd)


@pytest.mark.parametrize(
    "data, key, message",
    [
        (
            {"data": {"max_val_pair": 3}},
            "data.max_val_pair",
            "unknown key 'max_val_pair' (did you mean 'max_val_pairs'?); known: dataset",
        ),
        ({"ssl": {"rotation": 10}}, "ssl.rotation", "(did you mean 'rotation_deg'?)"),
        ({"epochs": "ten"}, "epochs", "'ten' is not allowed; expected an integer"),
        ({"ssl": {"scale": 1.0}}, "ssl.scale", "1.0 is not allowed; expected a list of 2 numbers"),
        ({"ssl_vis": "yes"}, "ssl_vis", "'yes' is not allowed; expected true/false"),
        ({"precision": "fp8"}, "precision", "one of auto, fp32, bf16, fp16; got 'fp8'"),
        ({"lambda_ssl": -0.5}, "lambda_ssl", "must be >= 0, got -0.5"),
        ({"sl": {"flip_prob": 1.5}}, "sl.flip_prob", "a probability in [0, 1], got 1.5"),
        ({"ssl": {"invert_prob": -0.1}}, "ssl.invert_prob", "a probability in [0, 1], got -0.1"),
        ({"crop_size": 4096}, "crop_size", "must be in [16, 2048] (or null), got 4096"),
        ({"val_k": 0}, "val_k", "must be >= 1, got 0"),
        (
            {"method": {"name": "r2d2", "params": {"margin": 1.0}}},
            "method.params.margin",
            "'margin'; known: ap_base",
        ),
        (
            {"method": {"name": "r2d3"}},
            "method.name",
            "unknown method 'r2d3' (did you mean 'r2d2'?)",
        ),
        ({"method": {"name": "d2net", "params": {"margin": "x"}}}, "method.params.margin", "'x'"),
        ({"method": {"name": "r2d2", "params": {"ap_nq": 1}}}, "method.params.ap_nq", "[2, 100]"),
    ],
    ids=[
        "unknown-nested",
        "unknown-ssl",
        "epochs-str",
        "scale-scalar",
        "bool-str",
        "precision-unknown",
        "lambda-negative",
        "flip-prob",
        "invert-prob",
        "crop-huge",
        "val-k-0",
        "param-of-other-method",
        "method-typo",
        "param-value-type",
        "param-value-range",
    ],
)
def test_train_config_rejected_naming_file_and_key(capsys, cwd, tmp_path, data, key, message):
    path = write_yaml(tmp_path / "train.yaml", data)
    assert_user_error(cli(capsys, "train", path, *GUARD), f"{path}: {key}: ", message)
    assert_nothing_created(cwd)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", ["lambda_ssl", "lr", "val_threshold_px", "ssl.noise_std"])
def test_non_finite_numbers_are_out_of_range(capsys, cwd, key, value):
    """``.inf`` passes ``lambda_ssl >= 0`` and ``lr > 0``; the trainer must never see it."""
    o = cli(capsys, "train", "r2d2-roadscene", "--set", f"{key}={value}", *GUARD)
    assert_user_error(o, f"r2d2-roadscene.yaml: {key}: ")
    assert_nothing_created(cwd)


def test_set_override_without_equals_sign(capsys, cwd):
    assert_user_error(
        cli(capsys, "train", "r2d2-roadscene", "--set", "lambda_ssl", *GUARD),
        "--set 'lambda_ssl': expected KEY=VALUE",
    )
    assert_nothing_created(cwd)


def test_scientific_notation_is_a_number(tmp_path):
    """``lr: 1e-4`` is how people write learning rates; PyYAML's YAML 1.1 reads it as a string."""
    path = write_yaml(tmp_path / "train.yaml", "lr: 1e-4\nweight_decay: 5E-4\n")
    cfg = load_train_config(str(path), ["lambda_ssl=1e-1"])
    assert (cfg.lr, cfg.weight_decay, cfg.lambda_ssl) == (1e-4, 5e-4, 0.1)
    assert read_yaml(path) == {"lr": 1e-4, "weight_decay": 5e-4}


def test_unknown_preset_lists_the_known_ones(capsys, cwd):
    line = assert_user_error(
        cli(capsys, "train", "r2d2-roadscen"),
        "unknown preset 'r2d2-roadscen' (did you mean 'r2d2-roadscene'?); known: ",
    )
    assert all(name in line for name in preset_names())
    assert_nothing_created(cwd)


def test_unknown_dataset_is_refused_at_load_naming_the_key(capsys, cwd):
    o = cli(capsys, "train", "r2d2-roadscene", "--set", "data.dataset=roadscen", *GUARD)
    assert_user_error(
        o,
        "r2d2-roadscene.yaml: data.dataset: ",
        "unknown dataset 'roadscen' (did you mean 'roadscene'?)",
    )
    assert_nothing_created(cwd)  # today the default output folder runs/train is created first


def test_config_name_too_long_for_the_file_system(capsys, cwd):
    name = "x" * 300
    assert_user_error(cli(capsys, "train", name), "unknown preset")
    assert_nothing_created(cwd)


@pytest.mark.parametrize(
    "change, key, message",
    [
        (
            {"base": "r2d2-roadscen"},
            "base.preset",
            "unknown preset 'r2d2-roadscen' (did you mean 'r2d2-roadscene'?)",
        ),
        (
            {"base": {"preset": "r2d2-roadscene", "data": {"max_val_pair": 3}}},
            "base: data.max_val_pair",
            "(did you mean 'max_val_pairs'?)",
        ),
        (
            {"space": {"lambda_ssl": {"type": "float", "low": 1.2, "high": 0.0}}},
            "space.lambda_ssl.low/high",
            "empty or inverted range; need low < high",
        ),
        (
            {"space": {"lambda_ssl": {"type": "categorical", "choices": []}}},
            "space.lambda_ssl.choices",
            "expected a non-empty list",
        ),
        (
            {"space": {"method.params.margin": {"type": "float", "low": 0.5, "high": 2.0}}},
            "method.params.margin",
            "unknown parameter of method 'r2d2' 'margin'",
        ),
        (
            {"evaluate": {"ks": [0, 1024]}},
            "evaluate.ks",
            "expected a non-empty list of positive integers",
        ),
        ({"asha": {"max_epochs": 0}}, "asha.max_epochs", "must be >= 1, got 0"),
        ({"resources": {"cpu": 1, "gpu": float("nan")}}, "resources.gpu", "nan"),
        ({"storage": "~no_such_user_s2study/results"}, "storage", "~no_such_user_s2study/results"),
        ({"tracking": {"uri": "http://[::1"}}, "tracking.uri", "http://[::1"),
        (
            {"base": {"preset": "r2d2-roadscene", "data": {"root": "Road\x00Scene"}}},
            "base.data.root",
            "Road",
        ),
        ({"base": {"preset": "y" * 300}}, "base.preset", "unknown preset"),
        (
            {"space": {"method.params.ap_nq": {"type": "int", "low": 1, "high": 8}}},
            "method.params.ap_nq",
            "[2, 100]",
        ),
    ],
    ids=[
        "preset",
        "base-key",
        "inverted-range",
        "no-choices",
        "param-of-other-method",
        "ks",
        "max-epochs",
        "gpu-nan",
        "storage-unknown-user",
        "uri-broken-ipv6",
        "root-nul-byte",
        "preset-too-long",
        "param-value-range",
    ],
)
def test_study_rejected_before_ray_naming_file_and_key(capsys, cwd, tmp_path, change, key, message):
    path = write_yaml(tmp_path / "study.yaml", smoke_study(**change))
    assert_user_error(cli(capsys, "run", path), str(path), key, message)
    assert_nothing_created(cwd)
    assert_ray_not_started()


# ----------------------------------------------------------------------------- data


def copy_roadscene(src: Path, dst: Path, ids: list[str], split: str = "val") -> Path:
    """A small RoadScene folder in ``dst`` holding ``ids`` (files copied from the shared data)."""
    for sub in ("crop_LR_visible", "cropinfrared"):
        (dst / sub).mkdir(parents=True)
        for pair_id in ids:
            shutil.copy(src / sub / f"{pair_id}.jpg", dst / sub / f"{pair_id}.jpg")
    (dst / "splits").mkdir()
    (dst / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dst


@pytest.fixture(scope="module")
def val_ids(roadscene) -> list[str]:
    return (roadscene / "splits" / "val.txt").read_text().split()[:2]


def eval_sift(capsys, root: str, out: Path, *extra) -> Outcome:
    return cli(
        capsys,
        "eval",
        "--checkpoint",
        "sift",
        "--data",
        root,
        "--k",
        "64",
        "--quiet",
        "--no-cache",
        "--out",
        out,
        *extra,
    )


def test_missing_dataset_root_names_the_path_and_the_variable(capsys, cwd, tmp_path):
    missing = tmp_path / "nowhere" / "RoadScene"
    o = cli(
        capsys, "train", "r2d2-roadscene", "--set", f"data.root={missing}", "--set", "device=cpu"
    )
    assert_user_error(
        o,
        f"dataset roadscene: the folder {missing} given as its root does not exist",
        "leave the root unset to find or fetch roadscene by name",
    )
    assert_nothing_created(cwd)  # today train() creates runs/train before opening the data


def test_split_file_naming_ids_without_images(capsys, cwd, tmp_path, roadscene, val_ids):
    root = copy_roadscene(roadscene, tmp_path / "RoadScene", val_ids)
    (root / "splits" / "val.txt").write_text(f"{val_ids[0]}\nFLIR_99999\n")
    assert_user_error(
        eval_sift(capsys, f"roadscene:{root}", cwd / "out"),
        "RoadScene id 'FLIR_99999' listed in",
        str(root / "splits" / "val.txt"),
        f"has no image {root / 'crop_LR_visible'}/FLIR_99999.jpg",
    )
    assert_nothing_created(cwd)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9, 0.99])
def test_truncated_jpeg_is_named(capsys, cwd, tmp_path, roadscene, val_ids, keep):
    root = copy_roadscene(roadscene, tmp_path / "RoadScene", val_ids)
    image = root / "crop_LR_visible" / f"{val_ids[1]}.jpg"
    data = image.read_bytes()
    image.write_bytes(data[: int(len(data) * keep)])
    assert_user_error(
        eval_sift(capsys, f"roadscene:{root}", cwd / "out"),
        f"cannot decode image {image}: unreadable, truncated or not an image",
    )


@pytest.mark.slow
def test_truncated_image_read_by_a_dataloader_worker_is_one_line(
    capsys, cwd, tmp_path, roadscene, val_ids
):
    """With ``num_workers > 0`` torch re-raises the worker's DataError with its traceback inside."""
    root = copy_roadscene(roadscene, tmp_path / "RoadScene", val_ids, split="train")
    shutil.copy(root / "splits" / "train.txt", root / "splits" / "val.txt")
    for pair_id in val_ids:
        image = root / "cropinfrared" / f"{pair_id}.jpg"
        image.write_bytes(image.read_bytes()[:500])
    o = cli(
        capsys,
        "train",
        "r2d2-roadscene",
        "--set",
        f"data.root={root}",
        "--set",
        "num_workers=1",
        "--set",
        "crop_size=64",
        "--set",
        "batch_size=1",
        "--set",
        "device=cpu",
        "--out",
        cwd / "out",
        "--max-steps",
        "1",
    )
    assert_user_error(o, "cannot decode image ", str(root / "cropinfrared"))


def test_grayscale_visible_and_colour_infrared_are_handled(
    capsys, cwd, tmp_path, roadscene, val_ids
):
    root = copy_roadscene(roadscene, tmp_path / "RoadScene", val_ids)
    for pair_id in val_ids:
        vis, ir = (
            root / "crop_LR_visible" / f"{pair_id}.jpg",
            root / "cropinfrared" / f"{pair_id}.jpg",
        )
        assert cv2.imwrite(str(vis), cv2.imread(str(vis), cv2.IMREAD_GRAYSCALE))
        colour = cv2.imread(str(ir))
        colour[..., 0] //= 2  # a real 3-channel image where one gray channel is expected
        assert cv2.imwrite(str(ir), colour)
    assert cv2.imread(str(vis), cv2.IMREAD_UNCHANGED).ndim == 2
    o = eval_sift(capsys, f"roadscene:{root}", cwd / "out")
    assert o.code == 0, o.err[-2000:]
    assert "roadscene val (2 pairs)" in o.out
    nc = float(re.search(r"^sift\s+\|\s+([\d.]+)", o.out, re.MULTILINE).group(1))
    assert nc > 0, o.out  # features really were matched on the converted images


def test_aligned_pair_of_different_sizes_names_both_files(
    capsys, cwd, tmp_path, roadscene, val_ids
):
    root = copy_roadscene(roadscene, tmp_path / "RoadScene", val_ids)
    ir = root / "cropinfrared" / f"{val_ids[0]}.jpg"
    assert cv2.imwrite(str(ir), cv2.resize(cv2.imread(str(ir)), (300, 200)))
    assert_user_error(
        eval_sift(capsys, f"roadscene:{root}", cwd / "out"),
        f"pair '{val_ids[0]}' should be pixel-aligned but its images differ in size",
        f"{ir} is 300x200",
    )


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.txt", "1 2 3\nfoo bar\n", "cannot read ground-truth transform"),
        (
            "p.txt",
            "1 0 0\n0 1 0\n0 0 1\n0 0 1\n",
            "expected a 2x3 affine or 3x3 homography, got shape (4, 3)",
        ),
        ("p.txt", "1 2 3\n2 4 6\n0 0 1\n", "the transform is singular (determinant ~ 0)"),
        ("p.txt", "0 0 0\n0 0 0\n0 0 0\n", "the transform is singular"),
        ("p.txt", "1 0 nan\n0 1 0\n0 0 1\n", "non-finite"),
        ("p.npy", b"not an npy file at all", "cannot read ground-truth transform"),
    ],
    ids=["text-garbage", "4x3", "singular", "zeros", "nan", "npy-garbage"],
)
def test_folder_ground_truth_malformed_or_singular(
    capsys, cwd, tmp_path, roadscene, val_ids, name, content, message
):
    root = tmp_path / "pairs"
    root.mkdir()
    image = cv2.imread(str(roadscene / "crop_LR_visible" / f"{val_ids[0]}.jpg"))
    for side in "ab":
        assert cv2.imwrite(str(root / f"p_{side}.jpg"), image)
    gt = root / name
    gt.write_bytes(content if isinstance(content, bytes) else content.encode())
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("p\n")
    line = assert_user_error(eval_sift(capsys, f"folder:{root}", cwd / "out"), str(gt), message)
    assert "allow_pickle" not in line, "the message must not advise loading the file unsafely"
    assert_nothing_created(cwd)


@pytest.mark.slow
def test_crop_larger_than_every_training_image_is_handled(
    capsys, cwd, tmp_path, roadscene, val_ids
):
    """40x40 pairs with 64 px crops: zero padding outside the image, ground truth only inside."""
    root = tmp_path / "tiny"
    root.mkdir()
    image = cv2.imread(str(roadscene / "crop_LR_visible" / f"{val_ids[0]}.jpg"))
    for k in range(5):
        small = cv2.resize(image[k * 10 : k * 10 + 200, k * 10 : k * 10 + 200], (40, 40))
        for side in "ab":
            assert cv2.imwrite(str(root / f"p{k}_{side}.png"), small)
    o = cli(
        capsys,
        "train",
        "r2d2-roadscene",
        "--set",
        "data.dataset=folder",
        "--set",
        f"data.root={root}",
        "--set",
        "data.train_split=all",
        "--set",
        "data.val_split=all",
        "--set",
        "crop_size=64",
        "--set",
        "batch_size=1",
        "--set",
        "steps_per_epoch=1",
        "--set",
        "val_k=64",
        "--set",
        "device=cpu",
        "--set",
        "precision=fp32",
        "--epochs",
        "1",
        "--out",
        cwd / "out",
    )
    assert o.code == 0, o.err[-2000:]
    loss = float(re.search(r"epoch 1: loss ([-\d.naif]+)", o.out).group(1))
    assert np.isfinite(loss) and loss > 0
    assert (cwd / "out" / "last.pt").is_file()


# ----------------------------------------------------------------------------- checkpoints


class _WritesAFile:
    """Unpickling this calls ``open(marker, "w")``: code from the file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def one_pair(roadscene, val_ids, tmp_path_factory) -> str:
    root = copy_roadscene(roadscene, tmp_path_factory.mktemp("data") / "RoadScene", val_ids[:1])
    return f"roadscene:{root}"


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A real s2study checkpoint of a (randomly initialised) R2D2, written by save_checkpoint."""
    from s2study.methods import build_method

    method = build_method("r2d2")
    path = tmp_path_factory.mktemp("ckpt") / "r2d2.pt"
    save_checkpoint(
        path,
        {
            "method": {"name": "r2d2", "params": dict(method.params)},
            "model": method.state_dict(),
            "config": {},
            "epoch": 1,
            "metrics": {},
        },
    )
    return path


def eval_checkpoint(capsys, path: Path, data: str, out: Path) -> Outcome:
    return cli(
        capsys,
        "eval",
        "--checkpoint",
        path,
        "--data",
        data,
        "--k",
        "64",
        "--max-pairs",
        "1",
        "--quiet",
        "--no-cache",
        "--out",
        out,
    )


def assert_no_unsafe_advice(line: str) -> None:
    assert "\x1b[" not in line, f"terminal escape codes in the message: {line!r}"
    for advice in ("weights_only` set to `False`", "can still be loaded", "allow_pickle"):
        assert advice not in line, f"the message advises loading the file unsafely: {line!r}"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello, this is a text file\n", "torch.save"),
        (np.random.default_rng(0).bytes(4096), "torch.save"),
    ],
    ids=["text", "random-bytes"],
)
def test_file_that_is_not_a_checkpoint(capsys, cwd, tmp_path, one_pair, content, message):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    line = assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"), str(path), message
    )
    assert_no_unsafe_advice(line)
    assert_nothing_created(cwd)


def test_torch_file_from_another_tool(capsys, cwd, tmp_path, one_pair):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3, "optimizer": {}}, path)
    assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"),
        f"{path}: not an s2study checkpoint (keys: epoch, optimizer, state_dict)",
    )
    torch.save([1, 2, 3], path)
    assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"),
        f"{path}: not a checkpoint (a list, expected a dict)",
    )
    assert_nothing_created(cwd)


def test_checkpoint_of_another_format_version(capsys, cwd, tmp_path, one_pair, real_checkpoint):
    data = torch.load(real_checkpoint, weights_only=True)
    data["version"] = 99
    path = tmp_path / "v99.pt"
    torch.save(data, path)
    assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"),
        f"{path}: checkpoint format version 99 is not supported (this s2study reads version 1)",
    )
    assert_nothing_created(cwd)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_checkpoint(capsys, cwd, tmp_path, one_pair, real_checkpoint, keep):
    data = real_checkpoint.read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: int(len(data) * keep)])
    line = assert_user_error(eval_checkpoint(capsys, path, one_pair, cwd / "out"), f"{path}: ")
    assert "truncated" in line.split(f"{path}: ", 1)[1], (
        line
    )  # the reason, not the test's folder name
    assert_no_unsafe_advice(line)
    assert_nothing_created(cwd)


def test_checkpoint_naming_an_unknown_method(capsys, cwd, tmp_path, one_pair, real_checkpoint):
    data = torch.load(real_checkpoint, weights_only=True)
    data["method"] = {"name": "r2d3", "params": {}}
    path = tmp_path / "r2d3.pt"
    torch.save(data, path)
    assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"),
        f"{path}: unknown method 'r2d3' (did you mean 'r2d2'?); known: aliked, d2net, r2d2",
    )
    assert_nothing_created(cwd)


def test_real_checkpoint_evaluates(capsys, cwd, one_pair, real_checkpoint):
    """The control for the cases above: the untouched file loads and evaluates."""
    o = eval_checkpoint(capsys, real_checkpoint, one_pair, cwd / "out")
    assert o.code == 0, o.err[-2000:]
    assert "r2d2-r2d2" in o.out and (cwd / "out" / "eval.json").is_file()


def test_pickled_callable_is_refused_and_never_runs(capsys, cwd, tmp_path, one_pair):
    marker, control = tmp_path / "PWNED", tmp_path / "CONTROL"
    payload = {
        "format": "s2study-checkpoint",
        "version": 1,
        "method": {"name": "r2d2", "params": {}},
        "model": {},
        "extra": _WritesAFile(marker),
    }
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    assert_user_error(eval_checkpoint(capsys, path, one_pair, cwd / "out"), str(path))
    assert not marker.exists(), "loading the checkpoint executed code from it"
    assert_nothing_created(cwd)
    # the payload is live: an unsafe load of the same kind of file does run it
    torch.save({**payload, "extra": _WritesAFile(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


def test_pickled_code_refusal_says_why(capsys, cwd, tmp_path, one_pair):
    path = tmp_path / "evil.pt"
    torch.save(
        {
            "format": "s2study-checkpoint",
            "version": 1,
            "method": {"name": "r2d2", "params": {}},
            "model": {},
            "extra": _WritesAFile(tmp_path / "PWNED"),
        },
        path,
    )
    line = assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"), str(path), "builtins.open"
    )
    assert_no_unsafe_advice(line)
    assert "refused" in line or "not allowed" in line, line


def test_pickled_class_is_refused(capsys, cwd, tmp_path, one_pair):
    path = tmp_path / "class.pt"
    torch.save(
        {
            "format": "s2study-checkpoint",
            "version": 1,
            "method": {"name": "r2d2", "params": {"activation": torch.nn.ReLU}},
            "model": {},
        },
        path,
    )
    assert_user_error(eval_checkpoint(capsys, path, one_pair, cwd / "out"), str(path))
    assert_nothing_created(cwd)


def test_official_format_with_code_as_architecture_is_refused(
    capsys, cwd, tmp_path, one_pair, official_r2d2
):
    marker = tmp_path / "PWNED"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    state = torch.load(official_r2d2, weights_only=True)["state_dict"]
    path = tmp_path / "official-evil.pt"
    torch.save({"net": code, "state_dict": state}, path)
    assert_user_error(
        eval_checkpoint(capsys, path, one_pair, cwd / "out"),
        str(path),
        "is not supported; known: Quad_L2Net_ConfCFS",
    )
    assert not marker.exists()
    assert_nothing_created(cwd)


# ----------------------------------------------------------------------------- environment


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message shown when CUDA is absent"
)
def test_train_on_cuda_without_a_gpu(capsys, cwd):
    assert_user_error(
        cli(capsys, "train", "r2d2-roadscene", "--device", "cuda", *GUARD),
        "'cuda' was requested but no CUDA GPU is available",
    )
    assert_nothing_created(cwd)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_output_folder_under_a_file(capsys, cwd, command):
    (cwd / "afile").write_text("a file, not a folder\n")
    if command == "train":
        o = cli(
            capsys,
            "train",
            "r2d2-roadscene",
            "--set",
            "device=cpu",
            "--out",
            "afile/sub",
            "--max-steps",
            "1",
            "--set",
            "data.max_train_pairs=1",
            "--set",
            "data.max_val_pairs=1",
            "--set",
            "crop_size=64",
            "--set",
            "val_k=64",
            "--set",
            "batch_size=1",
            "--epochs",
            "1",
        )
    else:
        o = cli(
            capsys,
            "eval",
            "--checkpoint",
            "sift",
            "--data",
            "roadscene",
            "--max-pairs",
            "1",
            "--k",
            "64",
            "--quiet",
            "--out",
            "afile/sub",
        )
    assert_user_error(o, "afile/sub")
    assert sorted(p.name for p in cwd.iterdir()) == ["afile"]


def test_tracking_database_under_a_file(capsys, cwd):
    (cwd / "afile").write_text("a file, not a folder\n")
    o = cli(capsys, "run", SMOKE, "--tracking-uri", f"sqlite:///{cwd}/afile/mlflow.db")
    assert_user_error(o, f"sqlite:///{cwd}/afile/mlflow.db", str(cwd / "afile"))
    assert sorted(p.name for p in cwd.iterdir()) == ["afile"]
    assert_ray_not_started()


@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast_before_ray(cwd):
    uri = f"http://127.0.0.1:{closed_port()}"
    o, seconds = cli_process(cwd, "run", SMOKE, "--tracking-uri", uri, timeout=180)
    assert_user_error(o, f"MLflow tracking server {uri} is not reachable", "Connection refused")
    assert seconds < 60, f"took {seconds:.0f}s to fail"
    assert "Ray" not in o.err and "Ray" not in o.out, "Ray was started"
    assert_nothing_created(cwd)


#: a study of one trial of one epoch, not evaluated: enough to reach the checks before Ray
ONE_EPOCH_TRIAL = ("--trials", "1", "--set", "asha.max_epochs=1", "--set", "evaluate.top_n=0")


@pytest.mark.slow
def test_storage_under_a_file_is_refused_before_anything_starts(cwd):
    (cwd / "afile").write_text("a file, not a folder\n")
    o, _ = cli_process(
        cwd,
        "run",
        SMOKE,
        "--storage",
        "afile/results",
        *ONE_EPOCH_TRIAL,
        timeout=240,
    )
    assert_user_error(o, "storage", str(cwd / "afile" / "results"))
    assert sorted(p.name for p in cwd.iterdir()) == ["afile"], "MLflow or Ray state was created"


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message shown when CUDA is absent"
)
def test_study_on_cuda_without_a_gpu_is_refused_before_ray(cwd):
    o, _ = cli_process(
        cwd,
        "run",
        SMOKE,
        "--set",
        "base.device=cuda",
        *ONE_EPOCH_TRIAL,
        timeout=240,
    )
    assert_user_error(o, "device", "cuda")
    assert_nothing_created(cwd)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "{tmp}/broken.yaml"], "not valid YAML (line 2, column 7)"),
        (
            ["run", "{tmp}/inverted.yaml"],
            "space.lambda_ssl.low/high: [1.2, 0.0] is an empty or inverted range",
        ),
        (
            ["eval", "--checkpoint", "{tmp}/evil.pt", "--data", "roadscene", "--max-pairs", "1"],
            "evil.pt",
        ),
    ],
    ids=["train-yaml", "run-space", "eval-checkpoint"],
)
def test_the_process_exits_2_without_traceback(cwd, tmp_path, args, message):
    (tmp_path / "broken.yaml").write_text("lambda_ssl: [0.4\nepochs: 3\n")
    write_yaml(
        tmp_path / "inverted.yaml",
        smoke_study(space={"lambda_ssl": {"type": "float", "low": 1.2, "high": 0.0}}),
    )
    torch.save({"extra": _WritesAFile(tmp_path / "PWNED")}, tmp_path / "evil.pt")
    o, _ = cli_process(cwd, *[a.format(tmp=tmp_path) for a in args], timeout=180)
    assert_user_error(o, message)
    assert not (tmp_path / "PWNED").exists()
    assert_nothing_created(cwd)
