"""Study files: the shipped ones validate; bad ones are refused before Ray starts.

Every rejection must be a ConfigError naming the key; through the CLI it is exit code 2
with a one-line message and no traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from s2study.cli import main as cli_main
from s2study.config.load import train_config_from_dict
from s2study.errors import ConfigError
from s2study.study.config import (
    ResourcesConfig,
    check_resources,
    load_study,
    resource_sets,
    study_from_dict,
    trial_resources,
)
from s2study.study.space import DefineByRun, grid_values, overlay

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_study_files_validate(path, tmp_path):
    cfg = load_study(path, cwd=tmp_path)
    assert cfg.name and cfg.space and cfg.trials >= 1
    assert cfg.base["epochs"] == cfg.asha.max_epochs
    assert cfg.storage == str(tmp_path / "s2study_results")
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfg.tracking.experiment == cfg.name
    assert cfg.metric == "val_ncm" and cfg.mode == "max"


def test_shipped_files_are_the_expected_set():
    assert {p.stem for p in SPACES} >= {"lambda", "augment", "backbone", "paper", "smoke"}


def test_smoke_study_is_small_and_really_early_stops(tmp_path):
    cfg = load_study(REPO / "search_spaces/smoke.yaml", cwd=tmp_path)
    assert cfg.trials >= 6 and cfg.max_concurrent == 2 and cfg.resources.gpu == 0
    assert (cfg.asha.enabled, cfg.asha.max_epochs, cfg.asha.grace_period, cfg.asha.reduction_factor) == (True, 4, 1, 2)
    assert {s.key for s in cfg.space if s.sampled} >= {"lambda_ssl", "ssl.rotation_deg"}
    assert cfg.base["method"]["weights"] == "official" and cfg.base["crop_size"] <= 64


def test_paper_grid_runs_every_combination_once(tmp_path):
    cfg = load_study(REPO / "search_spaces/paper.yaml", cwd=tmp_path)
    grid = grid_values(cfg.space, "paper.yaml")
    assert grid == {"lambda_ssl": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2], "method.name": ["d2net", "r2d2"],
                    "data.dataset": ["roadscene", "rgbnir"]}
    assert cfg.trials == 28 and not cfg.asha.enabled and cfg.evaluate.ks == (1024, 2048, 4096)
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0), direction="maximize")
    space = DefineByRun(cfg.space, cfg.base_flat)
    seen = set()

    def objective(trial):
        constants = space(trial)
        seen.add(tuple(trial.params[k] for k in grid))
        assert constants == ({"method.weights": "official", "weight_decay": 5e-4, "batch_size": 2, "crop_size": 192}
                             if trial.params["method.name"] == "r2d2" else {})
        return 1.0

    study.optimize(objective, n_trials=cfg.trials)
    assert len(seen) == 28


def test_conditional_params_are_sampled_only_for_their_method(tmp_path):
    cfg = load_study(REPO / "search_spaces/backbone.yaml", cwd=tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3), direction="maximize")
    space = DefineByRun(cfg.space, cfg.base_flat)
    methods = set()
    for _ in range(24):
        trial = study.ask()
        constants = space(trial)
        p = trial.params
        methods.add(p["method.name"])
        assert 0.0 <= p["lambda_ssl"] <= 1.2
        if p["method.name"] == "r2d2":
            assert {"method.params.w_peaky", "method.params.ap_base"} <= set(p) and "method.params.margin" not in p
            assert p["method.weights"] in {"r2d2_WASF_N16", "r2d2_WAF_N16", "r2d2_WASF_N8_big", "faster2d2_WASF_N16"}
        elif p["method.name"] == "aliked":
            assert p["method.params.model_name"] in {"aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32"}
            assert "method.weights" not in p and "method.params.w_peaky" not in p
        else:
            assert 2 <= p["method.params.safe_radius"] <= 8 and "method.params.w_peaky" not in p
            assert constants == {} and "method.weights" not in p
        if p["method.name"] != "d2net":
            assert constants == {"weight_decay": 5e-4, "batch_size": 2, "crop_size": 192}
        cfg_train = train_config_from_dict(overlay(cfg.base, {**p, **constants}))
        assert cfg_train.method.name == p["method.name"] and cfg_train.data.dataset == p["data.dataset"]
        study.tell(trial, 0.0)
    assert methods == {"r2d2", "d2net", "aliked"}


def test_tuple_elements_are_sampled_by_index(tmp_path):
    cfg = load_study(REPO / "search_spaces/augment.yaml", cwd=tmp_path)
    cfg_train = train_config_from_dict(overlay(cfg.base, {"ssl.scale[0]": 0.6, "ssl.scale[1]": 1.7}))
    assert cfg_train.ssl.scale == (0.6, 1.7)


def _study(tmp_path, **changes):
    raw = {"name": "t", "base": {"preset": "r2d2-roadscene"},
           "space": {"lambda_ssl": {"type": "float", "low": 0.0, "high": 1.2}},
           "trials": 4, "asha": {"max_epochs": 3}}
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("/")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return study_from_dict(raw, source="bad.yaml", cwd=tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"trails": 4}, r"bad.yaml: trails: unknown key 'trails' \(did you mean 'trials'\?\)"),
    ({"trials": "six"}, r"bad.yaml: trials: 'six' is not allowed; expected an integer"),
    ({"trials": 0}, r"trials: must be >= 1"),
    ({"space/lambda_ssl": {"type": "float", "low": 1.2, "high": 0.0}},
     r"space.lambda_ssl.low/high: \[1.2, 0.0\] is an empty or inverted range"),
    ({"space/lambda_ssl": {"type": "float", "low": 0.5, "high": 0.5}}, r"space.lambda_ssl.low/high: .*empty"),
    ({"space/lambda_ssl": {"type": "float", "low": 0.0, "hgh": 1.0}},
     r"space.lambda_ssl.hgh: unknown key 'hgh' \(did you mean 'high'\?\)"),
    ({"space/lambda_ssl": {"type": "float", "low": 0.0}}, r"space.lambda_ssl.high: required"),
    ({"space/lambda_ssl": {"type": "categorical", "choices": []}}, r"space.lambda_ssl.choices: \[\] is not allowed"),
    ({"space/lambda_ssl": {"type": "gaussian"}}, r"space.lambda_ssl.type: unknown type 'gaussian'"),
    ({"space/lambda_ssl": {"type": "float", "low": 0.0, "high": 1.0, "log": True}},
     r"space.lambda_ssl.low: 0.0 is not allowed with log: true"),
    ({"space/lambda_ss": {"type": "float", "low": 0.0, "high": 1.0}},
     r"space.lambda_ss: unknown TrainConfig key 'lambda_ss' \(did you mean 'lambda_ssl'\?\)"),
    ({"space/ssl.rotation": {"type": "float", "low": 0.0, "high": 1.0}},
     r"space.ssl.rotation: unknown key of ssl 'rotation' \(did you mean 'rotation_deg'\?\)"),
    ({"space/ssl": {"type": "constant", "value": {}}}, r"space.ssl: ssl is a section"),
    ({"space/crop_size": {"type": "float", "low": 64, "high": 128}}, r"space.crop_size.type: float is not allowed"),
    ({"space/epochs": {"type": "int", "low": 2, "high": 5}}, r"space.epochs: cannot be sampled; .*asha.max_epochs"),
    ({"space/method.params.margin": {"type": "float", "low": 0.5, "high": 2.0}},
     r"method.params.margin: unknown parameter of method 'r2d2' 'margin'"),
    ({"space/ssl.perspective": {"type": "float", "low": 0.0, "high": 0.8}},
     r"bad.yaml: space \(at .*ssl.perspective=0.8\): ssl.perspective: must be in \[0, 0.5\)"),
    ({"space/ssl.scale[2]": {"type": "float", "low": 0.5, "high": 1.0}}, r"space.ssl.scale\[2\]: \[2\] is not allowed"),
    ({"space/lambda_ssl": {"type": "float", "low": 0.0, "high": 1.0, "when": {"method.name": "r2d2"}},
      "space/method.name": {"type": "categorical", "choices": ["r2d2", "d2net"]}},
     r"space.lambda_ssl.when.method.name: method.name is sampled at or after lambda_ssl"),
    ({"space/lambda_ssl": {"type": "float", "low": 0.0, "high": 1.0, "when": {"method.params.dim": 128}}},
     r"space.lambda_ssl.when.method.params.dim: a condition key must be sampled earlier"),
    ({"base": {"preset": "r2d2-roadscen"}},
     r"bad.yaml: base.preset: unknown preset 'r2d2-roadscen' \(did you mean 'r2d2-roadscene'\?\)"),
    ({"base": {"preset": "r2d2-roadscene", "lambda_sl": 0.4}},
     r"bad.yaml: base: lambda_sl: unknown key 'lambda_sl' \(did you mean 'lambda_ssl'\?\)"),
    ({"asha": {"max_epochs": 3, "grace_period": 5}}, r"asha.grace_period: 5 is more than max_epochs 3"),
    ({"asha": {"max_epochs": 3, "reduction_factor": 1}}, r"asha.reduction_factor: must be > 1"),
    ({"resources": {"cpu": 1, "gpu": 1.5}}, r"bad.yaml: resources.gpu: must be in \[0, 1\], got 1.5; the trainer uses one"),
    ({"resources": {"cpu": 1, "gpu": 2}}, r"bad.yaml: resources.gpu: must be in \[0, 1\], got 2; the trainer uses one device"),
    ({"system_metrics": {"interval_s": 0.1}}, r"bad.yaml: system_metrics.interval_s: must be 0 \(off\) or in \[1, 3600\]"),
    ({"sampler": {"name": "tpee"}}, r"sampler.name: unknown sampler 'tpee' \(did you mean 'tpe'\?\)"),
    ({"sampler": {"name": "grid"}}, r"space.lambda_ssl: sampler 'grid' needs unconditional categorical specs"),
    ({"sampler": {"name": "random", "n_startup_trials": 3}}, r"sampler.n_startup_trials: not used by sampler 'random'"),
    ({"metric": "val_nmc"}, r"bad.yaml: metric: unknown metric 'val_nmc'"),
    ({"mode": "maximize"}, r"mode: 'maximize' is not allowed; one of max, min"),
    ({"evaluate": {"ks": [1024, 0]}}, r"evaluate.ks: \[1024, 0\] is not allowed"),
    ({"evaluate": {"split": "tests"}}, r"evaluate.split: unknown split 'tests'"),
    ({"tracking": {"uri": "./mlruns"}}, r"bad.yaml: tracking.uri: .*file store"),
    ({"name": "my study"}, r"name: 'my study' is not allowed"),
    ({"resources_when": {"method.name": "d2net"}}, r"bad.yaml: resources_when: expected a list of \{when: "),
    ({"resources_when": [{"cpu": 2}]}, r"bad.yaml: resources_when\[0\]: expected a list of \{when: "),
    ({"resources_when": [{"when": {"method.name": "d2net"}}]}, r"resources_when\[0\]: give cpu and/or gpu"),
    ({"resources_when": [{"when": {"method.nme": "d2net"}, "cpu": 2}]},
     r"bad.yaml: resources_when\[0\].when.method.nme: .*did you mean 'name'"),
    ({"resources_when": [{"when": {"method.name": "d2net"}, "gpus": 1}]},
     r"bad.yaml: resources_when\[0\].gpus: unknown key 'gpus' \(did you mean 'gpu'\?\)"),
    ({"resources_when": [{"when": {"method.name": "d2net"}, "cpu": 0}]},
     r"bad.yaml: resources_when\[0\].cpu: must be > 0, got 0"),
    ({"repeats": {"top_n": -1}}, r"bad.yaml: repeats.top_n: must be >= 0 \(0: no repeats\), got -1"),
    ({"repeats": {"top_n": 2, "seeds": 1}}, r"bad.yaml: repeats.seeds: must be >= 2 .*got 1"),
    ({"repeats": {"top_n": 2, "seed": 3}}, r"bad.yaml: repeats.seed: unknown key 'seed' \(did you mean 'seeds'\?\)"),
    ({"repeats": {"top_n": 2}, "space/seed": {"type": "int", "low": 0, "high": 9}},
     r"bad.yaml: repeats: the space samples seed; repeats vary the seed themselves"),
])
def test_bad_study_is_a_config_error_naming_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        _study(tmp_path, **change)


def test_grid_sampler_needs_enough_combinations(tmp_path):
    space = {"lambda_ssl": {"type": "categorical", "choices": [0.0, 0.4]}}
    with pytest.raises(ConfigError, match=r"trials: 4 is more than the 2 combinations"):
        _study(tmp_path, space=space, sampler={"name": "grid"})
    assert _study(tmp_path, space=space, sampler={"name": "grid"}, trials=2).trials == 2


def test_resources_no_node_offers_are_refused(tmp_path):
    cfg = _study(tmp_path, resources={"cpu": 4, "gpu": 0.25})
    check_resources(cfg, [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match=r"bad.yaml: resources: \{cpu: 4, gpu: 0.25\} per trial cannot be met"):
        check_resources(cfg, [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 16.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 1.0}])


METHODS = {"method.name": {"type": "categorical", "choices": ["r2d2", "d2net"]},
           "lambda_ssl": {"type": "float", "low": 0.0, "high": 1.2}}


def test_resources_when_gives_each_configuration_its_request_first_match_first(tmp_path):
    cfg = _study(tmp_path, space=METHODS, resources={"cpu": 2, "gpu": 0.5}, resources_when=[
        {"when": {"method.name": "d2net"}, "gpu": 1}, {"when": {"method.name": ["d2net", "r2d2"]}, "cpu": 3}])
    assert trial_resources(cfg, {"method.name": "d2net", "lambda_ssl": 0.4}) == ResourcesConfig(cpu=2, gpu=1)
    assert trial_resources(cfg, {"method.name": "r2d2"}) == ResourcesConfig(cpu=3, gpu=0.5)
    assert resource_sets(cfg) == [ResourcesConfig(cpu=3, gpu=0.5), ResourcesConfig(cpu=2, gpu=1)]
    # a base value can be the condition too; the default is only checked where the space reaches it
    cfg = _study(tmp_path, resources_when=[{"when": {"method.name": "r2d2"}, "cpu": 1}], resources={"cpu": 64})
    assert resource_sets(cfg) == [ResourcesConfig(cpu=1)]
    check_resources(cfg, [{"CPU": 2.0, "GPU": 0.0}])


def test_a_resources_when_request_no_node_offers_is_refused_by_its_entry(tmp_path):
    cfg = _study(tmp_path, space=METHODS, resources={"cpu": 1}, resources_when=[
        {"when": {"method.name": "d2net"}, "cpu": 4, "gpu": 1}])
    with pytest.raises(ConfigError, match=r"bad.yaml: resources_when\[0\]: \{cpu: 4, gpu: 1\} per trial cannot be met"):
        check_resources(cfg, [{"CPU": 8.0, "GPU": 0.0}])
    check_resources(cfg, [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}])
    # a trial on cuda must ask for a GPU under its own request
    with pytest.raises(ConfigError, match=r"resources.gpu: 0, but device: 'cuda' is requested \(at method.name='r2d2'"):
        _study(tmp_path, space=METHODS, base={"preset": "r2d2-roadscene", "device": "cuda"},
               resources_when=[{"when": {"method.name": "d2net"}, "gpu": 1}])


def test_resources_when_reaches_ray_per_trial(tmp_path):
    """Real Ray Tune: each trial of the study's trainable gets the request of its configuration."""
    import ray
    from ray import tune

    from s2study.study.runner import StudyOutcome, _trainable

    def probe(config, settings):
        tune.report({"cpu": ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0),
                     "method": config["method.name"]})

    cfg = _study(tmp_path, space=METHODS, resources={"cpu": 1}, resources_when=[
        {"when": {"method.name": "d2net"}, "cpu": 2}])
    outcome = StudyOutcome("t", str(tmp_path / "t"), "sqlite:///unused.db", "0", "parent")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid = tune.Tuner(_trainable(cfg, outcome, probe),
                          param_space={"method.name": tune.grid_search(["r2d2", "d2net"])},
                          run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0)).fit()
    finally:
        ray.shutdown()
    assert sorted((r.metrics["method"], r.metrics["cpu"]) for r in grid) == [("d2net", 2.0), ("r2d2", 1.0)]


