"""Run optimizers on a 2-D test function and record their paths.

A path is the sequence of points an optimizer visits from a start point, with the loss
and gradient norm at each, exactly as a plain torch loop would produce them::

    p = torch.tensor(start, requires_grad=True)
    optimizer = torch.optim.Adam([p], lr=0.1)
    for step in range(steps):
        optimizer.zero_grad()
        f(p[0], p[1]).backward()
        optimizer.step()

Batching: when an optimizer acts on each coordinate independently (all of
torch.optim's SGD/Adam/Adagrad/RMSprop family and ravine's built-in names do),
many start points share one ``(rows, 2)`` parameter and many learning rates become
param groups of one optimizer, so a whole learning-rate grid is one loop of tensor
operations instead of one loop per path. Anything else runs path by path, each on
its own ``(2,)`` parameter, which is the plain loop above.
"""

from __future__ import annotations

import csv
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ravine import registry
from ravine.registry import split_specs
from ravine.landscape.functions import Point, TestFunction, as_test_function

__all__ = [
    "CSV_COLUMNS",
    "OptimizerChoice",
    "Path",
    "as_optimizer_list",
    "resolve_optimizer",
    "run",
    "run_many",
    "split_specs",
    "write_csv",
]

CSV_COLUMNS = ("optimizer", "lr", "step", "x", "y", "loss")

# Registry names whose update is elementwise by definition (they mirror torch.optim).
_ELEMENTWISE_NAMES = frozenset(
    {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "rmsprop-centered", "adam", "amsgrad", "adamw",
     "adam-bf16", "adamw-bf16", "momentum-bf16"}
)
# torch.optim classes whose step treats every coordinate on its own (exact classes:
# a subclass may override step with something that mixes coordinates).
_ELEMENTWISE_CLASSES = frozenset(
    {
        torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad,
        torch.optim.RMSprop, torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
        torch.optim.Adadelta, torch.optim.Rprop,
    }
)


@dataclass(frozen=True)
class OptimizerChoice:
    """An optimizer ready to be built over fresh parameters: a label, a factory and an lr.

    ``factory(param_groups)`` returns a ``torch.optim.Optimizer``; each group carries its
    own ``"lr"`` when ``lr`` is known. ``lr`` is None only for a user factory whose
    learning rate is read back from the optimizer it builds.
    """

    label: str
    factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
    lr: float | None
    elementwise: bool = False

    def with_lr(self, lr: float) -> OptimizerChoice:
        return OptimizerChoice(self.label, self.factory, _check_lr(lr), self.elementwise)


def resolve_optimizer(optimizer: Any, lr: float | None = None) -> OptimizerChoice:
    """Turn what a user passes into an :class:`OptimizerChoice`.

    Accepted: a spec string (``"sgd(lr=0.02, momentum=0.9)"``), a ``torch.optim``-style
    class (``torch.optim.Adam``, ``ravine.Adam``), a pair ``(class or spec, kwargs)``, a
    factory ``params -> Optimizer`` (``functools.partial(torch.optim.SGD, lr=0.1)``), or
    an :class:`OptimizerChoice`. ``lr`` overrides the learning rate from any of these.
    """
    if isinstance(optimizer, OptimizerChoice):
        return optimizer if lr is None else optimizer.with_lr(lr)
    kwargs: dict[str, Any] = {}
    if _is_pair(optimizer):
        optimizer, kwargs = optimizer[0], dict(optimizer[1])
    if isinstance(optimizer, str):
        name, spec_kwargs = registry.parse_spec(optimizer)
        entry = registry.get(name)
        given = {**spec_kwargs, **kwargs}
        arguments = {**entry.presets, **given}
        chosen_lr = arguments.pop("lr", entry.defaults().get("lr"))
        label = _label(name, {k: v for k, v in given.items() if k != "lr"})
        elementwise = name in _ELEMENTWISE_NAMES or _is_elementwise_class(entry.cls)
        return _from_class(entry.cls, arguments, chosen_lr if lr is None else lr, label, elementwise)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        arguments = dict(kwargs)
        chosen_lr = arguments.pop("lr", _signature_default(optimizer, "lr"))
        if chosen_lr is None and lr is None:
            raise ValueError(f"optimizer {optimizer.__name__} has no default lr; pass lr=...")
        label = _label(optimizer.__name__, arguments)
        return _from_class(
            optimizer, arguments, chosen_lr if lr is None else lr, label, _is_elementwise_class(optimizer)
        )
    if callable(optimizer) and not kwargs:
        if isinstance(optimizer, functools.partial):
            keywords = {k: v for k, v in optimizer.keywords.items() if k != "lr"}
            label = _label(getattr(optimizer.func, "__name__", "optimizer"), keywords)
        else:
            label = getattr(optimizer, "__name__", type(optimizer).__name__)
        return OptimizerChoice(label, optimizer, None if lr is None else _check_lr(lr), False)
    raise ValueError(
        "optimizer must be a spec string such as 'adam(lr=0.1)' (names: "
        f"{', '.join(registry.available())}), a torch.optim.Optimizer class, a (class, kwargs) "
        f"pair or a factory params -> Optimizer; got {optimizer!r}"
    )


