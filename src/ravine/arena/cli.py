"""``ravine compare``: the arena on the command line, with rich progress bars."""

from __future__ import annotations

import math
import os
import runpy
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ravine import registry
from ravine.registry import split_specs
from ravine.arena.report import write_report
from ravine.arena.tasks import available_tasks, get_task
from ravine.arena.train import SCHEDULES
from ravine.arena.tune import BUDGETS, MODES, SEED_OPTIMIZERS, SweepConfig, SweepProgress, run_sweep

__all__ = ["RichSweepProgress", "compare_command"]


class RichSweepProgress(SweepProgress):
    """An overall bar for the sweep, one bar per run in flight, one line per finished run."""

    def __init__(self, console: Console, metric: str, percent: bool) -> None:
        self.console = console
        self.metric = metric
        self.percent = percent
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            console=console,
            transient=False,
        )
        self.overall: Any = None
        self.runs: dict[int, Any] = {}
        self.waiting_shown = False

    def start(self, total_runs: int, finished_runs: int) -> None:
        self.progress.start()
        self.overall = self.progress.add_task(
            "[bold]all runs", total=total_runs, completed=finished_runs, loss=""
        )
        if finished_runs:
            self.console.print(f"Resuming: {finished_runs} of {total_runs} runs already finished in the study.")

    def run_started(self, key: int, description: str, total_steps: int) -> None:
        self.runs[key] = self.progress.add_task(description, total=total_steps, loss="")

    def run_advanced(self, key: int, step: int, loss: float) -> None:
        if key in self.runs:
            self.progress.update(self.runs[key], completed=step, loss=f"loss {loss:.4g}")

    def run_finished(self, key: int, row: dict[str, Any]) -> None:
        task_id = self.runs.pop(key, None)
        if task_id is not None:
            description = self.progress.tasks[self.progress.task_ids.index(task_id)].description
            self.progress.remove_task(task_id)
        else:
            description = row["label"]
        self.progress.advance(self.overall)
        if row["status"] == "diverged":
            self.console.print(f"[yellow]diverged[/] {description} at step {row['diverged_at_step']}")
            return
        metric = row["final_test_metric"]
        shown = f"{100 * metric:.1f}%" if self.percent else f"{metric:.4g}"
        self.console.print(
            f"[green]done[/] {description}: train loss {row['final_train_loss']:.4g}, "
            f"{self.metric} {shown}, {row['wall_time_s']:.1f} s"
        )

    def waiting(self, message: str) -> None:
        if not self.waiting_shown:
            self.console.print(message)
            self.waiting_shown = True

    def stop(self) -> None:
        self.progress.stop()


def _fail(console: Console, message: str) -> None:
    del console  # errors go to stderr, so piping the report path stays clean
    Console(stderr=True).print(f"[red]Error:[/] {message}")
    raise typer.Exit(code=2)