def test_overrides_and_relative_paths(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({"base": "r2d2-roadscene", "space": {"lambda_ssl": {
        "type": "float", "low": 0.0, "high": 1.2}}, "storage": "out", "tracking": {"uri": "sqlite:///db/m.db"}}))
    cfg = load_study(study, ["base.lambda_ssl=0.2", "asha.max_epochs=2", "space.lambda_ssl.high=0.8",
                             "base.data.root=data/RoadScene"], trials=3, cwd=tmp_path)
    assert cfg.name == "s" and cfg.trials == 3 and cfg.base["lambda_ssl"] == 0.2 and cfg.max_epochs == 2
    assert cfg.base["method"]["name"] == "r2d2" and cfg.space[0].high == 0.8
    assert cfg.storage == str(tmp_path / "out") and cfg.tracking.uri == f"sqlite:///{tmp_path}/db/m.db"
    assert cfg.base["data"]["root"] == str(tmp_path / "data/RoadScene")
    assert load_study(study, ["storage=s3://bucket/studies"], cwd=tmp_path).storage == "s3://bucket/studies"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_bad_study_exits_2_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, {"base": "r2d2-roadscene", "space": {"lambda_ss": {"type": "float", "low": 0, "high": 1}}})
    assert cli_main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2study: error: ") and "space.lambda_ss" in err and "did you mean 'lambda_ssl'" in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_impossible_resources_exit_2_and_start_nothing(tmp_path):
    path = _write(tmp_path, {"base": "r2d2-roadscene", "resources": {"cpu": 1000, "gpu": 1},
                             "space": {"lambda_ssl": {"type": "float", "low": 0, "high": 1}}})
    proc = subprocess.run([sys.executable, "-m", "s2study", "run", str(path)], cwd=tmp_path,
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "resources: {cpu: 1000, gpu: 1} per trial cannot be met" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no storage, no mlflow.db
