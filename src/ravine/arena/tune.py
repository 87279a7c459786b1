"""Fair tuning: a learning-rate search per optimizer, the best setting re-run over seeds,
and the practitioner defaults beside it, all persisted in Optuna studies.

Protocol (after DeepOBS): for each optimizer, train with seed 0 at every point of a log
grid of learning rates suited to that optimizer (or ``trials`` Optuna TPE trials over
the same range), every other hyperparameter at torch's defaults or as the spec sets it;
the learning rate with the lowest final train loss is then re-run with fresh seeds
1..S, so the reported numbers are not the lucky seed that won the search. The
defaults mode runs the same seeds with the seed texts' advice (:data:`DEFAULT_SETTINGS`),
showing what following the rule of thumb costs against tuning.

Every run is an Optuna trial (value: final train loss, ``inf`` if it diverged; the whole
run record in its user attribute ``"run"``). Studies are named from a hash of everything
that changes a run, so rerunning a command resumes: finished trials are read back, never
repeated. Several processes or machines pointed at one ``storage`` URL share the work;
each claims queued trials atomically through Optuna, keeps a heartbeat on the trials it
runs, and reruns trials whose worker stopped beating for :data:`STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import json
import math
import multiprocessing
import runpy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState

from ravine import registry
from ravine.arena.batched import can_batch, train_batched
from ravine.arena.tasks import BUDGET_NAMES, available_tasks, get_task
from ravine.arena.train import SCHEDULES, TrainConfig, format_spec, train

__all__ = [
    "BUDGETS",
    "DEFAULT_SETTINGS",
    "LR_RANGES",
    "MODES",
    "SEED_OPTIMIZERS",
    "Budget",
    "SweepConfig",
    "SweepProgress",
    "SweepResult",
    "default_spec",
    "format_spec",
    "lr_grid",
    "run_sweep",
]

SEED_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")
MODES = ("both", "tuned", "defaults")
HEARTBEAT_INTERVAL_S = 20.0
MAX_BATCH = 16  # runs trained together at most (see ravine.arena.batched)
STALE_AFTER_S = 180.0
_POLL_S = 2.0


@dataclass(frozen=True)
class Budget:
    """How much a sweep spends: learning rates in the grid and seeds per setting; the
    epochs come from the task (``Task.epochs[budget.name]``)."""

    name: str
    grid_points: int
    seeds: int


BUDGETS = {
    "small": Budget("small", grid_points=4, seeds=3),
    "medium": Budget("medium", grid_points=7, seeds=5),
    "full": Budget("full", grid_points=13, seeds=10),
}
assert tuple(BUDGETS) == BUDGET_NAMES

# Learning-rate search ranges (inclusive, log scale), three decades each, so the small,
# medium and full grids step by a decade, half a decade and a quarter. SGD with momentum
# 0.9 moves about 10x as far per unit lr as plain SGD, and Adam-style steps are about lr
# per coordinate whatever the gradient's scale, so each family has its own range.
LR_RANGES: dict[str, tuple[float, float]] = {
    "sgd": (1e-2, 10.0),
    "momentum": (1e-3, 1.0),
    "nesterov": (1e-3, 1.0),
    "adagrad": (1e-3, 1.0),
    "rmsprop": (1e-4, 1e-1),
    "rmsprop-centered": (1e-4, 1e-1),
    "adam": (1e-4, 1e-1),
    "amsgrad": (1e-4, 1e-1),
    "adamw": (1e-4, 1e-1),
    # Sign-based steps move each coordinate by lr, as Adam's do; Lion's paper runs it
    # at 3-10x below AdamW's lr. Schedule-free SGD's default lr is 1.0.
    "lion": (1e-5, 1e-2),
    "signum": (1e-4, 1e-1),
    "signsgd": (1e-4, 1e-1),
    "lamb": (1e-4, 1e-1),
    "sfadamw": (1e-4, 1e-1),
    "sfsgd": (1e-2, 10.0),
}
FALLBACK_LR_RANGE = (1e-4, 1e-1)

# The defaults mode: the practical advice of the seed texts, taken literally. Adam(W) at
# lr 1e-3, betas (0.9, 0.999), weight decay 0.01 (an L2 penalty for Adam, decoupled for
# AdamW); SGD-family at lr 0.01 (momentum 0.9 comes with the "momentum"/"nesterov"
# names); Adagrad and RMSprop at torch's defaults. The tuned mode instead keeps torch's
# constructor defaults (and whatever the spec sets) and searches only the lr.
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01},
    "momentum": {"lr": 0.01},
    "nesterov": {"lr": 0.01},
    "adagrad": {"lr": 0.01},
    "rmsprop": {"lr": 0.01},
    "rmsprop-centered": {"lr": 0.01},
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01},
    "amsgrad": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01},
    "adamw": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.01},
}

# Low-memory variants (docs/memory.md) search and default like the optimizer whose
# state they store, so a comparison changes the storage alone.
LOW_MEMORY_VARIANTS = {
    "adam-bf16": "adam", "adamw-bf16": "adamw", "momentum-bf16": "momentum",
    "adam-8bit": "adam", "adamw-8bit": "adamw", "momentum-8bit": "momentum", "lion-8bit": "lion",
}
for _variant, _base in LOW_MEMORY_VARIANTS.items():
    if _base in LR_RANGES:
        LR_RANGES[_variant] = LR_RANGES[_base]
    if _base in DEFAULT_SETTINGS:
        DEFAULT_SETTINGS[_variant] = DEFAULT_SETTINGS[_base]


def default_spec(spec: str) -> str:
    """``spec`` with :data:`DEFAULT_SETTINGS` filled in where the spec says nothing."""
    name, kwargs = registry.parse_spec(spec)
    return format_spec(name, {**DEFAULT_SETTINGS.get(name, {}), **kwargs})


def lr_grid(spec: str, points: int, lr_range: tuple[float, float] | None = None) -> list[float]:
    """``points`` learning rates evenly spaced in log scale over the optimizer's range."""
    if not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be an integer >= 1, got {points!r}")
    name, _ = registry.parse_spec(spec)
    low, high = lr_range or LR_RANGES.get(name, FALLBACK_LR_RANGE)
    if not 0 < low <= high:
        raise ValueError(f"lr_range must satisfy 0 < low <= high, got {(low, high)!r}")
    if points == 1:
        return [float(math.sqrt(low * high))]
    return [float(f"{value:.6g}") for value in np.logspace(math.log10(low), math.log10(high), points)]


