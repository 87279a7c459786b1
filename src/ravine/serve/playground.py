"""The landscape playground's numbers: contour grids and optimizer paths for the page.

Paths come from :func:`ravine.landscape.run_many`, one optimizer at a time, and are
cached by (function, spec, lr, steps, start): moving one learning-rate slider recomputes
one path, and the others are read back. Paths are thinned to at most
:data:`MAX_POINTS` points for drawing; the final point is always kept.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ravine import registry
from ravine.landscape import available_functions, get_function, run_many
from ravine.serve.runs import check_optimizer

__all__ = ["MAX_POINTS", "MAX_STEPS", "contour", "functions", "paths"]

MAX_STEPS = 5000
DEFAULT_MAX_STEPS = 300  # the playground's default: a few hundred steps redraw quickly
MAX_POINTS = 400
GRID = 120
_CACHE_SIZE = 256
_cache: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
_cache_lock = threading.Lock()


def functions() -> list[dict[str, Any]]:
    """The built-in test functions as the page lists them."""
    listing = []
    for name in available_functions():
        function = get_function(name)
        listing.append({
            "name": name,
            "formula": function.formula,
            "start": list(function.start),
            "window": list(function.window),
            "minima": [list(point) for point in function.minima],
            "steps": min(function.steps, DEFAULT_MAX_STEPS),
        })
    return listing


@functools.lru_cache(maxsize=32)
def contour(name: str) -> dict[str, Any]:
    """``log10(f - lowest + tiny)`` on a grid over the function's window, for a contour plot."""
    function = get_function(name)
    xs, ys, height = function.height_grid(GRID)
    positive = height[height > 0]
    floor = float(np.percentile(positive, 0.5)) if positive.size else 1.0
    levels = np.log10(np.maximum(height, floor))
    return {
        "name": function.name,
        "formula": function.formula,
        "x": xs.tolist(),
        "y": ys.tolist(),
        "z": np.round(levels, 4).tolist(),
        "window": list(function.window),
        "start": list(function.start),
        "minima": [list(point) for point in function.minima],
    }


def paths(
    function: str,
    optimizers: list[str],
    steps: int | None = None,
    start: list[float] | None = None,
) -> list[dict[str, Any]]:
    """One path per optimizer spec; raises ValueError naming the bad setting."""
    if not isinstance(function, str) or function.strip().lower() not in available_functions():
        raise ValueError(f"function: unknown function {function!r}; valid functions: {', '.join(available_functions())}")
    test_function = get_function(function)
    if steps is None:
        steps = min(test_function.steps, DEFAULT_MAX_STEPS)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    if start is not None:
        if len(start) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in start):
            raise ValueError(f"start: must be two finite numbers [x, y], got {start!r}")
        start = [float(start[0]), float(start[1])]
    else:
        start = list(test_function.start)
    if not optimizers:
        raise ValueError(f"optimizers: choose at least one of {', '.join(registry.available())}")
    for spec in optimizers:
        check_optimizer(spec)
    return [_path(test_function.name, spec, steps, tuple(start)) for spec in optimizers]


def _path(function: str, spec: str, steps: int, start: tuple[float, float]) -> dict[str, Any]:
    key = (function, spec, steps, start)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    path = run_many(function, [spec], starts=[start], steps=steps)[0]
    count = len(path.positions)
    keep = np.unique(np.round(np.linspace(0, count - 1, min(count, MAX_POINTS))).astype(int))
    final_loss = path.final_loss
    drawn = {
        "spec": spec,
        "label": path.label,
        "lr": path.lr,
        "steps": steps,
        "x": [float(v) for v in path.positions[keep, 0]],
        "y": [float(v) for v in path.positions[keep, 1]],
        "step": keep.tolist(),
        "loss": [float(v) if math.isfinite(v) else None for v in path.losses[keep]],
        "final_loss": final_loss if math.isfinite(final_loss) else None,
        "final_position": [v if math.isfinite(v) else None for v in path.final_position],
        "diverged_at": path.diverged_at,
        "divergence": path.divergence,
    }
    with _cache_lock:
        _cache[key] = drawn
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return drawn
