"""Train configs: presets load, bad files are rejected with messages that name the key."""

import subprocess
import sys

import pytest

from s2study.config.load import (
    apply_overrides,
    config_to_dict,
    flatten,
    load_train_config,
    preset_names,
    read_yaml,
    train_config_from_dict,
)
from s2study.errors import ConfigError

PRESETS = ["aliked-rgbnir", "aliked-roadscene", "d2net-rgbnir", "d2net-roadscene", "r2d2-rgbnir", "r2d2-roadscene"]


def test_presets_are_shipped_and_load():
    assert preset_names() == PRESETS
    for name in PRESETS:
        cfg = load_train_config(name)
        assert cfg.method.name == name.split("-")[0]
        assert cfg.data.dataset == name.split("-")[1]


def test_paper_defaults_in_presets():
    r2d2 = load_train_config("r2d2-roadscene")
    assert (r2d2.lambda_ssl, r2d2.batch_size, r2d2.crop_size, r2d2.weight_decay) == (0.4, 2, 192, 5e-4)
    d2 = load_train_config("d2net-roadscene")
    assert (d2.lambda_ssl, d2.batch_size, d2.crop_size, d2.weight_decay) == (0.8, 1, 256, 1e-5)


def test_overrides_are_typed_and_validated():
    cfg = load_train_config("r2d2-roadscene", ["lambda_ssl=0.8", "ssl.scale=[0.5, 2]", "data.max_val_pairs=3"])
    assert cfg.lambda_ssl == 0.8 and cfg.ssl.scale == (0.5, 2.0) and cfg.data.max_val_pairs == 3
    with pytest.raises(ConfigError, match="lambda_ssl: must be >= 0"):
        load_train_config("r2d2-roadscene", ["lambda_ssl=-1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_train_config("r2d2-roadscene", ["lambda_ssl"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lambda_sl": 0.4}, r"lambda_sl: unknown key 'lambda_sl' \(did you mean 'lambda_ssl'\?\)"),
        ({"epochs": "ten"}, r"epochs: 'ten' is not allowed; expected an integer"),
        ({"epochs": 0}, r"epochs: must be >= 1, got 0"),
        ({"ssl": {"invert_prob": 1.5}}, r"invert_prob: a probability in \[0, 1\], got 1.5"),
        ({"ssl": {"scale": [1.2, 0.8]}}, r"ssl.scale: \[1.2, 0.8\] must be a range"),
        ({"val_k": 0}, r"val_k: must be >= 1"),
        ({"method": {"name": "r2d3"}}, r"method.name: unknown method 'r2d3' \(did you mean 'r2d2'\?\)"),
        ({"method": {"name": "r2d2", "params": {"margin": 1}}}, r"method.params.margin: unknown parameter"),
        ({"data": {"dataset": "roadscene", "rooot": "x"}}, r"data.rooot: unknown key 'rooot' \(did you mean 'root'\?\)"),
        ({"ssl_ir": "yes"}, r"ssl_ir: 'yes' is not allowed; expected true/false"),
        ({"precision": "half"}, r"precision: one of auto, fp32, bf16, fp16; got 'half'"),
        ({"amp": False}, r"amp: renamed to 'precision'"),
        ({"crop_size": 4}, r"crop_size: must be in \[16, 2048\]"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        train_config_from_dict(data, source="cfg.yaml")
    assert str(info.value).startswith("cfg.yaml: ")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'r2d2-roadscen' \(did you mean 'r2d2-roadscene'\?\); known: aliked-rgbnir, aliked-roadscene, d2net-rgbnir"):
        load_train_config("r2d2-roadscen")


def test_bad_yaml_files(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
        read_yaml(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        read_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line"):
        read_yaml(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="missing.yaml: no such file"):
        load_train_config(str(tmp_path / "missing.yaml"))


def test_dict_roundtrip_and_flatten():
    cfg = load_train_config("d2net-rgbnir")
    again = train_config_from_dict(config_to_dict(cfg))
    assert again == cfg
    flat = flatten(config_to_dict(cfg))
    assert flat["method.name"] == "d2net" and flat["ssl.rotation_deg"] == cfg.ssl.rotation_deg
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_import_is_light():
    code = (
        "import sys, s2study, s2study.cli; "
        "heavy = [m for m in ('ray', 'mlflow', 'optuna', 'torch', 'kornia') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_cli_reports_user_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lambda_sl: 0.4\n")
    proc = subprocess.run(
        [sys.executable, "-m", "s2study", "train", str(bad)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "bad.yaml: lambda_sl: unknown key 'lambda_sl' (did you mean 'lambda_ssl'?)" in proc.stderr
