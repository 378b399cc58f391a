"""s2study performance benchmarks: one entry point, medians over repeats, same-run baselines.

Every benchmark is timed after warm-up runs; where it has a baseline, the two are measured in
the same process, interleaved round by round (A B, then B A, ...), so load drifts on a shared
machine hit both alike and the *ratio* stays meaningful when absolute times do not. Figures of
the official R2D2 / D2-Net code measured elsewhere are printed beside as *reference figures*,
never as same-run ratios.

Memory: on CPU ``peak_rss_mb`` is the process's peak resident set during the timed runs (the
kernel's high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` before each run;
where that is unavailable, ``ru_maxrss``, a peak since process start). On CUDA the entry also
holds ``peak_gpu_mb`` (``torch.cuda.max_memory_allocated``, reset before each run).

Usage::

    python benchmarks/run.py                       # the default set (about 10 min, 2-core CPU)
    python benchmarks/run.py --only mnn_4096 ssl_sample --repeats 5
    python benchmarks/run.py --threads 1 --precision fp32  # 1 thread (steady CPU times), fp32 steps
    python benchmarks/run.py --device cuda --json bench_gpu.json
    python benchmarks/run.py --only study_overhead  # optional: needs ray, optuna (and mlflow)
    python benchmarks/run.py --only backbones       # optional: every backbone, ratios to R2D2 N16
    python benchmarks/run.py --only study_scale     # optional: real studies of 10, 100, 300 trials

See ``benchmarks/README.md`` for what each benchmark measures, the targets and the figures.

Data and weights are found as everywhere in s2study, by name (:mod:`s2study.resolver`). The JSON maps each benchmark name to ``{"median_s", "min_s", "max_s",
"peak_rss_mb", "device", ...}`` (plus ``baseline_median_s`` and ``ratio`` where there is a
same-run baseline); the key ``_meta`` holds the machine, versions, load and command.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import io
import itertools
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- reference figures

#: official code on an idle 2-core machine of this kind (other runs; never same-run ratios)
REFERENCE_S: dict[str, tuple[float, float, str]] = {
    "r2d2_s2_step": (10.7, 10.7, "official R2D2 S2 step, three passes (B=2, 192 px)"),
    "d2net_s2_step": (1.13, 1.13, "official D2-Net S2 step (B=1, 256 px; conv4_3 only trained)"),
    "d2net_s2_step_conv4_3": (1.13, 1.13, "official D2-Net S2 step (B=1, 256 px; conv4_3 only)"),
    "ssl_sample": (0.15, 0.29, "official R2D2 pipeline, one synthetic (SSL) sample"),
    "extract_r2d2_single_roadscene": (1.2, 1.2, "official R2D2 extract.py, single scale"),
    "extract_r2d2_multi_roadscene": (2.8, 2.8, "official R2D2 extract.py, multi-scale"),
    "extract_r2d2_single_rgbnir": (5.0, 5.0, "official R2D2 extract.py, single scale"),
    "extract_r2d2_multi_rgbnir": (16.3, 16.3, "official R2D2 extract.py, multi-scale"),
    "mnn_4096": (
        0.26,
        0.26,
        "cv2.BFMatcher crossCheck, N=4096 (same run there: torch 0.11 s, numpy 0.17 s)",
    ),
}
#: targets of the performance issue, as printed beside each result
TARGETS: dict[str, str] = {
    "r2d2_s2_step": "<= 0.5x the official S2 step (10.7 s reference)",
    "d2net_s2_step": "<= 1.0x the official S2 step (1.13 s reference, conv4_3 only trained)",
    "d2net_s2_step_conv4_3": "<= 1.0x the official S2 step (1.13 s reference)",
    "ssl_sample": "<= 0.1x the official pipeline (0.15-0.29 s reference)",
    "extract_r2d2_single_roadscene": "<= 1.0x official",
    "extract_r2d2_multi_roadscene": "<= 1.0x official",
    "extract_r2d2_single_rgbnir": "<= 1.0x official",
    "extract_r2d2_multi_rgbnir": "<= 1.0x official",
    "mnn_4096": "<= 0.4x cv2.BFMatcher (same run)",
    "study_overhead": "<= 0.1 s per extra trial (warm Ray), start-up <= 10 s",
    "study_scale": "driver overhead per trial flat in N and <= 0.1 s; driver memory at most linear in N",
}
#: official R2D2 S2 step peak RSS (reference, other run)
REFERENCE_R2D2_PEAK_RSS_MB = 2100.0

# ----------------------------------------------------------------------------- measuring


def _read_hwm_mb() -> float | None:
    """The process's peak RSS since the last reset (``VmHWM``), in MB; None off Linux."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
    return int(found.group(1)) / 1024 if found else None


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so that an earlier benchmark's freed
    buffers do not count in the next one's peak RSS; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_mb() -> float:
    """Peak RSS since process start (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (s)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Samples:
    """Timed runs of one variant: wall times (s), peak RSS (MB), peak GPU memory (MB)."""

    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float | None = None

    def summary(self) -> dict[str, float]:
        out = {
            "median_s": statistics.median(self.times),
            "min_s": min(self.times),
            "max_s": max(self.times),
            "median_cpu_s": statistics.median(self.cpu_times),
            "repeats": len(self.times),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }
        if self.peak_gpu_mb is not None:
            out["peak_gpu_mb"] = round(self.peak_gpu_mb, 1)
        return out


class Timer:
    """Times one call of a function on ``device``, with its peak memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.hwm_resettable = _reset_hwm() and _read_hwm_mb() is not None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, fn: Callable[[], Any], into: Samples) -> float:
        """Call ``fn`` once; append its wall time to ``into`` and raise its peaks."""
        self._sync()
        if self.hwm_resettable:
            _reset_hwm()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        fn()
        self._sync()
        elapsed = time.perf_counter() - t0
        into.cpu_times.append(_cpu_seconds() - c0)
        rss = _read_hwm_mb() if self.hwm_resettable else _maxrss_mb()
        into.peak_rss_mb = max(into.peak_rss_mb, rss or 0.0)
        if self.device.type == "cuda":
            gpu = torch.cuda.max_memory_allocated(self.device) / 2**20
            into.peak_gpu_mb = max(into.peak_gpu_mb or 0.0, gpu)
        into.times.append(elapsed)
        return elapsed

    def interleaved(
        self, variants: dict[str, Callable[[], Any]], repeats: int, warmup: int
    ) -> dict[str, Samples]:
        """Warm every variant up, then time them round by round, alternating their order.

        Returns:
            variant name -> :class:`Samples` with ``repeats`` times each.
        """
        names = list(variants)
        for _ in range(warmup):
            for name in names:
                variants[name]()
        self._sync()
        out = {name: Samples() for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                self.run(variants[name], out[name])
        return out


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every benchmark gets: device, repeat override, and lazily loaded shared inputs."""

    device: torch.device
    repeats: int | None
    timer: Timer
    precision: str = "auto"  # the batched S2 steps' precision, resolved as the trainer does
    scale_trials: tuple[int, ...] = (10, 100, 300)  # study_scale: the study sizes N
    _cache: dict[str, Any] = field(default_factory=dict)

    def n(self, cpu: int, gpu: int | None = None) -> int:
        """Timed repeats: ``--repeats`` if given, else the benchmark's default for the device."""
        return self.repeats or (gpu if gpu and self.device.type == "cuda" else cpu)

    def warm(self, cpu: int) -> int:
        """Warm-up runs: at least 3 on CUDA (allocator, cuDNN and autotuning settle)."""
        return max(cpu, 3) if self.device.type == "cuda" else cpu

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def weights(self) -> Path:
        from s2study.resolver import resolve_weights

        return resolve_weights("official")

    def train_samples(self, preset: str, count: int):
        """The first ``count`` training pairs of a preset's dataset, read once."""
        from s2study.config.load import load_train_config
        from s2study.data.datasets import open_dataset

        def read():
            cfg = load_train_config(preset, [f"device={self.device.type}"])
            data = open_dataset(cfg.data, cfg.data.train_split)
            return [data[i] for i in range(min(count, len(data)))]

        return self.cached(f"samples:{preset}:{count}", read)


Result = dict[str, dict[str, Any]]


def _entry(ctx: Context, samples: Samples, **extra: Any) -> dict[str, Any]:
    return {**samples.summary(), "device": str(ctx.device), **extra}


def _with_baseline(
    ctx: Context, main: Samples, base: Samples, base_name: str, **extra: Any
) -> dict[str, Any]:
    entry = _entry(ctx, main, **extra)
    entry["baseline"] = base_name
    entry["baseline_median_s"] = statistics.median(base.times)
    entry["ratio"] = entry["median_s"] / entry["baseline_median_s"]
    entry["baseline_median_cpu_s"] = statistics.median(base.cpu_times)
    entry["cpu_ratio"] = entry["median_cpu_s"] / max(entry["baseline_median_cpu_s"], 1e-9)
    return entry


# ----------------------------------------------------------------------------- S2 steps


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _s2_step_variants(
    ctx: Context, preset: str, overrides: tuple[str, ...] = ()
) -> tuple[dict[str, Callable[[], None]], dict[str, Any], Any]:
    """The batched S2 step and its three-pass baseline for ``preset``, on one model (returned
    third).

    Both variants build the same S2 batch (same samples, same generator seed for the same call
    count) with :func:`make_s2_batch`; the batched one then runs :func:`s2_loss` (one forward of
    SL + SSL-vis + SSL-ir), the baseline three forward/loss/backward passes, one per part,
    accumulating gradients; each ends with one Adam step. On CUDA the batched step runs under
    autocast in the trainer's precision (``--precision``, default ``auto``: bf16 on CUDA and on CPUs
    with AMX) and the baseline in fp32; when that is not fp32, a
    batched fp32 variant (``<name>_fp32``) is then timed too, to separate the two gains.
    """
    from s2study.config.load import load_train_config
    from s2study.data.batch import make_s2_batch
    from s2study.s2loss import active_parts, s2_loss
    from s2study.train import autocast_dtype, build_model, method_defaults

    cfg = load_train_config(preset, [f"device={ctx.device.type}", *overrides])
    crop, lr, wd = method_defaults(cfg)
    method = build_model(cfg, ctx.device).train()
    optimizer = torch.optim.Adam(
        [p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=wd
    )
    samples = ctx.train_samples(preset, 4 * cfg.batch_size)
    lam, b = cfg.lambda_ssl, cfg.batch_size
    gen = torch.Generator(device=ctx.device)

    def batch_maker() -> Callable[[], Any]:
        calls = itertools.count()

        def make():
            i = next(calls)
            gen.manual_seed(1000 + i)
            chosen = [samples[(i * b + j) % len(samples)] for j in range(b)]
            return make_s2_batch(
                chosen,
                crop,
                cfg.sl,
                cfg.ssl,
                ssl_vis=cfg.ssl_vis,
                ssl_ir=cfg.ssl_ir,
                generator=gen,
                device=ctx.device,
            )

        return make

    def batched(dtype: torch.dtype | None) -> Callable[[], None]:
        make = batch_maker()

        def step() -> None:
            batch = make()
            with _autocast(ctx.device, dtype):
                loss = s2_loss(method, batch, lam)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def three_pass() -> Callable[[], None]:
        make = batch_maker()

        def step() -> None:
            batch = make()
            optimizer.zero_grad(set_to_none=True)
            for name, part in active_parts(batch, lam).items():
                n = part.stop - part.start
                out_a, out_b = method(torch.cat([batch.images_a[part], batch.images_b[part]])).split([n, n])
                loss = method.loss(
                    out_a,
                    out_b,
                    batch.flow[part],
                    batch.valid[part],
                )["total"]
                (loss if name == "sl" else lam * loss).backward()
            optimizer.step()

        return step

    amp_dtype = autocast_dtype(ctx.precision, ctx.device)
    amp = amp_dtype is not None
    variants = {"batched": batched(amp_dtype), "three_pass": three_pass()}
    if amp:
        variants["batched_fp32"] = batched(None)
    info = {
        "batch_size": b,
        "crop": crop,
        "lambda_ssl": lam,
        "precision": f"{str(amp_dtype)[6:]} autocast (batched), fp32 (3-pass)" if amp else "fp32",
    }
    return variants, info, method


def _s2_step_benchmark(
    name: str, preset: str, repeats: int, gpu_repeats: int, overrides: tuple[str, ...] = ()
) -> Callable[[Context], Result]:
    def bench(ctx: Context) -> Result:
        variants, info, _ = _s2_step_variants(ctx, preset, overrides)
        info = {**info, "overrides": list(overrides)} if overrides else info
        runs = ctx.timer.interleaved(variants, ctx.n(repeats, gpu_repeats), ctx.warm(1))
        base_name = f"{name}_3pass"
        out = {
            name: _with_baseline(ctx, runs["batched"], runs["three_pass"], base_name, **info),
            base_name: _entry(ctx, runs["three_pass"], **{**info, "precision": "fp32"}),
        }
        if "batched_fp32" in runs:
            out[f"{name}_fp32"] = _with_baseline(
                ctx,
                runs["batched_fp32"],
                runs["three_pass"],
                base_name,
                **{**info, "precision": "fp32"},
            )
        return out

    return bench


# ----------------------------------------------------------------------------- SSL sample


SSL_BATCH = 8


def bench_ssl_sample(ctx: Context) -> Result:
    """Marginal cost of one SSL sample in :func:`make_s2_batch` at 192 px.

    ``make_s2_batch`` of ``SSL_BATCH`` pairs is timed with both SSL parts and with SL only,
    interleaved; per round, (full - SL only) / (2 * SSL_BATCH) is the cost of one SSL sample
    (a transformed copy, its crop pair, flow, validity and photometric cascade).
    """
    from s2study.config.load import load_train_config
    from s2study.data.batch import make_s2_batch

    cfg = load_train_config("r2d2-roadscene", [f"device={ctx.device.type}"])
    samples = ctx.train_samples("r2d2-roadscene", SSL_BATCH)
    gen = torch.Generator(device=ctx.device)

    def make(ssl: bool) -> Callable[[], None]:
        def run() -> None:
            gen.manual_seed(7)
            make_s2_batch(
                samples,
                192,
                cfg.sl,
                cfg.ssl,
                ssl_vis=ssl,
                ssl_ir=ssl,
                generator=gen,
                device=ctx.device,
            )

        return run

    runs = ctx.timer.interleaved(
        {"full": make(True), "sl_only": make(False)}, ctx.n(15, 40), ctx.warm(2)
    )
    per_ssl = 2 * SSL_BATCH
    diffs = [(f - s) / per_ssl for f, s in zip(runs["full"].times, runs["sl_only"].times)]
    cpu_diffs = [
        (f - s) / per_ssl for f, s in zip(runs["full"].cpu_times, runs["sl_only"].cpu_times)
    ]
    return {
        "ssl_sample": {
            "median_s": statistics.median(diffs),
            "min_s": min(diffs),
            "max_s": max(diffs),
            "median_cpu_s": statistics.median(cpu_diffs),
            "repeats": len(diffs),
            "peak_rss_mb": round(runs["full"].peak_rss_mb, 1),
            "device": str(ctx.device),
            "make_s2_batch_s": statistics.median(runs["full"].times),
            "make_s2_batch_sl_only_s": statistics.median(runs["sl_only"].times),
            "pairs_per_batch": SSL_BATCH,
            "crop": 192,
        }
    }


# ----------------------------------------------------------------------------- extraction


def _roadscene_image(ctx: Context) -> np.ndarray:
    """The visible image of the first RoadScene training pair (329 x 500, the usual size)."""
    from s2study.config.schema import DataConfig
    from s2study.data.datasets import open_dataset

    return ctx.cached(
        "img:roadscene", lambda: open_dataset(DataConfig(dataset="roadscene"), "train")[0].image_a
    )


def _rgbnir_image(ctx: Context) -> np.ndarray:
    from s2study.data.datasets import read_image
    from s2study.resolver import resolve_dataset

    return ctx.cached(
        "img:rgbnir", lambda: read_image(resolve_dataset("rgbnir") / "country" / "0000_rgb.jpg")
    )


def _extract_benchmark(
    name: str, image: Callable[[Context], np.ndarray], multiscale: bool, repeats: int
) -> Callable[[Context], Result]:
    def bench(ctx: Context) -> Result:
        from s2study.extractor import load_extractor

        extractor = load_extractor(ctx.weights(), device=ctx.device, multiscale=multiscale)
        img = image(ctx)
        found = []
        runs = ctx.timer.interleaved(
            {"x": lambda: found.append(len(extractor(img, 4096).keypoints))},
            ctx.n(repeats, 10),
            ctx.warm(1),
        )
        return {
            name: _entry(
                ctx,
                runs["x"],
                image_hw=list(img.shape[:2]),
                max_keypoints=4096,
                keypoints=found[-1],
                multiscale=multiscale,
            )
        }

    return bench


# ----------------------------------------------------------------------------- backbones

#: every backbone s2study trains: (label, preset, overrides); the first is the reference
BACKBONES = (
    ("r2d2_WASF_N16", "r2d2-roadscene", ()),
    ("r2d2_WAF_N16", "r2d2-roadscene", ("method.weights=r2d2_WAF_N16",)),
    ("r2d2_WASF_N8_big", "r2d2-roadscene", ("method.weights=r2d2_WASF_N8_big",)),
    ("faster2d2_WASF_N16", "r2d2-roadscene", ("method.weights=faster2d2_WASF_N16",)),
    ("aliked-t16", "aliked-roadscene", ("method.weights=aliked-t16",)),
    ("aliked-n16", "aliked-roadscene", ()),
    ("aliked-n16rot", "aliked-roadscene", ("method.weights=aliked-n16rot",)),
    ("aliked-n32", "aliked-roadscene", ("method.weights=aliked-n32",)),
    ("d2net (random init)", "d2net-roadscene", ()),
)
BACKBONE_CROP = 192  # one crop for every backbone, so the step times compare


def bench_backbones(ctx: Context) -> Result:
    """An S2 step (one batched forward, batch 1, lambda of the preset, 192 px crops, the
    trainer's precision) and a single-scale extraction (RoadScene 329 x 500, K = 4096) for
    every backbone, timed round by round in one run; ratios to R2D2 N16 (the official file)."""
    from s2study.extractor import MethodExtractor

    steps, extracts, info = {}, {}, {}
    img = _roadscene_image(ctx)
    for label, preset, overrides in BACKBONES:
        variants, meta, method = _s2_step_variants(ctx, preset, (*overrides, f"crop_size={BACKBONE_CROP}"))
        extractor = MethodExtractor(method, label, label, ctx.device, {})
        # one network for both: the step trains it (train mode), the extraction evaluates it
        steps[label] = lambda m=method, step=variants["batched"]: (m.train(), step())
        extracts[label] = lambda e=extractor: (e.method.eval(), e(img, 4096))
        info[label] = {"lambda_ssl": meta["lambda_ssl"], "crop": BACKBONE_CROP, "precision": meta["precision"]}
    step_runs = ctx.timer.interleaved(steps, ctx.n(3, 10), ctx.warm(1))
    extract_runs = ctx.timer.interleaved(extracts, ctx.n(3, 10), ctx.warm(1))
    ref = BACKBONES[0][0]
    out: Result = {}
    for label, *_ in BACKBONES:
        out[f"backbone_s2_step[{label}]"] = _with_baseline(ctx, step_runs[label], step_runs[ref],
                                                            f"backbone_s2_step[{ref}]", **info[label])
        out[f"backbone_extract[{label}]"] = _with_baseline(ctx, extract_runs[label], extract_runs[ref],
                                                            f"backbone_extract[{ref}]", image_hw=list(img.shape[:2]),
                                                            max_keypoints=4096)
    return out


# ----------------------------------------------------------------------------- MNN


def _mnn_benchmark(name: str, n: int, repeats: int) -> Callable[[Context], Result]:
    def bench(ctx: Context) -> Result:
        import cv2

        from s2study.metrics import mutual_nearest_neighbours

        gen = torch.Generator().manual_seed(n)
        a, b = (
            torch.nn.functional.normalize(torch.randn(n, 128, generator=gen), dim=1)
            for _ in range(2)
        )
        a_dev, b_dev = a.to(ctx.device), b.to(ctx.device)
        a_np, b_np = a.numpy(), b.numpy()
        matcher = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True)
        ours: list[Any] = [None]
        theirs: list[Any] = [None]

        def run_ours() -> None:
            ours[0] = mutual_nearest_neighbours(a_dev, b_dev)

        def run_cv2() -> None:
            theirs[0] = matcher.match(a_np, b_np)

        runs = ctx.timer.interleaved(
            {"ours": run_ours, "cv2": run_cv2}, ctx.n(repeats, 20), ctx.warm(1)
        )
        mine = {tuple(p) for p in ours[0].cpu().tolist()}
        cv = {(m.queryIdx, m.trainIdx) for m in theirs[0]}
        agree = len(mine & cv) / max(len(mine | cv), 1)
        base = f"{name}_cv2_bfmatcher"
        return {
            name: _with_baseline(
                ctx, runs["ours"], runs["cv2"], base, matches=len(mine), agreement=round(agree, 4)
            ),
            base: {**_entry(ctx, runs["cv2"], matches=len(cv)), "device": "cpu"},
        }

    return bench


# ----------------------------------------------------------------------------- evaluation


class _TimedExtractor:
    """Delegates to an extractor and adds up the time spent in it (to split eval time)."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner, self.device = inner, device
        self.name, self.cache_key = inner.name, inner.cache_key
        self.seconds, self.calls = 0.0, 0

    def __call__(self, image: np.ndarray, max_keypoints: int = 4096):
        t0 = time.perf_counter()
        feats = self.inner(image, max_keypoints=max_keypoints)  # returns numpy: already synced
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return feats


def bench_eval_roadscene_val(ctx: Context) -> Result:
    """Full evaluation of RoadScene val at K = 1024/2048/4096 with the official R2D2, no cache."""
    from s2study.config.schema import DataConfig
    from s2study.data.datasets import open_dataset
    from s2study.evaluate import evaluate
    from s2study.extractor import load_extractor

    data = open_dataset(DataConfig(dataset="roadscene"), "val")
    timed: list[_TimedExtractor] = []

    def run() -> None:
        extractor = _TimedExtractor(load_extractor(ctx.weights(), device=ctx.device), ctx.device)
        timed.append(extractor)
        evaluate(
            [extractor],
            data,
            ks=(1024, 2048, 4096),
            cache_dir=None,
            progress=False,
            dataset_name="roadscene",
            split="val",
        )

    runs = ctx.timer.interleaved({"eval": run}, ctx.n(1), warmup=0)
    total = statistics.median(runs["eval"].times)
    extract_s = statistics.median(t.seconds for t in timed)
    return {
        "eval_roadscene_val": _entry(
            ctx,
            runs["eval"],
            pairs=len(data),
            per_pair_s=total / len(data),
            extract_s=extract_s,
            extract_per_image_s=extract_s / max(timed[-1].calls, 1),
            metrics_and_io_s=total - extract_s,
            ks=[1024, 2048, 4096],
        )
    }


# ----------------------------------------------------------------------------- study overhead


def _noop_trial(config: dict[str, Any]) -> None:
    """A Tune function trainable that reports one metric value and returns."""
    from ray import tune

    tune.report({"val_ncm": float(sum(v for v in config.values() if isinstance(v, (int, float))))})


def _study_tuner_factory(storage: str) -> tuple[Callable[[str, int], Any], str]:
    """``make(name, trials) -> Tuner`` and a description of which Tuner it builds.

    Preferably the project's own :func:`s2study.study.runner.build_tuner` on the smoke study
    (OptunaSearch + ASHA, ``reuse_actors=True``, its callbacks and checkpoint settings) with a
    no-op trainable; if the runner cannot be used, a plain Tuner with ``reuse_actors=True``.
    """
    from ray import tune

    try:
        from s2study.study.config import load_study
        from s2study.study.runner import build_tuner

        cfg = load_study(REPO / "search_spaces" / "smoke.yaml", [f"storage={storage}"])
        trainable = tune.with_resources(_noop_trial, {"cpu": cfg.resources.cpu, "gpu": 0})

        def make(name: str, trials: int):
            return build_tuner(dataclasses.replace(cfg, name=name, trials=trials), trainable)

        return make, (
            "s2study.study.runner.build_tuner on search_spaces/smoke.yaml "
            f"(max_concurrent {cfg.max_concurrent}, {cfg.resources.cpu} CPU per trial) "
            "with a no-op trainable"
        )
    except Exception as exc:  # noqa: BLE001 - any breakage of the runner falls back to plain Tune
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    def make_plain(name: str, trials: int):
        return tune.Tuner(
            tune.with_resources(_noop_trial, {"cpu": 1}),
            param_space={"x": tune.uniform(0, 1)},
            tune_config=tune.TuneConfig(
                metric="val_ncm",
                mode="max",
                num_samples=trials,
                max_concurrent_trials=2,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
        )

    return (
        make_plain,
        f"ray.tune.Tuner directly (reuse_actors=True, 2 concurrent); runner unusable: {reason}",
    )


def bench_study_overhead(ctx: Context) -> Result:
    """Per-trial and start-up overhead of a study on a local Ray (optional; needs ray + optuna).

    ``ray.init`` is timed (start-up); then, on the warm Ray, fits of N=2 and N=10 no-op trials
    are interleaved (after one untimed fit); per extra trial = (T10 - T2) / 8 per round; the
    fixed cost of a fit is T2 - 2 x per-trial. In-process the same no-op trials cost
    microseconds, so these times are all overhead.
    """
    try:
        import ray
    except ImportError as exc:
        return {
            "study_overhead": {
                "skipped": f"ray is not installed here ({exc})",
                "device": str(ctx.device),
            }
        }
    small, large = 2, 10
    with tempfile.TemporaryDirectory(prefix="s2study-bench-study-") as storage:
        if ray.is_initialized():
            raise RuntimeError(
                "Ray is already initialised in this process; the start-up cannot be timed"
            )
        t0 = time.perf_counter()
        # "local": a fresh instance; without it ray.init joins any Ray already running here
        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        startup = time.perf_counter() - t0
        try:
            make, which = _study_tuner_factory(storage)
            fits: dict[int, list[float]] = {small: [], large: []}
            rounds = ctx.n(3)
            order = [
                n for r in range(rounds) for n in ((small, large) if r % 2 == 0 else (large, small))
            ]
            for i, trials in enumerate([small] + order):  # the first fit warms the workers up
                tuner = make(f"overhead-{i}-{trials}", trials)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    grid = tuner.fit()
                if i:
                    fits[trials].append(time.perf_counter() - t0)
                if grid.num_errors:
                    raise RuntimeError(f"{grid.num_errors} no-op trials failed: {grid.errors[0]}")
                if grid.num_terminated != trials:
                    raise RuntimeError(
                        f"a fit of {trials} no-op trials ended with {grid.num_terminated} done"
                    )
        finally:
            ray.shutdown()
    per_trial = [(b - a) / (large - small) for a, b in zip(fits[small], fits[large])]
    t_small = statistics.median(fits[small])
    return {
        "study_overhead": {
            "median_s": statistics.median(per_trial),
            "min_s": min(per_trial),
            "max_s": max(per_trial),
            "repeats": len(per_trial),
            "peak_rss_mb": round(_read_hwm_mb() or _maxrss_mb(), 1),
            "device": "cpu",
            "startup_s": startup,
            "fit_fixed_s": t_small - small * statistics.median(per_trial),
            f"fit_{small}_trials_s": t_small,
            f"fit_{large}_trials_s": statistics.median(fits[large]),
            # the same slope from the medians of each size (less paired, as noisy a check)
            "per_trial_from_medians_s": (statistics.median(fits[large]) - t_small)
            / (large - small),
            "tuner": which,
        }
    }


# ----------------------------------------------------------------------------- study scale

#: the cheapest real trial, set on search_spaces/smoke.yaml as ``s2study run --set`` would: one
#: epoch of one training step on 32 px crops, validation on one val pair shrunk to 64 px at K=64,
#: no post-study evaluation
STUDY_SCALE_OVERRIDES = (
    "base.steps_per_epoch=1",
    "base.crop_size=32",
    "base.val_k=64",
    "base.data.max_train_pairs=1",
    "base.data.max_val_pairs=1",
    "base.data.val_max_size=64",
    "asha.max_epochs=1",
    "asha.grace_period=1",
    "evaluate.top_n=0",
)
STUDY_SCALE_WARMUP = 2  # trials of the untimed first study (imports, first worker processes)
DEFAULT_SCALE_TRIALS = (10, 100, 300)


def _vm_rss_mb() -> float | None:
    """The process's current resident set (``VmRSS``), in MB; None off Linux."""
    try:
        found = re.search(r"VmRSS:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


class _EchoLog:
    """run_study's ``echo``: each line with its time, into the study's log file."""

    def __init__(self, log: io.TextIOBase) -> None:
        self.log, self.lines = log, []

    def __call__(self, line: str) -> None:
        self.lines.append((time.perf_counter(), line))
        print(line, file=self.log, flush=True)

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


@contextlib.contextmanager
def _timed_fits(into: list[tuple[float, float]]):
    """Record the start and end (``time.perf_counter``) of every ``Tuner.fit`` in the block;
    the fit itself is unchanged."""
    from ray.tune import Tuner

    fit = Tuner.fit

    @functools.wraps(fit)
    def timed(self, *args: Any, **kwargs: Any):
        t0 = time.perf_counter()
        try:
            return fit(self, *args, **kwargs)
        finally:
            into.append((t0, time.perf_counter()))

    Tuner.fit = timed
    try:
        yield
    finally:
        Tuner.fit = fit


def _one_study_scale(trials: int, folder: Path) -> dict[str, Any]:
    """One ``run_study`` of ``trials`` cheapest real trials, with its storage, Optuna study and
    MLflow store (sqlite) in ``folder``, on the Ray this process started; its times (seconds
    from the call), the trial runs' own time and the driver's memory."""
    from s2study.study import tracking
    from s2study.study.config import load_study
    from s2study.study.runner import run_study

    study_file = REPO / "search_spaces" / "smoke.yaml"
    overrides = [
        *STUDY_SCALE_OVERRIDES,
        f"name=scale-{trials}",
        # JSON-quoted, as `s2study run --storage/--tracking-uri` passes them
        f"storage={json.dumps(str(folder / 'storage'))}",
        f"tracking.uri={json.dumps('sqlite:///' + str(folder / 'mlflow.db'))}",
    ]
    cfg = load_study(study_file, overrides, trials=trials)
    concurrency = cfg.max_concurrent or 1
    load = os.getloadavg()[0]
    fits: list[tuple[float, float]] = []
    with open(folder / "study.log", "w") as log:
        echo = _EchoLog(log)
        gc.collect()
        hwm = _reset_hwm() and _read_hwm_mb() is not None  # trims the heap first
        rss_before = _vm_rss_mb()
        epoch0, t0 = time.time(), time.perf_counter()
        # Tune's and the workers' lines (forwarded to the driver) go to the log, not the report
        with _timed_fits(fits), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            outcome = run_study(cfg, study_text=study_file.read_text(encoding="utf-8"), echo=echo)
        wall = time.perf_counter() - t0
        peak = _read_hwm_mb() if hwm else _maxrss_mb()
    bad = [t for t in outcome.trials if t.status != "finished"]
    if len(outcome.trials) != trials or bad or len(fits) != 1:
        detail = f"; {bad[0].name}: {bad[0].status} {bad[0].error or ''}" if bad else ""
        raise RuntimeError(f"a study of {trials} trials ended with {len(outcome.trials)} trials, "
                           f"{len(bad)} not finished, {len(fits)} fits{detail}")
    experiment_id, parent = outcome.experiment_id, outcome.parent_run_id
    del outcome  # what the driver still holds of the study once its outcome is dropped:
    gc.collect()
    _trim_heap()
    rss_after = _vm_rss_mb()
    fit_start, fit_end = fits[0][0] - t0, fits[0][1] - t0
    runs = tracking.child_runs(cfg.tracking.uri, experiment_id, parent)
    if len(runs) != trials:
        raise RuntimeError(f"{len(runs)} MLflow trial runs for {trials} trials")
    # each trial run from its start to its end (the trial's own clock readings, in s from the
    # call); an end after the fit returned is the run's end write landing late (a trial Tune
    # stopped lets go at once) or the driver ending it (settle_trial_runs): not trial work
    spans = sorted((r.info.start_time / 1e3 - epoch0, r.info.end_time / 1e3 - epoch0) for r in runs)
    late = [end - fit_end for _, end in spans if end > fit_end]
    spans = [(start, min(end, fit_end)) for start, end in spans]
    work = sum(end - start for start, end in spans)
    first, last = spans[0][0], max(end for _, end in spans)
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = overlap = 0
    for _, step in events:
        running += step
        overlap = max(overlap, running)
    busy = work / concurrency
    return {
        "trials": trials,
        "wall_s": wall,
        "setup_s": fit_start,  # run_study up to Tuner.fit: checks, stores, parent run
        "fit_s": fit_end - fit_start,
        "post_fit_s": wall - fit_end,  # summary, settling the trial runs, ending the parent run
        "fit_to_first_run_s": first - fit_start,  # Tune start-up, first actors, first trial's start
        "trials_span_s": last - first,
        "trial_work_s": work,
        "trial_run_mean_s": work / trials,
        "concurrency": concurrency,
        "max_overlap": overlap,
        "overhead_per_trial_s": (wall - busy) / trials,
        "steady_overhead_per_trial_s": (last - first - busy) / trials,
        "fixed_s": wall - (last - first),
        "runs_ended_after_fit": len(late),
        "max_end_after_fit_s": max(late, default=0.0),
        "peak_rss_mb": round(peak or 0.0, 1),
        # the driver's growth during the study, per trial
        "peak_rss_growth_per_trial_mb": None if rss_before is None or not peak
        else round((peak - rss_before) / trials, 3),
        "rss_before_mb": None if rss_before is None else round(rss_before, 1),
        "rss_after_mb": None if rss_after is None else round(rss_after, 1),
        "load_avg_1min": round(load, 2),
    }


def bench_study_scale(ctx: Context) -> Result:
    """A real study (``run_study``: checks, Optuna storage, MLflow parent and trial runs, Tune with
    StudySearch + ASHA, summary) of the cheapest real trials at each N of ``--scale-trials``
    (optional; needs ray, optuna and mlflow). See benchmarks/README.md for the definitions."""
    import logging

    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process")
    counts = list(ctx.scale_trials)
    t0 = time.perf_counter()
    # as run_study starts it (address="local": never join a Ray already running here); run_study
    # finds it initialised, uses it and leaves it running, so it is started once for every N
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    startup = time.perf_counter() - t0
    per_n: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="s2study-bench-scale-") as tmp:
            # not compared: the process's first study also pays the imports and first workers
            warmup = _one_study_scale(STUDY_SCALE_WARMUP, Path(tmp))
        print(_scale_row(warmup) + "  (warm-up: the process's first study)", flush=True)
        for trials in counts:
            with tempfile.TemporaryDirectory(prefix="s2study-bench-scale-") as tmp:
                row = _one_study_scale(trials, Path(tmp))
            per_n.append(row)
            print(_scale_row(row), flush=True)
    finally:
        ray.shutdown()
    overheads = [r["overhead_per_trial_s"] for r in per_n]
    first, last = per_n[0], per_n[-1]
    marginal = [
        ((b["wall_s"] - b["trial_work_s"] / b["concurrency"]) - (a["wall_s"] - a["trial_work_s"] / a["concurrency"]))
        / (b["trials"] - a["trials"])
        for a, b in itertools.pairwise(per_n)
        if b["trials"] != a["trials"]
    ]
    return {
        "study_scale": {
            "median_s": last["overhead_per_trial_s"],  # one study per N: the figure at the largest N
            "min_s": min(overheads),
            "max_s": max(overheads),
            "repeats": len(per_n),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in per_n),
            "device": "cpu",
            "startup_s": startup,
            "scale": per_n,
            "marginal_overhead_per_trial_s": marginal,
            "overhead_ratio_largest_vs_smallest": _ratio(last, first, "overhead_per_trial_s"),
            "steady_overhead_ratio_largest_vs_smallest": _ratio(last, first, "steady_overhead_per_trial_s"),
            "warmup": warmup,
            "trial": "search_spaces/smoke.yaml with " + " ".join(f"--set {o}" for o in STUDY_SCALE_OVERRIDES),
        }
    }


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return a[key] / b[key] if b[key] > 0 else None


