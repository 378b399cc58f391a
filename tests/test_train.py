"""The S2 trainer on real RoadScene pairs: short runs, gradients, determinism, resume."""

from __future__ import annotations

import math

import pytest
import torch

from s2study.config.load import load_train_config
from s2study.data.batch import make_s2_batch
from s2study.data.datasets import open_dataset
from s2study.errors import EnvironmentProblem
from s2study.s2loss import s2_loss
from s2study.train import autocast_dtype, build_model, cpu_has_native_bf16, train, validate

# Tiny settings so a CPU run takes seconds; the presets hold the paper's full-size ones.
TINY = [
    "epochs=2", "steps_per_epoch=2", "crop_size=64", "val_k=256",
    "data.max_train_pairs=8", "data.max_val_pairs=2", "data.val_max_size=160",
]


def tiny_config(preset: str, *extra: str):
    return load_train_config(preset, [*TINY, *extra])


def s2_batch(cfg, seed=0, n=1):
    samples = [open_dataset(cfg.data, "train")[i] for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return make_s2_batch(samples, 64, cfg.sl, cfg.ssl, ssl_vis=True, ssl_ir=True, generator=gen, device="cpu")


@pytest.mark.parametrize("preset", ["r2d2-roadscene", "d2net-roadscene"])
def test_short_run_reports_finite_losses_and_val_ncm(preset, tmp_path, shared_data):
    reports = []
    result = train(
        tiny_config(preset), out_dir=tmp_path, report=lambda m, ck: reports.append((m, ck)), progress=False
    )
    assert [m["epoch"] for m, _ in reports] == [1.0, 2.0]
    for metrics, ckpt in reports:
        assert ckpt == tmp_path / "last.pt" and ckpt.is_file()
        for key in ("loss/total", "loss/sl", "loss/ssl_vis", "loss/ssl_ir", "val_nc", "val_ncm", "val_cmr"):
            assert math.isfinite(metrics[key]), key
        assert 0 <= metrics["val_ncm"] <= metrics["val_nc"]
    assert result.best_checkpoint == tmp_path / "best.pt" and result.epochs_done == 2
    assert result.best_val_ncm == max(m["val_ncm"] for m, _ in reports)


def test_validation_sees_the_official_r2d2_far_above_random_weights(shared_data):
    cpu = torch.device("cpu")
    full_size = ("data.val_max_size=null", "val_k=1024")
    official = tiny_config("r2d2-roadscene", *full_size)
    random = tiny_config("r2d2-roadscene", *full_size, "method.weights=null")
    val_set = open_dataset(official.data, "val")
    torch.manual_seed(0)
    ncm_official = validate(build_model(official, cpu), val_set, 1024, 3.0, cpu)["val_ncm"]
    ncm_random = validate(build_model(random, cpu), val_set, 1024, 3.0, cpu)["val_ncm"]
    # random convolutions still match some edges of an aligned pair: a clear factor, not 10x
    assert ncm_official > 2 * max(ncm_random, 1.0)


@pytest.mark.parametrize("preset", ["r2d2-roadscene", "d2net-roadscene"])
def test_every_trainable_parameter_gets_a_finite_nonzero_gradient(preset, shared_data):
    cfg = tiny_config(preset)
    torch.manual_seed(0)
    method = build_model(cfg, torch.device("cpu"))
    loss = s2_loss(method, s2_batch(cfg), lambda_ssl=0.5)["total"]
    loss.backward()
    for name, p in method.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_lambda_zero_ignores_ssl_images(shared_data):
    cfg = tiny_config("r2d2-roadscene")
    method = build_model(cfg, torch.device("cpu"))
    batch = s2_batch(cfg)

    def grads(b):
        torch.manual_seed(0)  # R2D2's loss samples random query points
        method.zero_grad()
        s2_loss(method, b, lambda_ssl=0.0)["total"].backward()
        return [p.grad.clone() for p in method.parameters()]

    first = grads(batch)
    for part in ("ssl_vis", "ssl_ir"):  # replace the SSL images by noise
        sl = batch.parts[part]
        batch.images_a[sl] = torch.rand_like(batch.images_a[sl])
        batch.images_b[sl] = torch.rand_like(batch.images_b[sl])
    assert all(torch.equal(a, b) for a, b in zip(first, grads(batch)))
    # ... while with lambda > 0 they do change the gradient
    torch.manual_seed(0)
    method.zero_grad()
    s2_loss(method, batch, lambda_ssl=0.5)["total"].backward()
    assert not all(torch.equal(a, p.grad) for a, p in zip(first, method.parameters()))


def test_each_part_is_normalised_with_its_own_statistics_and_only_sl_updates_the_running_ones():
    from s2study.part_norm import part_statistics

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    separate = [torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(net)]) for _ in range(2)]
    x = torch.randn(6, 3, 8, 8)
    x[2:] = x[2:] * 3 + 1  # a part with other statistics (as the noisy, inverted SSL images)
    with part_statistics(net, [2, 4]):
        y = net(x)
    expected = torch.cat([separate[0](x[:2]), separate[1](x[2:])])
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(net[1].running_mean, separate[0][1].running_mean)  # from the first part only
    assert torch.allclose(net[1].running_var, separate[0][1].running_var)
    assert "forward" not in vars(net[1])  # the plain batch norm is back
    y.square().sum().backward()
    expected.square().sum().backward()
    grads = [p.grad for p in net.parameters()]
    summed = [a.grad + b.grad for a, b in zip(*(s.parameters() for s in separate))]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, summed))


