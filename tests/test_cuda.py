"""GPU checks: run only where CUDA is present (the project's CPU machines skip them).

Besides training, extraction and matching on CUDA: the tags a trial's MLflow run gets on a
GPU, the DataLoader workers a GPU run picks, two processes sharing the GPU at 0.5 each (each
capped by :func:`s2study.study.trainable.limit_gpu_memory`, its CUDA context included in its
half; needs ``nvidia-smi`` and an otherwise idle GPU), and, where Ray, Optuna and MLflow are
installed, a real smoke study whose two trials share the GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s2study.config.load import load_train_config
from s2study.data.datasets import open_dataset
from s2study.metrics import mutual_nearest_neighbours
from s2study.study.trainable import context_reserve_bytes, device_tags
from s2study.train import build_model, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


@pytest.mark.parametrize("preset", ["r2d2-roadscene", "d2net-roadscene"])
def test_mixed_precision_training_on_cuda(preset, tmp_path, shared_data):
    cfg = load_train_config(preset, ["epochs=1", "steps_per_epoch=5", "data.max_val_pairs=2", "device=cuda"])
    result = train(cfg, out_dir=tmp_path, progress=False)
    metrics = result.history[-1]
    assert math.isfinite(metrics["loss/total"]) and metrics["val_nc"] > 0


def test_cuda_extraction_matches_cpu(shared_data):
    cfg = load_train_config("r2d2-roadscene")
    sample = open_dataset(cfg.data, "val")[0]
    image = torch.from_numpy(sample.image_a).permute(2, 0, 1)[None].float() / 255
    cpu = build_model(cfg, torch.device("cpu")).eval().extract(image, 1024)
    gpu = build_model(cfg, torch.device("cuda")).eval().extract(image.cuda(), 1024)
    n = min(len(cpu), len(gpu))
    same = (cpu.xy[:n] == gpu.xy[:n].cpu()).all(dim=1).float().mean()
    assert abs(len(cpu) - len(gpu)) <= 0.02 * len(cpu) and same > 0.9


def test_cuda_mutual_nearest_neighbours_equal_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4096, 128, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(4096, 128, generator=g), dim=1)
    assert torch.equal(mutual_nearest_neighbours(a, b), mutual_nearest_neighbours(a.cuda(), b.cuda()).cpu())


def test_trial_device_tags_name_the_gpu_and_the_cuda_build():
    tags = device_tags(torch.device("cuda"))
    assert tags["s2study.device"] == f"cuda:{torch.cuda.current_device()}"
    assert tags["s2study.gpu_name"] == torch.cuda.get_device_name() != "none"
    assert tags["s2study.cuda"] == torch.version.cuda and tags["s2study.torch"] == torch.__version__


def test_training_on_cuda_loads_data_in_threads_minus_one_workers(tmp_path, shared_data, caplog):
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # as a trial with resources.cpu: 3 sets it
    try:
        cfg = load_train_config("r2d2-roadscene", ["epochs=1", "steps_per_epoch=3", "data.max_val_pairs=2",
                                                   "device=cuda"])
        assert cfg.num_workers is None
        with caplog.at_level(logging.INFO, logger="s2study.train"):
            result = train(cfg, out_dir=tmp_path, progress=False)
    finally:
        torch.set_num_threads(before)
    assert "data loading: 2 worker process(es)" in caplog.text
    assert math.isfinite(result.history[-1]["loss/total"])


# One process of the sharing test: cap to the share, load what a trial loads (cuDNN
# convolutions, cuBLAS matmuls), fill the allocator up to the cap, report, hold until released.
_FILL = r"""
import json, sys, time
from pathlib import Path
import torch
from s2study.study.trainable import limit_gpu_memory