def _scale_row(r: dict[str, Any]) -> str:
    return (
        f"{'':32s} N={r['trials']:<4d} wall {r['wall_s']:6.1f} s (set-up {r['setup_s']:.1f}, fit {r['fit_s']:.1f}, "
        f"after {r['post_fit_s']:.1f})  trial runs {r['trial_work_s']:6.1f} s (mean {r['trial_run_mean_s']:.2f}, "
        f"/{r['concurrency']})  overhead/trial {r['overhead_per_trial_s']:.3f} s (steady "
        f"{r['steady_overhead_per_trial_s']:.3f} s, fixed {r['fixed_s']:.1f} s)  driver peak RSS "
        f"{r['peak_rss_mb']:.0f} MB"
    )


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Benchmark:
    run: Callable[[Context], Result]
    default: bool = True  # part of the run without --only
    needs: tuple[str, ...] = ()  # importable modules it needs


BENCHMARKS: dict[str, Benchmark] = {
    "r2d2_s2_step": Benchmark(
        _s2_step_benchmark("r2d2_s2_step", "r2d2-roadscene", repeats=3, gpu_repeats=15)
    ),
    "d2net_s2_step": Benchmark(
        _s2_step_benchmark("d2net_s2_step", "d2net-roadscene", repeats=5, gpu_repeats=20)
    ),
    # the official D2-Net setting (only conv4_3 trained), the one the 1.13 s reference used
    "d2net_s2_step_conv4_3": Benchmark(
        _s2_step_benchmark(
            "d2net_s2_step_conv4_3",
            "d2net-roadscene",
            repeats=5,
            gpu_repeats=20,
            overrides=("method.params.train_layers=conv4_3",),
        ),
        default=False,
    ),
    "ssl_sample": Benchmark(bench_ssl_sample),
    "extract_r2d2_single_roadscene": Benchmark(
        _extract_benchmark("extract_r2d2_single_roadscene", _roadscene_image, False, repeats=5)
    ),
    "extract_r2d2_multi_roadscene": Benchmark(
        _extract_benchmark("extract_r2d2_multi_roadscene", _roadscene_image, True, repeats=3)
    ),
    "extract_r2d2_single_rgbnir": Benchmark(
        _extract_benchmark("extract_r2d2_single_rgbnir", _rgbnir_image, False, repeats=3)
    ),
    "extract_r2d2_multi_rgbnir": Benchmark(
        _extract_benchmark("extract_r2d2_multi_rgbnir", _rgbnir_image, True, repeats=2)
    ),
    "mnn_4096": Benchmark(_mnn_benchmark("mnn_4096", 4096, repeats=7)),
    "mnn_8192": Benchmark(_mnn_benchmark("mnn_8192", 8192, repeats=5)),
    "eval_roadscene_val": Benchmark(bench_eval_roadscene_val),
    "study_overhead": Benchmark(bench_study_overhead, default=False, needs=("ray", "optuna")),
    "study_scale": Benchmark(bench_study_scale, default=False, needs=("ray", "optuna", "mlflow")),
    "backbones": Benchmark(bench_backbones, default=False),
}