def as_optimizer_list(optimizers: Any) -> list[Any]:
    """One optimizer (spec, class, (class, kwargs) pair, factory) or a sequence of them, as a list."""
    if isinstance(optimizers, (str, OptimizerChoice, type)) or _is_pair(optimizers):
        return [optimizers]
    if isinstance(optimizers, Iterable):
        return list(optimizers)
    return [optimizers]


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)


@dataclass(frozen=True, eq=False)
class Path:
    """One optimizer's walk from ``start``: arrays indexed by step, step 0 is the start.

    ``positions`` has shape ``(n + 1, 2)``; ``losses`` and ``grad_norms`` (of the
    noise-free gradient) have shape ``(n + 1,)``, where ``n`` is the budget ``steps``
    unless the path diverged at step ``diverged_at`` (then the arrays end there and
    ``divergence`` says why: ``"nan"``, ``"inf"`` or ``"bound"``).
    """

    optimizer: str
    lr: float
    start: Point
    function: str
    minimum_value: float | None
    steps: int
    positions: np.ndarray
    losses: np.ndarray
    grad_norms: np.ndarray
    diverged_at: int | None = None
    divergence: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def label(self) -> str:
        return f"{self.optimizer} (lr={self.lr:.3g})"

    @property
    def final_position(self) -> Point:
        x, y = self.positions[-1]
        return (float(x), float(y))

    @property
    def final_loss(self) -> float:
        """Loss after the last step; ``inf`` for a diverged path."""
        return math.inf if self.diverged else float(self.losses[-1])

    def gaps(self) -> np.ndarray:
        """Loss minus the function's minimum value at each step (NaN if no minimum is known)."""
        if self.minimum_value is None:
            return np.full_like(self.losses, np.nan)
        return self.losses - self.minimum_value

    def steps_to_tolerance(self, tolerance: float) -> int | None:
        """Steps until the loss is within ``tolerance`` of the minimum value and stays there.

        Counting from the step after which the loss never leaves the tolerance again (to
        the end of the run) keeps a momentum path that dips below the tolerance once and
        bounces back out from being counted as done. None if the run ends outside the
        tolerance, diverged, or the function has no known minimum.
        """
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
            raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
        if self.minimum_value is None or self.diverged:
            return None
        outside = np.flatnonzero(~(self.gaps() <= tolerance))
        if outside.size == 0:
            return 0
        if outside[-1] == len(self.losses) - 1:
            return None
        return int(outside[-1]) + 1

    def solved(self, tolerance: float) -> bool:
        """True when the run ends within ``tolerance`` of the minimum value."""
        return self.steps_to_tolerance(tolerance) is not None


