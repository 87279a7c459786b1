"""The arena's training loop: one optimizer, one task, one seed, everything measured.

Each step is forward, loss, backward, optional gradient clipping by global norm, the
optimizer step and the learning-rate schedule. Held-out data is evaluated before the
first step, after every epoch and after the last step. A run whose loss turns NaN or
infinite, or stays above ``initial + divergence_factor * |initial|`` for
``divergence_patience`` steps in a row (or until the end of the run), stops there and is
recorded as diverged rather than raising. The patience matters: Adagrad and RMSprop at large learning rates spike
the loss by 100x on their first step (every coordinate moves by about lr) and then
recover, and such a run is slow to start, not divergent.
"""

from __future__ import annotations

import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ravine import registry
from ravine.clip import clip_grad_norm_
from ravine.optim import lowmem
from ravine.optim.schedulefree import evaluation_mode
from ravine.arena.tasks import Task, get_task

__all__ = [
    "SCHEDULES",
    "format_spec",
    "RunResult",
    "TrainConfig",
    "evaluate",
    "optimizer_state_bytes",
    "train",
]

SCHEDULES = ("constant", "cosine", "warmup-cosine", "one-cycle")
WARMUP_FRACTION = 0.05  # of the run's steps, for "warmup-cosine"


def format_spec(name: str, kwargs: dict[str, Any]) -> str:
    """The spec string for ``name`` and ``kwargs`` (parsable by ``ravine.parse_spec``)."""
    if not kwargs:
        return name
    return f"{name}({', '.join(f'{key}={value!r}' for key, value in kwargs.items())})"


@dataclass(frozen=True)
class TrainConfig:
    """What one run does. ``steps`` (a step budget) wins over ``epochs`` when both are set;
    ``lr`` overrides the learning rate of the ``optimizer`` spec."""

    optimizer: str
    lr: float | None = None
    batch_size: int = 32
    epochs: int | None = 1
    steps: int | None = None
    schedule: str = "constant"
    clip_norm: float | None = None
    seed: int = 0
    divergence_factor: float = 100.0
    divergence_patience: int = 10

    def __post_init__(self) -> None:
        registry.parse_spec(self.optimizer)  # raises ValueError listing valid names
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0 or None, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.epochs is None and self.steps is None:
            raise ValueError("give epochs or steps (a step budget); both are None")
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.clip_norm is not None and not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a finite number > 0 or None, got {self.clip_norm!r}")
        if not self.divergence_factor > 0:
            raise ValueError(f"divergence_factor must be > 0, got {self.divergence_factor!r}")
        if not isinstance(self.divergence_patience, int) or self.divergence_patience < 1:
            raise ValueError(f"divergence_patience must be an integer >= 1, got {self.divergence_patience!r}")


@dataclass
class RunResult:
    """Everything one run measured; ``to_dict`` gives the row written to results.json."""

    task: str
    optimizer: str
    spec: str
    lr: float
    seed: int
    batch_size: int
    schedule: str
    clip_norm: float | None
    hyperparameters: dict[str, Any]
    status: str  # "ok" or "diverged"
    steps_planned: int
    steps: int
    steps_per_epoch: int
    diverged_at_step: int | None
    initial_loss: float
    final_train_loss: float
    final_test_loss: float
    final_test_metric: float
    metric_name: str
    higher_is_better: bool
    train_loss: list[float]
    eval_steps: list[int]
    eval_epochs: list[float]
    test_loss: list[float]
    test_metric: list[float]
    wall_time_s: float
    train_time_s: float
    time_per_step_s: float
    optimizer_step_time_s: float
    state_bytes: int
    parameter_count: int
    parameter_bytes: int
    peak_memory_bytes: int
    peak_memory_method: str
    torch_threads: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunResult:
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's per-parameter state (step counters
    included): :func:`ravine.optim.lowmem.state_bytes`."""
    return lowmem.state_bytes(optimizer)


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, split: str = "test") -> tuple[float, float]:
    """Mean loss and mean metric of ``model`` on the task's ``split`` ("test" or "train")."""
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    data = task.data
    inputs = getattr(data, f"{split}_inputs")
    targets = getattr(data, f"{split}_targets")
    was_training = model.training
    model.eval()
    loss_sum = metric_sum = 0.0
    for start in range(0, len(inputs), task.eval_batch_size):
        batch_inputs = inputs[start : start + task.eval_batch_size]
        batch_targets = targets[start : start + task.eval_batch_size]
        outputs = model(batch_inputs)
        count = len(batch_inputs)
        loss_sum += float(task.loss_fn(outputs, batch_targets)) * count
        metric_sum += float(task.metric_fn(outputs, batch_targets)) * count
    model.train(was_training)
    return loss_sum / len(inputs), metric_sum / len(inputs)


