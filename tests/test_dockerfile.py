"""docker/Dockerfile, checked offline (no Docker engine): its base image runs this client's Ray and
Python and is the one the cluster files name, the dependency pins it installs satisfy
pyproject.toml and cover every runtime dependency, and the project itself is left to the
cluster's setup commands."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
#: the image the cluster files name: built from docker/Dockerfile, tagged with the project version
IMAGE = "YOUR-REGISTRY/s2study:{version}"
#: installed in place of a pyproject dependency (same import, same versions)
STANDS_IN_FOR = {"opencv-python-headless": "opencv-python"}


def _instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    parts: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also inside a continued instruction
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        keyword, _, rest = " ".join([*parts, stripped]).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        parts = []
    return out


def _pip_installs(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a shell command line (options included)."""
    words = shlex.split(command)
    out = []
    for i, word in enumerate(words):
        if word.endswith("pip") and words[i + 1 : i + 2] == ["install"]:
            args = []
            for arg in words[i + 2 :]:
                if arg in ("&&", ";", "||", "|"):
                    break
                args.append(arg)
            out.append(args)
    return out


def _requirements(args: list[str]) -> list[Requirement]:
    """The requirement specifiers among pip arguments (options and their values skipped)."""
    with_value = {
        "-r",
        "--requirement",
        "-c",
        "--constraint",
        "-i",
        "--index-url",
        "--extra-index-url",
        "-f",
        "--find-links",
        "-t",
        "--target",
    }
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif not arg.startswith("-"):
            out.append(Requirement(arg))
    return out


def _dockerfile_pins(text: str) -> list[Requirement]:
    return [
        req
        for keyword, rest in _instructions(text)
        if keyword == "RUN"
        for args in _pip_installs(rest)
        for req in _requirements(args)
    ]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _ranges() -> dict[str, Requirement]:
    """pyproject's dependency ranges by canonical name (runtime and optional)."""
    project = _pyproject()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    out: dict[str, Requirement] = {}
    for req in reqs:
        out.setdefault(canonicalize_name(req.name), req)
    return out


def _stands_for(req: Requirement) -> str:
    name = canonicalize_name(req.name)
    return STANDS_IN_FOR.get(name, name)


def _pin_problems(pins: list[Requirement], ranges: dict[str, Requirement]) -> list[str]:
    """Pins outside pyproject's ranges: an ``==`` pin must lie in the range, any other
    specifier set must hold every clause of the range (so it cannot reach past it)."""
    problems = []
    for pin in pins:
        allowed = ranges.get(_stands_for(pin))
        if allowed is None:
            continue  # not a project dependency (awscli): pyproject says nothing about it
        if not set(allowed.extras) <= set(pin.extras):
            problems.append(f"{pin}: lacks the extras {sorted(allowed.extras)} of {allowed}")
        exact = [s for s in pin.specifier if s.operator in ("==", "===") and "*" not in s.version]
        if exact:
            if not allowed.specifier.contains(exact[0].version, prereleases=True):
                problems.append(f"{pin}: {exact[0].version} is outside {allowed}")
        elif not {str(s) for s in allowed.specifier} <= {str(s) for s in pin.specifier}:
            problems.append(f"{pin}: may install a version outside {allowed}")
    return problems


def _from_image() -> str:
    froms = [rest for keyword, rest in _instructions(DOCKERFILE.read_text()) if keyword == "FROM"]
    assert len(froms) == 1, froms
    return froms[0].split()[0]


def _cluster(name: str) -> dict:
    return yaml.safe_load((REPO / "clusters" / name).read_text())


def _kuberay_containers(doc: dict) -> list[dict]:
    groups = [doc["spec"]["headGroupSpec"], *doc["spec"]["workerGroupSpecs"]]
    return [
        c
        for g in groups
        for key in ("initContainers", "containers")
        for c in g["template"]["spec"].get(key, [])
    ]


# --------------------------------------------------------------------------- the base image


def test_base_image_runs_this_clients_ray_and_python():
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", _from_image())
    assert match, _from_image()
    assert match[1] == importlib.metadata.version("ray")
    assert (int(match[2]), int(match[3])) == sys.version_info[:2]