def run(
    function: str | TestFunction | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: Any,
    start: Sequence[float] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> Path:
    """One optimizer from one start point for ``steps`` steps (defaults: the function's)."""
    return run_many(function, [optimizer], starts=None if start is None else [start],
                    lrs=None if lr is None else [lr], steps=steps, seed=seed, dtype=dtype)[0]


def run_many(
    function: str | TestFunction | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizers: Any,
    *,
    starts: Sequence[Sequence[float]] | None = None,
    lrs: Sequence[float] | None = None,
    steps: int | None = None,
    batched: bool | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[Path]:
    """Every optimizer x learning rate x start point; paths in that order.

    ``lrs`` (applied to every optimizer) defaults to each optimizer's own rate and
    ``starts`` to the function's start point. ``batched=None`` batches the optimizers
    known to be elementwise and runs the others path by path; ``True`` batches all
    (use only for optimizers that treat coordinates independently); ``False`` batches none.
    Gradient noise (``function.gradient_noise``) is drawn from ``seed``, the same draws
    for the i-th (lr, start) of every optimizer, batched or not.
    """
    first_start = None if starts is None or len(starts) == 0 else starts[0]
    test_function = as_test_function(function, first_start)
    steps = test_function.steps if steps is None else _check_steps(steps)
    if starts is None:
        starts = [test_function.start]
    if len(starts) == 0:
        raise ValueError("starts must hold at least one point (x, y)")
    points = [test_function.check_point(point, "start") for point in starts]
    if lrs is not None:
        lrs = [_check_lr(value) for value in lrs]
        if not lrs:
            raise ValueError("lrs must hold at least one learning rate")
    if batched not in (None, True, False):
        raise ValueError(f"batched must be None, True or False, got {batched!r}")
    choices = [resolve_optimizer(optimizer) for optimizer in as_optimizer_list(optimizers)]
    if not choices:
        raise ValueError("optimizers must name at least one optimizer")

    paths: list[Path] = []
    for choice in choices:
        tracks = [(lr, point) for lr in (lrs or [choice.lr]) for point in points]
        noise = _noise_table(test_function, len(tracks), steps, seed, dtype)
        use_batch = choice.elementwise if batched is None else batched
        if use_batch:
            paths += _walk(test_function, choice, tracks, steps, noise, dtype, batched=True)
        else:
            for index, track in enumerate(tracks):
                rows = None if noise is None else noise[index : index + 1]
                paths += _walk(test_function, choice, [track], steps, rows, dtype, batched=False)
    return paths


def write_csv(paths: Iterable[Path], file: str | os.PathLike[str]) -> None:
    """One row per path and step: ``optimizer, lr, step, x, y, loss``."""
    with open(file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for path in paths:
            for step, ((x, y), loss) in enumerate(zip(path.positions, path.losses)):
                writer.writerow([path.optimizer, repr(path.lr), step, repr(float(x)),
                                 repr(float(y)), repr(float(loss))])


def _walk(
    function: TestFunction,
    choice: OptimizerChoice,
    tracks: list[tuple[float | None, Point]],
    steps: int,
    noise: torch.Tensor | None,
    dtype: torch.dtype,
    batched: bool,
) -> list[Path]:
    """Run the tracks (lr, start) with one optimizer instance; one param group per lr."""
    lrs = list(dict.fromkeys(lr for lr, _ in tracks))
    rows_of_lr = {lr: [i for i, (track_lr, _) in enumerate(tracks) if track_lr == lr] for lr in lrs}
    order = [i for lr in lrs for i in rows_of_lr[lr]]  # row order inside the batch
    params, groups = [], []
    for lr in lrs:
        starts = [tracks[i][1] for i in rows_of_lr[lr]]
        # Per path: a (2,) tensor, as in a plain loop. Batched: (rows, 2).
        value = torch.tensor(starts[0] if not batched else starts, dtype=dtype)
        params.append(value.requires_grad_(True))
        groups.append({"params": [params[-1]]} if lr is None else {"params": [params[-1]], "lr": lr})
    optimizer = choice.factory(groups)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer factory for {choice.label!r} returned {optimizer!r}, not a torch.optim.Optimizer")
    group_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if noise is not None:
        noise = noise[order]

    count = len(tracks)
    positions = torch.full((steps + 1, count, 2), math.nan, dtype=dtype)
    losses = torch.full((steps + 1, count), math.nan, dtype=dtype)
    grad_norms = torch.full((steps + 1, count), math.nan, dtype=dtype)
    alive = torch.ones(count, dtype=torch.bool)
    diverged_at = [None] * count
    divergence: list[str | None] = [None] * count
    last = steps
    for step in range(steps + 1):
        optimizer.zero_grad(set_to_none=True)
        if batched:
            # One evaluation for all rows; backward through cat hands each group its rows.
            points = torch.cat(params) if len(params) > 1 else params[0]
            value = function(points[:, 0], points[:, 1])
            if value.shape != points.shape[:1]:
                raise ValueError(
                    f"function {function.name!r} must act elementwise to be batched: f(x, y) for "
                    f"x, y of shape {tuple(points.shape[:1])} returned shape {tuple(value.shape)}; "
                    "pass batched=False"
                )
            value.sum().backward()
        else:
            points = params[0]
            value = function(points[0], points[1])
            if value.dim() != 0:
                raise ValueError(
                    f"function {function.name!r} must return one value for scalar x and y, "
                    f"got shape {tuple(value.shape)}"
                )
            value.backward()
        with torch.no_grad():
            position = points.detach().reshape(-1, 2)
            loss = value.detach().reshape(-1)
            gradient = torch.cat([p.grad.reshape(-1, 2) for p in params])
            positions[step], losses[step] = position, loss
            grad_norms[step] = torch.linalg.vector_norm(gradient, dim=1)
            healthy = position.isfinite().all(1) & loss.isfinite()
            healthy &= position.abs().amax(1) <= function.bound
            if not bool(healthy[alive].all()):
                for row in torch.nonzero(alive & ~healthy).flatten().tolist():
                    diverged_at[row], divergence[row] = step, _divergence_reason(
                        position[row], loss[row], function.bound
                    )
                alive &= healthy
            if step == steps or not bool(alive.any()):
                last = step
                break
            if noise is not None:
                row = 0
                for p in params:
                    rows = p.reshape(-1, 2).shape[0]
                    p.grad.add_(noise[row : row + rows, step].reshape(p.shape))
                    row += rows
        optimizer.step()

    # Back from batch rows to the caller's track order.
    lr_of_row = [group_lrs[g] for g, lr in enumerate(lrs) for _ in rows_of_lr[lr]]
    out: list[Path | None] = [None] * count
    positions_np = positions[: last + 1].numpy()
    losses_np = losses[: last + 1].numpy()
    norms_np = grad_norms[: last + 1].numpy()
    minimum_value = function.minimum_value
    for row, index in enumerate(order):
        end = (diverged_at[row] if diverged_at[row] is not None else last) + 1
        out[index] = Path(
            optimizer=choice.label,
            lr=lr_of_row[row],
            start=tracks[index][1],
            function=function.name,
            minimum_value=minimum_value,
            steps=steps,
            positions=positions_np[:end, row].astype(np.float64, copy=True),
            losses=losses_np[:end, row].astype(np.float64, copy=True),
            grad_norms=norms_np[:end, row].astype(np.float64, copy=True),
            diverged_at=diverged_at[row],
            divergence=divergence[row],
        )
    return out  # type: ignore[return-value]


def _divergence_reason(position: torch.Tensor, loss: torch.Tensor, bound: float) -> str:
    if bool(position.isnan().any() or loss.isnan()):
        return "nan"
    if bool(position.isinf().any() or loss.isinf()):
        return "inf"
    return "bound"


def _noise_table(
    function: TestFunction, count: int, steps: int, seed: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Gaussian gradient noise, shape (tracks, steps, 2), or None for a noise-free function."""
    if not function.gradient_noise:
        return None
    generator = torch.Generator().manual_seed(int(seed))
    return function.gradient_noise * torch.randn(count, steps, 2, generator=generator, dtype=dtype)


def _from_class(
    cls: type, arguments: dict[str, Any], lr: float | None, label: str, elementwise: bool
) -> OptimizerChoice:
    lr = _check_lr(lr)
    if getattr(cls, "needs_matrices", False):
        raise ValueError(
            f"optimizer {label!r} acts on matrices (2-D parameters), and a landscape path is a point "
            "(x, y), a vector: it has no matrix to act on (muon would hand the point to its AdamW "
            "fallback and draw AdamW's path); compare it on a model with 'ravine compare' instead"
        )

    def factory(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        # Groups carry their own lr; the constructor's is only a fallback.
        return cls(groups, lr=groups[0].get("lr", lr), **arguments)

    return OptimizerChoice(label, factory, lr, elementwise)


def _is_elementwise_class(cls: Any) -> bool:
    return cls in _ELEMENTWISE_CLASSES or getattr(cls, "elementwise", False) is True


def _label(name: str, arguments: dict[str, Any]) -> str:
    if not arguments:
        return name
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _signature_default(cls: type, argument: str) -> Any:
    parameter = inspect.signature(cls).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    default = parameter.default
    return float(default) if isinstance(default, (int, float)) else None


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    return float(lr)


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be an integer > 0, got {steps!r}")
    return int(steps)
