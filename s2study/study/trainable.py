"""The Ray Tune function trainable: one trial = one call of :func:`s2study.train.train`.

The trial overlays its sampled values (dotted keys) on the study's base config, validates
the result as a TrainConfig, opens (or reopens) its MLflow child run, and trains. After each
epoch the report hook logs the metrics to MLflow (``step`` = epoch; the best checkpoint on
improvement) and hands them to Tune with a checkpoint folder, which Tune copies into the
study's storage: ``checkpoint.pt`` (the epoch's full training state) and ``best.pt`` (the
trial's best weights so far by the study metric, without optimiser state). ASHA stops a
trial by raising ``SystemExit`` inside ``tune.report``; the ``finally`` block ends the
MLflow run with the matching status either way.

A restarted trial (``max_failures``, or ``s2study run --resume``) continues from the last
checkpoint Tune stored, with its best weights so far; its MLflow run id comes back from that
checkpoint's ``extra``.

Inside the trial the process is held to the trial's share (:func:`apply_share`): torch's and
OpenCV's thread pools to ``resources.cpu`` threads, CUDA memory to the ``resources.gpu`` share
less the CUDA context; the DataLoader workers follow from the device and the threads
(:func:`s2study.train.loader_workers`). The run gets tags naming the device, GPU, torch and
CUDA build, and MLflow's ``system/*`` metrics every ``system_metrics.interval_s`` seconds.

A trial that reserved a GPU but finds no CUDA (no driver on its node, a CPU-only torch,
``CUDA_VISIBLE_DEVICES`` hiding the GPU) fails at once, with a diagnosis as its MLflow
failure reason, instead of training on the CPU under a GPU reservation. It ends the trial
without raising: an exception would make Tune retry the trial ``max_failures`` times, and
a node's missing GPU is not a transient fault (the driver reads the failure back from MLflow,
see :func:`s2study.study.runner.summarize`). A trial that meets a user error
(:class:`~s2study.errors.S2StudyError`: data or weights that cannot be resolved on its node, an
unreadable file) ends the same way, once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2study.config.load import config_to_dict, flatten, train_config_from_dict
from s2study.errors import EnvironmentProblem, S2StudyError
from s2study.study import tracking
from s2study.study.space import overlay

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
#: GPU memory kept out of a fractional trial's allocator cap for the CUDA context (driver
#: state, kernels of cuDNN/cuBLAS, their handles), which the caching allocator does not see
CUDA_CONTEXT_MIB = 1024
CUDA_CONTEXT_ENV = "S2STUDY_CUDA_CONTEXT_MIB"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a study shares (small; passed through ``tune.with_parameters``).

    Attributes:
        base: the study's base TrainConfig as a nested mapping.
        tracking_uri / experiment_id / parent_run_id: where trial runs go.
        metric / mode: the study metric.
        gpu_fraction: the trial's GPU share; below 1 it caps CUDA memory to that share.
        system_metrics_s: MLflow system-metrics sampling interval in seconds (0: off).
        also: a multi-objective study's other metrics (logged at the best epoch, ``at_best/...``).
    """

    base: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    gpu_fraction: float = 0.0
    system_metrics_s: float = 15.0
    also: tuple[str, ...] = ()


def trial_config(base: dict[str, Any], sampled: dict[str, Any], name: str):
    """The TrainConfig of a trial: ``sampled`` dotted values over ``base``, validated."""
    return train_config_from_dict(overlay(base, sampled), source=f"trial {name}")


