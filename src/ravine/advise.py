"""Advice on which optimizer fits a model: state memory, step time and a learning-rate range test.

``advise(model, loss_fn, batch)`` measures, for each optimizer, on a private copy of the
model (the user's model is never touched):

* **state memory**: the exact bytes of every tensor in the optimizer's ``state_dict()["state"]``
  after one real step (``step`` counters included), and bytes per trainable parameter;
* **step time**: the median wall time of the optimizer step alone (what differs between
  optimizers) and of the whole training step (zero_grad + forward + backward + step),
  over several repeats after a warm-up, on this machine;
* **learning-rate range test** (Smith, "Cyclical Learning Rates for Training Neural
  Networks", 2017; fastai's ``lr_find``): the learning rate grows exponentially from
  ``lr_min`` to ``lr_max``, one training step per value,

  .. math:: \\eta_i = \\eta_{min} (\\eta_{max} / \\eta_{min})^{i / (N - 1)},

  the loss is smoothed by a bias-corrected exponential moving average
  :math:`\\bar\\ell_i = m_i / (1 - \\beta^{i+1})`, :math:`m_i = \\beta m_{i-1} + (1-\\beta)\\ell_i`
  with :math:`\\beta = 0.98`, and the sweep stops as soon as the smoothed loss exceeds 4x the
  best one so far or the loss is not finite. The suggested learning rate is the middle of
  the *valley* (see :func:`suggest_lr`).

It ends with a recommendation computed by :func:`recommend` from those numbers and the
memory and time budgets.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ravine import registry
from ravine.optim.lowmem import state_bytes as count_state_bytes
from ravine.optim.schedulefree import evaluation_mode
from ravine.registry import split_specs

__all__ = [
    "Advice",
    "OptimizerAdvice",
    "RangeTest",
    "advise",
    "format_bytes",
    "lr_range_test",
    "optimizer_family",
    "parse_duration",
    "parse_size",
    "recommend",
    "split_specs",
    "suggest_lr",
]

Batch = tuple[Any, Any]
BatchSource = Batch | Callable[[], Batch]

# Families in the order the recommendation prefers them (see `recommend`).
FAMILY_PREFERENCE = ("adam", "momentum", "adaptive", "sgd")
FAMILY_DESCRIPTION = {
    "adam": "the Adam family",
    "momentum": "SGD with momentum",
    "adaptive": "other adaptive methods",
    "sgd": "plain SGD",
}
_ADAM_NAMES = {"adam", "adamw", "amsgrad", "nadam", "radam", "adamax", "adam-bf16", "adamw-bf16", "adam-8bit", "adamw-8bit"}
_SGD_NAMES = {"sgd", "momentum", "nesterov", "momentum-bf16", "momentum-8bit"}


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class RangeTest:
    """One learning-rate range test: the sweep as run and the suggestion drawn from it.

    ``lrs[i]`` is the learning rate of step ``i``; ``losses[i]`` is the loss of the batch seen
    at that step (computed before the step is taken) and ``smoothed_losses[i]`` its
    bias-corrected moving average. ``valley`` holds the learning rates bounding the descent
    the suggestion is drawn from, ``None`` when the loss never clearly fell.
    """

    spec: str
    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggested_lr: float | None
    valley: tuple[float, float] | None
    steps_planned: int
    stop_reason: str

    @property
    def steps_run(self) -> int:
        return len(self.lrs)

    @property
    def stopped_early(self) -> bool:
        """True when the sweep stopped before ``steps_planned`` because the loss blew up."""
        return self.steps_run < self.steps_planned

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "suggested_lr": self.suggested_lr,
            "valley": list(self.valley) if self.valley else None,
            "steps_planned": self.steps_planned,
            "steps_run": self.steps_run,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "lrs": self.lrs,
            "losses": [_json_float(value) for value in self.losses],
            "smoothed_losses": [_json_float(value) for value in self.smoothed_losses],
        }


@dataclass
class OptimizerAdvice:
    """The measurements for one optimizer spec."""

    spec: str
    name: str
    family: str
    parameter_count: int
    state_bytes: int
    state_tensors: int
    optimizer_step_ms: float
    train_step_ms: float
    range_test: RangeTest | None = None

    @property
    def state_bytes_per_parameter(self) -> float:
        return self.state_bytes / self.parameter_count

    @property
    def suggested_lr(self) -> float | None:
        return self.range_test.suggested_lr if self.range_test else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "name": self.name,
            "family": self.family,
            "state_bytes": self.state_bytes,
            "state_bytes_per_parameter": self.state_bytes_per_parameter,
            "state_tensors": self.state_tensors,
            "optimizer_step_ms": self.optimizer_step_ms,
            "train_step_ms": self.train_step_ms,
            "suggested_lr": self.suggested_lr,
            "range_test": self.range_test.to_dict() if self.range_test else None,
        }


@dataclass
class Advice:
    """What :func:`advise` measured, and the recommendation that follows from it."""

    rows: list[OptimizerAdvice]
    parameter_count: int
    parameter_tensors: int
    parameter_bytes: int
    memory_budget: int | None
    time_budget: float | None
    recommended: str | None
    recommendation: str
    excluded: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def row(self, spec: str) -> OptimizerAdvice:
        """The row measured for ``spec`` (as passed to :func:`advise`)."""
        for row in self.rows:
            if row.spec == spec:
                return row
        raise ValueError(f"spec must be one of {[row.spec for row in self.rows]}, got {spec!r}")

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready values (non-finite losses become ``None``)."""
        return {
            "parameter_count": self.parameter_count,
            "parameter_tensors": self.parameter_tensors,
            "parameter_bytes": self.parameter_bytes,
            "memory_budget_bytes": self.memory_budget,
            "time_budget_ms": self.time_budget,
            "recommended": self.recommended,
            "recommendation": self.recommendation,
            "excluded": dict(self.excluded),
            "environment": dict(self.environment),
            "optimizers": [row.to_dict() for row in self.rows],
        }

    def to_table(self) -> Any:
        """A :class:`rich.table.Table` with one row per optimizer."""
        from rich import box
        from rich.table import Table

        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            title=f"Optimizers for {self.parameter_count:,} parameters "
            f"({format_bytes(self.parameter_bytes)})"
        )
        table.add_column("optimizer", no_wrap=True)
        table.add_column("state bytes", justify="right", min_width=7)
        table.add_column("B/param", justify="right", min_width=7)
        table.add_column("step ms", justify="right")
        table.add_column("train ms", justify="right")
        table.add_column("lr", justify="right", min_width=7)
        table.add_column("verdict")
        for row in self.rows:
            if row.spec == self.recommended:
                verdict = "[bold green]chosen[/]"
            elif row.spec in self.excluded:
                over = []
                if self.memory_budget is not None and row.state_bytes > self.memory_budget:
                    over.append("mem")
                if self.time_budget is not None and row.train_step_ms > self.time_budget:
                    over.append("time")
                verdict = f"[red]> {over[0] if len(over) == 1 else 'both'}[/]"
            else:
                verdict = "fits"
            table.add_row(
                row.spec,
                f"{row.state_bytes:,}",
                f"{row.state_bytes_per_parameter:.2f}",
                f"{row.optimizer_step_ms:.3f}",
                f"{row.train_step_ms:.3f}",
                f"{row.suggested_lr:.1e}" if row.suggested_lr is not None else "-",
                verdict,
            )
        table.caption_justify = "left"
        table.caption = (
            "step ms: optimizer step alone; train ms: whole training step (medians); "
            "lr: range-test suggestion; > mem, > time, > both: over the memory or time budget"
        )
        return table

    def plot(self, path: str | Path) -> Path:
        """Write the range-test figure (smoothed loss against learning rate) to ``path``."""
        from matplotlib.figure import Figure

        tests = [row.range_test for row in self.rows if row.range_test and row.range_test.lrs]
        if not tests:
            raise ValueError("plot needs at least one range test; advise ran with range_steps=0")
        figure = Figure(figsize=(8, 5), layout="constrained")
        axes = figure.subplots()
        colors = _colors(len(tests))
        low, high = math.inf, -math.inf
        for test, color in zip(tests, colors):
            finite = [(lr, loss) for lr, loss in zip(test.lrs, test.smoothed_losses) if math.isfinite(loss)]
            if not finite:
                continue
            lrs, losses = zip(*finite)
            label = test.spec
            if test.suggested_lr is not None:
                label += f"  (suggested {test.suggested_lr:.1e})"
            axes.plot(lrs, losses, color=color, linewidth=1.6, label=label)
            if test.valley is not None:
                # The valley is drawn as a thicker stretch of the curve itself.
                inside = [(lr, loss) for lr, loss in finite if test.valley[0] <= lr <= test.valley[1]]
                if inside:
                    axes.plot(*zip(*inside), color=color, linewidth=4.5, alpha=0.45,
                              solid_capstyle="round")
            if test.suggested_lr is not None:
                index = min(range(len(lrs)), key=lambda i: abs(math.log(lrs[i] / test.suggested_lr)))
                axes.plot(lrs[index], losses[index], "o", color=color, markersize=7,
                          markeredgecolor="black", zorder=3)
            low = min(low, min(losses))
            # The blow-up at the end would flatten everything else: cap the view a little
            # above where each curve started.
            high = max(high, max(losses[: max(1, len(losses) // 10)]))
        axes.set_xscale("log")
        if math.isfinite(low) and math.isfinite(high) and high > low:
            margin = 0.08 * (high - low)
            axes.set_ylim(low - margin, high + 3 * margin)
        axes.set_xlabel("learning rate")
        axes.set_ylabel("smoothed training loss")
        axes.set_title("Learning-rate range test (thick: valley, dot: suggested lr)")
        axes.grid(True, which="major", alpha=0.3)
        axes.legend(fontsize=8, loc="best")
        path = Path(path)
        figure.savefig(path, dpi=120)
        return path


# --------------------------------------------------------------------------------------
# The advisor
# --------------------------------------------------------------------------------------


def advise(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: BatchSource,
    optimizers: str | Iterable[str] | None = None,
    memory_budget: int | float | str | None = None,
    time_budget: float | str | None = None,
    lr_range: tuple[float, float] = (1e-7, 10.0),
    range_steps: int = 200,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
    timing_repeats: int = 20,
    warmup_steps: int = 3,
) -> Advice:
    """Measure state memory, step time and a learning-rate range test for each optimizer.

    Args:
        model: the user's model; it is deep-copied, never modified (parameters, buffers and
            the global torch random state are the same afterwards).
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss (non-negative,
            as the range test's stop rule assumes).
        batch: ``(inputs, targets)``, or a callable returning one, called once per range-test
            step so the sweep sees fresh batches. Timing uses one batch throughout.
        optimizers: spec strings (``"adamw(weight_decay=0.1)"``), one spec, or ``None`` for
            every registered optimizer (``ravine.available()``).
        memory_budget: the most bytes the optimizer state may take: a number of bytes or a
            size such as ``"10MB"`` or ``"1.5GiB"`` (see :func:`parse_size`).
        time_budget: the most milliseconds a whole training step may take: a number of ms or
            a duration such as ``"5ms"`` or ``"0.2s"`` (see :func:`parse_duration`).
        lr_range: ``(lr_min, lr_max)`` of the exponential sweep, ``0 < lr_min < lr_max``.
        range_steps: steps of the sweep (10 to 100000), or 0 to skip the range test.
        smoothing: EMA coefficient beta of the smoothed loss, in [0, 1).
        divergence_factor: stop the sweep once the smoothed loss exceeds this multiple of
            the best smoothed loss so far (> 1).
        timing_repeats: timed training steps per optimizer (>= 1); the median is reported.
        warmup_steps: untimed training steps before them (>= 0).

    Returns:
        an :class:`Advice`: one :class:`OptimizerAdvice` row per spec, and the
        recommendation of :func:`recommend` for the budgets.
    """
    specs = _check_specs(optimizers)
    _check_model(model)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model(inputs), targets), got {loss_fn!r}")
    next_batch = _batch_source(batch)
    memory_budget = _check_memory_budget(memory_budget)
    time_budget = _check_time_budget(time_budget)
    lr_min, lr_max = _check_lr_range(lr_range)
    _check_int("range_steps", range_steps, 0, 100_000)
    if 0 < range_steps < 10:
        raise ValueError(f"range_steps must be 0 (skip) or in [10, 100000], got {range_steps}")
    _check_real("smoothing", smoothing, 0.0, 1.0, high_inclusive=False)
    _check_real("divergence_factor", divergence_factor, 1.0, math.inf, low_inclusive=False)
    _check_int("timing_repeats", timing_repeats, 1, 100_000)
    _check_int("warmup_steps", warmup_steps, 0, 100_000)

    parameters = _trainable(model)
    parameter_count = sum(p.numel() for p in parameters)
    rows = []
    with torch.random.fork_rng(devices=_cuda_devices(parameters)):
        timing_batch = next_batch()
        for spec in specs:
            name = registry.parse_spec(spec)[0]
            work = copy.deepcopy(model).train()
            state_bytes, state_tensors, step_ms, train_ms = _measure_state_and_time(
                work, loss_fn, timing_batch, spec, warmup_steps, timing_repeats
            )
            test = None
            if range_steps:
                work.load_state_dict(model.state_dict())  # copies: the user's model stays as is
                test = _range_test(
                    work, loss_fn, next_batch, spec, lr_min, lr_max, range_steps, smoothing,
                    divergence_factor,
                )
            rows.append(
                OptimizerAdvice(
                    spec=spec,
                    name=name,
                    family=optimizer_family(spec),
                    parameter_count=parameter_count,
                    state_bytes=state_bytes,
                    state_tensors=state_tensors,
                    optimizer_step_ms=step_ms,
                    train_step_ms=train_ms,
                    range_test=test,
                )
            )
            del work
    recommended, text, excluded = recommend(rows, memory_budget, time_budget)
    return Advice(
        rows=rows,
        parameter_count=parameter_count,
        parameter_tensors=len(parameters),
        parameter_bytes=sum(p.nbytes for p in parameters),
        memory_budget=memory_budget,
        time_budget=time_budget,
        recommended=recommended.spec if recommended else None,
        recommendation=text,
        excluded=excluded,
        environment={
            "torch": torch.__version__,
            "device": str(parameters[0].device),
            "threads": torch.get_num_threads(),
            "timing_repeats": timing_repeats,
            "warmup_steps": warmup_steps,
            "lr_range": [lr_min, lr_max],
            "range_steps": range_steps,
            "smoothing": smoothing,
            "divergence_factor": divergence_factor,
        },
    )


def lr_range_test(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: BatchSource,
    spec: str = "sgd",
    lr_range: tuple[float, float] = (1e-7, 10.0),
    steps: int = 200,
    smoothing: float = 0.98,
    divergence_factor: float = 4.0,
) -> RangeTest:
    """Run one learning-rate range test for ``spec`` on a copy of ``model``.

    The sweep, smoothing and stop rule are described in the module docstring; the
    suggestion in :func:`suggest_lr`. ``model`` and the global random state are left as
    they were.
    """
    try:
        registry.parse_spec(spec)
    except ValueError as error:
        raise ValueError(f"spec: {error}") from None
    _check_model(model)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(model(inputs), targets), got {loss_fn!r}")
    next_batch = _batch_source(batch)
    lr_min, lr_max = _check_lr_range(lr_range)
    _check_int("steps", steps, 10, 100_000)
    _check_real("smoothing", smoothing, 0.0, 1.0, high_inclusive=False)
    _check_real("divergence_factor", divergence_factor, 1.0, math.inf, low_inclusive=False)
    with torch.random.fork_rng(devices=_cuda_devices(_trainable(model))):
        work = copy.deepcopy(model).train()
        return _range_test(
            work, loss_fn, next_batch, spec, lr_min, lr_max, steps, smoothing, divergence_factor
        )


def suggest_lr(
    lrs: Sequence[float], smoothed_losses: Sequence[float]
) -> tuple[float | None, tuple[float, float] | None]:
    """The *valley* suggestion: the middle (in log lr) of the smoothed loss's main descent.

    The first 10% of the sweep is skipped (as fastai does: the bias-corrected average of
    a few noisy losses is itself noisy). Of the rest, let ``bottom`` be the lowest smoothed
    loss, ``plateau`` the median of the smoothed losses before it (the level the loss
    falls from) and ``drop = plateau - bottom``. The valley runs from the last step before
    the minimum where the loss is still within 10% of ``drop`` of the plateau to the first
    step after that where it is within 10% of ``drop`` of the bottom; the suggestion is the
    geometric mean of the learning rates at its two ends: the middle of the stretch where
    raising the learning rate visibly pays. This is fastai's ``valley`` idea (the middle
    of the longest descent) made robust to noise on the plateau, which a
    longest-decreasing-run rule threads through back to ``lr_min``.

    Returns ``(suggested_lr, (valley_low, valley_high))``, or ``(None, None)`` when fewer
    than 5 finite points remain or the loss fell by less than 1% of the plateau.
    """
    if len(lrs) != len(smoothed_losses):
        raise ValueError(
            f"lrs and smoothed_losses must have the same length, got {len(lrs)} and "
            f"{len(smoothed_losses)}"
        )
    skip = len(lrs) // 10
    points = [
        (lr, loss) for lr, loss in zip(lrs[skip:], smoothed_losses[skip:]) if math.isfinite(loss)
    ]
    if len(points) < 5:
        return None, None
    losses = [loss for _, loss in points]
    bottom_index = min(range(len(losses)), key=losses.__getitem__)
    bottom = losses[bottom_index]
    plateau = statistics.median(losses[: bottom_index + 1])
    drop = plateau - bottom
    if drop <= 0.01 * abs(plateau):
        return None, None
    start = max(i for i in range(bottom_index + 1) if losses[i] >= plateau - 0.1 * drop)
    end = next(i for i in range(start, bottom_index + 1) if losses[i] <= bottom + 0.1 * drop)
    low, high = points[start][0], points[end][0]
    return math.sqrt(low * high), (low, high)


def recommend(
    rows: Sequence[OptimizerAdvice],
    memory_budget: int | float | None = None,
    time_budget: float | None = None,
) -> tuple[OptimizerAdvice | None, str, dict[str, str]]:
    """Pick one optimizer from measured rows; the rule, applied in this order:

    1. with a ``memory_budget`` (bytes), drop every optimizer whose state takes more;
    2. with a ``time_budget`` (ms), drop every optimizer whose whole training step
       (median) takes longer;
    3. among the rest, prefer by family: the Adam family (adam, adamw, amsgrad), then SGD
       with momentum (momentum, nesterov, sgd with momentum > 0), then other adaptive
       methods (rmsprop, adagrad, ...), then plain SGD; within a family, the smaller state
       wins, then the earlier row.

    Adam comes first because with defaults it trains the widest range of models well
    ("Descending through a Crowded Valley", Schmidt et al. 2021) for 8 bytes of state per
    parameter; momentum SGD needs half of that and, once tuned, often generalizes as well.

    Returns ``(row or None, text, excluded)``: the text cites the measured bytes and ms;
    ``excluded`` maps each dropped spec to the reason. When nothing fits, the row is
    ``None`` and the text names the smallest and the fastest optimizer measured.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows must hold at least one measured optimizer, got none")
    memory_budget = _check_memory_budget(memory_budget)
    time_budget = _check_time_budget(time_budget)
    excluded: dict[str, str] = {}
    for row in rows:
        reasons = []
        if memory_budget is not None and row.state_bytes > memory_budget:
            reasons.append(
                f"state {format_bytes(row.state_bytes)} > {format_bytes(memory_budget)} budget"
            )
        if time_budget is not None and row.train_step_ms > time_budget:
            reasons.append(f"step {row.train_step_ms:.3g} ms > {time_budget:.3g} ms budget")
        if reasons:
            excluded[row.spec] = "; ".join(reasons)
    fitting = [row for row in rows if row.spec not in excluded]
    budgets = _budget_words(memory_budget, time_budget)
    excluded_text = ""
    if excluded:
        excluded_text = " Excluded: " + "; ".join(f"{spec} ({why})" for spec, why in excluded.items()) + "."
    if not fitting:
        smallest = min(rows, key=lambda row: row.state_bytes)
        fastest = min(rows, key=lambda row: row.train_step_ms)
        text = (
            f"No optimizer fits {budgets}. The smallest state is {smallest.spec}'s "
            f"{format_bytes(smallest.state_bytes)}; the fastest training step is {fastest.spec}'s "
            f"{fastest.train_step_ms:.3g} ms. Raise the budget or shrink the model."
            + excluded_text
        )
        return None, text, excluded

    def preference(item: tuple[int, OptimizerAdvice]) -> tuple[int, int, int]:
        order, row = item
        return FAMILY_PREFERENCE.index(row.family), row.state_bytes, order

    best = min(enumerate(fitting), key=preference)[1]
    lr = f" at lr {best.suggested_lr:.2e} (range test)" if best.suggested_lr is not None else ""
    text = (
        f"Use {best.spec}{lr}: its state takes {format_bytes(best.state_bytes)} "
        f"({best.state_bytes_per_parameter:.3g} B per parameter) and a training step "
        f"{best.train_step_ms:.3g} ms (optimizer step {best.optimizer_step_ms:.3g} ms)"
        + (f", within {budgets}." if budgets != "no budget" else ".")
        + " Rule: among the optimizers within the budgets, prefer "
        + ", then ".join(FAMILY_DESCRIPTION[family] for family in FAMILY_PREFERENCE)
        + "."
    )
    return best, text + excluded_text, excluded


def optimizer_family(spec: str) -> str:
    """``"adam"``, ``"momentum"``, ``"adaptive"`` or ``"sgd"`` for an optimizer spec."""
    described = registry.describe(spec)
    name = described["name"]
    if name in _ADAM_NAMES:
        return "adam"
    if name in _SGD_NAMES:
        return "momentum" if described.get("momentum") else "sgd"
    return "adaptive"


# --------------------------------------------------------------------------------------
# Sizes, durations and spec lists
# --------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DURATION_UNITS = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 1e-3, "µs": 1e-3, "ns": 1e-6}
_NUMBER_AND_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Zµ]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in ``text``: ``"4096"``, ``"10MB"`` (10**6), ``"1.5 GiB"`` (2**30), case-insensitive.

    Units: B, kB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024).
    """
    if isinstance(text, bool):
        raise ValueError(f"size must be a number of bytes or a string such as '10MB', got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"size must be a finite number of bytes >= 0, got {text!r}")
        return int(text)
    match = _NUMBER_AND_UNIT.match(text) if isinstance(text, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"size must be a number >= 0 with an optional unit (B, kB, MB, GB, TB, KiB, MiB, "
            f"GiB, TiB), e.g. '10MB', got {text!r}"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | int | float) -> float:
    """Milliseconds in ``text``: ``"5"`` and ``"5ms"`` are 5 ms, ``"0.2s"`` 200, ``"300us"`` 0.3."""
    if isinstance(text, bool):
        raise ValueError(f"duration must be a number of ms or a string such as '5ms', got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"duration must be a finite number of ms >= 0, got {text!r}")
        return float(text)
    match = _NUMBER_AND_UNIT.match(text) if isinstance(text, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise ValueError(
            f"duration must be a number >= 0 with an optional unit (ms, s, us, ns; ms when "
            f"none), e.g. '5ms', got {text!r}"
        )
    return float(match.group(1)) * _DURATION_UNITS[unit]


def format_bytes(count: int | float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (powers of 1000)."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} B"


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------


def _measure_state_and_time(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batch: Batch,
    spec: str,
    warmup_steps: int,
    repeats: int,
) -> tuple[int, int, float, float]:
    """(state bytes, state tensors, median optimizer-step ms, median training-step ms)."""
    parameters = _trainable(model)
    optimizer = registry.create(spec, parameters)
    synchronize = _synchronizer(parameters)
    inputs, targets = batch
    optimizer_ms, train_ms = [], []
    for index in range(1 + warmup_steps + repeats):
        synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, loss_fn, inputs, targets)
        loss.backward()
        synchronize()
        middle = time.perf_counter()
        optimizer.step()
        synchronize()
        end = time.perf_counter()
        if index == 0:
            # State is created lazily by the first step; everything after it is steady state.
            state_bytes, state_tensors = _state_size(optimizer)
        elif index > warmup_steps:
            optimizer_ms.append(1000 * (end - middle))
            train_ms.append(1000 * (end - start))
    return state_bytes, state_tensors, statistics.median(optimizer_ms), statistics.median(train_ms)


def _state_size(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes (ravine.optim.lowmem.state_bytes) and number of the state's tensors."""
    tensors = sum(isinstance(value, torch.Tensor) for state in optimizer.state.values() for value in state.values())
    return count_state_bytes(optimizer), tensors


def _range_test(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    next_batch: Callable[[], Batch],
    spec: str,
    lr_min: float,
    lr_max: float,
    steps: int,
    smoothing: float,
    divergence_factor: float,
) -> RangeTest:
    parameters = _trainable(model)
    optimizer = registry.create(spec, parameters, lr=lr_min)
    ratio = lr_max / lr_min
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best = 0.0, math.inf
    stop_reason = "completed"
    for step in range(steps):
        lr = lr_min * ratio ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = next_batch()
        optimizer.zero_grad(set_to_none=True)
        with evaluation_mode(optimizer) as switched, torch.no_grad():
            # Schedule-free optimizers: the loss recorded is the averaged point x's, the
            # gradient below is taken at y, where they train.
            recorded = float(_loss(model, loss_fn, inputs, targets)) if switched else None
        loss = _loss(model, loss_fn, inputs, targets)
        value = float(loss.detach()) if recorded is None else recorded
        average = smoothing * average + (1 - smoothing) * value
        smooth = average / (1 - smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        if not math.isfinite(smooth):
            stop_reason = f"loss not finite at lr {lr:.3g}"
            break
        best = min(best, smooth)
        if smooth > divergence_factor * best:
            stop_reason = f"smoothed loss above {divergence_factor:g}x the best at lr {lr:.3g}"
            break
        loss.backward()
        optimizer.step()
    suggested, valley = suggest_lr(lrs, smoothed)
    return RangeTest(spec, lrs, losses, smoothed, suggested, valley, steps, stop_reason)


def _loss(model: torch.nn.Module, loss_fn: Callable, inputs: Any, targets: Any) -> torch.Tensor:
    loss = loss_fn(model(inputs), targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
        )
    return loss.reshape(())


# --------------------------------------------------------------------------------------
# Validation and small helpers
# --------------------------------------------------------------------------------------


def _check_specs(optimizers: str | Iterable[str] | None) -> list[str]:
    if optimizers is None:
        return registry.available()
    specs = [optimizers] if isinstance(optimizers, str) else list(optimizers)
    if not specs:
        raise ValueError(
            f"optimizers must name at least one of {', '.join(registry.available())}, got none"
        )
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError(f"optimizers must be spec strings such as 'adam(lr=1e-3)', got {spec!r}")
        try:
            registry.parse_spec(spec)
        except ValueError as error:
            raise ValueError(f"optimizers: {error}") from None
    return specs


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not _trainable(model):
        raise ValueError("model must have at least one parameter with requires_grad=True, got none")


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _batch_source(batch: Any) -> Callable[[], Batch]:
    def checked(value: Any) -> Batch:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(
                "batch must be (inputs, targets) or a callable returning (inputs, targets), "
                f"got {type(value).__name__}"
                + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
            )
        return value[0], value[1]

    if callable(batch):
        return lambda: checked(batch())
    fixed = checked(batch)
    return lambda: fixed


def _check_memory_budget(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as error:
        raise ValueError(f"memory_budget: {error}") from None


def _check_time_budget(value: Any) -> float | None:
    if value is None:
        return None
    try:
        milliseconds = parse_duration(value)
    except ValueError as error:
        raise ValueError(f"time_budget: {error}") from None
    if milliseconds <= 0:
        raise ValueError(f"time_budget must be > 0 ms, got {value!r}")
    return milliseconds


def _check_lr_range(lr_range: Any) -> tuple[float, float]:
    try:
        lr_min, lr_max = (float(value) for value in lr_range)
    except (TypeError, ValueError):
        raise ValueError(f"lr_range must be a pair (lr_min, lr_max) of numbers, got {lr_range!r}") from None
    if not (0 < lr_min < lr_max < math.inf):
        raise ValueError(
            f"lr_range must satisfy 0 < lr_min < lr_max < inf, got ({lr_min!r}, {lr_max!r})"
        )
    return lr_min, lr_max


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def _check_real(
    name: str,
    value: Any,
    low: float,
    high: float,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if valid:
        valid = (low <= value if low_inclusive else low < value) and (
            value <= high if high_inclusive else value < high
        )
    if not valid:
        interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def _budget_words(memory_budget: int | None, time_budget: float | None) -> str:
    words = []
    if memory_budget is not None:
        words.append(f"the {format_bytes(memory_budget)} memory budget")
    if time_budget is not None:
        words.append(f"the {time_budget:.3g} ms time budget")
    return " and ".join(words) if words else "no budget"


def _cuda_devices(parameters: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in parameters if p.device.type == "cuda"})


def _synchronizer(parameters: Sequence[torch.Tensor]) -> Callable[[], None]:
    # Kernels run asynchronously on accelerators; time only what has finished.
    if any(p.device.type == "cuda" for p in parameters):
        return torch.cuda.synchronize
    return lambda: None


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"] if count <= 10 else colormaps["tab20"]
    return [palette(i % palette.N) for i in range(count)]


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
