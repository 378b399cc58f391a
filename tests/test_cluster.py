"""Cluster files and multi-node checks: the shipped YAMLs pass Ray's own offline validation,
broken variants are rejected with messages naming the key, and node-local storage/tracking is
refused for multi-node studies."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import s2study
from s2study.cli import main
from s2study.cluster import (
    WorkerType,
    alive_node_count,
    autoscaler_worker_types,
    check_cluster_file,
    check_storage_for_cluster,
    check_study_for_cluster,
    check_study_resources,
    check_tracking_for_cluster,
)
from s2study.errors import EnvironmentProblem

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((REPO / "clusters").glob("*.yaml"))
STUDIES = sorted((REPO / "search_spaces").glob("*.yaml"))
WORKER_ROLE = "arn:aws:iam::YOUR-AWS-ACCOUNT-ID:role/s2study-worker"
WORKER_PROFILE = "arn:aws:iam::YOUR-AWS-ACCOUNT-ID:instance-profile/s2study-worker"
HEAD_PROFILE = "arn:aws:iam::YOUR-AWS-ACCOUNT-ID:instance-profile/ray-autoscaler-v1"
FETCH = "s2study fetch roadscene r2d2_WASF_N16"
MIRROR_LINE = "# export S2STUDY_MIRROR=s3://YOUR-BUCKET/s2study-mirror"


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
    cfg = _load("gpu.yaml")
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert all(t["resources"]["GPU"] == 1 and t["min_workers"] == 0 for t in workers)
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in workers
    )
    # the image of docker/Dockerfile (its Ray, Python and pins: tests/test_dockerfile.py)
    assert cfg["docker"]["image"] == f"YOUR-REGISTRY/s2study:{s2study.__version__}"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "mlflow server" in head_start and "--host 0.0.0.0" not in head_start
    setup = " ".join(cfg["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" in setup and "torch" not in setup  # torch is in the image


def test_gpu_yaml_workers_have_their_own_profile_and_a_pinned_ami():
    cfg = _load("gpu.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    assert "IamInstanceProfile" not in head  # Ray gives the head ray-autoscaler-v1
    workers = [t["node_config"] for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers
    for node_config in workers:
        assert node_config["IamInstanceProfile"] == {"Arn": WORKER_PROFILE}
        assert node_config["ImageId"].startswith("ami-")


# --------------------------------------------------------------------------- IAM files


def _policy(name: str) -> dict:
    return json.loads((REPO / "clusters" / "aws" / name).read_text())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def test_worker_policy_is_s3_read_write_on_the_study_bucket_only():
    statements = _policy("worker-policy.json")["Statement"]
    granted = {
        (action, resource)
        for st in statements
        if st["Effect"] == "Allow"
        for action in _as_list(st["Action"])
        for resource in _as_list(st["Resource"])
    }
    assert granted == {
        ("s3:ListBucket", "arn:aws:s3:::YOUR-BUCKET"),
        ("s3:GetObject", "arn:aws:s3:::YOUR-BUCKET/*"),
        ("s3:PutObject", "arn:aws:s3:::YOUR-BUCKET/*"),
        ("s3:DeleteObject", "arn:aws:s3:::YOUR-BUCKET/*"),
    }


def test_worker_trust_lets_ec2_assume_the_role():
    (statement,) = _policy("worker-trust.json")["Statement"]
    assert statement == {
        "Effect": "Allow",
        "Principal": {"Service": "ec2.amazonaws.com"},
        "Action": "sts:AssumeRole",
    }


def test_head_may_pass_the_worker_role_and_nothing_else():
    (statement,) = _policy("head-passrole-policy.json")["Statement"]
    assert statement["Effect"] == "Allow"
    assert _as_list(statement["Action"]) == ["iam:PassRole"]
    assert _as_list(statement["Resource"]) == [WORKER_ROLE]


def test_docs_create_the_worker_role_as_the_files_say():
    docs = (REPO / "docs" / "cluster.md").read_text()
    for needle in (
        "aws iam create-role --role-name s2study-worker",
        "file://clusters/aws/worker-trust.json",
        "aws iam put-role-policy --role-name s2study-worker",
        "file://clusters/aws/worker-policy.json",
        "aws iam create-instance-profile --instance-profile-name s2study-worker",
        (
            "aws iam add-role-to-instance-profile --instance-profile-name s2study-worker "
            "--role-name s2study-worker"
        ),
        "aws iam put-role-policy --role-name ray-autoscaler-v1",
        "file://clusters/aws/head-passrole-policy.json",
    ):
        assert needle in " ".join(docs.replace("\\\n", " ").split()), needle


# --------------------------------------------------------------------------- data route


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_launcher_nodes_warm_their_cache_after_installing_the_project(name):
    setup = _load(name)["setup_commands"]
    text = "\n".join(setup)
    assert "S2STUDY_DATA" not in text and "s3 sync" not in text
    install = next(i for i, c in enumerate(setup) if "-e /home/ray/s2study" in c)
    env = next(i for i, c in enumerate(setup) if "> ~/.s2study_env" in c)
    fetch = next(i for i, c in enumerate(setup) if FETCH in c)
    assert install < fetch and env < fetch  # the mirror setting applies to the fetch
    assert "source ~/.s2study_env" in setup[fetch]
    assert MIRROR_LINE in setup[env]


def test_kuberay_pods_warm_their_cache_with_an_optional_mirror():
    doc = _load("kuberay.yaml")
    assert "S2STUDY_DATA" not in (REPO / "clusters" / "kuberay.yaml").read_text()
    groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        (init,) = pod["initContainers"]
        assert FETCH.replace("s2study fetch", "python -m s2study fetch") in " ".join(init["args"])
        for container in (init, pod["containers"][0]):
            env = {e["name"]: e for e in container["env"]}
            assert env["S2STUDY_CACHE"]["value"] == "/s2study-cache"
            assert env["S2STUDY_MIRROR"]["valueFrom"]["configMapKeyRef"]["optional"] is True
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["s2study-cache"] == "/s2study-cache"


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
    import ray

    doc = _load("kuberay.yaml")
    for container in _kuberay_ray_containers(doc):
        container["image"] = f"rayproject/ray:{ray.__version__}-py311-gpu"
    doc["spec"]["rayVersion"] = "2.59.0"
    problems = _problems(tmp_path, doc)
    assert len(problems) == 2 and all("spec.rayVersion is '2.59.0'" in p for p in problems)


def _kuberay_ray_containers(doc: dict) -> list[dict]:
    groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def _in_repo_layout(tmp_path: Path, name: str, doc: dict, base: str | None) -> Path:
    """``tmp/clusters/NAME`` beside ``tmp/docker/Dockerfile`` built FROM ``base``."""
    (tmp_path / "clusters").mkdir()
    (tmp_path / "docker").mkdir()
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    if base is not None:
        dockerfile = dockerfile.replace("FROM rayproject/ray:2.60.0-py311-gpu", f"FROM {base}")
    else:
        dockerfile = "\n".join(
            line for line in dockerfile.splitlines() if not line.startswith("FROM")
        )
    (tmp_path / "docker" / "Dockerfile").write_text(dockerfile)
    path = tmp_path / "clusters" / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_s2study_image_is_checked_through_its_dockerfile(tmp_path):
    doc = _load("kuberay.yaml")
    doc["spec"]["rayVersion"] = "2.59.0"
    path = _in_repo_layout(tmp_path, "kuberay.yaml", doc, base="rayproject/ray:2.60.0-py311-gpu")
    problems = check_cluster_file(path)
    assert len(problems) == 2, problems
    assert all("built from docker/Dockerfile" in p for p in problems)
    assert all("spec.rayVersion is '2.59.0'" in p for p in problems)


@pytest.mark.parametrize(
    ("base", "needle"),
    [
        ("rayproject/ray:2.59.0-py311-gpu", "runs Ray 2.59.0, but this client has Ray"),
        ("rayproject/ray:latest-gpu", "does not pin a Ray version"),
        (None, "has no FROM line"),
    ],
)
def test_launcher_s2study_image_base_must_run_this_ray(tmp_path, base, needle):
    path = _in_repo_layout(tmp_path, "gpu.yaml", _load("gpu.yaml"), base)
    _one(check_cluster_file(path), "docker.image", "YOUR-REGISTRY/s2study:0.1.0", needle)


def test_s2study_image_without_its_dockerfile_is_not_checked(tmp_path):
    # a cluster file outside the repository layout: the image is the user's to keep in step
    assert _problems(tmp_path, _load("gpu.yaml")) == []


# --------------------------------------------------------------------------- instance profiles


@pytest.mark.parametrize(
    "profile",
    [
        {"Arn": HEAD_PROFILE},
        {"Name": "ray-autoscaler-v1"},
        {"Arn": "arn:aws:iam::123456789012:instance-profile/some/path/ray-autoscaler-v1"},
    ],
    ids=["arn", "name", "arn-with-path"],
)
def test_worker_with_the_heads_default_profile_is_refused(tmp_path, profile):
    cfg = _load("gpu.yaml")
    cfg["available_node_types"]["gpu_a10g_ondemand"]["node_config"]["IamInstanceProfile"] = profile
    _one(
        _problems(tmp_path, cfg),
        "available_node_types.gpu_a10g_ondemand.node_config.IamInstanceProfile",
        "'ray-autoscaler-v1'",
        "iam:PassRole",
        "instance-profile/s2study-worker",
        "docs/cluster.md",
    )


def test_worker_with_the_profile_the_head_sets_is_refused(tmp_path):
    cfg = _load("gpu.yaml")
    types = cfg["available_node_types"]
    types["head_cpu"]["node_config"]["IamInstanceProfile"] = {"Name": "my-head"}
    types["gpu_a10g_spot"]["node_config"]["IamInstanceProfile"] = {
        "Arn": "arn:aws:iam::123456789012:instance-profile/my-head"
    }
    _one(
        _problems(tmp_path, cfg),
        "available_node_types.gpu_a10g_spot.node_config.IamInstanceProfile",
        "'my-head'",
        "head node type 'head_cpu' sets",
    )


def test_both_workers_with_the_heads_profile_are_each_named(tmp_path):
    cfg = _load("gpu.yaml")
    for name in ("gpu_a10g_spot", "gpu_a10g_ondemand"):
        cfg["available_node_types"][name]["node_config"]["IamInstanceProfile"] = {
            "Arn": HEAD_PROFILE
        }
    problems = _problems(tmp_path, cfg)
    assert len(problems) == 2, problems
    named = {p.split(".")[1] for p in problems}
    assert named == {"gpu_a10g_spot", "gpu_a10g_ondemand"}


def test_worker_without_a_profile_or_with_its_own_passes(tmp_path):
    cfg = _load("gpu.yaml")
    del cfg["available_node_types"]["gpu_a10g_spot"]["node_config"]["IamInstanceProfile"]
    cfg["available_node_types"]["gpu_a10g_ondemand"]["node_config"]["IamInstanceProfile"] = {
        "Name": "s2study-worker"
    }
    assert _problems(tmp_path, cfg) == []


# --------------------------------------------------------------------------- studies on clusters


def _study(tmp_path: Path, **resources) -> Path:
    raw = yaml.safe_load((REPO / "search_spaces" / "lambda.yaml").read_text())
    raw["resources"] = resources
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _load_study(path: Path):
    from s2study.study.config import load_study

    return load_study(path)


def test_study_asking_for_several_gpus_per_trial_is_refused(tmp_path):
    def study(gpu):
        return SimpleNamespace(resources=SimpleNamespace(cpu=4, gpu=gpu), source="s.yaml")

    _one(check_study_resources(study(2)), "resources.gpu: 2", "the trainer uses one device")
    assert check_study_resources(study(1)) == check_study_resources(study(0.5)) == []
    assert check_study_resources(_load_study(_study(tmp_path, cpu=4, gpu=1))) == []


def test_gpu_study_on_a_cluster_without_gpus_is_refused(tmp_path):
    study = _load_study(_study(tmp_path, cpu=4, gpu=0.5))
    cfg = _load("gpu.yaml")
    for name in ("gpu_a10g_spot", "gpu_a10g_ondemand"):
        cfg["available_node_types"][name]["resources"]["GPU"] = 0
    cluster = tmp_path / "cpu-cluster.yaml"
    cluster.write_text(yaml.safe_dump(cfg))
    _one(
        check_study_for_cluster(study, cluster),
        f"the study {study.source}",
        f"no node type of {cluster} offers a GPU",
        "available_node_types.gpu_a10g_spot: resources.GPU 0",
    )
    cpu_study = _load_study(_study(tmp_path, cpu=4, gpu=0))
    assert check_study_for_cluster(cpu_study, cluster) == []


def test_gpu_study_on_a_kuberay_cluster_without_gpus_is_refused(tmp_path):
    study = _load_study(_study(tmp_path, cpu=4, gpu=1))
    doc = _load("kuberay.yaml")
    for section in ("requests", "limits"):
        del _worker_container(doc)["resources"][section]["nvidia.com/gpu"]
    cluster = tmp_path / "kuberay.yaml"
    cluster.write_text(yaml.safe_dump(doc))
    _one(
        check_study_for_cluster(study, cluster),
        "spec.headGroupSpec: num-gpus 0",
        "spec.workerGroupSpecs[0]: no GPU limit",
    )


def test_undeclared_gpus_are_not_refused(tmp_path):
    """Ray fills a node type's resources from its instance type, and the local provider detects
    them at `ray start`: offline, such a cluster may offer GPUs."""
    study = _load_study(_study(tmp_path, cpu=4, gpu=1))
    cfg = _load("gpu.yaml")
    cfg["available_node_types"]["gpu_a10g_spot"]["resources"] = {"CPU": 8}
    cfg["available_node_types"]["gpu_a10g_ondemand"]["resources"]["GPU"] = 0
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(cfg))
    assert check_study_for_cluster(study, cluster) == []
    assert check_study_for_cluster(study, REPO / "clusters" / "local.yaml") == []


def test_cli_checks_shipped_studies_on_shipped_clusters(capsys):
    files = [str(p) for p in CLUSTERS]
    args = [arg for study in STUDIES for arg in ("--study", str(study))]
    assert main(["cluster", "check", *files, *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{s}: ok" for s in STUDIES] + [f"{f}: ok" for f in files]


def test_cli_refuses_several_gpus_per_trial(tmp_path, capsys):
    two = _study(tmp_path, cpu=4, gpu=2)
    good = str(REPO / "clusters" / "gpu.yaml")
    assert main(["cluster", "check", good, "--study", str(two)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out
    # refused by the study's own validation or by the cluster check: one line either way
    assert out[0].startswith(f"{two}: resources.gpu") and "the trainer uses one device" in out[0]
    assert out[1] == f"{good}: ok"


def test_cli_refuses_a_gpu_study_naming_both_files(tmp_path, capsys):
    study = _study(tmp_path, cpu=4, gpu=0.25)
    cfg = _load("gpu.yaml")
    for name in ("gpu_a10g_spot", "gpu_a10g_ondemand"):
        cfg["available_node_types"][name]["resources"]["GPU"] = 0
    cluster = tmp_path / "cpu-cluster.yaml"
    cluster.write_text(yaml.safe_dump(cfg))
    assert main(["cluster", "check", str(cluster), "--study", str(study)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{study}: ok"
    _one(out[1:], f"{cluster}: the study {study} asks for gpu: 0.25", "offers a GPU")


def test_cli_reports_an_invalid_study_and_still_checks_the_files(tmp_path, capsys):
    bad = tmp_path / "bad-study.yaml"
    bad.write_text("name: x\ntrials: many\n")
    good = str(REPO / "clusters" / "gpu.yaml")
    assert main(["cluster", "check", good, "--study", str(bad)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert str(bad) in out[0] and out[-1] == f"{good}: ok"


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