def run_repeat(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune function trainable of a repeat: ``config["repeat"]`` holds the configuration
    (``config``, with its seed) and the search trial it repeats (``of``)."""
    repeat = config["repeat"]
    run_trial(repeat["config"], settings, run_tags={tracking.TAG_REPEAT_OF: repeat["of"]})


def run_trial(config: dict[str, Any], settings: TrialSettings, run_tags: dict[str, str] | None = None) -> None:
    """Tune function trainable (see the module docstring); ``run_tags`` go on a new run."""
    from ray import tune

    from s2study.train import loader_workers, resolve_device, train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(settings.base, config, trial_name)
    cpu, gpu = assigned_share(gpu=settings.gpu_fraction)
    threads = limit_cpu_threads(cpu)
    device, fraction = None, None
    problem = cuda_problem(gpu, cfg.device)
    if problem is None:
        try:
            device = resolve_device(cfg.device)
            fraction = limit_gpu_memory(gpu) if device.type == "cuda" else None
        except EnvironmentProblem as exc:
            device, problem = None, str(exc)
        if gpu > 0 and device is not None and device.type != "cuda":
            log.warning("%s trains on the CPU (device: cpu) under a GPU reservation (resources.gpu: %g)",
                        trial_name, gpu)
    with tempfile.TemporaryDirectory(prefix="s2study-trial-") as tmp:
        work = Path(tmp)
        resume_from, run_id = _restore(tune.get_checkpoint(), work)
        run = tracking.TrialRun.open(
            settings.tracking_uri, settings.experiment_id, settings.parent_run_id, trial_id, trial_name,
            params=flatten(config_to_dict(cfg)), metric=settings.metric, mode=settings.mode, run_id=run_id,
            tags=run_tags,
        )
        run.also = settings.also
        # epochs of the checkpoint that never reached MLflow (queued when a head died with its server)
        if resume_from is not None and run.backfill(_history(resume_from)) and (work / BEST_FILE).is_file():
            run.log_artifact(work / BEST_FILE, "checkpoints")
        tags = {"s2study.sampled": json.dumps(config, sort_keys=True), **device_tags(device),
                "s2study.cpu_threads": threads}
        if device is not None:
            tags["s2study.num_workers"] = loader_workers(cfg.num_workers, device)
        if fraction is not None:
            tags["s2study.gpu_memory_fraction"] = f"{fraction:.4f}"
        tracking.set_tags(settings.tracking_uri, run.run_id, tags)
        if problem is not None:
            # Ended here, not raised: Tune retries a raising trial max_failures times, and a
            # node without a usable GPU stays so. Tune sees a trial without results; the
            # study's summary reads the failure back from this run.
            log.error("%s failed: %s", trial_name, problem)
            run.finish("failed", problem)
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per trial
        monitor = (tracking.start_system_metrics(settings.tracking_uri, run.run_id, settings.system_metrics_s)
                   if settings.system_metrics_s > 0 else None)
        hook = _Reporter(run, work, settings.metric, settings.mode)
        status, reason, stopped = "failed", None, False
        try:
            train(cfg, out_dir=work / "train", report=hook, resume_from=resume_from,
                  extra={"mlflow_run_id": run.run_id}, progress=False)
            status = "finished"
        except SystemExit:
            status, stopped = ("finished" if hook.last_epoch >= cfg.epochs else "stopped_early"), True
            raise
        except KeyboardInterrupt:
            status = "killed"
            raise
        except S2StudyError as exc:
            # a user error (data or weights that cannot be had on this node, a broken file):
            # ended like the missing GPU above, since a retry would meet it again
            reason = f"{type(exc).__name__}: {exc}"
            log.error("%s failed: %s", trial_name, exc)
            return
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if monitor is not None:
                monitor.finish()  # its last samples reach the run before it ends
            # stopped by Tune: end at once, the run's queue drains behind (Tune reuses the actor
            # only if this thread ends within TUNE_FUNCTION_THREAD_TIMEOUT_S, 2 s)
            run.finish(status, reason, wait=not stopped)
            _free_gpu_memory()


class _Reporter:
    """``train``'s report hook: MLflow first (so an ASHA stop loses nothing), then Tune.

    It keeps the trial's best weights in ``work/best.pt`` (restored with the trial) and puts
    them in every Tune checkpoint next to the epoch's state.
    """

    def __init__(self, run: tracking.TrialRun, work: Path, metric: str, mode: str) -> None:
        self.run, self.work, self.metric, self.mode = run, work, metric, mode
        self.best_path = work / BEST_FILE
        self.best = _metric_of(self.best_path, metric)
        self.last_epoch = 0

    def __call__(self, metrics: dict[str, float], checkpoint: Path) -> None:
        from ray import tune

        epoch = int(metrics["epoch"])
        self.last_epoch = epoch
        if tracking.improves(metrics.get(self.metric), self.best, self.mode):
            self.best = float(metrics[self.metric])
            _save_weights_only(checkpoint, self.best_path)
        if self.run.log_epoch(metrics, epoch):
            self.run.log_artifact(self.best_path, "checkpoints")
        with tempfile.TemporaryDirectory(dir=self.work) as d:
            shutil.copy2(checkpoint, Path(d) / CHECKPOINT_FILE)
            if self.best_path.is_file():
                shutil.copy2(self.best_path, Path(d) / BEST_FILE)
            tune.report({**metrics, tracking.RESULT_RUN_ID: self.run.run_id},
                        checkpoint=tune.Checkpoint.from_directory(d))


def _save_weights_only(checkpoint: Path, dst: Path) -> None:
    """``checkpoint`` without its optimiser state, written to ``dst``."""
    from s2study.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    state.pop("optimizer", None)
    save_checkpoint(dst, state)


def _metric_of(path: Path, metric: str) -> float | None:
    """The study metric recorded in checkpoint ``path`` (None where there is no such file)."""
    if not path.is_file():
        return None
    from s2study.checkpoint import load_checkpoint

    value = (load_checkpoint(path).get("metrics") or {}).get(metric)
    return float(value) if value is not None else None


def _restore(checkpoint: Any, work: Path) -> tuple[Path | None, str | None]:
    """The Tune checkpoint as a local file to resume from (its best weights into ``work``),
    and the MLflow run id it carries."""
    if checkpoint is None:
        return None, None
    from s2study.checkpoint import load_checkpoint

    dst = work / "resume.pt"
    with checkpoint.as_directory() as d:
        shutil.copy2(Path(d) / CHECKPOINT_FILE, dst)
        if (Path(d) / BEST_FILE).is_file():
            shutil.copy2(Path(d) / BEST_FILE, work / BEST_FILE)
    extra = load_checkpoint(dst).get("extra") or {}
    return dst, extra.get("mlflow_run_id")


def _history(checkpoint: Path) -> list[dict[str, float]]:
    """The per-epoch metrics a training checkpoint carries."""
    from s2study.checkpoint import load_checkpoint

    return list(load_checkpoint(checkpoint).get("history") or [])


def _free_gpu_memory() -> None:
    # with reuse_actors the next trial runs in this process
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the trial's share


def assigned_share(cpu: float = 1.0, gpu: float = 0.0) -> tuple[float, float]:
    """The CPUs and GPU share Ray assigned to this trial or task (the defaults outside Ray)."""
    try:
        import ray

        assigned = ray.get_runtime_context().get_assigned_resources() if ray.is_initialized() else {}
    except Exception:  # noqa: BLE001 - outside a Ray worker there is nothing to read
        assigned = {}
    return float(assigned.get("CPU", cpu)), float(assigned.get("GPU", gpu))


def apply_share(cpu: float, gpu: float) -> float | None:
    """Hold this process to ``cpu`` threads and a ``gpu`` share of the GPU's memory (trials and
    the post-study evaluation tasks); returns the allocator's memory fraction (None: no cap)."""
    limit_cpu_threads(cpu)
    return limit_gpu_memory(gpu)


