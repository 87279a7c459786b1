"""Run records, the statistics over seeds, and results.csv / results.json.

A *row* is one run: the :class:`~ravine.arena.train.RunResult` fields plus where the
run sits in the sweep (``phase``: ``"search"`` for a learning-rate trial, ``"seed"`` for
a re-run of the best setting, ``"default"`` for the defaults mode) and the derived
``steps_to_target`` / ``seconds_to_target``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CSV_COLUMNS",
    "Interval",
    "Summary",
    "confidence_interval",
    "smoothed_losses",
    "steps_to_target",
    "summarize",
    "t_critical_95",
    "write_csv",
    "write_json",
]

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T_95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_T_95_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))


def t_critical_95(degrees_of_freedom: int) -> float:
    """Two-sided 95% quantile of Student's t (table values; 1.960 beyond 120)."""
    if not isinstance(degrees_of_freedom, int) or degrees_of_freedom < 1:
        raise ValueError(f"degrees_of_freedom must be an integer >= 1, got {degrees_of_freedom!r}")
    if degrees_of_freedom <= len(_T_95):
        return _T_95[degrees_of_freedom - 1]
    for limit, value in _T_95_LARGE:
        if degrees_of_freedom <= limit:
            return value  # conservative: the value at the next tabulated df below
    return 1.960


@dataclass(frozen=True)
class Interval:
    """``mean ± half_width`` over ``n`` values (half_width is NaN when n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "—"
        mean = self.mean * scale
        if not math.isfinite(self.half_width):
            return f"{mean:.{digits}g} (n={self.n})"
        return f"{mean:.{digits}g} ± {self.half_width * scale:.2g}"


def confidence_interval(values: Iterable[float]) -> Interval:
    r"""Mean and 95% interval half-width of the mean, Student's t:

    .. math:: \bar x \pm t_{0.975,\,n-1} \, s / \sqrt{n}

    with ``s`` the sample standard deviation. Non-finite values are dropped.
    """
    finite = [float(value) for value in values if value is not None and math.isfinite(value)]
    if not finite:
        return Interval(math.nan, math.nan, 0)
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return Interval(mean, math.nan, len(finite))
    spread = statistics.stdev(finite)
    return Interval(mean, t_critical_95(len(finite) - 1) * spread / math.sqrt(len(finite)), len(finite))


def smoothing_window(steps: int, steps_per_epoch: int) -> int:
    """Steps averaged for "the train loss now": one epoch, or a tenth of a shorter run."""
    return max(1, min(steps_per_epoch, math.ceil(0.1 * steps)))


def smoothed_losses(losses: Sequence[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (over all steps so far for the first ones)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    smoothed, total = [], 0.0
    for index, value in enumerate(losses):
        total += value
        if index >= window:
            total -= losses[index - window]
        smoothed.append(total / min(index + 1, window))
    return smoothed


def steps_to_target(row: dict[str, Any], target: float) -> int | None:
    """First step at which the trailing-mean train loss is at or below ``target``."""
    losses = row["train_loss"]
    if not losses or not math.isfinite(target):
        return None
    window = smoothing_window(row["steps_planned"], row["steps_per_epoch"])
    for index, value in enumerate(smoothed_losses(losses, window)):
        if math.isfinite(value) and value <= target and index + 1 >= min(window, len(losses)):
            return index + 1
    return None


@dataclass(frozen=True)
class Summary:
    """One optimizer in one mode ("tuned" or "default"), aggregated over its seeds."""

    optimizer: str
    mode: str
    spec: str
    lr: float
    lr_at_grid_edge: bool
    runs: int
    diverged: int
    final_train_loss: Interval
    test_loss: Interval
    test_metric: Interval
    steps_to_target: float | None
    seconds_to_target: float | None
    reached_target: int
    time_per_step_s: float
    optimizer_step_time_s: float
    state_bytes: int
    peak_memory_bytes: int


def summarize(
    rows: Sequence[dict[str, Any]], target: float, edges: dict[str, bool] | None = None
) -> list[Summary]:
    """Aggregate the "seed" rows (mode tuned) and "default" rows per optimizer spec."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        mode = {"seed": "tuned", "default": "default"}.get(row["phase"])
        if mode is not None:
            groups.setdefault((mode, row["label"]), []).append(row)
    summaries = []
    for (mode, label), members in groups.items():
        ok = [row for row in members if row["status"] == "ok"]
        reached = [row for row in ok if row.get("steps_to_target") is not None]
        summaries.append(
            Summary(
                optimizer=label,
                mode=mode,
                spec=members[0]["spec"],
                lr=members[0]["lr"],
                lr_at_grid_edge=bool(edges and edges.get(label)) and mode == "tuned",
                runs=len(members),
                diverged=len(members) - len(ok),
                final_train_loss=confidence_interval(row["final_train_loss"] for row in ok),
                test_loss=confidence_interval(row["final_test_loss"] for row in ok),
                test_metric=confidence_interval(row["final_test_metric"] for row in ok),
                steps_to_target=_mean_or_none(row["steps_to_target"] for row in reached),
                seconds_to_target=_mean_or_none(row["seconds_to_target"] for row in reached),
                reached_target=len(reached),
                time_per_step_s=_median(row["time_per_step_s"] for row in members),
                optimizer_step_time_s=_median(row["optimizer_step_time_s"] for row in members),
                state_bytes=max(row["state_bytes"] for row in members),
                peak_memory_bytes=int(_median(row["peak_memory_bytes"] for row in members)),
            )
        )
    return summaries


def _mean_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def _median(values: Iterable[float]) -> float:
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return statistics.median(finite) if finite else math.nan


# Scalar columns of results.csv, in order; results.json holds these and the curves.
CSV_COLUMNS = (
    "task", "label", "phase", "optimizer", "spec", "lr", "seed", "status", "batch_size",
    "schedule", "clip_norm", "steps_planned", "steps", "steps_per_epoch", "diverged_at_step",
    "initial_loss", "final_train_loss", "final_test_loss", "final_test_metric", "metric_name",
    "higher_is_better", "target_loss", "steps_to_target", "seconds_to_target", "wall_time_s",
    "train_time_s", "time_per_step_s", "optimizer_step_time_s", "state_bytes",
    "parameter_count", "parameter_bytes", "peak_memory_bytes", "peak_memory_method",
    "torch_threads", "trial", "study", "hyperparameters",
)


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One line per run with the scalar columns (hyperparameters as a JSON string)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            line = {key: row.get(key) for key in CSV_COLUMNS}
            line["hyperparameters"] = json.dumps(row.get("hyperparameters", {}), sort_keys=True)
            writer.writerow({key: "" if value is None else value for key, value in line.items()})
    return path


def write_json(rows: Sequence[dict[str, Any]], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """``{"meta": {...}, "runs": [row, ...]}``; NaN and infinity are written as null."""
    path = Path(path)
    document = {"meta": _finite(meta or {}), "runs": [_finite(row) for row in rows]}
    path.write_text(json.dumps(document, indent=1, allow_nan=False))
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
