"""The S2 trainer: ``train(cfg)`` runs the same with or without Ray.

One epoch = ``steps_per_epoch`` optimiser steps on S2 batches (SL pair + SSL-vis + SSL-ir,
one batched forward), then validation on the val split (NC / NCM / CMR at ``val_k``,
design.md section 2), a checkpoint, and a ``report(metrics, checkpoint)`` callback — the
hook the study uses to talk to Ray Tune and MLflow. This module never imports Ray or MLflow.

Randomness is re-seeded from ``(seed, epoch)`` at the start of every epoch, so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have (on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from s2study.config.load import config_to_dict, load_train_config, train_config_from_dict
from s2study.config.schema import TrainConfig
from s2study.errors import EnvironmentProblem, TrainingDiverged

log = logging.getLogger(__name__)

ReportFn = Callable[[dict[str, float], Path], None]


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    last_checkpoint: Path
    best_checkpoint: Path | None
    best_val_ncm: float
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("device: 'cuda' was requested but no CUDA GPU is available")
    return torch.device(name)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX), where bf16 autocast pays off.

    Read from the Linux CPU flags; elsewhere False (plain fp32 is the safe default).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    Raises:
        EnvironmentProblem: a precision this device cannot run.
    """
    cuda = device.type == "cuda"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else True
    if precision == "auto":
        if cuda:
            return torch.bfloat16 if bf16_ok else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not bf16_ok:
            raise EnvironmentProblem("precision: this GPU has no bf16; use fp16, fp32 or auto")
        return torch.bfloat16
    if not cuda:  # fp16
        raise EnvironmentProblem(f"precision: fp16 needs CUDA, the device is {device}; use bf16 or fp32")
    return torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**63


def method_defaults(cfg: TrainConfig) -> tuple[int, float, float]:
    """Crop size, learning rate and weight decay: the config's, or those the method class
    declares (its paper's: ``default_crop``, ``default_lr``, ``default_weight_decay``)."""
    from s2study.methods import load_methods

    cls = load_methods().get(cfg.method.name)
    crop = cfg.crop_size or cls.default_crop
    lr = cfg.lr if cfg.lr is not None else cls.default_lr
    wd = cfg.weight_decay if cfg.weight_decay is not None else cls.default_weight_decay
    return crop, lr, wd


def build_model(cfg: TrainConfig, device: torch.device):
    """The method of ``cfg`` with its initial weights, on ``device``.

    The weights are ``method.weights`` (a weights name or a file), else the method's
    ``default_weights`` for its parameters (ALIKED: the official file of its ``model_name``),
    else none; the architecture parameters the file implies (``Method.pretrained_params``)
    fill in those the config leaves unset.
    """
    from s2study.methods import build_method, load_methods
    from s2study.resolver import resolve_weights

    cls = load_methods().get(cfg.method.name)
    name = cfg.method.weights or cls.default_weights(cls.validate_params(dict(cfg.method.params)))
    weights = name and str(resolve_weights(name))
    implied = cls.pretrained_params(weights) if weights else {}
    method = build_method(cfg.method.name, **{**implied, **cfg.method.params})
    if weights:
        method.load_pretrained(weights)
        log.info("%s: initialised from %s", cfg.method.name, weights)
    else:
        log.info("%s: random initialisation (no method.weights given)", cfg.method.name)
    return method.to(device)


def validate(method, dataset, k: int, threshold: float, device: torch.device) -> dict[str, float]:
    """Mean NC / NCM / CMR / repeatability at ``k`` on ``dataset`` (the study's metric source).

    Runs the same evaluation as ``s2study eval`` on the in-memory network, then puts the
    network back in training mode.
    """
    from s2study.evaluate import evaluate
    from s2study.extractor import MethodExtractor

    extractor = MethodExtractor(method, name="val", cache_key="", device=device, options={})
    try:
        result = evaluate([extractor], dataset, ks=(k,), main_threshold=threshold, progress=False)
    finally:
        method.train()
    mean = result.means["val"][k]
    return {"val_nc": mean.nc, "val_ncm": mean.ncm, "val_cmr": mean.cmr, "val_rep": mean.repeatability}


#: most DataLoader workers picked automatically: each is a process decoding PNG pairs, and a
#: few keep a GPU fed at the trainer's small batches; more only cost memory and start-up time
MAX_AUTO_WORKERS = 8