ProgressCallback = Callable[[int, int, float], None]
"""Called as ``callback(step, total_steps, loss)`` after each step."""

EvaluationCallback = Callable[[int, float, float], None]
"""Called as ``callback(step, test_loss, test_metric)`` after each held-out evaluation."""


def train(
    task: Task | str,
    config: TrainConfig,
    progress: ProgressCallback | None = None,
    evaluation: EvaluationCallback | None = None,
) -> RunResult:
    """Train ``task``'s model from seed ``config.seed`` and return what was measured.

    ``progress`` is called after every step and ``evaluation`` after every held-out
    evaluation (step 0, each epoch's end, the last step); either may raise to end the run.

    Timing: ``time_per_step_s`` is the median wall time of forward + backward + clipping +
    optimizer step + schedule (evaluation excluded; the median shrugs off the odd step
    that other processes on the machine interrupt); ``optimizer_step_time_s`` is the
    median of ``optimizer.step()`` alone; ``train_time_s`` sums every training step. Memory: ``state_bytes`` is exact (see
    :func:`optimizer_state_bytes`); ``peak_memory_bytes`` is how far the process's
    resident set rose above where it stood when the run started (Linux: the VmHWM
    high-water mark, reset at the start of the run; elsewhere ``ru_maxrss``, which
    cannot be reset and so reads 0 once an earlier run peaked higher).
    """
    if isinstance(task, str):
        task = get_task(task)
    data = task.data
    steps_per_epoch = math.ceil(data.num_train / config.batch_size)
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch

    wall_start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = task.make_model(config.seed)
    model.train()
    overrides = {} if config.lr is None else {"lr": config.lr}
    optimizer = registry.create(config.optimizer, model.parameters(), **overrides)
    lr = float(optimizer.param_groups[0]["lr"])
    scheduler = _make_scheduler(config.schedule, optimizer, lr, total_steps)
    memory_before, memory_method = _reset_peak_memory()

    shuffle = torch.Generator().manual_seed(config.seed)
    train_losses: list[float] = []
    eval_steps: list[int] = []
    test_losses: list[float] = []
    test_metrics: list[float] = []
    initial_loss: float | None = None
    limit = math.inf
    diverged_at: int | None = None
    above_since: int | None = None  # first step of the current run of losses above the limit
    state_bytes = 0
    step_durations: list[float] = []
    optimizer_durations: list[float] = []

    def record_evaluation(step: int) -> bool:
        with evaluation_mode(optimizer):  # schedule-free optimizers: evaluate the average x
            loss, metric = evaluate(task, model)
        eval_steps.append(step)
        test_losses.append(loss)
        test_metrics.append(metric)
        if evaluation is not None:
            evaluation(step, loss, metric)
        return math.isfinite(loss)

    record_evaluation(0)
    step = 0
    while step < total_steps and diverged_at is None:
        order = torch.randperm(data.num_train, generator=shuffle)
        for start in range(0, data.num_train, config.batch_size):
            if step >= total_steps:
                break
            index = order[start : start + config.batch_size]
            inputs, targets = data.train_inputs[index], data.train_targets[index]
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(inputs), targets)
            value = loss.detach().item()
            if initial_loss is None:
                initial_loss = value
                limit = value + config.divergence_factor * max(abs(value), 1e-8)
            if value > limit:
                above_since = step if above_since is None else above_since
            else:
                above_since = None
            if not math.isfinite(value) or (
                above_since is not None and step - above_since + 1 >= config.divergence_patience
            ):
                diverged_at = step if above_since is None else above_since
                train_losses.append(value if math.isfinite(value) else math.nan)
                break
            loss.backward()
            if config.clip_norm is not None:
                clip_grad_norm_(model.parameters(), config.clip_norm)
            step_began = time.perf_counter()
            optimizer.step()
            ended = time.perf_counter()
            if scheduler is not None:
                scheduler.step()
            step_durations.append(time.perf_counter() - began)
            optimizer_durations.append(ended - step_began)
            train_losses.append(value)
            step += 1
            if step == 1:
                state_bytes = optimizer_state_bytes(optimizer)
            if progress is not None:
                progress(step, total_steps, value)
        if diverged_at is None and (step % steps_per_epoch == 0 or step >= total_steps):
            if not record_evaluation(step):
                diverged_at = step

    if diverged_at is None and above_since is not None:
        diverged_at = above_since  # the budget ran out with the loss still far above the start
    peak_memory = max(0, _peak_memory() - memory_before)
    state_bytes = state_bytes or optimizer_state_bytes(optimizer)
    parameters = list(model.parameters())
    return run_result(
        task,
        config,
        lr,
        steps_planned=total_steps,
        steps=step,
        steps_per_epoch=steps_per_epoch,
        diverged_at=diverged_at,
        initial_loss=initial_loss,
        train_losses=train_losses,
        eval_steps=eval_steps,
        test_losses=test_losses,
        test_metrics=test_metrics,
        step_durations=step_durations,
        optimizer_durations=optimizer_durations,
        wall_time_s=time.perf_counter() - wall_start,
        state_bytes=state_bytes,
        parameter_count=sum(p.numel() for p in parameters),
        parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
        peak_memory_bytes=peak_memory,
        peak_memory_method=memory_method,
    )