# ----------------------------------------------------------------------------- report


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.3f} s"


def format_entry(name: str, e: dict[str, Any]) -> list[str]:
    """Printable lines of one result entry."""
    if "skipped" in e or "error" in e:
        return [
            f"{name:32s} {'SKIPPED' if 'skipped' in e else 'FAILED'}: {e.get('skipped') or e.get('error')}"
        ]
    mem = f"peak RSS {e['peak_rss_mb']:.0f} MB"
    if "peak_gpu_mb" in e:
        mem += f", peak GPU {e['peak_gpu_mb']:.0f} MB"
    cpu = f"  CPU time {_fmt_s(e['median_cpu_s'])}" if "median_cpu_s" in e else ""
    spread = f"[min {_fmt_s(e['min_s'])}, max {_fmt_s(e['max_s'])}]"
    lines = [
        f"{name:32s} median {_fmt_s(e['median_s'])}  {spread}  n={e.get('repeats', 1)}{cpu}  {mem}"
    ]
    if "ratio" in e:
        lines.append(
            f"{'':32s} same-run baseline {e['baseline']}: {_fmt_s(e['baseline_median_s'])}"
            f" -> ratio {e['ratio']:.3f}x (CPU-time ratio {e['cpu_ratio']:.3f}x)"
        )
    if name in REFERENCE_S:
        lo, hi, what = REFERENCE_S[name]
        ref = _fmt_s(lo) if lo == hi else f"{_fmt_s(lo)}-{_fmt_s(hi)}"
        span = (
            f"{e['median_s'] / lo:.3f}x"
            if lo == hi
            else f"{e['median_s'] / hi:.3f}x-{e['median_s'] / lo:.3f}x"
        )
        lines.append(
            f"{'':32s} REFERENCE FIGURE (other run, idle machine; not a same-run ratio): {what} {ref};"
            f" indicative {span}"
        )
    if name == "r2d2_s2_step":
        lines.append(
            f"{'':32s} REFERENCE FIGURE: official S2 step peak RSS {REFERENCE_R2D2_PEAK_RSS_MB:.0f} MB"
        )
    shown = (
        "per_pair_s",
        "extract_per_image_s",
        "startup_s",
        "fit_fixed_s",
        "per_trial_from_medians_s",
        "tuner",
    )
    for key in shown:
        if key in e:
            value = _fmt_s(e[key]) if isinstance(e[key], float) else e[key]
            lines.append(f"{'':32s} {key}: {value}")
    if "scale" in e:  # study_scale: one row per N, then how the overhead per trial moves with N
        lines += [_scale_row(r) for r in e["scale"]]
        n0, n1 = e["scale"][0]["trials"], e["scale"][-1]["trials"]
        ratios = [e["overhead_ratio_largest_vs_smallest"], e["steady_overhead_ratio_largest_vs_smallest"]]
        all_in, steady = (f"{x:.2f}x" if x is not None else "n/a" for x in ratios)
        lines.append(
            f"{'':32s} overhead/trial N={n1} vs N={n0}: {all_in} (steady {steady}); marginal per "
            "extra trial " + ", ".join(_fmt_s(m) for m in e["marginal_overhead_per_trial_s"])
        )
    if name in TARGETS:
        lines.append(f"{'':32s} target: {TARGETS[name]}")
    return lines