def loader_workers(requested: int | None, device: torch.device, threads: int | None = None) -> int:
    """The DataLoader worker processes for ``num_workers: requested`` on ``device``.

    ``None`` picks them: on CUDA ``threads - 1`` (at most :data:`MAX_AUTO_WORKERS`), where
    ``threads`` is the CPU threads this process may use (default ``torch.get_num_threads()``,
    which a study trial sets to its ``resources.cpu``), so the images of the next batches are
    decoded while the GPU computes and one core stays with the training loop; on the CPU 0:
    the training threads already use every core of the share, and a worker would only take
    time from them (the loading is a small part of a CPU step).
    """
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    threads = torch.get_num_threads() if threads is None else threads
    return max(0, min(int(threads) - 1, MAX_AUTO_WORKERS))


def _closing(bar):
    """Iterate a progress bar and close it however the loop ends (errors print on a clean line)."""
    try:
        yield from bar
    finally:
        bar.close()


def _cycle(loader, steps: int):
    """``steps`` batches from ``loader``, restarting it when exhausted."""
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def train(
    cfg: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    extra: dict | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg.method`` with the S2 joint loss.

    Args:
        cfg: a validated :class:`TrainConfig`.
        out_dir: where ``last.pt``, ``best.pt`` and ``history.json`` (metrics per epoch) go
            (a temporary folder when None).
        report: called after every epoch with the epoch's metrics and the checkpoint path.
        resume_from: a checkpoint written by ``train``: weights, optimiser and epoch resume.
        extra: stored in every checkpoint under ``"extra"`` (e.g. an MLflow run id).
        max_steps: stop after this many optimiser steps in total (for smoke runs).
        progress: show a progress bar.

    Returns:
        A :class:`TrainResult`.

    Raises:
        TrainingDiverged: the loss stayed non-finite for ``cfg.max_nonfinite_steps`` steps.
    """
    from s2study.resolver import using_mirror

    with using_mirror(cfg.mirror):
        return _train(cfg, out_dir=out_dir, report=report, resume_from=resume_from, extra=extra,
                      max_steps=max_steps, progress=progress)


def _train(cfg: TrainConfig, *, out_dir, report, resume_from, extra, max_steps, progress) -> TrainResult:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from s2study.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
    from s2study.data.batch import make_s2_batch
    from s2study.data.datasets import open_dataset
    from s2study.paths import output_dir
    from s2study.s2loss import s2_loss

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    crop, lr, wd = method_defaults(cfg)
    train_set = open_dataset(cfg.data, cfg.data.train_split)
    val_set = open_dataset(cfg.data, cfg.data.val_split)
    method = build_model(cfg, device)
    network = torch.compile(method) if cfg.compile else method  # shares the parameters
    # the output folder is created only once the data and the model are known to be good
    out = output_dir(out_dir, "out_dir") if out_dir else Path(tempfile.mkdtemp(prefix="s2study-train-"))
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    start_epoch, best_ncm, history = 1, -math.inf, []
    if resume_from:
        state = load_checkpoint(resume_from, map_location=device)
        method.load_state_dict(state["model"])
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        best_ncm = float(state.get("best_val_ncm", -math.inf))
        history = list(state.get("history", []))
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its kernels
    amp_dtype = autocast_dtype(cfg.precision, device)
    use_amp = amp_dtype is not None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log.info("precision: %s", "fp32" if amp_dtype is None else f"{amp_dtype} autocast")
    with_ssl = cfg.lambda_ssl > 0
    steps_per_epoch = cfg.steps_per_epoch or max(1, len(train_set) // cfg.batch_size)
    loader_gen = torch.Generator()
    batch_gen = torch.Generator(device=device)
    workers = loader_workers(cfg.num_workers, device)
    log.info("data loading: %d worker process(es)", workers)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= cfg.batch_size,
        collate_fn=list,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=loader_gen,
    )
    last_path, best_path = out / "last.pt", out / "best.pt"
    steps_done = nonfinite = 0  # consecutive non-finite losses, counted across epochs
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # the losses' own sampling
        loader_gen.manual_seed(epoch_seed(cfg.seed, epoch))
        batch_gen.manual_seed(epoch_seed(cfg.seed, epoch) + 1)
        method.train()
        t0 = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        n_steps = 0
        bar = tqdm(
            _cycle(loader, steps_per_epoch),
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not progress,
            leave=False,
        )
        for samples in _closing(bar):
            batch = make_s2_batch(
                samples, crop, cfg.sl, cfg.ssl,
                ssl_vis=with_ssl and cfg.ssl_vis, ssl_ir=with_ssl and cfg.ssl_ir,
                generator=batch_gen, device=device,
            )
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                parts = s2_loss(method, batch, cfg.lambda_ssl, network)
            loss = parts["total"]
            if not torch.isfinite(loss):
                nonfinite += 1
                if nonfinite >= cfg.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"loss is {loss.item()} for {nonfinite} consecutive steps at epoch {epoch}"
                    )
                optimizer.zero_grad(set_to_none=True)
                continue
            nonfinite = 0
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n_steps += 1
            steps_done += 1
            if progress and n_steps % 5 == 1:
                bar.set_postfix({k: f"{float(v) / n_steps:.3f}" for k, v in sums.items() if "/" not in k})
            if max_steps and steps_done >= max_steps:
                break
        train_time = time.perf_counter() - t0
        metrics: dict[str, float] = {"epoch": float(epoch)}
        metrics.update({f"loss/{k}": float(v) / max(n_steps, 1) for k, v in sums.items()})
        t1 = time.perf_counter()
        metrics.update(validate(method, val_set, k=cfg.val_k, threshold=cfg.val_threshold_px, device=device))
        metrics["time/train_s"] = train_time
        metrics["time/val_s"] = time.perf_counter() - t1
        history.append(metrics)
        improved = metrics["val_ncm"] > best_ncm
        best_ncm = max(best_ncm, metrics["val_ncm"])
        payload = {
            "method": {"name": cfg.method.name, "params": dict(method.params)},
            "model": method.state_dict(),
            "config": config_to_dict(cfg),
            "epoch": epoch,
            "metrics": metrics,
            "best_val_ncm": best_ncm,
            "history": history,
            "extra": dict(extra or {}),
        }
        if improved:
            save_checkpoint(best_path, payload)
        atomic_write_bytes(out / "history.json", lambda f: f.write(json.dumps(history, indent=1).encode()))
        save_checkpoint(last_path, {**payload, "optimizer": optimizer.state_dict()})
        if progress:
            print(
                f"epoch {epoch}: loss {metrics.get('loss/total', float('nan')):.4f}  "
                f"val NCM@{cfg.val_threshold_px:g}px K={cfg.val_k}: {metrics['val_ncm']:.1f}  "
                f"CMR {metrics['val_cmr']:.1f}%  ({train_time:.1f}s train, {metrics['time/val_s']:.1f}s val)",
                flush=True,
            )
        if report:
            report(metrics, last_path)
        if max_steps and steps_done >= max_steps:
            break
    return TrainResult(
        last_checkpoint=last_path,
        best_checkpoint=best_path if best_path.exists() else None,
        best_val_ncm=best_ncm,
        epochs_done=epoch,
        history=history,
    )


def _cli_train(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if args.epochs is not None:
        overrides.append(f"epochs={args.epochs}")
    if args.device:
        overrides.append(f"device={args.device}")
    from s2study.paths import output_dir

    cfg = load_train_config(args.config, overrides)
    out = output_dir(args.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(cfg, out_dir=out, resume_from=args.resume, max_steps=args.max_steps)
    print(f"best val NCM {result.best_val_ncm:.1f}; checkpoints: {result.best_checkpoint}, {result.last_checkpoint}")
    return 0


def register_cli(sub) -> None:
    from s2study.config.load import preset_names

    p = sub.add_parser(
        "train",
        help="train one config (a YAML file or a preset)",
        description="Train one configuration with the S2 joint loss. Presets: " + ", ".join(preset_names()),
    )
    p.add_argument("config", help="a train YAML file or a preset name")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--epochs", type=int, help="override epochs")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total")
    p.add_argument("--out", default="runs/train", help="output folder for best.pt / last.pt (default: runs/train)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="resume from a last.pt written by train")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the device")
    p.set_defaults(func=_cli_train)


__all__ = ["TrainResult", "loader_workers", "resolve_device", "train", "train_config_from_dict"]
