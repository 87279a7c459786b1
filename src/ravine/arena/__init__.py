"""The arena: fair, measured comparisons of optimizers on real small tasks.

``compare`` is the one call: it runs (or resumes) the sweep and writes the report::

    from ravine.arena import SweepConfig, compare

    report = compare(SweepConfig(task="mnist1d-mlp", budget="small", out="runs/mlp"))
    print(report.html_path, report.verdict)

The pieces: :mod:`~ravine.arena.tasks` (data + model + loss + metric by name),
:mod:`~ravine.arena.train` (the measured training loop), :mod:`~ravine.arena.tune`
(learning-rate search, seeds, Optuna persistence), :mod:`~ravine.arena.results`
(statistics and files) and :mod:`~ravine.arena.report` (figures, HTML, verdict).
"""

from __future__ import annotations

from ravine.arena.report import Report, write_report
from ravine.arena.tasks import Task, TaskData, available_tasks, get_task, register_task
from ravine.arena.train import RunResult, TrainConfig, train
from ravine.arena.tune import SweepConfig, SweepProgress, SweepResult, run_sweep

__all__ = [
    "Report",
    "RunResult",
    "SweepConfig",
    "SweepProgress",
    "SweepResult",
    "Task",
    "TaskData",
    "TrainConfig",
    "available_tasks",
    "compare",
    "get_task",
    "register_task",
    "run_sweep",
    "train",
    "write_report",
]


def compare(
    config: SweepConfig, progress: SweepProgress | None = None, target_loss: float | None = None
) -> Report:
    """Run or resume the sweep ``config`` describes, then write report.html, results.csv
    and results.json under ``config.out``."""
    return write_report(run_sweep(config, progress), target_loss=target_loss)