@dataclass(frozen=True)
class SweepConfig:
    """A comparison: which optimizers on which task, at what budget, stored where.

    ``seeds``, ``grid_points`` and ``epochs`` default to the budget's (and the task's)
    values; ``steps`` (a step budget) wins over epochs. ``trials`` switches the search
    from the grid to that many Optuna TPE trials. ``storage`` is an Optuna storage URL;
    ``None`` means SQLite at ``<out>/study.db``. ``jobs`` runs that many trainings at once
    in worker processes, each with ``threads`` torch threads; ``task_files`` are Python
    files that register tasks, run again in worker processes that start without a copy
    of this one (where ``fork`` is unavailable). ``batch`` trains the runs of one grid
    or one set of seeds together (:mod:`ravine.arena.batched`) where the task and the
    optimizer allow it, up to :data:`MAX_BATCH` at once; the results are those of the
    runs one after another, within floating-point rounding.
    """

    task: str = "mnist1d-mlp"
    optimizers: tuple[str, ...] = SEED_OPTIMIZERS
    budget: str = "medium"
    seeds: int | None = None
    grid_points: int | None = None
    trials: int | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 32
    schedule: str = "constant"
    clip_norm: float | None = None
    mode: str = "both"
    out: Path = Path("ravine-out")
    storage: str | None = None
    jobs: int = 1
    threads: int = 1
    divergence_factor: float = 100.0
    divergence_patience: int = 10
    task_files: tuple[Path, ...] = ()
    batch: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", get_task(self.task).name)  # ValueError lists tasks
        optimizers = tuple(spec.strip() for spec in self.optimizers if spec.strip())
        if not optimizers:
            raise ValueError("optimizers must name at least one optimizer")
        for spec in optimizers:
            registry.parse_spec(spec)  # ValueError listing valid optimizer names
        if len(set(optimizers)) != len(optimizers):
            raise ValueError(f"optimizers must not repeat a spec, got {', '.join(optimizers)}")
        object.__setattr__(self, "optimizers", optimizers)
        object.__setattr__(self, "out", Path(self.out))
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("seeds", "grid_points", "trials", "epochs", "steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        for name in ("batch_size", "jobs", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0 or None, got {self.clip_norm!r}")
        if not isinstance(self.batch, bool):
            raise ValueError(f"batch must be True or False, got {self.batch!r}")

    @property
    def seed_count(self) -> int:
        return self.seeds or BUDGETS[self.budget].seeds

    @property
    def points(self) -> int:
        return self.grid_points or BUDGETS[self.budget].grid_points

    @property
    def epoch_count(self) -> int | None:
        if self.steps is not None:
            return None
        return self.epochs or get_task(self.task).epochs[self.budget]

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def train_config(self, spec: str, lr: float | None, seed: int) -> TrainConfig:
        return TrainConfig(
            optimizer=spec,
            lr=lr,
            batch_size=self.batch_size,
            epochs=self.epoch_count,
            steps=self.steps,
            schedule=self.schedule,
            clip_norm=self.clip_norm,
            seed=seed,
            divergence_factor=self.divergence_factor,
            divergence_patience=self.divergence_patience,
        )


