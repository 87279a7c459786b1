"""Pictures of paths: contour plot, loss against step, and a GIF of the paths growing.

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state), sized for a
slide or a README at ``dpi=100``. Each path keeps one colour across all pictures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib import animation
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ravine.landscape.functions import TestFunction, as_test_function
from ravine.landscape.paths import Path

__all__ = [
    "animate_paths", "default_title", "marker_steps", "path_colors", "plot_contour", "plot_loss",
]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf",
           "#e377c2", "#8c564b", "#bcbd22", "#7f7f7f"]
FIGSIZE = (9.6, 5.4)  # 16:9, reads on a slide and at README width


def path_colors(count: int) -> list[str]:
    """``count`` distinct colours, cycling after ten."""
    return [_COLORS[i % len(_COLORS)] for i in range(count)]


def marker_steps(length: int, count: int = 16) -> np.ndarray:
    """Step indices for markers, dense early and thinning out geometrically later."""
    if length <= 1:
        return np.zeros(min(length, 1), dtype=int)
    spaced = np.unique(np.round(np.geomspace(1, length - 1, count)).astype(int))
    return np.concatenate([[0], spaced])


def plot_contour(
    function: str | TestFunction,
    paths: Sequence[Path],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    levels: int = 24,
    resolution: int = 300,
    legend: bool = True,
) -> Figure:
    """Log-spaced contours of ``function`` over its window with every path drawn on top.

    Markers on each path sit at geometrically spaced steps, so they crowd where the
    path starts and thin out as steps grow; a cross marks where a path diverged.
    """
    function = as_test_function(function)
    figure, ax = _figure_and_axes(ax)
    _draw_contours(ax, function, levels, resolution)
    colors = path_colors(len(paths))
    for path, color in zip(paths, colors):
        points = path.positions[np.isfinite(path.positions).all(axis=1)]
        label = path.label + (f", diverged at step {path.diverged_at}" if path.diverged else "")
        ax.plot(points[:, 0], points[:, 1], color=color, lw=1.6, alpha=0.9, label=label, zorder=3)
        marks = marker_steps(len(points))
        ax.plot(points[marks, 0], points[marks, 1], "o", color=color, ms=3.5,
                markeredgecolor="white", markeredgewidth=0.4, zorder=4)
        if path.diverged and len(points):
            inside = _inside(points, function.window)
            last = points[inside][-1] if inside.any() else points[0]
            ax.plot(*last, "X", color=color, ms=10, markeredgecolor="black", zorder=5)
    _draw_landmarks(ax, function, paths)
    ax.set_title(title if title is not None else default_title(function, paths), fontsize=11)
    if legend:
        _legend_outside(ax, figure)
    return figure


def plot_loss(
    function: str | TestFunction,
    paths: Sequence[Path],
    *,
    ax: Axes | None = None,
    title: str | None = None,
    tolerance: float | None = None,
    legend: bool = True,
) -> Figure:
    """Loss (minus the minimum value, when known) against step on a log axis, one line per path."""
    function = as_test_function(function)
    figure, ax = _figure_and_axes(ax)
    minimum = function.minimum_value
    colors = path_colors(len(paths))
    values = [path.losses - minimum if minimum is not None else path.losses for path in paths]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] or [np.zeros(1)])
    positive = minimum is not None or bool((finite > 0).all())
    floor = 1e-16 * max(1.0, float(np.abs(finite).max(initial=1.0)))
    for path, value, color in zip(paths, values, colors):
        steps = np.arange(len(value))
        shown = np.where(np.isfinite(value), np.maximum(value, floor) if positive else value, np.nan)
        label = path.label + (f", diverged at step {path.diverged_at}" if path.diverged else "")
        ax.plot(steps, shown, color=color, lw=1.8, label=label)
        if path.diverged:
            good = np.flatnonzero(np.isfinite(shown))
            if good.size:
                ax.plot(steps[good[-1]], shown[good[-1]], "X", color=color, ms=9,
                        markeredgecolor="black")
    if positive:
        ax.set_yscale("log")
    else:
        ax.set_yscale("symlog", linthresh=1e-3)
    if tolerance is not None and minimum is not None:
        ax.axhline(tolerance, color="0.4", ls="--", lw=1.0, label=f"tolerance {tolerance:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss − minimum" if minimum is not None else "loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlim(0, max(path.steps for path in paths) if paths else 1)
    steps = max((path.steps for path in paths), default=0)
    ax.set_title(title if title is not None else f"{function.title}\nloss against step, {steps} steps",
                 fontsize=11)
    if legend:
        _legend_outside(ax, figure)
    return figure


def _legend_outside(ax: Axes, figure: Figure) -> None:
    """A frameless legend to the right of the axes."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False, borderaxespad=0.0)
    figure.tight_layout()