def limit_cpu_threads(cpu: float) -> int:
    """torch's intra-op pool and OpenCV's pool at ``cpu`` threads (at least 1); returns it.

    Ray sets ``OMP_NUM_THREADS`` for its workers, but OpenCV keeps a pool as large as the
    machine, and a reused actor or a custom environment can leave torch with another size.
    """
    import cv2
    import torch

    n = max(1, int(cpu))
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    return n


def context_reserve_bytes() -> int:
    """GPU memory kept for the CUDA context: ``$S2STUDY_CUDA_CONTEXT_MIB`` or 1024 MiB."""
    raw = os.environ.get(CUDA_CONTEXT_ENV, "")
    try:
        mib = float(raw) if raw.strip() else CUDA_CONTEXT_MIB
    except ValueError:
        raise EnvironmentProblem(f"{CUDA_CONTEXT_ENV}: {raw!r} is not a number of MiB") from None
    return int(max(mib, 0.0) * 2**20)


def gpu_memory_fraction(share: float, total_bytes: int, context_bytes: int) -> float:
    """The allocator cap (a fraction of the GPU's memory) for a ``share`` of the GPU:
    ``context + cap * total <= share * total``."""
    return share - context_bytes / total_bytes


def limit_gpu_memory(share: float) -> float | None:
    """Cap torch's CUDA allocator so this process stays within ``share`` of the GPU's memory.

    Ray shares a GPU between fractional trials but does not split its memory. The CUDA
    context lives outside torch's allocator, so the cap leaves :func:`context_reserve_bytes`
    of the share to it. Nothing happens for a whole GPU, no share, or no CUDA.

    Returns:
        The fraction passed to ``torch.cuda.set_per_process_memory_fraction`` (or None).

    Raises:
        EnvironmentProblem: the share is not larger than the context reserve.
    """
    import torch

    if not (0 < share < 1 and torch.cuda.is_available()):
        return None
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    context = context_reserve_bytes()
    fraction = gpu_memory_fraction(share, total, context)
    if fraction <= 0:
        raise EnvironmentProblem(
            f"resources.gpu: {share:g} of this {total / 2**30:.1f} GiB GPU is {share * total / 2**30:.2f} GiB, "
            f"no more than the {context / 2**20:.0f} MiB kept for the CUDA context ({CUDA_CONTEXT_ENV}); "
            "raise resources.gpu")
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