@dataclass
class SweepResult:
    """Rows (one per finished run of this sweep), and how many runs this call executed."""

    config: SweepConfig
    rows: list[dict[str, Any]]
    executed: int
    reused: int
    best_lr: dict[str, float]
    lr_at_grid_edge: dict[str, bool]
    search: dict[str, list[float]]
    studies: list[str] = field(default_factory=list)


class SweepProgress:
    """Hooks a front end implements to show a sweep; the base class shows nothing."""

    def start(self, total_runs: int, finished_runs: int) -> None: ...

    def run_started(self, key: int, description: str, total_steps: int) -> None: ...

    def run_advanced(self, key: int, step: int, loss: float) -> None: ...

    def run_finished(self, key: int, row: dict[str, Any]) -> None: ...

    def waiting(self, message: str) -> None: ...

    def stop(self) -> None: ...


# ---------------------------------------------------------------------------------------
# One study: a list of wanted trials (a grid, seeds) or a number of sampler trials (TPE).


def _key(params: dict[str, Any]) -> tuple:
    return tuple(
        (name, float(f"{value:.9g}") if isinstance(value, float) else value)
        for name, value in sorted(params.items())
    )


class _StudyWork:
    """The trials one study should hold, and which of them this process may run next."""

    def __init__(
        self,
        study: optuna.Study,
        phase: str,
        label: str,
        spec: str,
        distributions: dict[str, Any],
        wanted: list[dict[str, Any]] | None = None,
        sampler_trials: int | None = None,
    ) -> None:
        self.study = study
        self.phase = phase
        self.label = label
        self.spec = spec
        self.distributions = distributions
        self.wanted = wanted
        self.sampler_trials = sampler_trials
        self.claimed: set[tuple] = set()  # keys this process is running now
        self.complete: list[optuna.trial.FrozenTrial] = []
        self.running_keys: set[tuple] = set()  # trials other workers are training now
        self.waiting_keys: set[tuple] = set()  # queued trials nobody has taken yet
        self.refresh()

    @property
    def planned(self) -> int:
        return len(self.wanted) if self.wanted is not None else int(self.sampler_trials or 0)

    def refresh(self) -> None:
        now = datetime.datetime.now()
        complete, running, waiting = [], set(), set()
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state == TrialState.COMPLETE:
                complete.append(trial)
            elif trial.state == TrialState.RUNNING:
                beat = trial.user_attrs.get("heartbeat")
                last = beat if beat is not None else trial.datetime_start.timestamp()
                if now.timestamp() - last > STALE_AFTER_S:
                    _fail(self.study, trial)  # its worker stopped: the trial will be rerun
                else:
                    running.add(_key(trial.params))
            elif trial.state == TrialState.WAITING:
                waiting.add(_key(trial.system_attrs.get("fixed_params", {})))
        if self.wanted is not None:
            # Two workers that queue the same missing trial at the same instant both run
            # it; the first finished copy (lowest number) is the one that counts.
            wanted = {_key(params) for params in self.wanted}
            first: dict[tuple, optuna.trial.FrozenTrial] = {}
            for trial in sorted(complete, key=lambda t: t.number):
                if _key(trial.params) in wanted:
                    first.setdefault(_key(trial.params), trial)
            complete = list(first.values())
        self.complete = complete
        self.running_keys = running
        self.waiting_keys = waiting

    def done(self) -> bool:
        if self.wanted is not None:
            finished = {_key(trial.params) for trial in self.complete}
            return all(_key(params) in finished for params in self.wanted)
        return len(self.complete) >= (self.sampler_trials or 0)

    def next_trial(self) -> optuna.Trial | None:
        if self.done():
            return None  # finished trials never change: no need to read the study again
        self.refresh()
        finished = {_key(trial.params) for trial in self.complete}
        if self.wanted is not None:
            missing = [
                params
                for params in self.wanted
                if _key(params) not in finished
                and _key(params) not in self.running_keys
                and _key(params) not in self.claimed
            ]
            if not missing:
                return None
            if not any(_key(params) in self.waiting_keys for params in missing):
                self.study.enqueue_trial(missing[0])
            # ask() takes the oldest queued trial: ours, or one a worker queued and left.
            trial = self.study.ask(self.distributions)
            key = _key(trial.params)
            if key not in {_key(params) for params in self.wanted} or key in finished or self._has_earlier_twin(trial):
                # Another worker took the queued trial first and this one was sampled,
                # it popped a stale duplicate of a finished trial, or two workers queued
                # the same parameters: the lowest-numbered copy is the one that runs.
                self.study.tell(trial, state=TrialState.PRUNED)
                return None
        else:
            running = len(self.running_keys) + len(self.claimed)
            if len(self.complete) + running >= (self.sampler_trials or 0):
                return None
            trial = self.study.ask(self.distributions)
        self.claimed.add(_key(trial.params))
        return trial

    def prune_stale_queue(self) -> None:
        """Prune queued copies of parameter sets that have finished. Two workers that
        queue the same missing trial at once leave one copy behind when the other copy
        runs; once the unit is done nobody would take it, and it would stay WAITING."""
        if self.wanted is None:
            return
        finished = {_key(trial.params) for trial in self.complete}
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if _key(trial.system_attrs.get("fixed_params", {})) in finished:
                _set_state(self.study, trial, TrialState.PRUNED)

    def release(self, trial: optuna.Trial) -> None:
        self.claimed.discard(_key(trial.params))

    def _has_earlier_twin(self, trial: optuna.Trial) -> bool:
        """Whether a lower-numbered trial with the same parameters is queued, running or
        finished: then this copy must not run, so each parameter set runs once."""
        key = _key(trial.params)
        for other in self.study.get_trials(
            deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
        ):
            if other.number >= trial.number:
                continue
            # a queued trial, and one just taken from the queue, have no params yet
            params = other.system_attrs.get("fixed_params") or other.params
            if _key(params) == key:
                return True
        return False


