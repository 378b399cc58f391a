"""Ray cluster files and multi-node safety checks.

Two jobs live here:

* ``s2study cluster check [--study STUDY.yaml] FILE ...``: validate a Ray cluster-launcher YAML
  (``clusters/gpu.yaml``, ``clusters/local.yaml``) offline, with Ray's own schema and its own
  defaults merge and cross-field checks plus s2study's own (worker instance profiles, the Ray
  version of the node image), or a KubeRay ``RayCluster`` manifest (``clusters/kuberay.yaml``)
  structurally; with ``--study``, also whether the study's trials fit the cluster. Problems come
  back as plain sentences that name the key.
* Helpers the study runner calls before ``Tuner.fit`` on a cluster: the number of alive nodes,
  and refusals of a node-local ``storage_path`` or tracking store when trials run on more than
  one node (the trials on the other nodes could not write there).

Ray is imported inside the functions only: importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import importlib.metadata
import io
import ipaddress
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import yaml

from s2study.errors import ConfigError, EnvironmentProblem

#: ``storage_path`` schemes that every node reaches (pyarrow filesystems Ray Tune accepts)
REMOTE_STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")

_RAY_IMAGE = re.compile(r"^(?:docker\.io/)?rayproject/(?P<repo>ray|ray-ml)(?::(?P<tag>[^@\s]+))?")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_K8S_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE]|n|u)?$")
_GPU_KEYS = ("nvidia.com/gpu", "amd.com/gpu")
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(?P<image>\S+)", re.IGNORECASE | re.MULTILINE)

#: the instance profiles Ray creates for (and gives to) the head node on AWS
HEAD_DEFAULT_PROFILES = ("ray-autoscaler-v1", "ray-autoscaler-cloudwatch-v1")
#: the node image built from docker/Dockerfile is named ``REGISTRY/s2study:TAG``
IMAGE_NAME = "s2study"

#: where ``ray up`` leaves the prepared cluster config on the head (read by the autoscaler)
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


class WorkerType(NamedTuple):
    """A node type the autoscaler may add: its Ray resources and how many of it at most."""

    name: str
    resources: dict[str, float]
    max_workers: int


# --------------------------------------------------------------------------- cluster files


def check_cluster_file(path: str | os.PathLike[str]) -> list[str]:
    """Validate a Ray cluster file offline (no cloud account, no network, no boto3).

    A cluster-launcher YAML goes through Ray's schema (``ray-schema.json``) first, then through
    Ray's own defaults merge and cross-field checks (``prepare_config`` + ``validate_config``,
    the same code ``ray up`` runs before it contacts the cloud), then through s2study's own: no
    worker node type may launch with the head's instance profile. A KubeRay manifest
    (``kind: RayCluster``) is checked structurally. Both also check that a ``rayproject/ray``
    image runs the Ray version of this client, and so does the base image of an ``s2study``
    image (``REGISTRY/s2study:TAG``) when its ``docker/Dockerfile`` sits beside the cluster
    file's folder (the repository layout: ``clusters/`` and ``docker/``).

    Args:
        path: the YAML file.

    Returns:
        Problems in plain words, one sentence each, naming the key; empty when the file is fine.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return [f"cannot read the file: {exc.strerror or exc}"]
    doc, problem = _parse_cluster_yaml(text)
    if problem:
        return [problem]
    dockerfile = Path(path).resolve().parent.parent / "docker" / "Dockerfile"
    dockerfile = dockerfile if dockerfile.is_file() else None
    if "apiVersion" in doc or "kind" in doc:
        return check_kuberay_manifest(doc, dockerfile)
    return check_launcher_config(doc, dockerfile)