def test_cluster_files_name_the_image_or_its_base():
    version = _pyproject()["version"]
    image = IMAGE.format(version=version)
    base = _from_image()
    ray_version = re.search(r":(\d+\.\d+\.\d+)", base)[1]
    assert _cluster("gpu.yaml")["docker"]["image"] == image
    kuberay = _cluster("kuberay.yaml")
    assert kuberay["spec"]["rayVersion"] == ray_version
    assert {c["image"] for c in _kuberay_containers(kuberay)} == {image}
    # local.yaml runs the plain base image and pip-installs the same pins (below)
    assert _cluster("local.yaml")["docker"]["image"] == base


# --------------------------------------------------------------------------- the pins


def test_pins_satisfy_pyproject_ranges():
    pins = _dockerfile_pins(DOCKERFILE.read_text())
    assert pins, "no pip install found in docker/Dockerfile"
    assert _pin_problems(pins, _ranges()) == []


def test_pins_cover_every_runtime_dependency():
    pinned = {_stands_for(pin) for pin in _dockerfile_pins(DOCKERFILE.read_text())}
    runtime = {canonicalize_name(Requirement(r).name) for r in _pyproject()["dependencies"]}
    assert runtime - pinned == set()


def test_opencv_stays_headless():
    names = {canonicalize_name(p.name) for p in _dockerfile_pins(DOCKERFILE.read_text())}
    assert "opencv-python-headless" in names and "opencv-python" not in names


def test_the_pin_check_bites():
    ranges = {
        "torch": Requirement("torch>=2.4,<3"),
        "ray": Requirement("ray[tune]==2.60.0"),
        "opencv-python": Requirement("opencv-python>=4.8"),
    }
    text = (
        'FROM x\nRUN pip install --no-cache-dir \\\n    "torch==3.0.0" "ray==2.60.0" \\\n'
        '    "opencv-python-headless>=4" awscli\n'
    )
    problems = _pin_problems(_dockerfile_pins(text), ranges)
    assert len(problems) == 3, problems
    assert (
        _pin_problems([Requirement("torch==2.13.0"), Requirement("torch>=2.4,<3,!=2.5")], ranges)
        == []
    )


def test_local_yaml_installs_the_same_pins():
    """local.yaml pip-installs at setup what the image holds: the same specifiers."""
    pins = {canonicalize_name(p.name): p for p in _dockerfile_pins(DOCKERFILE.read_text())}
    local = [
        req
        for command in _cluster("local.yaml")["setup_commands"]
        for args in _pip_installs(command)
        if "--no-deps" not in args
        for req in _requirements(args)
    ]
    assert local
    for req in local:
        assert str(req) == str(pins[canonicalize_name(req.name)])
    runtime = {canonicalize_name(Requirement(r).name) for r in _pyproject()["dependencies"]}
    assert runtime - {_stands_for(r) for r in local} == set()


def test_docs_fallback_pip_line_installs_the_same_pins():
    """docs/cluster.md's pip line for the plain Ray image installs exactly the image's pins."""
    docs = (REPO / "docs" / "cluster.md").read_text()
    match = re.search(r'pip install --quiet "ray\[default,tune\][^\n]*(?:\n[ \t]+"[^\n]*)*', docs)
    assert match, "no fallback pip line in docs/cluster.md"
    (args,) = _pip_installs(" ".join(match[0].split()))
    documented = sorted(str(r) for r in _requirements(args))
    assert documented == sorted(str(r) for r in _dockerfile_pins(DOCKERFILE.read_text()))


# --------------------------------------------------------------------------- the project


def test_image_does_not_install_the_project():
    instructions = _instructions(DOCKERFILE.read_text())
    assert not [i for i in instructions if i[0] in ("COPY", "ADD")]
    for keyword, rest in instructions:
        if keyword != "RUN":
            continue
        for args in _pip_installs(rest):
            assert not {"-e", "--editable", "."} & set(args), args
            assert not [a for a in args if a.startswith(("/", "./", "git+"))], args
            names = {canonicalize_name(r.name) for r in _requirements(args)}
            assert "s2study" not in names


@pytest.mark.parametrize("name", ["gpu.yaml", "local.yaml"])
def test_setup_installs_the_project_without_dependencies(name):
    installs = [
        args for command in _cluster(name)["setup_commands"] for args in _pip_installs(command)
    ]
    assert ["--quiet", "--no-deps", "-e", "/home/ray/s2study"] in installs
    if name == "gpu.yaml":  # the image holds the dependencies: nothing else at boot
        assert installs == [["--quiet", "--no-deps", "-e", "/home/ray/s2study"]]