def _fail(study: optuna.Study, trial: Any) -> None:
    _set_state(study, trial, TrialState.FAIL)


def _set_state(study: optuna.Study, trial: Any, state: TrialState) -> None:
    try:
        study._storage.set_trial_state_values(trial._trial_id, state)
    except Exception:  # already finished by its worker, or claimed by another: fine
        pass


# ---------------------------------------------------------------------------------------
# One optimizer: search, then seeds at the best lr; the defaults alongside.


class _OptimizerPlan:
    """One optimizer's studies: lr search, then seeds at the best lr; defaults beside."""

    def __init__(self, sweep: _Sweep, label: str) -> None:
        self.sweep = sweep
        self.label = label
        config = sweep.config
        name, kwargs = registry.parse_spec(label)
        self.spec = format_spec(name, kwargs)  # tuned mode: torch's defaults + the spec
        self.defaults_spec = default_spec(label)
        self.name = name
        self.fixed_lr: float | None = kwargs.get("lr")
        self.seeds = list(range(1, config.seed_count + 1))
        self.grid: list[float] = []
        self.search: _StudyWork | None = None
        self.confirm: _StudyWork | None = None
        self.defaults: _StudyWork | None = None
        tuned = config.mode in ("both", "tuned")
        if tuned and self.fixed_lr is None:
            low, high = LR_RANGES.get(name, FALLBACK_LR_RANGE)
            distribution = {"lr": FloatDistribution(low / 2, high * 2, log=True)}
            if config.trials is None:
                self.grid = lr_grid(self.spec, config.points)
                self.search = sweep.work(
                    "search", label, self.spec, {"search": "grid", "lrs": self.grid},
                    distribution, wanted=[{"lr": lr} for lr in self.grid],
                )
            else:
                self.search = sweep.work(
                    "search", label, self.spec, {"search": "tpe", "range": [low, high]},
                    distribution, sampler_trials=config.trials, sampler=True,
                )
        if config.mode in ("both", "defaults"):
            self.defaults = sweep.work(
                "default", label, self.defaults_spec, {}, {"seed": IntDistribution(0, 1_000_000)},
                wanted=[{"seed": seed} for seed in self.seeds],
            )
        self.tuned = tuned

    @property
    def planned(self) -> int:
        total = self.search.planned if self.search else 0
        total += len(self.seeds) if self.tuned else 0
        return total + (self.defaults.planned if self.defaults else 0)

    def best_lr(self) -> float | None:
        if self.fixed_lr is not None:
            return float(self.fixed_lr)
        if self.search is None or not self.search.done():
            return None
        trials = sorted(self.search.complete, key=lambda t: (t.value, t.params["lr"]))
        return float(trials[0].params["lr"])

    def confirmation(self) -> _StudyWork | None:
        if not self.tuned:
            return None
        if self.confirm is None:
            best = self.best_lr()
            if best is None:
                return None
            self.confirm = self.sweep.work(
                "seed", self.label, self.spec, {"search": self.search_key(), "lr": best},
                {"lr": FloatDistribution(best / 2, best * 2, log=True), "seed": IntDistribution(0, 1_000_000)},
                wanted=[{"lr": best, "seed": seed} for seed in self.seeds],
            )
        return self.confirm

    def search_key(self) -> Any:
        if self.fixed_lr is not None:
            return {"search": "fixed"}
        return {"search": "grid", "lrs": self.grid} if self.grid else {"search": "tpe"}

    def units(self) -> list[_StudyWork]:
        return [unit for unit in (self.search, self.confirmation(), self.defaults) if unit]

    def done(self) -> bool:
        if self.tuned and self.confirmation() is None:
            return False
        return all(unit.done() for unit in self.units())

    def next_trial(self) -> tuple[_StudyWork, optuna.Trial] | None:
        # The search first: claiming refreshes it, so a search that just finished is
        # seen before deciding whether the seed re-runs can start.
        if self.search is not None:
            trial = self.search.next_trial()
            if trial is not None:
                return self.search, trial
        for unit in (self.confirmation(), self.defaults):
            if unit is not None:
                trial = unit.next_trial()
                if trial is not None:
                    return unit, trial
        return None


def _open_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url``; SQLite files get a long lock timeout, since several
    worker processes may write at once."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    for attempt in range(1, attempts + 1):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
            if url.startswith("sqlite"):
                _serialize_sqlite_transactions(storage.engine)
            return storage
        except Exception as error:  # bad URL, missing driver, unreachable server
            # Workers that start together race to create the schema; the loser retries.
            if attempt == attempts or "UNIQUE constraint" not in str(error) and "already exists" not in str(error):
                raise ValueError(f"cannot open storage {url!r}: {error}") from error
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _serialize_sqlite_transactions(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins.

    Optuna claims a queued trial by reading that it is WAITING and then marking it
    RUNNING; PostgreSQL locks the row in between (SELECT ... FOR UPDATE), SQLite
    does not, so two processes could both claim one trial. ``BEGIN IMMEDIATE`` makes
    the read and the write one atomic step (SQLAlchemy's recipe for pysqlite)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy, not the driver, begins

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners are dropped


class _Sweep:
    def __init__(self, config: SweepConfig) -> None:
        self.config = config
        self.storage = _open_storage(config.storage_url)
        self.study_names: list[str] = []

    def base_key(self, spec: str) -> dict[str, Any]:
        config = self.config
        name, kwargs = registry.parse_spec(spec)
        return {
            "version": 1,
            "task": config.task,
            "optimizer": name,
            "arguments": {key: kwargs[key] for key in sorted(kwargs)},
            "batch_size": config.batch_size,
            "epochs": config.epoch_count,
            "steps": config.steps,
            "schedule": config.schedule,
            "clip_norm": config.clip_norm,
            "divergence_factor": config.divergence_factor,
            "divergence_patience": config.divergence_patience,
        }

    def work(
        self,
        phase: str,
        label: str,
        spec: str,
        extra: dict[str, Any],
        distributions: dict[str, Any],
        wanted: list[dict[str, Any]] | None = None,
        sampler_trials: int | None = None,
        sampler: bool = False,
    ) -> _StudyWork:
        key = {**self.base_key(spec), "phase": phase, **extra}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=repr).encode()).hexdigest()[:12]
        name = f"{self.config.task}/{registry.parse_spec(spec)[0]}/{phase}/{digest}"
        study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            direction="minimize",
            load_if_exists=True,
            sampler=_tpe(self.config.trials) if sampler else None,
        )
        if name not in self.study_names:
            self.study_names.append(name)
            study.set_user_attr("key", key)
        return _StudyWork(study, phase, label, spec, distributions, wanted, sampler_trials)


