"""`ravine landscape`: compare optimizers on a 2-D test function and draw them.

Registered in :mod:`ravine.cli` as ``app.command("landscape")(landscape_command)``.
"""

import math
import time
from pathlib import Path as FilePath
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ravine.landscape.functions import available_functions, get_function
from ravine.landscape.paths import split_specs, write_csv
from ravine.landscape.tuning import (
    DEFAULT_TOLERANCE,
    SEED_OPTIMIZERS,
    compare,
    learning_rate_grid,
    summarize,
)

__all__ = ["landscape_command"]


def landscape_command(
    function: str = typer.Option(
        "ravine", "--function", "-f",
        help=f"Test function: {', '.join(available_functions())}.",
    ),
    optimizers: Optional[str] = typer.Option(
        None, "--optimizers", "-o",
        help="Comma-separated optimizer specs, e.g. \"sgd(lr=0.02),momentum,adam(lr=0.1)\". "
        "Default: the seed optimizers " + ", ".join(SEED_OPTIMIZERS) + ".",
    ),
    steps: Optional[int] = typer.Option(
        None, "--steps", "-n", help="Steps per path. Default: the function's budget."
    ),
    out: FilePath = typer.Option(
        FilePath("ravine-out/landscape"), "--out", help="Directory for contour.png, loss.png, "
        "trajectories.csv (and paths.gif)."
    ),
    tune: Optional[bool] = typer.Option(
        None, "--tune/--no-tune",
        help="Search each optimizer's learning rate on a log grid first. Default: on when "
        "--optimizers is not given, off otherwise.",
    ),
    animate: bool = typer.Option(False, "--animate/--no-animate", help="Also write paths.gif."),
    frames: int = typer.Option(48, "--frames", help="Frames of paths.gif (evenly spaced steps)."),
    start: Optional[str] = typer.Option(
        None, "--start", help="Start point \"x,y\". Default: the function's."
    ),
    tolerance: float = typer.Option(
        DEFAULT_TOLERANCE, "--tolerance", help="Loss gap to the minimum that counts as reached."
    ),
    noise: float = typer.Option(0.0, "--noise", help="Standard deviation of gradient noise."),
    lr_min: float = typer.Option(1e-5, "--lr-min", help="Smallest rate of the tuning grid."),
    lr_max: float = typer.Option(1.0, "--lr-max", help="Largest rate of the tuning grid."),
    seed: int = typer.Option(0, "--seed", help="Seed of the gradient noise."),
) -> None:
    """Run optimizers on a 2-D test function; write contour.png, loss.png, trajectories.csv."""
    try:
        test_function = get_function(function, noise=noise)
        specs = list(SEED_OPTIMIZERS) if optimizers is None else split_specs(optimizers)
        start_point = None if start is None else _parse_point(start)
        do_tune = (optimizers is None) if tune is None else tune
        grid = learning_rate_grid(lr_min, lr_max) if do_tune else None
        if frames < 1:
            raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
        began = time.perf_counter()
        paths = compare(
            test_function, specs, steps=steps, tune=do_tune, grid=grid,
            tolerance=tolerance, start=start_point, seed=seed,
        )
        elapsed = time.perf_counter() - began
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None

    from ravine.landscape.plots import animate_paths, plot_contour, plot_loss

    out.mkdir(parents=True, exist_ok=True)
    written = []
    figure = plot_contour(test_function, paths)
    figure.savefig(out / "contour.png", dpi=100)
    written.append(out / "contour.png")
    figure = plot_loss(test_function, paths, tolerance=tolerance)
    figure.savefig(out / "loss.png", dpi=100)
    written.append(out / "loss.png")
    write_csv(paths, out / "trajectories.csv")
    written.append(out / "trajectories.csv")
    if animate:
        written.append(FilePath(animate_paths(test_function, paths, out / "paths.gif", frames=frames)))

    console = Console()
    heading = f"{test_function.title}, {paths[0].steps} steps" + (
        ", learning rates tuned" if do_tune else ""
    )
    table = Table(title=heading)
    table.add_column("optimizer")
    table.add_column("lr", justify="right")
    table.add_column("final loss", justify="right")
    table.add_column(f"steps to {tolerance:g}", justify="right")
    table.add_column("diverged", justify="center")
    for row in summarize(paths, tolerance):
        table.add_row(
            row.optimizer,
            f"{row.lr:.3g}",
            "-" if not math.isfinite(row.final_loss) else f"{row.final_loss:.3g}",
            "-" if row.steps_to_tolerance is None else str(row.steps_to_tolerance),
            f"yes (step {row.diverged_at})" if row.diverged else "no",
        )
    console.print(table)
    console.print(f"ran in {elapsed:.1f} s; wrote " + ", ".join(str(p) for p in written))


def _parse_point(text: str) -> tuple[float, float]:
    parts = [part.strip() for part in text.strip().strip("()").split(",")]
    try:
        x, y = (float(part) for part in parts)
    except ValueError:
        raise ValueError(f"start must be two numbers \"x,y\", got {text!r}") from None
    return (x, y)
