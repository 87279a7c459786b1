"""Fair comparisons: a learning-rate search per optimizer, then one path each.

A comparison of a tuned optimizer against an untuned one says nothing about the
optimizers, so :func:`compare` tunes all of them or none. The search runs every rate of
a log grid from the function's start point for the same step budget and keeps the
best by :func:`rank_key`: paths that end within ``tolerance`` of the minimum value are
tied on loss and ordered by fewest steps to reach it; the rest are ordered by final
loss; diverged paths come last.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ravine.landscape.functions import TestFunction, as_test_function
from ravine.landscape.paths import Path, as_optimizer_list, resolve_optimizer, run_many

__all__ = [
    "SEED_OPTIMIZERS",
    "Summary",
    "TuningResult",
    "compare",
    "learning_rate_grid",
    "rank_key",
    "summarize",
    "tune_learning_rate",
]

#: The optimizers the seed texts draw: SGD, momentum, Nesterov, Adagrad, RMSprop, Adam.
SEED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")

DEFAULT_TOLERANCE = 1e-6


def learning_rate_grid(low: float = 1e-5, high: float = 1.0, per_decade: int = 4) -> list[float]:
    """Log-spaced rates from ``low`` to ``high``, ``per_decade`` per factor of ten."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise ValueError(f"grid bounds must satisfy 0 < low < high, got low={low!r}, high={high!r}")
    if isinstance(per_decade, bool) or not isinstance(per_decade, int) or per_decade < 1:
        raise ValueError(f"per_decade must be an integer >= 1, got {per_decade!r}")
    count = round(math.log10(high / low) * per_decade) + 1
    return [float(f"{value:.6g}") for value in np.geomspace(low, high, count)]


def rank_key(path: Path, tolerance: float = DEFAULT_TOLERANCE) -> tuple[float, float, float]:
    """Sort key, smaller is better: solved by fewest steps, then lowest final loss, diverged last."""
    if path.diverged:
        return (2.0, math.inf, math.inf)
    if path.solved(tolerance):
        return (0.0, float(path.steps_to_tolerance(tolerance)), path.final_loss)
    loss = path.final_loss
    return (1.0, loss if math.isfinite(loss) else math.inf, 0.0)


@dataclass(frozen=True)
class TuningResult:
    """The grid's paths (one per rate, grid order) and the best of them."""

    optimizer: str
    tolerance: float
    paths: tuple[Path, ...]
    best: Path

    @property
    def best_lr(self) -> float:
        return self.best.lr


def tune_learning_rate(
    function: str | TestFunction | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: Any,
    *,
    steps: int | None = None,
    grid: Sequence[float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    start: Sequence[float] | None = None,
    seed: int = 0,
    batched: bool | None = None,
) -> TuningResult:
    """Run ``optimizer`` at every rate of ``grid`` (default :func:`learning_rate_grid`) and pick the best."""
    _check_tolerance(tolerance)
    grid = learning_rate_grid() if grid is None else list(grid)
    paths = run_many(
        function, [optimizer], starts=None if start is None else [start], lrs=grid,
        steps=steps, batched=batched, seed=seed,
    )
    best = min(paths, key=lambda path: rank_key(path, tolerance))
    return TuningResult(paths[0].optimizer, tolerance, tuple(paths), best)


def compare(
    function: str | TestFunction | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizers: Sequence[Any] = SEED_OPTIMIZERS,
    *,
    steps: int | None = None,
    tune: bool = False,
    grid: Sequence[float] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    start: Sequence[float] | None = None,
    seed: int = 0,
    batched: bool | None = None,
) -> list[Path]:
    """One path per optimizer, at its own learning rate or, with ``tune``, its best on ``grid``."""
    _check_tolerance(tolerance)
    test_function = as_test_function(function, start)
    optimizers = as_optimizer_list(optimizers)
    if not optimizers:
        raise ValueError("optimizers must name at least one optimizer")
    if not tune:
        return run_many(
            test_function, list(optimizers), starts=None if start is None else [start],
            steps=steps, batched=batched, seed=seed,
        )
    return [
        tune_learning_rate(
            test_function, resolve_optimizer(optimizer), steps=steps, grid=grid,
            tolerance=tolerance, start=start, seed=seed, batched=batched,
        ).best
        for optimizer in optimizers
    ]


@dataclass(frozen=True)
class Summary:
    """One row of the comparison table."""

    optimizer: str
    lr: float
    final_loss: float
    steps_to_tolerance: int | None
    diverged: bool
    diverged_at: int | None
    final_position: tuple[float, float]


def summarize(paths: Sequence[Path], tolerance: float = DEFAULT_TOLERANCE) -> list[Summary]:
    """Final loss, steps to ``tolerance`` and divergence for each path."""
    _check_tolerance(tolerance)
    return [
        Summary(
            optimizer=path.optimizer,
            lr=path.lr,
            final_loss=path.final_loss,
            steps_to_tolerance=path.steps_to_tolerance(tolerance),
            diverged=path.diverged,
            diverged_at=path.diverged_at,
            final_position=path.final_position,
        )
        for path in paths
    ]


def _check_tolerance(tolerance: float) -> None:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
        math.isfinite(tolerance) and tolerance > 0
    ):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