def _parse_cluster_yaml(text: str) -> tuple[Any, str | None]:
    """The parsed mapping, or a sentence saying why the text is not one."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return None, f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"
    if not isinstance(doc, dict):
        kind = type(doc).__name__
        return None, (
            f"the file must hold a mapping (a Ray launcher config or a RayCluster), not {kind}"
        )
    return doc, None


def check_launcher_config(config: dict[str, Any], dockerfile: Path | None = None) -> list[str]:
    """Validate a parsed Ray cluster-launcher config; see :func:`check_cluster_file`.

    Args:
        config: the parsed launcher YAML.
        dockerfile: the ``docker/Dockerfile`` an ``s2study`` image is built from, if known.
    """
    problems = [
        problem
        for error in _schema_errors(config, _ray_schema())
        for problem in _describe_schema_error(error, defaulted=("cluster_name",))
    ]
    if not problems:
        problems = _ray_cross_checks(config)
    # jsonschema reports a `required` error once per missing key, each listing all of them
    return (
        list(dict.fromkeys(problems))
        + _launcher_image_problems(config, dockerfile)
        + _instance_profile_problems(config)
    )


def check_kuberay_manifest(doc: dict[str, Any], dockerfile: Path | None = None) -> list[str]:
    """Check a KubeRay ``RayCluster`` manifest structurally.

    Checked: ``apiVersion: ray.io/v1``, ``kind: RayCluster``, a DNS-label ``metadata.name``,
    ``spec.headGroupSpec`` and each ``spec.workerGroupSpecs[i]`` (unique ``groupName``, integer
    ``replicas`` within ``minReplicas..maxReplicas``, ``rayStartParams`` values as strings,
    containers with name and image, resource quantities, whole-number GPU limits equal to any
    GPU requests), a named ``authOptions.mode`` and the ``rayproject/ray`` image versions (or,
    for an ``s2study`` image, its ``dockerfile``'s base) against ``spec.rayVersion`` and this
    client's Ray.

    Args:
        doc: the parsed manifest.
        dockerfile: the ``docker/Dockerfile`` an ``s2study`` image is built from, if known.

    Returns:
        Problems in plain words; empty when the manifest is fine.
    """
    problems: list[str] = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(
            f"apiVersion must be 'ray.io/v1' (KubeRay 1.x), got {doc.get('apiVersion')!r}"
        )
    if doc.get("kind") != "RayCluster":
        problems.append(
            f"kind must be 'RayCluster' (the KubeRay kind checked here), got {doc.get('kind')!r}"
        )
    name = _get(doc, "metadata", "name")
    if not isinstance(name, str) or not _K8S_NAME.match(name) or len(name) > 63:
        problems.append(
            f"metadata.name must be a lowercase DNS label (a-z, 0-9, '-', at most 63 characters), "
            f"got {name!r}"
        )
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec is missing or not a mapping"]

    ray_version = spec.get("rayVersion")
    if ray_version is not None and not isinstance(ray_version, str):
        problems.append(
            f"spec.rayVersion must be a quoted string such as '2.60.0', got {ray_version!r}"
        )
        ray_version = None
    auth = spec.get("authOptions")
    if auth is not None:
        # the accepted modes are the operator's to check (its enum differs between releases)
        mode = auth.get("mode") if isinstance(auth, dict) else None
        if not isinstance(mode, str) or not mode:
            problems.append(f"spec.authOptions.mode must name a mode such as 'token', got {mode!r}")

    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        problems.append("spec.headGroupSpec is missing or not a mapping")
    else:
        problems += _check_group(head, "spec.headGroupSpec", ray_version, dockerfile)

    workers = spec.get("workerGroupSpecs", [])
    if not isinstance(workers, list):
        problems.append("spec.workerGroupSpecs must be a list of worker groups")
        workers = []
    seen: set[str] = set()
    for i, group in enumerate(workers):
        where = f"spec.workerGroupSpecs[{i}]"
        if not isinstance(group, dict):
            problems.append(f"{where} must be a mapping")
            continue
        group_name = group.get("groupName")
        if not isinstance(group_name, str) or not group_name:
            problems.append(f"{where}.groupName is missing")
        elif group_name in seen:
            problems.append(f"{where}.groupName {group_name!r} is used by another worker group")
        else:
            seen.add(group_name)
        problems += _check_replicas(group, where)
        problems += _check_group(group, where, ray_version, dockerfile)
    return problems


# --------------------------------------------------------------------------- multi-node safety


def alive_node_count() -> int:
    """Number of alive nodes in the Ray cluster this process is connected to.

    Call it after ``ray.init``. On an autoscaling cluster (``min_workers: 0``) it can be 1 when
    the study starts although trials will run on workers that join later: add what
    :func:`autoscaler_worker_types` reports.

    Returns:
        The count of ``ray.nodes()`` entries marked alive (the head included).

    Raises:
        RuntimeError: Ray is not initialised in this process.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("alive_node_count() needs a connected Ray: call ray.init() first")
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def autoscaler_worker_types(path: str | os.PathLike[str] = BOOTSTRAP_CONFIG) -> list[WorkerType]:
    """Worker node types an autoscaling launcher cluster may add, read on its head node.

    With ``min_workers: 0`` (clusters/gpu.yaml) a study starts while the head, which offers no
    CPU or GPU, is the only node: the checks must count the workers that trials will bring up.
    A runner on the head uses ``1 + sum(max_workers)`` as the node count for
    :func:`check_storage_for_cluster` / :func:`check_tracking_for_cluster`, and these
    ``resources`` as the node shapes a trial's request must fit.

    Args:
        path: the config ``ray up`` wrote on the head (JSON in a ``.yaml`` file).

    Returns:
        The non-head node types with declared resources and ``max_workers > 0``; empty when
        the file is absent (not on a launcher head, a KubeRay pod, a local Ray) or unreadable.
    """
    try:
        config = yaml.safe_load(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    types = _get(config, "available_node_types")
    if not isinstance(types, dict):
        return []
    head = config.get("head_node_type")
    return [
        WorkerType(name, {k: float(v) for k, v in node["resources"].items()}, node["max_workers"])
        for name, node in types.items()
        if name != head
        and isinstance(node, dict)
        and isinstance(node.get("resources"), dict)
        and node["resources"]
        and isinstance(node.get("max_workers"), int)
        and node["max_workers"] > 0
    ]


def check_storage_for_cluster(storage_path: str, n_nodes: int, shared_fs: bool = False) -> None:
    """Refuse a Tune ``storage_path`` that the trials on other nodes cannot write.

    Since Ray 2.7 nothing is synced to the head: every trial writes its checkpoints straight to
    ``storage_path`` from the node it runs on, so with more than one node the path must be cloud
    storage (``s3://``, ``gs://``, ...) or a folder on a file system mounted at the same path on
    every node (NFS, EFS), which the caller vouches for with ``shared_fs=True``.

    Args:
        storage_path: the study's storage path or URI.
        n_nodes: nodes the trials may run on (the head included).
        shared_fs: the local-looking path is a shared mount present on every node.

    Raises:
        EnvironmentProblem: ``n_nodes > 1`` and the path is node-local.
    """
    if n_nodes <= 1:
        return
    scheme = urlparse(storage_path).scheme.lower()
    if scheme in REMOTE_STORAGE_SCHEMES:
        return
    if scheme in ("", "file"):
        if shared_fs:
            return
        raise EnvironmentProblem(
            f"storage path {storage_path!r} is on one node's local disk, but the Ray cluster has "
            f"{n_nodes} nodes: trials on the other nodes cannot write their checkpoints there "
            "(Ray fails with 'Unable to set up cluster storage'). Use s3://BUCKET/PREFIX or "
            "gs://BUCKET/PREFIX, or a folder on a file system mounted at the same path on every "
            "node (NFS/EFS) marked as shared (shared_fs)"
        )
    raise EnvironmentProblem(
        f"storage path {storage_path!r} uses the scheme {scheme}://, which is not storage every "
        f"node of a {n_nodes}-node cluster shares; use one of "
        + ", ".join(f"{s}://" for s in REMOTE_STORAGE_SCHEMES)
        + " or a shared mount (shared_fs)"
    )


def check_tracking_for_cluster(uri: str, n_nodes: int) -> None:
    """Refuse an MLflow tracking URI that trials on other nodes cannot reach.

    A ``sqlite://`` database, a ``file:`` store or a bare path lives on one node, and an
    ``http://127.0.0.1``/``localhost`` server is a different machine for every node. With more
    than one node, trials need a tracking server on the network (clusters/gpu.yaml starts one on
    the head and exports its URI as ``$MLFLOW_TRACKING_URI`` on every node).

    Args:
        uri: the MLflow tracking URI trials will log to.
        n_nodes: nodes the trials may run on (the head included).

    Raises:
        EnvironmentProblem: ``n_nodes > 1`` and the URI is node-local.
    """
    if n_nodes <= 1:
        return
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    advice = (
        "start an MLflow server on the head (clusters/gpu.yaml does) and pass its private "
        "address, e.g. --tracking-uri http://HEAD-PRIVATE-IP:5000 ($MLFLOW_TRACKING_URI on "
        "nodes set up by clusters/*.yaml)"
    )
    if scheme in ("", "file") or scheme.startswith("sqlite"):
        raise EnvironmentProblem(
            f"tracking URI {uri!r} is a store on one node's disk, but the Ray cluster has "
            f"{n_nodes} nodes and trials on the others cannot write to it; {advice}"
        )
    if _is_loopback(parsed.hostname):
        raise EnvironmentProblem(
            f"tracking URI {uri!r} points at the loopback address, which on each of the "
            f"{n_nodes} nodes is that node itself, so trials on workers would not reach the "
            f"server; {advice}"
        )


# --------------------------------------------------------------------------- studies on clusters


def _max_gpu(study: Any) -> float:
    """The largest GPU request of a study's trials: ``resources`` and each ``resources_when`` entry."""
    return max([study.resources.gpu, *(r.resources.gpu for r in getattr(study, "resources_when", ()))])


def check_study_resources(study: Any) -> list[str]:
    """What a study asks of every trial that no cluster can give it.

    Args:
        study: a :class:`s2study.study.config.StudyConfig`.

    Returns:
        Problems in plain words (without the file name); empty when the request is fine.
    """
    gpu = _max_gpu(study)
    if gpu > 1:
        return [
            (
                f"resources.gpu: {gpu:g} per trial, but the trainer uses one device (a trial "
                "never spreads over several GPUs, so the others would sit idle); use gpu: 1, or "
                "a fraction such as 0.5 to share one GPU between trials"
            )
        ]
    return []


def check_study_for_cluster(study: Any, path: str | os.PathLike[str]) -> list[str]:
    """Refuse a GPU study against a cluster file none of whose node types offers a GPU.

    A node type's GPUs are read from its declared ``resources`` (launcher YAMLs) or from the
    group's ``rayStartParams.num-gpus`` or its Ray container's GPU limit (KubeRay). Where that
    is not declared (Ray fills it from the instance type at launch, or the ``local`` provider
    detects it at ``ray start``), the file is not refused: only AWS or the machines know.

    Args:
        study: a :class:`s2study.study.config.StudyConfig`.
        path: the cluster file.

    Returns:
        Problems in plain words naming both files; empty when a GPU may be offered, when the
        study needs none, or when the file cannot be read (:func:`check_cluster_file` says why).
    """
    gpu = _max_gpu(study)
    if gpu <= 0:
        return []
    try:
        doc, problem = _parse_cluster_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError:
        return []
    if problem:
        return []
    kuberay = "apiVersion" in doc or "kind" in doc
    offers = _kuberay_gpu_offers(doc) if kuberay else _launcher_gpu_offers(doc)
    if not offers or any(count is None or count > 0 for _, count, _ in offers):
        return []
    detail = "; ".join(f"{where}: {why}" for where, _, why in offers)
    return [
        (
            f"the study {study.source} asks for gpu: {gpu:g} per trial, but no node type of "
            f"{path} offers a GPU ({detail}), so its trials could never start; add a GPU node "
            f"type to {path} or set resources.gpu: 0 in {study.source}"
        )
    ]


def _launcher_gpu_offers(config: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """``(node type, GPUs or None when undeclared, why)`` per node type that may run trials."""
    types = config.get("available_node_types")
    if not isinstance(types, dict):
        return []  # the local provider: Ray detects each machine's GPUs at `ray start`
    offers = []
    for name, node_type in types.items():
        if not isinstance(node_type, dict):
            continue
        where = f"available_node_types.{name}"
        if name != config.get("head_node_type") and node_type.get("max_workers") == 0:
            offers.append((where, 0.0, "max_workers 0"))
            continue
        resources = node_type.get("resources")
        gpus = resources.get("GPU") if isinstance(resources, dict) else None
        if isinstance(gpus, (int, float)) and not isinstance(gpus, bool):
            offers.append((where, float(gpus), f"resources.GPU {gpus:g}"))
        else:
            offers.append((where, None, "GPU not declared"))
    return offers


def _kuberay_gpu_offers(doc: dict[str, Any]) -> list[tuple[str, float | None, str]]:
    """``(group, GPUs, why)`` per KubeRay group: ``num-gpus``, else the Ray container's limit."""
    groups = [("spec.headGroupSpec", _get(doc, "spec", "headGroupSpec"))]
    workers = _get(doc, "spec", "workerGroupSpecs")
    if isinstance(workers, list):
        groups += [(f"spec.workerGroupSpecs[{i}]", g) for i, g in enumerate(workers)]
    offers: list[tuple[str, float | None, str]] = []
    for where, group in groups:
        if not isinstance(group, dict):
            continue
        if where != "spec.headGroupSpec" and group.get("maxReplicas") == 0:
            offers.append((where, 0.0, "maxReplicas 0"))
            continue
        params = group.get("rayStartParams")
        num_gpus = params.get("num-gpus") if isinstance(params, dict) else None
        if num_gpus is not None:
            try:
                offers.append((where, float(num_gpus), f"num-gpus {num_gpus}"))
            except (TypeError, ValueError):
                offers.append((where, None, f"num-gpus {num_gpus!r}"))
            continue
        containers = _get(group, "template", "spec", "containers")
        ray_container = containers[0] if isinstance(containers, list) and containers else None
        limits = _get(ray_container, "resources", "limits")
        counts = [
            _whole_number(limits[key])
            for key in _GPU_KEYS
            if isinstance(limits, dict) and key in limits
        ]
        if any(c is None for c in counts):
            offers.append((where, None, "GPU limit not a whole number"))
        elif counts:
            offers.append((where, float(sum(counts)), f"GPU limit {sum(counts)}"))
        else:
            offers.append((where, 0.0, "no GPU limit"))
    return offers


# --------------------------------------------------------------------------- CLI


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``s2study cluster check [--study STUDY.yaml] FILE [FILE ...]``."""
    parser = subparsers.add_parser("cluster", help="Ray cluster files (see docs/cluster.md)")
    actions = parser.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="validate cluster files offline (launcher YAMLs with Ray's schema, KubeRay manifests)",
        description="Validate Ray cluster-launcher YAMLs with Ray's own schema, defaults and "
        "cross-field checks (and s2study's: worker instance profiles, the node image's Ray), "
        "and KubeRay RayCluster manifests structurally; with --study, also whether the study's "
        "trials can run on each cluster. No cloud account or network needed. Exit 0 when every "
        "file is fine, 2 otherwise.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="cluster YAML files")
    check.add_argument(
        "--study",
        action="append",
        default=[],
        metavar="STUDY.yaml",
        help="a study file to run on these clusters (repeatable): refused when a trial asks for "
        "more than one GPU, or for a GPU that no node type of a cluster file offers",
    )
    check.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    status = 0
    studies = []
    if args.study:
        from s2study.study.config import load_study

    for name in args.study:
        try:
            study = load_study(name)
        except ConfigError as exc:
            status = 2
            print(" ".join(str(exc).split()))
            continue
        problems = check_study_resources(study)
        for problem in problems:
            print(f"{name}: {problem}")
        if not problems:
            print(f"{name}: ok")
        status = 2 if problems else status
        studies.append(study)
    for name in args.files:
        problems = check_cluster_file(name)
        problems += [p for study in studies for p in check_study_for_cluster(study, name)]
        if not problems:
            print(f"{name}: ok")
            continue
        status = 2
        for problem in problems:
            print(f"{name}: {problem}")
    return status


# --------------------------------------------------------------------------- launcher helpers


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).with_name("ray-schema.json"), encoding="utf-8") as f:
        return json.load(f)


def _schema_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[Any]:
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)
    return sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path)


def _describe_schema_error(error: Any, defaulted: tuple[str, ...] = ()) -> list[str]:
    """One jsonschema error -> sentences naming the key (several for several unknown keys).

    ``defaulted`` top-level keys are not reported missing: Ray's defaults merge fills them.
    """
    where = _key(error.absolute_path)
    place = where or "the top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        out = []
        for key in sorted(set(error.instance) - set(allowed)):
            full = f"{where}.{key}" if where else key
            guess = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            out.append(f"unknown key {full!r}{hint} (allowed in {place}: {', '.join(allowed)})")
        return out
    if error.validator == "required":
        skip = defaulted if not where else ()
        missing = [k for k in error.validator_value if k not in error.instance and k not in skip]
        return [f"{place} is missing the required key {k!r}" for k in missing]
    if error.validator == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        text = f"{place} must be of type {wanted}, got {error.instance!r}"
        if "resources" in error.absolute_path and wanted == "integer":
            text += (
                " (node resources are whole numbers; fractions such as GPU: 0.5 belong in the "
                "trials' resource requests, not in a node type)"
            )
        return [text]
    if error.validator == "minimum":
        return [f"{place} must be at least {error.validator_value}, got {error.instance!r}"]
    return [f"{place}: {error.message}"]


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """Silence the autoscaler's INFO logs and CLI prints while its helpers run."""
    logger = logging.getLogger("ray.autoscaler")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _ray_cross_checks(config: dict[str, Any]) -> list[str]:
    """Ray's defaults merge + cross-field checks (private API, pinned Ray 2.60)."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider = config["provider"].get("type")
    try:
        with _quiet_ray():
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
    except jsonschema.ValidationError as exc:  # only possible in the merged defaults
        return _describe_schema_error(exc)
    except NotImplementedError:
        return [f"provider.type {provider!r} is not a node provider Ray knows"]
    except FileNotFoundError as exc:
        missing = exc.filename
        return [f"provider.type {provider!r} cannot be checked offline: Ray lacks {missing}"]
    except KeyError as exc:
        return [f"the key {exc.args[0]!r} is missing (Ray needs it to prepare the config)"]
    except click.ClickException as exc:
        return [exc.format_message().replace("`", "'")]
    except (ValueError, RuntimeError, AssertionError) as exc:
        return [_explain_ray_error(str(exc), config)]
    return []


def _explain_ray_error(message: str, config: dict[str, Any]) -> str:
    """Ray's cross-field message, with the values it is about."""
    types = config.get("available_node_types") or {}
    if "head_node_type" in message and config.get("head_node_type") not in types:
        if "head_node_type" not in config:
            return (
                f"head_node_type is missing: name one of available_node_types ({', '.join(types)})"
            )
        head = config["head_node_type"]
        guess = difflib.get_close_matches(str(head), list(types), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        return (
            f"head_node_type {head!r} is not one of available_node_types ({', '.join(types)}){hint}"
        )
    if "min_workers" in message and "max_workers" in message:
        total = sum(t.get("min_workers", 0) for t in types.values() if isinstance(t, dict))
        return (
            f"max_workers ({config.get('max_workers')}) is smaller than the sum of the node "
            f"types' min_workers ({total})"
        )
    if message == "Must provide a container & image name":
        return "docker needs both 'image' and 'container_name' (or neither)"
    return message.replace("`", "'")


def _launcher_image_problems(config: dict[str, Any], dockerfile: Path | None = None) -> list[str]:
    images: list[tuple[str, Any]] = []
    docker = config.get("docker")
    if isinstance(docker, dict):
        images += [
            (f"docker.{k}", docker[k])
            for k in ("image", "head_image", "worker_image")
            if k in docker
        ]
    types = config.get("available_node_types")
    if isinstance(types, dict):
        for name, node_type in types.items():
            node_docker = node_type.get("docker") if isinstance(node_type, dict) else None
            if isinstance(node_docker, dict) and "worker_image" in node_docker:
                images.append(
                    (
                        f"available_node_types.{name}.docker.worker_image",
                        node_docker["worker_image"],
                    )
                )
    return [
        p for where, image in images for p in _node_image_problems(where, image, None, dockerfile)
    ]


def _instance_profile_problems(config: dict[str, Any]) -> list[str]:
    """Refuse worker node types that launch with the head's IAM instance profile.

    Ray gives the head ``ray-autoscaler-v1`` (EC2 and S3 full access) unless the head node type
    names a profile. A worker started with that profile fails to launch, because the head's
    role may not pass its own role (``iam:PassRole``, ray-project/ray#3190), and once the role
    can, every trial on the worker holds EC2 full access.
    """
    types = config.get("available_node_types")
    if not isinstance(types, dict):
        return []
    head_type = config.get("head_node_type")
    head_profiles = set(HEAD_DEFAULT_PROFILES)
    head = types.get(head_type) if isinstance(head_type, str) else None
    head_own = _profile_name(_get(head, "node_config", "IamInstanceProfile"))
    if head_own:
        head_profiles.add(head_own)
    problems = []
    for name, node_type in types.items():
        if name == head_type:
            continue
        profile = _profile_name(_get(node_type, "node_config", "IamInstanceProfile"))
        if profile not in head_profiles:
            continue
        whose = (
            f"the one head node type {head_type!r} sets"
            if profile == head_own
            else "the one Ray creates for the head"
        )
        problems.append(
            f"available_node_types.{name}.node_config.IamInstanceProfile is the head's instance "
            f"profile {profile!r} ({whose}): the head's role cannot pass it to a worker without "
            "iam:PassRole on itself (RunInstances fails, ray-project/ray#3190), and with that "
            "every trial would hold the head's permissions (EC2 full access for Ray's default "
            "role); give the worker node types "
            "their own least-privilege profile, e.g. Arn: "
            "arn:aws:iam::YOUR-AWS-ACCOUNT-ID:instance-profile/s2study-worker, created from "
            "clusters/aws/*.json as in docs/cluster.md, section 3"
        )
    return problems


def _profile_name(profile: Any) -> str | None:
    """The instance profile's name, from ``Name`` or the last part of ``Arn`` (paths allowed)."""
    if not isinstance(profile, dict):
        return None
    name = profile.get("Name")
    if isinstance(name, str) and name:
        return name
    arn = profile.get("Arn")
    if isinstance(arn, str) and arn:
        return arn.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return None


# --------------------------------------------------------------------------- KubeRay helpers


def _check_replicas(group: dict[str, Any], where: str) -> list[str]:
    counts = {}
    problems = []
    for key in ("replicas", "minReplicas", "maxReplicas"):
        value = group.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            problems.append(f"{where}.{key} must be a whole number >= 0, got {value!r}")
        else:
            counts[key] = value
    low, high = counts.get("minReplicas", 0), counts.get("maxReplicas")
    if high is not None and low > high:
        problems.append(f"{where}.minReplicas ({low}) is larger than maxReplicas ({high})")
    replicas = counts.get("replicas")
    if replicas is not None and (replicas < low or (high is not None and replicas > high)):
        problems.append(
            f"{where}.replicas ({replicas}) is outside minReplicas..maxReplicas ({low}..{high})"
        )
    return problems


def _check_group(
    group: dict[str, Any], where: str, ray_version: str | None, dockerfile: Path | None = None
) -> list[str]:
    problems = []
    params = group.get("rayStartParams", {})
    if not isinstance(params, dict):
        problems.append(f"{where}.rayStartParams must be a mapping of strings")
    else:
        problems += [
            f"{where}.rayStartParams.{k} must be a quoted string (KubeRay reads a map of strings), "
            f"got {v!r}"
            for k, v in params.items()
            if not isinstance(v, str)
        ]
    containers = _get(group, "template", "spec", "containers")
    if not isinstance(containers, list) or not containers:
        return problems + [f"{where}.template.spec.containers must list at least one container"]
    for i, container in enumerate(containers):
        cwhere = f"{where}.template.spec.containers[{i}]"
        if not isinstance(container, dict):
            problems.append(f"{cwhere} must be a mapping")
            continue
        if not container.get("name"):
            problems.append(f"{cwhere}.name is missing")
        image = container.get("image")
        if not isinstance(image, str) or not image:
            problems.append(f"{cwhere}.image is missing")
        else:
            problems += _node_image_problems(f"{cwhere}.image", image, ray_version, dockerfile)
        problems += _check_container_resources(container.get("resources"), f"{cwhere}.resources")
    return problems


def _check_container_resources(resources: Any, where: str) -> list[str]:
    if resources is None:
        return []
    if not isinstance(resources, dict):
        return [f"{where} must be a mapping with requests/limits"]
    problems = []
    gpus: dict[str, dict[str, Any]] = {}
    for section in ("requests", "limits"):
        values = resources.get(section) or {}
        if not isinstance(values, dict):
            problems.append(f"{where}.{section} must be a mapping")
            continue
        for name, value in values.items():
            key = f"{where}.{section}.{name}"
            if name in _GPU_KEYS:
                count = _whole_number(value)
                if count is None:
                    problems.append(
                        f"{key} must be a whole number of GPUs (Kubernetes cannot hand out a "
                        f"fraction of a device; share GPUs through the trials' Ray requests), "
                        f"got {value!r}"
                    )
                else:
                    gpus.setdefault(name, {})[section] = count
            elif not _is_quantity(value):
                problems.append(
                    f"{key} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi): {value!r}"
                )
    for name, by_section in gpus.items():
        if "requests" in by_section and by_section.get("limits") != by_section["requests"]:
            problems.append(
                f"{where}: requests.{name} ({by_section['requests']}) must equal limits.{name} "
                f"({by_section.get('limits')}); Kubernetes does not overcommit devices"
            )
    return problems


def _is_quantity(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return value >= 0
    return isinstance(value, str) and bool(_K8S_QUANTITY.match(value))


def _get(doc: Any, *keys: str) -> Any:
    """``doc[k1][k2]...`` or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


# --------------------------------------------------------------------------- shared helpers


def dockerfile_base_image(path: str | os.PathLike[str]) -> str | None:
    """The image the last stage of a Dockerfile is built ``FROM`` (None: no ``FROM`` line)."""
    found = _FROM.findall(Path(path).read_text(encoding="utf-8"))
    return found[-1] if found else None


def _is_s2study_image(image: Any) -> bool:
    """``REGISTRY/.../s2study:TAG`` (or without a tag): the image of ``docker/Dockerfile``."""
    if not isinstance(image, str):
        return False
    repository = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return repository.split(":", 1)[0] == IMAGE_NAME


def _node_image_problems(
    where: str, image: Any, ray_version: str | None, dockerfile: Path | None
) -> list[str]:
    """:func:`_image_problems`, looking through an ``s2study`` image to its Dockerfile's base."""
    if dockerfile is None or not _is_s2study_image(image):
        return _image_problems(where, image, ray_version)
    shown = f"{dockerfile.parent.name}/{dockerfile.name}"
    try:
        base = dockerfile_base_image(dockerfile)
    except OSError as exc:
        return [f"{where}: cannot read {shown}, which {image} is built from: {exc.strerror or exc}"]
    if base is None:
        return [f"{where}: {shown}, which {image} is built from, has no FROM line"]
    return _image_problems(f"{where} ({image}, built from {shown})", base, ray_version)


def _image_problems(where: str, image: Any, ray_version: str | None) -> list[str]:
    """A rayproject image must carry this client's Ray version (and the manifest's rayVersion)."""
    match = _RAY_IMAGE.match(image) if isinstance(image, str) else None
    if not match:
        return []  # a custom image: its Ray version is the user's to keep in step
    client = importlib.metadata.version("ray")
    if match["repo"] == "ray-ml":
        text = (
            f"{where}: {image} is a rayproject/ray-ml image; those are no longer published "
            f"(2.49.x was the last): use rayproject/ray:{client}-py311-gpu and install torch in "
            "the setup"
        )
        return [text]
    tag = match["tag"] or "latest"
    version = re.match(r"\d+\.\d+\.\d+", tag)
    if not version:
        text = (
            f"{where}: {image} does not pin a Ray version (the tag {tag!r} moves); use "
            f"rayproject/ray:{client}-py311-gpu, matching this client's Ray {client}"
        )
        return [text]
    problems = []
    if version[0] != client:
        problems.append(
            f"{where}: {image} runs Ray {version[0]}, but this client has Ray {client}; "
            "the versions must match"
        )
    if ray_version is not None and version[0] != ray_version:
        problems.append(
            f"{where}: {image} runs Ray {version[0]}, but spec.rayVersion is {ray_version!r}"
        )
    return problems


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified
