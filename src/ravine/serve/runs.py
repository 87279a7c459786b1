"""Training runs started from the page: settings, a background thread per run, files on disk.

A *run* trains one task with one or more optimizers, one after the other, each from the
same seed, with the arena's training loop (:func:`ravine.arena.train.train`). Every run
has its own id and its own folder under the output directory::

    <out>/<run id>/run.json       settings, status, and per optimizer the train-loss
                                  curve and the held-out loss / metric per evaluation
    <out>/<run id>/results.csv    the arena's rows (one per optimizer that finished)
    <out>/<run id>/results.json
    <out>/<run id>/report.html    the arena's comparison report (finished runs only)

``run.json`` is written when the run starts and rewritten when it ends, so what a run
finished survives the server; the list of runs is read back from these folders. Each
run builds its own model and optimizer in its own thread, so runs started from two
browser tabs share nothing that either of them changes (the task's data tensors are
only read).
"""

from __future__ import annotations

import datetime
import json
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ravine import registry
from ravine.arena.results import write_csv, write_json
from ravine.arena.tasks import available_tasks, get_task
from ravine.arena.train import SCHEDULES, TrainConfig, train

__all__ = [
    "DEFAULT_TASK",
    "MAX_EPOCHS",
    "Run",
    "RunManager",
    "RunNotFound",
    "TrainingSettings",
    "check_optimizer",
]

DEFAULT_TASK = "mnist1d-mlp"
DEFAULT_OPTIMIZERS = ("sgd(lr=0.1)", "adam(lr=0.001)")
MAX_EPOCHS = 100
MAX_OPTIMIZERS = 9
REPORT_NOTE = (
    "<p class='meta'><b>Started from ravine serve:</b> every optimizer ran once (seed {seed}) at the "
    "settings chosen on the page; the tables below list them under “Defaults”.</p>"
)

# matplotlib's pyplot (which the arena report draws with) is not thread-safe.
_REPORT_LOCK = threading.Lock()


class RunNotFound(KeyError):
    """No run with that id in memory or on disk."""


class _Stopped(Exception):
    """Raised inside the training loop's callback to end a run the user stopped."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_optimizer(spec: str) -> None:
    """Raise ValueError (starting "optimizers:") unless ``spec`` builds an optimizer with lr > 0."""
    try:
        registry.check_spec(spec)
    except ValueError as error:
        raise ValueError(f"optimizers: {error}") from None
    lr = registry.parse_spec(spec)[1].get("lr")
    if lr is not None and not (_is_number(lr) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"optimizers: the learning rate must be a finite number > 0, got lr={lr!r} in {spec!r}")


@dataclass(frozen=True)
class TrainingSettings:
    """What the page asks for. ``optimizers`` are spec strings such as ``"adam(lr=0.001)"``;
    ``lr``, when given, overrides the learning rate of every one of them."""

    task: str = DEFAULT_TASK
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS
    batch_size: int = 32
    lr: float | None = None
    schedule: str = "constant"
    clip_norm: float | None = None
    epochs: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or self.task.strip().lower() not in available_tasks():
            raise ValueError(f"task: unknown task {self.task!r}; valid tasks: {', '.join(available_tasks())}")
        object.__setattr__(self, "task", self.task.strip().lower())
        if isinstance(self.optimizers, str) or not all(isinstance(spec, str) for spec in self.optimizers):
            raise ValueError("optimizers: give a list of optimizer specs such as ['sgd(lr=0.1)', 'adam']")
        specs = tuple(spec.strip() for spec in self.optimizers if spec.strip())
        if not specs:
            raise ValueError(f"optimizers: choose at least one of {', '.join(registry.available())}")
        if len(specs) > MAX_OPTIMIZERS:
            raise ValueError(f"optimizers: at most {MAX_OPTIMIZERS} per run, got {len(specs)}")
        for spec in specs:
            check_optimizer(spec)
        if len(set(specs)) != len(specs):
            raise ValueError(f"optimizers: each optimizer spec may appear once, got {', '.join(specs)}")
        object.__setattr__(self, "optimizers", specs)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size: must be an integer >= 1, got {self.batch_size!r}")
        if self.lr is not None and not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be a finite number > 0 (or left empty), got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.clip_norm is not None and not (
            _is_number(self.clip_norm) and math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ValueError(f"clip_norm: must be a finite number > 0 (or left empty), got {self.clip_norm!r}")
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or not 1 <= self.epochs <= MAX_EPOCHS:
            raise ValueError(f"epochs: must be an integer from 1 to {MAX_EPOCHS}, got {self.epochs!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {self.seed!r}")

    def train_config(self, spec: str) -> TrainConfig:
        return TrainConfig(
            optimizer=spec, lr=self.lr, batch_size=self.batch_size, epochs=self.epochs,
            schedule=self.schedule, clip_norm=self.clip_norm, seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["optimizers"] = list(self.optimizers)
        return values


@dataclass
class Curve:
    """One optimizer's numbers so far within a run."""

    label: str
    status: str = "waiting"  # waiting, running, ok, diverged, stopped, failed
    total_steps: int | None = None
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_metric: list[float] = field(default_factory=list)
    lr: float | None = None
    wall_time_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Run:
    """One run's live state. ``version`` grows on every change; readers poll it."""

    def __init__(self, run_id: str, settings: TrainingSettings, folder: Path) -> None:
        self.id = run_id
        self.settings = settings
        self.folder = folder
        self.status = "running"  # running, done, stopped, failed
        self.error: str | None = None
        self.created = datetime.datetime.now().isoformat(timespec="seconds")
        self.finished: str | None = None
        self.report = False
        task = get_task(settings.task)
        self.metric_name = task.metric_name
        self.higher_is_better = task.higher_is_better
        self.curves = [Curve(label=spec) for spec in settings.optimizers]
        self.rows: list[dict[str, Any]] = []
        self.stop_requested = threading.Event()
        self.lock = threading.Lock()
        self.version = 0
        self.thread: threading.Thread | None = None

    @property
    def finished_flag(self) -> bool:
        return self.status != "running"

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows about the run (also what run.json holds)."""
        with self.lock:
            return {
                "id": self.id,
                "status": self.status,
                "error": self.error,
                "created": self.created,
                "finished": self.finished,
                "settings": self.settings.to_dict(),
                "metric": self.metric_name,
                "higher_is_better": self.higher_is_better,
                "report": self.report,
                "optimizers": [_finite(curve.to_dict()) for curve in self.curves],
            }

    def progress_since(self, cursor: dict[str, int] | None) -> tuple[dict[str, Any], dict[str, int]]:
        """New points since ``cursor`` (counts per optimizer already sent), and the new cursor."""
        cursor = dict(cursor or {})
        with self.lock:
            updates = []
            for index, curve in enumerate(self.curves):
                sent_train = cursor.get(f"{index}t", 0)
                sent_eval = cursor.get(f"{index}e", 0)
                updates.append({
                    "label": curve.label,
                    "status": curve.status,
                    "total_steps": curve.total_steps,
                    "train_start": sent_train,
                    "train_loss": _finite(curve.train_loss[sent_train:]),
                    "eval_steps": curve.eval_steps[sent_eval:],
                    "test_loss": _finite(curve.test_loss[sent_eval:]),
                    "test_metric": _finite(curve.test_metric[sent_eval:]),
                })
                cursor[f"{index}t"] = len(curve.train_loss)
                cursor[f"{index}e"] = len(curve.eval_steps)
            message = {"id": self.id, "status": self.status, "error": self.error,
                       "report": self.report, "optimizers": updates}
        return message, cursor

    def _touch(self) -> None:
        self.version += 1


class RunManager:
    """Starts runs in background threads and finds runs in memory or under ``out``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    # -- starting and stopping ---------------------------------------------------------

    def start(self, settings: TrainingSettings) -> Run:
        """Create the run's folder, write run.json, start training in a thread; returns at once."""
        self.out.mkdir(parents=True, exist_ok=True)
        with self._lock:
            while True:
                run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
                folder = self.out / run_id
                if run_id not in self._runs and not folder.exists():
                    break
            folder.mkdir()
            run = Run(run_id, settings, folder)
            self._runs[run_id] = run
        _write_run_json(run)
        run.thread = threading.Thread(target=self._train, args=(run,), name=f"ravine-run-{run_id}", daemon=True)
        run.thread.start()
        return run

    def stop(self, run_id: str) -> dict[str, Any]:
        """Ask a running run to stop after its current step; a finished run is left as it is."""
        run = self._runs.get(run_id)
        if run is None:
            return self.get(run_id)  # raises RunNotFound, or returns the finished run
        run.stop_requested.set()
        return run.snapshot()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every running run and wait for each to write its files."""
        running = [run for run in list(self._runs.values()) if run.thread is not None and run.thread.is_alive()]
        for run in running:
            run.stop_requested.set()
        deadline = time.monotonic() + timeout
        for run in running:
            run.thread.join(max(0.0, deadline - time.monotonic()))

    def wait(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends (for tests and scripts); returns its snapshot."""
        run = self._live(run_id)
        if run.thread is not None:
            run.thread.join(timeout)
        return run.snapshot()

    # -- reading -------------------------------------------------------------------------

    def live(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    def _live(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def folder(self, run_id: str) -> Path:
        """The run's folder; raises :class:`RunNotFound` for an id that names none."""
        if not _valid_id(run_id):
            raise RunNotFound(run_id)
        folder = self.out / run_id
        if run_id not in self._runs and not (folder / "run.json").is_file():
            raise RunNotFound(run_id)
        return folder

    def get(self, run_id: str) -> dict[str, Any]:
        """The run's snapshot: live from memory, else read back from its run.json."""
        run = self._runs.get(run_id)
        if run is not None:
            return run.snapshot()
        folder = self.folder(run_id)
        try:
            document = json.loads((folder / "run.json").read_text())
        except (OSError, ValueError):
            raise RunNotFound(run_id) from None
        if document.get("status") == "running":
            document["status"] = "interrupted"  # the server stopped before the run ended
        return document

    def list(self) -> list[dict[str, Any]]:
        """Every run in memory or under ``out``, newest first, without the curves."""
        ids = set(self._runs)
        if self.out.is_dir():
            ids.update(path.parent.name for path in self.out.glob("*/run.json") if _valid_id(path.parent.name))
        listing = []
        for run_id in sorted(ids, reverse=True):
            try:
                document = self.get(run_id)
            except RunNotFound:
                continue
            listing.append({
                "id": document["id"],
                "status": document["status"],
                "created": document.get("created"),
                "finished": document.get("finished"),
                "settings": document.get("settings", {}),
                "metric": document.get("metric"),
                "report": document.get("report", False),
                "optimizers": [_summary(curve) for curve in document.get("optimizers", [])],
            })
        return listing

    # -- the worker thread ---------------------------------------------------------------

    def _train(self, run: Run) -> None:
        settings = run.settings
        try:
            task = get_task(settings.task)
            for index, spec in enumerate(settings.optimizers):
                if run.stop_requested.is_set():
                    break
                curve = run.curves[index]
                with run.lock:
                    curve.status = "running"
                    run._touch()
                result = self._train_one(run, task, spec, curve)
                if result is None:
                    break
                row = {**result.to_dict(), "label": spec, "phase": "default", "trial": index, "study": run.id}
                with run.lock:
                    run.rows.append(row)
                    curve.status = result.status
                    curve.lr = result.lr
                    curve.wall_time_s = result.wall_time_s
                    run._touch()
            stopped = run.stop_requested.is_set() or len(run.rows) < len(settings.optimizers)
            status = "stopped" if stopped else "done"
        except Exception as error:  # the page gets a message, the server keeps running
            status = "failed"
            with run.lock:
                run.error = f"{type(error).__name__}: {error}"
        try:
            self._write_results(run, status)
        except Exception as error:
            status = "failed"
            with run.lock:
                run.error = f"writing results failed: {type(error).__name__}: {error}"
        with run.lock:
            for curve in run.curves:
                if curve.status in ("waiting", "running"):
                    curve.status = "stopped" if status == "stopped" else ("failed" if status == "failed" else curve.status)
            run.status = status
            run.finished = datetime.datetime.now().isoformat(timespec="seconds")
            run._touch()
        try:
            _write_run_json(run)
        except OSError as error:  # the folder went away: the page still shows the run
            with run.lock:
                run.error = f"could not write run.json: {error}"
                run._touch()

    def _train_one(self, run: Run, task: Any, spec: str, curve: Curve) -> Any:
        def progress(step: int, total: int, loss: float) -> None:
            with run.lock:
                curve.total_steps = total
                curve.train_loss.append(loss)
                run._touch()
            if run.stop_requested.is_set():
                raise _Stopped

        def evaluation(step: int, loss: float, metric: float) -> None:
            with run.lock:
                curve.eval_steps.append(step)
                curve.test_loss.append(loss)
                curve.test_metric.append(metric)
                run._touch()

        try:
            return train(task, run.settings.train_config(spec), progress=progress, evaluation=evaluation)
        except _Stopped:
            with run.lock:
                curve.status = "stopped"
                run._touch()
            return None

    def _write_results(self, run: Run, status: str) -> None:
        rows = list(run.rows)
        if not rows:
            return
        if status != "done":
            write_csv(rows, run.folder / "results.csv")
            write_json(rows, run.folder / "results.json", meta={"run": run.id, "status": status})
            return
        from ravine.arena.report import write_report  # matplotlib: load on first use
        from ravine.arena.tune import SweepConfig, SweepResult

        settings = run.settings
        config = SweepConfig(
            task=settings.task, optimizers=settings.optimizers, budget="small", seeds=1,
            epochs=settings.epochs, batch_size=settings.batch_size, schedule=settings.schedule,
            clip_norm=settings.clip_norm, mode="defaults", out=run.folder, jobs=1, threads=1,
            storage="none (trained by ravine serve)",
        )
        result = SweepResult(config=config, rows=rows, executed=len(rows), reused=0, best_lr={},
                             lr_at_grid_edge={}, search={})
        with _REPORT_LOCK:
            report = write_report(result)
        page = report.html_path.read_text(encoding="utf-8")
        page = page.replace("</h1>", "</h1>" + REPORT_NOTE.format(seed=settings.seed), 1)
        report.html_path.write_text(page, encoding="utf-8")
        with run.lock:
            run.report = True


def _write_run_json(run: Run) -> None:
    document = run.snapshot()
    temporary = run.folder / "run.json.tmp"
    temporary.write_text(json.dumps(document, indent=1, allow_nan=False))
    temporary.replace(run.folder / "run.json")


def _valid_id(run_id: str) -> bool:
    return bool(run_id) and len(run_id) <= 64 and all(c.isalnum() or c in "-_" for c in run_id)


def _summary(curve: dict[str, Any]) -> dict[str, Any]:
    losses = [value for value in curve.get("train_loss", []) if value is not None]
    metrics = curve.get("test_metric", [])
    return {
        "label": curve.get("label"),
        "status": curve.get("status"),
        "final_test_metric": metrics[-1] if metrics else None,
        "last_train_loss": losses[-1] if losses else None,
    }


def _finite(value: Any) -> Any:
    """NaN and infinity as None, so the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
