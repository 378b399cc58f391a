"""Study budgets: stop a study cleanly (and resumably) once its wall time or GPU hours are spent.

``budget: {wall: 8h, gpu_hours: 40}`` in a study file. Wall time is the time the study spends
in Tune's fit, summed over every attempt (``--resume`` continues the count, kept in the
study's state file); GPU hours are the trials' training time times their GPU share
(``resources.gpu``), summed over every reported epoch. When either is spent, :class:`BudgetWatch`
stops the study as Ctrl-C does (Tune saves its state; ``--resume`` goes on, with a larger
budget given by ``--set budget.wall=...``).
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass
from typing import Any

_DURATION = re.compile(r"^(?:(?P<d>\d+(?:\.\d+)?)d)?(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?"
                       r"(?:(?P<s>\d+(?:\.\d+)?)s)?$")
_UNIT_S = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: Any) -> float:
    """Seconds in ``8h``, ``90m``, ``1h30m``, ``3600s``, ``2d`` or a number of seconds.

    Raises:
        ValueError: naming the value and the forms allowed.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text).strip().lower().replace(" ", ""))
        if not match or not any(match.groupdict().values()):
            raise ValueError(f"{text!r} cannot be parsed as a duration; use e.g. 90m, 8h, 1h30m, 2d or 3600s")
        seconds = sum(float(v) * _UNIT_S[k] for k, v in match.groupdict().items() if v)
    if not seconds > 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def format_duration(seconds: float) -> str:
    """``42 s``, ``12.5 min`` or ``8.00 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


@dataclass
class Spent:
    """What a study has spent so far (over every attempt)."""

    wall_s: float = 0.0
    gpu_s: float = 0.0

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Spent:
        stored = (state or {}).get("budget_spent") or {}
        return cls(float(stored.get("wall_s", 0.0)), float(stored.get("gpu_s", 0.0)))

    def as_state(self) -> dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "gpu_s": round(self.gpu_s, 3)}

    def as_metrics(self) -> dict[str, float]:
        return {"budget/wall_hours_spent": self.wall_s / 3600, "budget/gpu_hours_spent": self.gpu_s / 3600}


def _tune_callback_class() -> type:
    from ray.tune import Callback

    return Callback


class BudgetWatch(_tune_callback_class()):
    """A Tune callback that stops the study (as Ctrl-C does) once a budget is spent.

    Args:
        wall_s / gpu_s: the budgets in seconds (None: no limit).
        gpu_share: ``resources.gpu``, for trials that do not say what they asked for.
        spent: what earlier attempts spent (updated as this one goes).
    """

    def __init__(self, wall_s: float | None, gpu_s: float | None, gpu_share: float, spent: Spent) -> None:
        self.wall_s, self.gpu_s, self.gpu_share, self.spent = wall_s, gpu_s, gpu_share, spent
        self.reason: str | None = None  # set when a budget stopped the study
        self._since: float | None = None

    @property
    def active(self) -> bool:
        return self.wall_s is not None or self.gpu_s is not None

    def start(self) -> None:
        self._since = time.monotonic()

    def stop(self) -> None:
        """Add this attempt's wall time to :attr:`spent` (idempotent)."""
        if self._since is not None:
            self.spent.wall_s += time.monotonic() - self._since
            self._since = None

    def wall_now(self) -> float:
        return self.spent.wall_s + (time.monotonic() - self._since if self._since is not None else 0.0)

    def exhausted(self) -> str | None:
        """Which budget is spent, as a sentence (None: neither)."""
        if self.wall_s is not None and self.wall_now() >= self.wall_s:
            return f"wall budget of {format_duration(self.wall_s)} spent ({format_duration(self.wall_now())})"
        if self.gpu_s is not None and self.spent.gpu_s >= self.gpu_s:
            return (f"GPU budget of {self.gpu_s / 3600:g} GPU hours spent "
                    f"({self.spent.gpu_s / 3600:.2f} GPU hours)")
        return None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.spent.gpu_s += float(result.get("time_this_iter_s") or 0.0) * trial_gpu(trial, self.gpu_share)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.reason is not None or not self.active:
            return
        self.reason = self.exhausted()
        if self.reason is not None:
            interrupt_fit()


def trial_gpu(trial: Any, default: float) -> float:
    """The GPU share a Tune trial asked for (its own under ``resources_when``), else ``default``."""
    try:
        return float(trial.placement_group_factory.required_resources.get("GPU", 0.0))
    except AttributeError:  # another Tune layout
        return default


def interrupt_fit(otherwise: BaseException | None = None) -> None:
    """Stop Tune's fit as Ctrl-C does (its SIGINT handler: stop the trials, save the state,
    return); called from the main thread. Outside a fit, raise ``otherwise`` (default
    KeyboardInterrupt)."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, None)
        return
    raise otherwise or KeyboardInterrupt()