def compare_command(
    task: str = typer.Option("mnist1d-mlp", "--task", "-t", help="Task name (see --list)."),
    optimizers: str = typer.Option(
        ",".join(SEED_OPTIMIZERS), "--optimizers", "-o",
        help="Comma-separated optimizer specs, e.g. 'sgd,adamw(weight_decay=0.1)'. "
        "A spec that sets lr is run at that lr instead of searched.",
    ),
    budget: str = typer.Option(
        "medium", "--budget", "-b",
        help="small | medium | full: lr grid points (4/7/13), seeds (3/5/10) and the task's epochs.",
    ),
    seeds: int = typer.Option(None, "--seeds", help="Seeds for the best setting and the defaults (default: budget's)."),
    trials: int = typer.Option(None, "--trials", help="Optuna TPE trials per optimizer instead of the lr grid."),
    grid_points: int = typer.Option(None, "--grid-points", help="Learning rates in the log grid (default: budget's)."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs per run (default: the task's for the budget)."),
    steps: int = typer.Option(None, "--steps", help="Step budget per run; wins over --epochs."),
    batch_size: int = typer.Option(32, "--batch-size", help="Mini-batch size."),
    schedule: str = typer.Option("constant", "--schedule", help=f"Learning-rate schedule: {' | '.join(SCHEDULES)}."),
    clip: float = typer.Option(None, "--clip", help="Clip gradients to this global norm."),
    mode: str = typer.Option("both", "--mode", help="tuned | defaults | both (tuned lr and the seed texts' defaults)."),
    out: Path = typer.Option(None, "--out", help="Output folder (default: ravine-out/<task>)."),
    storage: str = typer.Option(
        None, "--storage",
        help="Optuna storage URL shared by several workers, e.g. postgresql://user@host/db "
        "(default: SQLite at <out>/study.db).",
    ),
    jobs: int = typer.Option(
        None, "--jobs", "-j",
        help="Runs at once, each in its own worker process (default: 2, or 1 on a one-core machine).",
    ),
    threads: int = typer.Option(1, "--threads", help="torch threads per run."),
    batch: bool = typer.Option(
        True, "--batch/--no-batch",
        help="Train each lr grid and each set of seeds together where task and optimizer allow.",
    ),
    target_loss: float = typer.Option(None, "--target-loss", help="Train loss for 'steps to target' (default: median optimizer's final loss)."),
    tasks_from: Path = typer.Option(None, "--tasks-from", help="Python file that calls register_task(...) for your own tasks."),
    list_only: bool = typer.Option(False, "--list", help="List tasks and optimizers, then exit."),
) -> None:
    """Compare optimizers on a task: tuned learning rates, seeds, defaults, one report.

    With no arguments: SGD, momentum, Nesterov, Adagrad, RMSprop, Adam and AdamW on
    MNIST-1D with the paper's MLP. Rerunning the same command resumes the sweep.
    """
    console = Console()
    if tasks_from is not None:
        if not tasks_from.is_file():
            _fail(console, f"--tasks-from: no such file {str(tasks_from)!r}")
        runpy.run_path(str(tasks_from), run_name="ravine_user_tasks")
    if list_only:
        table = Table("task", "metric", "description", title="Tasks")
        for name in available_tasks():
            entry = get_task(name)
            table.add_row(name, entry.metric_name, entry.description)
        console.print(table)
        console.print("Optimizers: " + ", ".join(registry.available()))
        return
    if task not in available_tasks():
        _fail(console, f"unknown task {task!r}; valid tasks: {', '.join(available_tasks())}")
    if budget not in BUDGETS:
        _fail(console, f"unknown budget {budget!r}; valid budgets: {', '.join(BUDGETS)}")
    if mode not in MODES:
        _fail(console, f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    try:
        specs = split_specs(optimizers)
        for spec in specs:
            registry.check_spec(spec)
    except ValueError as error:
        _fail(console, f"--optimizers: {error}")
    try:
        config = SweepConfig(
            task=task, optimizers=tuple(specs), budget=budget, seeds=seeds, grid_points=grid_points,
            trials=trials, epochs=epochs, steps=steps, batch_size=batch_size, schedule=schedule,
            clip_norm=clip, mode=mode, out=out or Path("ravine-out") / get_task(task).name,
            storage=storage, jobs=jobs or min(2, os.cpu_count() or 1), threads=threads, batch=batch,
            task_files=(tasks_from.resolve(),) if tasks_from is not None else (),
        )
    except ValueError as error:
        _fail(console, str(error))
    entry = get_task(config.task)
    percent = entry.metric_name == "accuracy"
    length = f"{config.epoch_count} epochs" if config.epoch_count else f"{config.steps} steps"
    search = f"{config.trials} TPE trials" if config.trials else f"{config.points}-point lr grid"
    console.print(
        f"[bold]ravine compare[/] {config.task}: {', '.join(config.optimizers)}\n"
        f"budget {config.budget}: {search}, {length} per run, batch {config.batch_size}, "
        f"{config.seed_count} seeds, mode {config.mode}; storage {config.storage_url}"
    )
    started = time.perf_counter()
    progress = RichSweepProgress(console, entry.metric_name, percent)
    try:
        result = run_sweep(config, progress)
    except ValueError as error:
        progress.stop()
        _fail(console, str(error))
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/] Finished runs are saved; rerun the same command to resume.")
        raise typer.Exit(code=130) from None
    report = write_report(result, target_loss=target_loss)
    elapsed = time.perf_counter() - started
    _print_summary(console, report, percent, entry.metric_name)
    console.print(
        f"{result.executed} runs executed, {result.reused} read back from the study, in {elapsed:.0f} s."
    )
    console.print(f"Report: [bold]{report.html_path.resolve()}[/]")
    console.print(f"Results: {report.csv_path.resolve()}, {report.json_path.resolve()}")


def _print_summary(console: Console, report: Any, percent: bool, metric: str) -> None:
    for mode, title in (("tuned", "tuned learning rate"), ("default", "defaults")):
        group = [s for s in report.summaries if s.mode == mode]
        if not group:
            continue
        table = Table("optimizer", "lr", "final train loss", f"test {metric}", "ms/step", "state", title=title)
        for s in group:
            interval = s.test_metric
            if interval.n == 0:
                shown = "diverged"
            elif percent:
                half = f" ± {100 * interval.half_width:.1f}" if math.isfinite(interval.half_width) else ""
                shown = f"{100 * interval.mean:.1f}%{half}"
            else:
                shown = interval.format(digits=4)
            table.add_row(
                s.optimizer, f"{s.lr:.3g}", s.final_train_loss.format(digits=4), shown,
                f"{1e3 * s.time_per_step_s:.2f}", f"{s.state_bytes / 1024:.1f} KiB",
            )
        console.print(table)
    console.print("[bold]Verdict[/]")
    for line in report.verdict:
        console.print(f" • {line}")