def animate_paths(
    function: str | TestFunction,
    paths: Sequence[Path],
    file: str | os.PathLike[str],
    *,
    fps: int = 15,
    frames: int = 48,
    dpi: int = 72,
    title: str | None = None,
) -> str:
    """Write a GIF (matplotlib's Pillow writer) of the paths growing step by step; returns the file name.

    ``frames`` evenly spaced steps are shown, so the GIF stays small for long runs.
    """
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1, got {fps!r}")
    function = as_test_function(function)
    figure = Figure(figsize=FIGSIZE)
    ax = figure.add_subplot()
    _draw_contours(ax, function, levels=20, resolution=150, filled=False)
    _draw_landmarks(ax, function, paths)
    colors = path_colors(len(paths))
    clean = [path.positions[np.isfinite(path.positions).all(axis=1)] for path in paths]
    lines = [ax.plot([], [], color=c, lw=1.8, label=p.label)[0] for p, c in zip(paths, colors)]
    heads = [ax.plot([], [], "o", color=c, ms=7, markeredgecolor="black")[0] for c in colors]
    longest = max((len(points) for points in clean), default=1)
    frame_steps = np.unique(np.round(np.linspace(0, longest - 1, frames)).astype(int))
    base_title = title if title is not None else default_title(function, paths)
    heading = ax.set_title(base_title, fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False,
              borderaxespad=0.0)
    figure.tight_layout()

    def draw(step: int) -> list:
        for points, line, head in zip(clean, lines, heads):
            shown = points[: step + 1]
            line.set_data(shown[:, 0], shown[:, 1])
            head.set_data(shown[-1:, 0], shown[-1:, 1])
        heading.set_text(f"{base_title}  [step {step}]")
        return [*lines, *heads, heading]

    movie = animation.FuncAnimation(figure, draw, frames=frame_steps, blit=False)
    movie.save(os.fspath(file), writer=animation.PillowWriter(fps=fps), dpi=dpi)
    return os.fspath(file)


def default_title(function: TestFunction, paths: Sequence[Path]) -> str:
    """``function: formula`` over ``optimizers, N steps``."""
    names = list(dict.fromkeys(path.optimizer for path in paths))
    steps = max((path.steps for path in paths), default=0)
    return f"{function.title}\n{', '.join(names)}; {steps} steps"


def _figure_and_axes(ax: Axes | None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    figure = Figure(figsize=FIGSIZE, dpi=100)
    return figure, figure.add_subplot()


def _draw_contours(
    ax: Axes, function: TestFunction, levels: int, resolution: int, filled: bool = True
) -> None:
    x_min, x_max, y_min, y_max = function.window
    xs, ys, height = function.height_grid(resolution)
    top = float(np.nanmax(height))
    if not (math.isfinite(top) and top > 0):
        return
    positive = height[height > 0]
    bottom = max(float(np.percentile(positive, 0.5)), top * 1e-8)
    # Log-spaced levels above the lowest value: narrow valleys get as many lines as steep walls.
    spaced = np.geomspace(bottom, top, levels)
    shown = np.clip(height, bottom, top)
    if filled:
        ax.contourf(xs.numpy(), ys.numpy(), shown, levels=spaced, norm=LogNorm(bottom, top),
                    cmap="Blues_r", alpha=0.55, zorder=0)
        ax.contour(xs.numpy(), ys.numpy(), shown, levels=spaced, colors="0.35", linewidths=0.5,
                   alpha=0.6, zorder=1)
    else:
        # Lines only: flat colour areas keep GIF frames small.
        ax.contour(xs.numpy(), ys.numpy(), shown, levels=spaced, cmap="Blues_r",
                   norm=LogNorm(bottom, top), linewidths=0.8, zorder=1)
    ax.set_xlim(x_min, x_max)
    ax.set_ylim(y_min, y_max)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    width, span = x_max - x_min, y_max - y_min
    if 1 / 3 <= span / width <= 3:
        ax.set_aspect("equal", adjustable="box")


def _draw_landmarks(ax: Axes, function: TestFunction, paths: Sequence[Path]) -> None:
    starts = list(dict.fromkeys(path.start for path in paths)) or [function.start]
    for index, (x, y) in enumerate(starts):
        ax.plot(x, y, "o", color="black", ms=9, markeredgecolor="white", markeredgewidth=1.2,
                zorder=6, label="start" if index == 0 else None)
    for index, (x, y) in enumerate(function.minima):
        ax.plot(x, y, "*", color="gold", ms=16, markeredgecolor="black", markeredgewidth=0.8,
                zorder=6, label="minimum" if index == 0 else None)


def _inside(points: np.ndarray, window: tuple[float, float, float, float]) -> np.ndarray:
    x_min, x_max, y_min, y_max = window
    return (points[:, 0] >= x_min) & (points[:, 0] <= x_max) & (
        points[:, 1] >= y_min) & (points[:, 1] <= y_max)

