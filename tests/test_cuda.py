"""GPU checks: run only where CUDA is present (the project's CPU machines skip them)."""

from __future__ import annotations

import math

import pytest
import torch

from s2study.config.load import load_train_config
from s2study.data.datasets import open_dataset
from s2study.metrics import mutual_nearest_neighbours
from s2study.train import build_model, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