def _tpe(trials: int | None) -> optuna.samplers.TPESampler:
    # TPE samples at random for its first n_startup_trials; with the few trials a 1-D lr
    # search gets, a third of them is enough. constant_liar keeps parallel workers apart.
    startup = min(10, max(3, (trials or 0) // 3))
    return optuna.samplers.TPESampler(seed=0, n_startup_trials=startup, constant_liar=True)


# ---------------------------------------------------------------------------------------
# Running: in this process, or in a pool of worker processes.

_WORKER_PROGRESS: Any = None


def _init_worker(queue: Any, threads: int, task: str, task_files: tuple[str, ...]) -> None:
    global _WORKER_PROGRESS
    _WORKER_PROGRESS = queue
    torch.set_num_threads(threads)
    if task not in available_tasks():  # a spawned (not forked) worker: register user tasks again
        for path in task_files:
            runpy.run_path(path, run_name="ravine_user_tasks")


def _execute(
    task: str,
    configs: list[TrainConfig],
    keys: list[int],
    report: Callable[[int, int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``configs`` (one run, or several batched) and return their rows."""
    if report is None and _WORKER_PROGRESS is not None:
        queue = _WORKER_PROGRESS

        def report(key: int, step: int, total: int, loss: float) -> None:
            if step % 10 == 0 or step == total:
                queue.put((key, step, loss))

    if len(configs) == 1:
        one = None if report is None else lambda step, total, loss: report(keys[0], step, total, loss)
        return [train(task, configs[0], progress=one).to_dict()]
    many = None if report is None else lambda run, step, total, loss: report(keys[run], step, total, loss)
    return [result.to_dict() for result in train_batched(task, configs, progress=many)]


class _InlineExecutor:
    """The executor interface, running each submission at once in this process."""

    def submit(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(function(*args, **kwargs))
        except Exception as error:  # delivered through the future, like a process pool
            future.set_exception(error)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None: ...


def run_sweep(config: SweepConfig, progress: SweepProgress | None = None) -> SweepResult:
    """Run (or resume) the sweep ``config`` describes; returns every finished run's row.

    Runs that diverge are rows with ``status="diverged"``; the sweep goes on. Any other
    error in a run marks its trial failed and is raised. Ctrl-C marks the runs in flight
    failed, so the next call reruns them and nothing else.
    """
    progress = progress or SweepProgress()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = get_task(config.task)
    task.data  # load (and cache) once here, before any worker process starts
    sweep = _Sweep(config)
    plans = [_OptimizerPlan(sweep, label) for label in config.optimizers]
    finished_before = sum(
        len(unit.complete) for plan in plans for unit in plan.units()
    )
    progress.start(sum(plan.planned for plan in plans), finished_before)

    previous_threads = torch.get_num_threads()
    queue = None
    if config.jobs > 1:
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        queue = context.Queue()
        executor: Any = concurrent.futures.ProcessPoolExecutor(
            max_workers=config.jobs, mp_context=context, initializer=_init_worker,
            initargs=(queue, config.threads, config.task, tuple(str(path) for path in config.task_files)),
        )
    else:
        torch.set_num_threads(config.threads)
        executor = _InlineExecutor()

    inflight: dict[concurrent.futures.Future, list[tuple[_StudyWork, optuna.Trial, int]]] = {}
    batchable = {
        spec: config.batch and can_batch(task, spec)
        for plan in plans for spec in (plan.spec, plan.defaults_spec)
    }
    executed = 0
    next_key = 0
    last_beat = time.monotonic()
    try:
        while True:
            for plan in plans:
                while len(inflight) < config.jobs:
                    claimed = plan.next_trial()
                    if claimed is None:
                        break
                    unit, trial = claimed
                    claims = [trial]
                    # A grid or a set of seeds: claim the unit's other runs to train together.
                    if unit.wanted is not None and batchable[unit.spec]:
                        while len(claims) < MAX_BATCH:
                            more = unit.next_trial()
                            if more is None:
                                break
                            claims.append(more)
                    batch = []
                    for claim in claims:
                        batch.append((unit, claim, next_key))
                        next_key += 1
                    inflight[_submit(executor, config, task.data.num_train, batch, progress)] = batch
            if not inflight:
                if all(plan.done() for plan in plans):
                    for plan in plans:
                        for unit in plan.units():
                            unit.prune_stale_queue()
                    break
                progress.waiting("waiting for trials that other workers are running")
                time.sleep(_POLL_S)
                continue
            done, _ = concurrent.futures.wait(
                list(inflight), timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED
            )
            _drain(queue, progress)
            for future in done:
                batch = inflight.pop(future)
                for unit, trial, _ in batch:
                    unit.release(trial)
                error = future.exception()
                if error is not None:
                    for unit, trial, _ in batch:
                        _give_back(unit, trial)
                    raise error
                for (unit, trial, key), row in zip(batch, future.result(), strict=True):
                    value = row["final_train_loss"] if row["status"] == "ok" else math.inf
                    try:
                        trial.set_user_attr("run", row)
                        unit.study.tell(trial, value if math.isfinite(value) else math.inf)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        pass  # another worker took the same queued trial and finished it first
                    executed += 1
                    progress.run_finished(key, _row(row, unit, trial))
            if time.monotonic() - last_beat > HEARTBEAT_INTERVAL_S:
                last_beat = time.monotonic()
                for batch in inflight.values():
                    for _, trial, _ in batch:
                        _beat(trial)
    except BaseException:
        for batch in inflight.values():
            for unit, trial, _ in batch:
                _give_back(unit, trial)
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        progress.stop()
        torch.set_num_threads(previous_threads)
    executor.shutdown(wait=True)
    return _collect(config, sweep, plans, executed)


def _submit(
    executor: Any,
    config: SweepConfig,
    num_train: int,
    batch: list[tuple[_StudyWork, optuna.Trial, int]],
    progress: SweepProgress,
) -> concurrent.futures.Future:
    """Start the runs of ``batch`` (trials of one unit when more than one): in a worker
    process, or in this one."""
    try:
        configs = []
        for unit, trial, key in batch:
            _beat(trial)
            lr = trial.params.get("lr") if unit.phase != "default" else None
            train_config = config.train_config(unit.spec, lr, int(trial.params.get("seed", 0)))
            total = train_config.steps or train_config.epochs * math.ceil(num_train / train_config.batch_size)
            progress.run_started(key, _describe(unit, trial), total)
            configs.append(train_config)
        keys = [key for _, _, key in batch]
        if config.jobs > 1:
            return executor.submit(_execute, config.task, configs, keys)
        last_beat = time.monotonic()

        def advance(key: int, step: int, total: int, loss: float) -> None:
            nonlocal last_beat
            if step % 10 == 0 or step == total:
                progress.run_advanced(key, step, loss)
            if time.monotonic() - last_beat > HEARTBEAT_INTERVAL_S:
                last_beat = time.monotonic()  # a long in-process run must not look stale
                for _, trial, _ in batch:
                    _beat(trial)

        return executor.submit(_execute, config.task, configs, keys, advance)
    except BaseException:
        # Ctrl-C during an in-process run lands here: free the trials for the next call.
        for unit, trial, _ in batch:
            unit.release(trial)
            _give_back(unit, trial)
        raise


def _give_back(unit: _StudyWork, trial: optuna.Trial) -> None:
    """Mark an unfinished trial failed, so that the next call runs it again."""
    try:
        unit.study.tell(trial, state=TrialState.FAIL)
    except Exception:  # finished meanwhile by a worker that took the same queued trial
        pass


def _beat(trial: optuna.Trial) -> None:
    try:
        trial.set_user_attr("heartbeat", time.time())
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # finished by a worker that took the same queued trial


def _drain(queue: Any, progress: SweepProgress) -> None:
    if queue is None:
        return
    while True:
        try:
            key, step, loss = queue.get_nowait()
        except Exception:
            return
        progress.run_advanced(key, step, loss)


def _describe(unit: _StudyWork, trial: optuna.Trial) -> str:
    parts = [unit.label, {"search": "lr search", "seed": "tuned", "default": "defaults"}[unit.phase]]
    if "lr" in trial.params:
        parts.append(f"lr={trial.params['lr']:.3g}")
    parts.append(f"seed {int(trial.params.get('seed', 0))}")
    return " · ".join(parts)


def _row(run: dict[str, Any], unit: _StudyWork, trial: Any) -> dict[str, Any]:
    return {
        **run,
        "label": unit.label,
        "phase": unit.phase,
        "trial": trial.number,
        "study": unit.study.study_name,
    }


def _collect(config: SweepConfig, sweep: _Sweep, plans: list[_OptimizerPlan], executed: int) -> SweepResult:
    rows: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    edges: dict[str, bool] = {}
    searched: dict[str, list[float]] = {}
    for plan in plans:
        for unit in plan.units():
            unit.refresh()
            for trial in sorted(unit.complete, key=lambda t: t.number):
                if "run" in trial.user_attrs:
                    rows.append(_row(trial.user_attrs["run"], unit, trial))
        lr = plan.best_lr()
        if lr is not None:
            best[plan.label] = lr
            edges[plan.label] = bool(plan.grid) and lr in (plan.grid[0], plan.grid[-1])
        if plan.search is not None:
            searched[plan.label] = sorted(float(t.params["lr"]) for t in plan.search.complete)
    return SweepResult(
        config=config,
        rows=rows,
        executed=executed,
        reused=len(rows) - executed,
        best_lr=best,
        lr_at_grid_edge=edges,
        search=searched,
        studies=list(sweep.study_names),
    )