def _grads_and_stats(method, batch, lambda_ssl, parts=None):
    torch.manual_seed(0)  # the losses sample random query points
    method.zero_grad()
    losses = s2_loss(method, batch, lambda_ssl=lambda_ssl, parts=parts)
    losses["total"].backward()
    stats = [b.clone() for name, b in method.named_buffers() if "running" in name]
    return losses, [p.grad.clone() for p in method.parameters() if p.grad is not None], stats


@pytest.mark.parametrize("preset", ["r2d2-roadscene", "aliked-roadscene"])
def test_lambda_zero_with_ssl_images_in_the_batch_trains_exactly_as_without_them(preset, shared_data):
    """Batch norm sees each part apart: the SSL images change neither the SL term, nor the
    gradient at lambda = 0, nor the running statistics; so lambda alone varies in a study."""
    import copy

    cfg = tiny_config(preset)
    torch.manual_seed(0)
    method = build_model(cfg, torch.device("cpu"))
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in method.modules())
    batch = s2_batch(cfg)
    twin = copy.deepcopy(method)
    sl_only, grads, stats = _grads_and_stats(method, batch, 0.0)
    with_ssl, grads_ssl, stats_ssl = _grads_and_stats(twin, batch, 0.0, parts=batch.parts)
    assert "ssl_vis" in with_ssl and "ssl_vis" not in sl_only
    assert torch.allclose(sl_only["total"], with_ssl["total"], rtol=1e-5)
    # equal up to float32 summation order (measured: at most 4e-6 of each gradient's scale)
    assert len(grads) == len(grads_ssl) and all(
        (a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(grads, grads_ssl))
    assert stats and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(stats, stats_ssl))
    # while one batch norm over all parts would normalise the SL images differently
    sl = batch.parts["sl"]
    images = torch.cat([batch.images_a[sl], batch.images_b[sl], batch.images_a[sl.stop:], batch.images_b[sl.stop:]])
    twin.train()
    mixed = twin(images).descriptors[: 2 * (sl.stop - sl.start)]
    alone = twin(images[: 2 * (sl.stop - sl.start)]).descriptors
    assert (mixed - alone).abs().max() > 1e-2
    # the SL term at lambda > 0 is the one at lambda = 0
    at_04, _, _ = _grads_and_stats(copy.deepcopy(twin), batch, 0.4)
    at_0, _, _ = _grads_and_stats(copy.deepcopy(twin), batch, 0.0)
    assert torch.allclose(at_04["sl"], at_0["sl"], rtol=1e-5) and at_04["total"] > at_0["total"]


def test_same_seed_same_losses_and_resume_continues_exactly(tmp_path, shared_data):
    cfg = tiny_config("r2d2-roadscene", "epochs=2")
    full = train(cfg, out_dir=tmp_path / "a", progress=False).history
    # the same seed, stopped after epoch 1: the same first epoch ...
    first = train(tiny_config("r2d2-roadscene", "epochs=1"), out_dir=tmp_path / "b", progress=False)
    assert first.history[0]["loss/total"] == full[0]["loss/total"]
    # ... and resumed from its last.pt, epoch 2 matches the uninterrupted run
    resumed = train(cfg, out_dir=tmp_path / "b", resume_from=first.last_checkpoint, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0]
    assert resumed.history[1]["loss/total"] == pytest.approx(full[1]["loss/total"], rel=1e-5)
    assert resumed.history[1]["val_ncm"] == pytest.approx(full[1]["val_ncm"])


def test_precision_resolves_per_device():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(EnvironmentProblem, match="fp16 needs CUDA"):
        autocast_dtype("fp16", cpu)


def test_bf16_training_follows_fp32(tmp_path, shared_data):
    """Three steps from the same weights and batches: bf16 autocast losses within 2 % of fp32."""
    one_epoch = ("epochs=1", "steps_per_epoch=3", "val_k=128")
    runs = {
        p: train(tiny_config("r2d2-roadscene", *one_epoch, f"precision={p}"), out_dir=tmp_path / p,
                 progress=False)
        for p in ("fp32", "bf16")
    }
    fp32, bf16 = (runs[p].history[0] for p in ("fp32", "bf16"))
    for key in ("loss/total", "loss/sl", "loss/ssl_vis", "loss/ssl_ir"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.02), key
    assert bf16["loss/total"] != fp32["loss/total"]  # bf16 really ran


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, shared_data):
    """``compile: true`` trains the same model: the first epoch's losses agree with eager mode."""
    settings = ("epochs=1", "steps_per_epoch=2", "val_k=128", "precision=fp32")
    eager = train(tiny_config("r2d2-roadscene", *settings), out_dir=tmp_path / "eager", progress=False)
    compiled = train(tiny_config("r2d2-roadscene", *settings, "compile=true"), out_dir=tmp_path / "compiled",
                     progress=False)
    for key in ("loss/total", "loss/sl", "loss/ssl_vis", "loss/ssl_ir"):
        assert compiled.history[0][key] == pytest.approx(eager.history[0][key], rel=1e-3), key