def run_result(
    task: Task,
    config: TrainConfig,
    lr: float,
    *,
    steps_planned: int,
    steps: int,
    steps_per_epoch: int,
    diverged_at: int | None,
    initial_loss: float | None,
    train_losses: list[float],
    eval_steps: list[int],
    test_losses: list[float],
    test_metrics: list[float],
    step_durations: list[float],
    optimizer_durations: list[float],
    **measured: Any,
) -> RunResult:
    """A run's :class:`RunResult` from what it recorded, step by step and at each
    evaluation (sequential and batched runs alike); ``measured`` holds the remaining
    fields as measured (wall time, state and parameter bytes, peak memory, extra).
    The final train loss averages the last tenth of the finite step losses (at most an
    epoch's); a diverged run reports NaN for its final losses and metric."""
    name, spec_arguments = registry.parse_spec(config.optimizer)
    hyperparameters = registry.describe(config.optimizer)
    hyperparameters["lr"] = lr
    ok = diverged_at is None
    finite_losses = [value for value in train_losses if math.isfinite(value)]
    tail = max(1, min(steps_per_epoch, math.ceil(0.1 * len(finite_losses)))) if finite_losses else 1
    return RunResult(
        task=task.name,
        optimizer=name,
        spec=config.optimizer if config.lr is None else format_spec(name, {**spec_arguments, "lr": lr}),
        lr=lr,
        seed=config.seed,
        batch_size=config.batch_size,
        schedule=config.schedule,
        clip_norm=config.clip_norm,
        hyperparameters=_plain(hyperparameters),
        status="ok" if ok else "diverged",
        steps_planned=steps_planned,
        steps=steps,
        steps_per_epoch=steps_per_epoch,
        diverged_at_step=diverged_at,
        initial_loss=initial_loss if initial_loss is not None else math.nan,
        final_train_loss=sum(finite_losses[-tail:]) / tail if ok and finite_losses else math.nan,
        final_test_loss=test_losses[-1] if ok else math.nan,
        final_test_metric=test_metrics[-1] if ok else math.nan,
        metric_name=task.metric_name,
        higher_is_better=task.higher_is_better,
        train_loss=train_losses,
        eval_steps=eval_steps,
        eval_epochs=[s / steps_per_epoch for s in eval_steps],
        test_loss=test_losses,
        test_metric=test_metrics,
        train_time_s=math.fsum(step_durations),
        time_per_step_s=statistics.median(step_durations) if step_durations else math.nan,
        optimizer_step_time_s=statistics.median(optimizer_durations) if optimizer_durations else math.nan,
        torch_threads=torch.get_num_threads(),
        **measured,
    )


def _make_scheduler(schedule: str, optimizer: torch.optim.Optimizer, lr: float, total_steps: int) -> Any:
    if schedule == "constant":
        return None
    from ravine import schedules

    if schedule == "cosine":
        rule = schedules.cosine(lr, total_steps)
    elif schedule == "warmup-cosine":
        rule = schedules.warmup_cosine(lr, int(WARMUP_FRACTION * total_steps), total_steps)
    else:
        rule = schedules.one_cycle(lr, total_steps)
    return schedules.ScheduledLR(optimizer, rule)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as JSON-friendly values (tuples to lists, tensors to floats)."""
    plain = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        elif isinstance(value, tuple):
            value = list(value)
        plain[key] = value
    return plain


_STATUS = "/proc/self/status"


def _reset_peak_memory() -> tuple[int, str]:
    """Reset the peak-RSS mark where the OS allows it; returns (current bytes, method)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            return _status_kilobytes("VmRSS") * 1024, "peak RSS rise (Linux VmHWM, reset per run)"
        except OSError:
            pass
    return _peak_memory(), "peak RSS rise (ru_maxrss, not resettable)"


def _peak_memory() -> int:
    if sys.platform.startswith("linux"):
        try:
            return _status_kilobytes("VmHWM") * 1024
        except (OSError, ValueError):
            pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _status_kilobytes(field_name: str) -> int:
    with open(_STATUS) as handle:
        match = re.search(rf"^{field_name}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{field_name} not found in {_STATUS}")
    return int(match.group(1))
