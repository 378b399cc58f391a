"""Cluster files and multi-node checks: the shipped YAMLs pass Ray's own offline validation,
broken variants are rejected with messages naming the key, and node-local storage/tracking is
refused for multi-node studies."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from s2study.cli import main
from s2study.cluster import (
    WorkerType,
    alive_node_count,
    autoscaler_worker_types,
    check_cluster_file,
    check_storage_for_cluster,
    check_tracking_for_cluster,
)
from s2study.errors import EnvironmentProblem

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((REPO / "clusters").glob("*.yaml"))


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "clusters" / name).read_text())


def _problems(tmp_path: Path, doc: dict) -> list[str]:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    return check_cluster_file(path)


def _one(problems: list[str], *needles: str) -> str:
    """The single problem reported, after checking that it names every needle."""
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], problems[0]
    return problems[0]


# --------------------------------------------------------------------------- shipped files


def test_shipped_files_are_all_found():
    assert {p.name for p in CLUSTERS} >= {"gpu.yaml", "local.yaml", "kuberay.yaml"}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_shipped_cluster_file_validates(path):
    assert check_cluster_file(path) == []


def test_gpu_yaml_keeps_trials_off_the_head_and_pins_the_image():
    import ray

    cfg = _load("gpu.yaml")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert all(t["resources"]["GPU"] == 1 and t["min_workers"] == 0 for t in workers)
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in workers
    )
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "mlflow server" in head_start and "--host 0.0.0.0" not in head_start
    setup = " ".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" in setup and "optuna==5.0.0" in setup


def test_kuberay_gpu_limits_are_whole_numbers_and_head_has_none():
    doc = _load("kuberay.yaml")
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert all("nvidia.com/gpu" not in (c.get("resources", {}).get("limits") or {}) for c in head)
    for group in doc["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert isinstance(gpus, int) and gpus >= 1


# --------------------------------------------------------------------------- broken launcher files


def test_unknown_head_node_type_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["head_node_type"] = "head_cpus"
    _one(_problems(tmp_path, cfg), "head_node_type 'head_cpus'", "did you mean 'head_cpu'")


def test_fractional_node_resource_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["available_node_types"]["gpu_a10g_spot"]["resources"]["GPU"] = 0.5
    _one(
        _problems(tmp_path, cfg),
        "available_node_types.gpu_a10g_spot.resources.GPU",
        "integer",
        "0.5",
    )


def test_unknown_top_level_key_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["idle_timeout_minute"] = 5
    _one(_problems(tmp_path, cfg), "unknown key 'idle_timeout_minute'", "'idle_timeout_minutes'")


def test_typo_inside_docker_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["docker"]["imagee"] = cfg["docker"].pop("image")
    _one(_problems(tmp_path, cfg), "unknown key 'docker.imagee'", "did you mean 'image'")


def test_missing_node_config_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    del cfg["available_node_types"]["gpu_a10g_ondemand"]["node_config"]
    _one(
        _problems(tmp_path, cfg),
        "available_node_types.gpu_a10g_ondemand is missing the required key 'node_config'",
    )


def test_several_problems_are_all_reported(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["docker"]["imagee"] = cfg["docker"].pop("image")
    cfg["available_node_types"]["gpu_a10g_spot"]["resources"]["GPU"] = 0.5
    problems = _problems(tmp_path, cfg)
    assert len(problems) == 2, problems


def test_min_workers_above_max_workers_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["available_node_types"]["gpu_a10g_spot"]["min_workers"] = 3
    cfg["available_node_types"]["gpu_a10g_ondemand"]["min_workers"] = 2
    _one(_problems(tmp_path, cfg), "max_workers (4)", "min_workers (5)")


def test_missing_head_node_type_and_provider_are_each_reported_once(tmp_path):
    cfg = _load("gpu.yaml")
    del cfg["head_node_type"]
    _one(_problems(tmp_path, cfg), "head_node_type is missing", "head_cpu")
    del cfg["provider"], cfg["cluster_name"]  # cluster_name has a Ray default; provider not
    _one(_problems(tmp_path, cfg), "missing the required key 'provider'")


def test_unknown_provider_is_rejected(tmp_path):
    cfg = _load("gpu.yaml")
    cfg["provider"]["type"] = "awz"
    _one(_problems(tmp_path, cfg), "provider.type 'awz'")


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        ("rayproject/ray-ml:2.49.0-py311-gpu", "ray-ml"),
        ("rayproject/ray:2.49.0-py311-gpu", "runs Ray 2.49.0"),
        ("rayproject/ray:latest-gpu", "does not pin a Ray version"),
    ],
)
def test_image_with_another_ray_is_rejected(tmp_path, image, needle):
    cfg = _load("gpu.yaml")
    cfg["docker"]["image"] = image
    _one(_problems(tmp_path, cfg), "docker.image", needle)


def test_local_provider_refuses_node_types(tmp_path):
    cfg = _load("local.yaml")
    cfg["available_node_types"] = _load("gpu.yaml")["available_node_types"]
    cfg["head_node_type"] = "head_cpu"
    _one(_problems(tmp_path, cfg), "available_node_types", "not supported")


def test_unreadable_files_are_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    _one(check_cluster_file(bad), "not valid YAML", "line")
    bad.write_text("- just\n- a list\n")
    _one(check_cluster_file(bad), "mapping")
    _one(check_cluster_file(tmp_path / "missing.yaml"), "cannot read")


# --------------------------------------------------------------------------- broken KubeRay files


def _worker_container(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_kuberay_fractional_gpu_limit_is_rejected(tmp_path):
    doc = _load("kuberay.yaml")
    resources = _worker_container(doc)["resources"]
    resources["limits"]["nvidia.com/gpu"] = 0.5
    del resources["requests"]["nvidia.com/gpu"]
    _one(
        _problems(tmp_path, doc),
        "spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu",
        "whole number",
    )


def test_kuberay_gpu_request_must_equal_limit(tmp_path):
    doc = _load("kuberay.yaml")
    _worker_container(doc)["resources"]["requests"]["nvidia.com/gpu"] = 2
    _one(_problems(tmp_path, doc), "requests.nvidia.com/gpu (2)", "limits.nvidia.com/gpu (1)")


def test_kuberay_numeric_ray_start_param_is_rejected(tmp_path):
    doc = _load("kuberay.yaml")
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    _one(_problems(tmp_path, doc), "spec.headGroupSpec.rayStartParams.num-cpus", "string")


def test_kuberay_structure_problems_are_each_named(tmp_path):
    doc = _load("kuberay.yaml")
    doc["apiVersion"] = "ray.io/v1alpha1"
    group = doc["spec"]["workerGroupSpecs"][0]
    group["replicas"] = 9
    doc["spec"]["workerGroupSpecs"].append(copy.deepcopy(group))
    doc["spec"]["workerGroupSpecs"][1]["replicas"] = 0
    del doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    problems = _problems(tmp_path, doc)
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    for needle in (
        "apiVersion must be 'ray.io/v1'",
        "spec.workerGroupSpecs[0].replicas (9) is outside minReplicas..maxReplicas (0..4)",
        "spec.workerGroupSpecs[1].groupName 'gpu' is used by another worker group",
        "spec.headGroupSpec.template.spec.containers must list at least one container",
    ):
        assert needle in text


def test_kuberay_image_must_match_ray_version(tmp_path):
    doc = _load("kuberay.yaml")
    doc["spec"]["rayVersion"] = "2.59.0"
    problems = _problems(tmp_path, doc)
    assert len(problems) == 2 and all("spec.rayVersion is '2.59.0'" in p for p in problems)


# --------------------------------------------------------------------------- CLI


def test_cli_exits_0_on_good_files(capsys):
    files = [str(p) for p in CLUSTERS]
    assert main(["cluster", "check", *files]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{f}: ok" for f in files]


def test_cli_exits_2_on_a_bad_file(tmp_path, capsys):
    cfg = _load("gpu.yaml")
    cfg["available_node_types"]["gpu_a10g_spot"]["resources"]["GPU"] = 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    good = str(REPO / "clusters" / "gpu.yaml")
    assert main(["cluster", "check", good, str(bad)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{good}: ok"
    assert out[1].startswith(f"{bad}: available_node_types.gpu_a10g_spot.resources.GPU")


def test_importing_the_module_does_not_import_ray():
    code = "import sys, s2study.cluster; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------------- multi-node safety


@pytest.mark.parametrize("path", ["s3://bucket/s2study", "gs://bucket/runs", "hdfs://nn/runs"])
def test_cloud_storage_is_accepted_on_many_nodes(path):
    check_storage_for_cluster(path, n_nodes=5)


@pytest.mark.parametrize("path", ["/home/ray/runs", "runs", "file:///home/ray/runs"])
def test_local_storage_is_refused_on_many_nodes_only(path):
    with pytest.raises(EnvironmentProblem, match=r"2 nodes.*s3://"):
        check_storage_for_cluster(path, n_nodes=2)
    check_storage_for_cluster(path, n_nodes=1)
    check_storage_for_cluster(path, n_nodes=2, shared_fs=True)


def test_unshared_scheme_is_refused_on_many_nodes():
    with pytest.raises(EnvironmentProblem, match="memory://"):
        check_storage_for_cluster("memory://runs", n_nodes=3)


@pytest.mark.parametrize(
    "uri", ["http://10.0.1.17:5000", "https://mlflow.example.org", "postgresql://db.internal/ml"]
)
def test_network_tracking_is_accepted_on_many_nodes(uri):
    check_tracking_for_cluster(uri, n_nodes=3)


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("sqlite:////home/ray/mlflow.db", "one node's disk"),
        ("file:///home/ray/mlruns", "one node's disk"),
        ("/home/ray/mlruns", "one node's disk"),
        ("http://127.0.0.1:5000", "loopback"),
        ("http://localhost:5000", "loopback"),
        ("http://[::1]:5000", "loopback"),
    ],
)
def test_node_local_tracking_is_refused_on_many_nodes_only(uri, needle):
    with pytest.raises(EnvironmentProblem, match=needle):
        check_tracking_for_cluster(uri, n_nodes=2)
    check_tracking_for_cluster(uri, n_nodes=1)


def test_autoscaler_worker_types_read_the_bootstrap_config(tmp_path):
    """The head of a `ray up` cluster holds the prepared config (JSON); the GPU types come back."""
    from ray.autoscaler._private.util import prepare_config

    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(prepare_config(_load("gpu.yaml"))))
    types = autoscaler_worker_types(bootstrap)
    gpu = {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}
    assert types == [
        WorkerType("gpu_a10g_spot", gpu, 4),
        WorkerType("gpu_a10g_ondemand", gpu, 2),
    ]
    # the count a runner on the head passes to the storage/tracking checks
    with pytest.raises(EnvironmentProblem):
        check_storage_for_cluster("/home/ray/runs", 1 + sum(t.max_workers for t in types))
    assert autoscaler_worker_types(tmp_path / "absent.yaml") == []


def test_alive_node_count_needs_a_connected_ray():
    import ray

    assert not ray.is_initialized()
    with pytest.raises(RuntimeError, match=r"ray.init"):
        alive_node_count()


@pytest.mark.slow
def test_two_node_cluster_refuses_local_storage_and_sqlite(tmp_path):
    """A real two-node Ray cluster on this host: the count sees both nodes, and the checks bite."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        n_nodes = alive_node_count()
        assert n_nodes == 2
        with pytest.raises(EnvironmentProblem):
            check_storage_for_cluster(str(tmp_path / "runs"), n_nodes)
        with pytest.raises(EnvironmentProblem):
            check_tracking_for_cluster(f"sqlite:///{tmp_path}/mlflow.db", n_nodes)
        check_storage_for_cluster("s3://bucket/s2study", n_nodes)
    finally:
        ray.shutdown()
        cluster.shutdown()