# --------------------------------------------------------------------------- device state


def device_tags(device: Any | None) -> dict[str, str]:
    """MLflow tags of the device a trial trains on (``device`` None: none could be used)."""
    import torch

    cuda = device is not None and device.type == "cuda"
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
        name, gpu = f"cuda:{index}", torch.cuda.get_device_name(index)
    else:
        name, gpu = (str(device) if device is not None else "none"), "none"
    return {
        "s2study.device": name,
        "s2study.gpu_name": gpu,
        "s2study.torch": torch.__version__,
        "s2study.cuda": torch.version.cuda or "none",
        "s2study.cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
    }


def cuda_problem(gpu: float, device: str) -> str | None:
    """Why a trial that reserved ``gpu`` (> 0) of a GPU cannot use it, or None when it can
    (or needs none: no reservation, or ``device: cpu`` asked for explicitly)."""
    import torch

    if gpu <= 0 or device == "cpu" or torch.cuda.is_available():
        return None
    return (f"resources.gpu: {gpu:g} is reserved for this trial (device: {device}) but it sees no CUDA GPU: "
            f"{cuda_diagnosis()}. Fix the node's NVIDIA driver or install a CUDA build of torch, or set "
            "resources.gpu: 0 to train on the CPU; not retried")


def cuda_diagnosis() -> str:
    """What torch, the environment and the NVIDIA driver say about CUDA here (one line)."""
    import torch

    available, count = torch.cuda.is_available(), torch.cuda.device_count()
    parts = [f"torch.cuda.is_available() is {available}, torch.cuda.device_count() is {count}"]
    if torch.version.cuda is None:
        parts.append(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    else:
        parts.append(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}")
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - its message is the diagnosis
            parts.append(f"CUDA initialisation: {_first_line(exc)}")
    parts += [_visible_devices(), _driver_state(), f"node {socket.gethostname()}"]
    return "; ".join(parts)


def _visible_devices() -> str:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        import ray

        ids = [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:  # noqa: BLE001
        ids = []
    by_ray = f"Ray assigned GPU ids {','.join(ids)}" if ids else "Ray assigned no GPU id"
    if env is None:
        return f"CUDA_VISIBLE_DEVICES is not set ({by_ray})"
    if not env.strip():
        return f"CUDA_VISIBLE_DEVICES is empty, which hides every GPU ({by_ray})"
    if ids and env.split(",") == ids:
        return f"CUDA_VISIBLE_DEVICES={env} (set by Ray to the trial's GPU ids)"
    return f"CUDA_VISIBLE_DEVICES={env} ({by_ray})"


def _driver_state() -> str:
    module = ("the NVIDIA kernel module is loaded" if Path("/proc/driver/nvidia/version").is_file()
              else "no NVIDIA kernel module is loaded (no /proc/driver/nvidia/version)")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return f"NVIDIA driver: nvidia-smi is absent (not on PATH), {module}"
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"NVIDIA driver: nvidia-smi did not answer ({_first_line(exc)}), {module}"
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    if out.returncode != 0:
        return f"NVIDIA driver: nvidia-smi exits {out.returncode} ({lines[0] if lines else 'no output'}), {module}"
    return f"NVIDIA driver: nvidia-smi lists {' | '.join(lines) or 'no GPU'}, {module}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