share, out, release = float(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
fraction = limit_gpu_memory(share)
x = torch.randn(8, 3, 192, 192, device="cuda", requires_grad=True)
torch.nn.Conv2d(3, 64, 3, padding=1).cuda()(x).square().mean().backward()
for dtype in (torch.float32, torch.bfloat16):
    a = torch.randn(1024, 1024, device="cuda", dtype=dtype)
    (a @ a).sum().item()
del x, a
held, error = [], ""
try:
    while True:
        held.append(torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda"))
except torch.OutOfMemoryError as exc:
    error = str(exc).splitlines()[0]
torch.cuda.synchronize()
total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
out.write_text(json.dumps({"fraction": fraction, "reserved": torch.cuda.memory_reserved(), "total": total,
                           "error": error}))
deadline = time.time() + 300
while not release.exists() and time.time() < deadline:
    time.sleep(0.1)
"""


def _gpu_memory_mib() -> tuple[float, float]:
    """(used, total) MiB of this test's GPU as nvidia-smi reports them (all processes)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=uuid,memory.used,memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    rows = [[v.strip() for v in line.split(",")] for line in out.strip().splitlines()]
    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", ""))
    mine = [r for r in rows if uuid and r[0].removeprefix("GPU-") == uuid.removeprefix("GPU-")]
    if not mine and len(rows) != 1:
        pytest.skip("cannot tell which GPU nvidia-smi row is this test's")
    _, used, total = (mine or rows)[0]
    return float(used), float(total)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the filling process exited with {proc.returncode}"
        assert time.monotonic() < deadline, "the filling process did not report"
        time.sleep(0.2)
    time.sleep(0.2)  # the file is written in one call; let it land
    return json.loads(path.read_text())


def test_two_processes_sharing_the_gpu_at_half_each_stay_within_their_half(tmp_path):
    if shutil.which("nvidia-smi") is None:
        pytest.skip("needs nvidia-smi to read the GPU's memory use")
    torch.cuda.empty_cache()
    base, total_mib = _gpu_memory_mib()
    if base > 0.1 * total_mib:
        pytest.skip(f"the GPU is in use ({base:.0f} of {total_mib:.0f} MiB); the sharing test needs it idle")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    release, procs, reports, used = tmp_path / "release", [], [], []
    try:
        for name in ("first", "second"):  # the second fills its half while the first holds its own
            procs.append(subprocess.Popen([sys.executable, "-c", _FILL, "0.5", str(tmp_path / name), str(release)],
                                          env=env))
            reports.append(_wait_for(tmp_path / name, procs[-1]))
            used.append(_gpu_memory_mib()[0])
    finally:
        release.touch()
        for proc in procs:
            proc.wait(timeout=120)
    for report in reports:
        cap = report["fraction"] * report["total"]
        assert report["fraction"] == pytest.approx(0.5 - context_reserve_bytes() / report["total"])
        assert "out of memory" in report["error"].lower()
        # each reached its own cap, so the second was not starved by the first's context (the
        # slack: 256 MiB of allocator rounding, and what this test process holds on the GPU)
        assert cap - 256 * MIB - base * MIB <= report["reserved"] <= cap, report
    half = 0.5 * total_mib
    assert used[0] - base <= half, (base, used)  # context + cap of the first within its half
    assert used[1] - used[0] <= half, (base, used)


@pytest.mark.e2e
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("ray", "optuna", "mlflow")),
                    reason="needs Ray, Optuna and MLflow")
def test_study_trials_share_the_gpu_capped_with_device_tags_and_gpu_metrics(tmp_path, shared_data):
    from mlflow import MlflowClient

    from s2study.study.config import TrackingConfig, load_study
    from s2study.study.runner import run_study

    name = "gpu-share"
    cfg = load_study(REPO / "search_spaces" / "smoke.yaml",
                     [f"name={name}", "base.device=auto", "resources.cpu=2", "resources.gpu=0.5", "max_concurrent=2",
                      "asha.max_epochs=1", "system_metrics.interval_s=1", "evaluate.top_n=1"], trials=2, cwd=tmp_path)
    cfg = dataclasses.replace(cfg, tracking=TrackingConfig(f"sqlite:///{tmp_path / 'mlflow.db'}", name))
    outcome = run_study(cfg, echo=lambda line: None)
    assert all(t.status in ("finished", "stopped_early") for t in outcome.trials), outcome.trials
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([outcome.experiment_id], f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(runs) == 2
    total = torch.cuda.get_device_properties(0).total_memory
    for run in runs:
        tags = run.data.tags
        assert tags["s2study.device"] == "cuda:0" and tags["s2study.gpu_name"] == torch.cuda.get_device_name(0)
        assert tags["s2study.cuda"] == torch.version.cuda
        assert float(tags["s2study.gpu_memory_fraction"]) == pytest.approx(0.5 - context_reserve_bytes() / total,
                                                                           abs=1e-3)
        assert tags["s2study.cpu_threads"] == "2" and tags["s2study.num_workers"] == "1"
        assert "system/cpu_utilization_percentage" in run.data.metrics
        if importlib.util.find_spec("pynvml") is not None:
            assert "system/gpu_0_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
            assert "system/gpu_0_memory_usage_megabytes" in run.data.metrics
