"""Draw the gallery in docs/gallery/: the seed optimizers on every landscape function.

    python scripts/make_gallery.py            # all functions
    python scripts/make_gallery.py ravine     # just one

Each picture is a contour plot with the paths (left) and loss against step (right) for
SGD, momentum, Nesterov, Adagrad, RMSprop and Adam, each at its best learning rate on
the default grid (``ravine.landscape.learning_rate_grid()``), from the function's start
point, for the function's default number of steps. The saddle has no minimum to tune
towards, so it uses one shared rate (0.01) for all six. On Rastrigin the grid stops at
0.1: larger rates turn into random walks over the bumps whose last loss is low by luck
(RMSprop at lr=1 "wins" that way), which says nothing and hides the other paths. PNGs
are quantized to a 256-colour palette to stay near 100 KB.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path as FilePath

from matplotlib.figure import Figure
from PIL import Image

from ravine.landscape import (
    SEED_OPTIMIZERS,
    available_functions,
    compare,
    get_function,
    learning_rate_grid,
    plot_contour,
    plot_loss,
    summarize,
)

GALLERY = FilePath(__file__).resolve().parents[1] / "docs" / "gallery"
TOLERANCE = 1e-6
UNTUNED_LR = 0.01  # for functions without a minimum (the saddle)
GRID_TOP = {"rastrigin": 0.1}  # default grid is 1e-5 .. 1


def draw(name: str) -> FilePath:
    function = get_function(name)
    tune = function.minimum_value is not None
    optimizers = SEED_OPTIMIZERS if tune else [f"{o}(lr={UNTUNED_LR})" for o in SEED_OPTIMIZERS]
    began = time.perf_counter()
    top = GRID_TOP.get(name, 1.0)
    grid = learning_rate_grid(1e-5, top)
    paths = compare(function, optimizers, tune=tune, grid=grid, tolerance=TOLERANCE)
    elapsed = time.perf_counter() - began

    figure = Figure(figsize=(13.0, 5.6), dpi=100)
    left, right = figure.subplots(1, 2, width_ratios=[1.35, 1.0])
    plot_contour(function, paths, ax=left, legend=False, title="paths")
    plot_loss(function, paths, ax=right, legend=False, tolerance=TOLERANCE if tune else None,
              title="loss against step")
    handles, labels = left.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=10, frameon=False)
    how = f"learning rates tuned on a log grid 1e-5..{top:g}" if tune else f"all at lr={UNTUNED_LR}"
    figure.suptitle(f"{function.title}\n{', '.join(SEED_OPTIMIZERS)}; {function.steps} steps; {how}",
                    fontsize=12)
    figure.tight_layout(rect=(0, 0.12, 1, 1))

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    GALLERY.mkdir(parents=True, exist_ok=True)
    file = GALLERY / f"{name}.png"
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(
            file, optimize=True
        )
    print(f"{file.name}: {file.stat().st_size // 1024} KB, runs {elapsed:.1f} s")
    for row in summarize(paths, TOLERANCE):
        reached = "-" if row.steps_to_tolerance is None else row.steps_to_tolerance
        print(f"  {row.optimizer:9s} lr={row.lr:<9.3g} final loss={row.final_loss:<10.3g} "
              f"steps to {TOLERANCE:g}={reached} diverged={row.diverged}")
    return file


def main(names: list[str]) -> None:
    for name in names or available_functions():
        draw(name)


if __name__ == "__main__":
    main(sys.argv[1:])
