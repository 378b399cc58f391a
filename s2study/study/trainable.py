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
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s2study.config.load import config_to_dict, flatten, train_config_from_dict
from s2study.study import tracking
from s2study.study.space import overlay

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a study shares (small; passed through ``tune.with_parameters``).

    Attributes:
        base: the study's base TrainConfig as a nested mapping.
        tracking_uri / experiment_id / parent_run_id: where trial runs go.
        metric / mode: the study metric.
        gpu_fraction: the trial's GPU share; below 1 it caps CUDA memory to that share.
    """

    base: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    mode: str
    gpu_fraction: float = 0.0


def trial_config(base: dict[str, Any], sampled: dict[str, Any], name: str):
    """The TrainConfig of a trial: ``sampled`` dotted values over ``base``, validated."""
    return train_config_from_dict(overlay(base, sampled), source=f"trial {name}")


def run_trial(config: dict[str, Any], settings: TrialSettings) -> None:
    """Tune function trainable (see the module docstring)."""
    from ray import tune

    from s2study.train import train

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per epoch
    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(settings.base, config, trial_name)
    _limit_gpu_memory(settings.gpu_fraction)
    with tempfile.TemporaryDirectory(prefix="s2study-trial-") as tmp:
        work = Path(tmp)
        resume_from, run_id = _restore(tune.get_checkpoint(), work)
        run = tracking.TrialRun.open(
            settings.tracking_uri, settings.experiment_id, settings.parent_run_id, trial_id, trial_name,
            params=flatten(config_to_dict(cfg)), metric=settings.metric, mode=settings.mode, run_id=run_id,
        )
        tracking.set_tags(settings.tracking_uri, run.run_id, {"s2study.sampled": json.dumps(config, sort_keys=True)})
        hook = _Reporter(run, work, settings.metric, settings.mode)
        status, reason = "failed", None
        try:
            train(cfg, out_dir=work / "train", report=hook, resume_from=resume_from,
                  extra={"mlflow_run_id": run.run_id}, progress=False)
            status = "finished"
        except SystemExit:
            status = "finished" if hook.last_epoch >= cfg.epochs else "stopped_early"
            raise
        except KeyboardInterrupt:
            status = "killed"
            raise
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            run.finish(status, reason)
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
            tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(d))


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


def _limit_gpu_memory(fraction: float) -> None:
    # Ray shares a GPU between fractional trials but does not split its memory
    import torch

    if 0 < fraction < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)


def _free_gpu_memory() -> None:
    # with reuse_actors the next trial runs in this process
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