def _meta(device: torch.device, argv: list[str], load_start: tuple[float, ...]) -> dict[str, Any]:
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/run.py", *argv]),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_avg_start": [round(x, 2) for x in load_start],
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="s2study performance benchmarks (medians, same-run baselines, reference figures).",
        epilog="Default set: "
        + ", ".join(n for n, b in BENCHMARKS.items() if b.default)
        + ". Optional: "
        + ", ".join(n for n, b in BENCHMARKS.items() if not b.default)
        + ".",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=list(BENCHMARKS),
        help="run only these benchmarks (optional ones included)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        metavar="N",
        help="timed repeats of every benchmark (default: per benchmark)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of the networks and matching",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="precision of the batched S2 steps, as the trainer's `precision` (default auto: "
        "bf16 on CUDA and on CPUs with AMX, else fp32); the 3-pass baseline is always fp32",
    )
    p.add_argument(
        "--scale-trials",
        type=int,
        nargs="+",
        metavar="N",
        default=list(DEFAULT_SCALE_TRIALS),
        help="study_scale: the numbers of trials of its studies, one study each "
        f"(default: {' '.join(map(str, DEFAULT_SCALE_TRIALS))})",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's; 1 gives steadier CPU times on a loaded machine)",
    )
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if any(n < 1 for n in args.scale_trials):
        p.error("--scale-trials: every N must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or [n for n, b in BENCHMARKS.items() if b.default]
    load_start = os.getloadavg()
    ctx = Context(
        device=device,
        repeats=args.repeats,
        timer=Timer(device),
        precision=args.precision,
        scale_trials=tuple(args.scale_trials),
    )
    print(
        f"s2study benchmarks on {device} ({os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); load average {load_start[0]:.2f} {load_start[1]:.2f} "
        f"{load_start[2]:.2f}",
        flush=True,
    )
    if not ctx.timer.hwm_resettable:
        print("note: peak RSS is the process peak since start (VmHWM cannot be reset here)")
    results: dict[str, Any] = {}
    failed = False
    for name in names:
        bench = BENCHMARKS[name]
        missing = [m for m in bench.needs if not _importable(m)]
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        if missing:
            out: Result = {
                name: {
                    "skipped": f"needs {', '.join(missing)} (not installed here)",
                    "device": str(device),
                }
            }
        else:
            try:
                out = bench.run(ctx)
            except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
                traceback.print_exc()
                out = {
                    name: {
                        "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                        "device": str(device),
                    }
                }
                failed = True
        for key, entry in out.items():
            entry.setdefault("load_avg_1min", round(load, 2))
            results[key] = entry
            print("\n".join(format_entry(key, entry)), flush=True)
        print(f"{'':32s} ({time.perf_counter() - t0:.0f} s wall incl. set-up)", flush=True)
    results["_meta"] = _meta(device, argv, load_start)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print(f"results written to {args.json}")
    return 1 if failed else 0


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
