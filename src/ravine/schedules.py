"""Learning-rate schedules as pure functions of the step count, and the adapter that
drives any ``torch.optim.Optimizer`` with them.

A schedule is any callable ``step -> lr`` (:data:`Schedule`), in the style of optax's
schedules: the builders here return small picklable callables with a readable
``repr``, and a plain ``lambda step: ...`` works everywhere a schedule is expected.
Schedules compose: :func:`join` runs one after another, :func:`multiply` multiplies
them pointwise (``multiply(cosine(1e-3, 1000), constant(0.5))`` halves a schedule).

:class:`ScheduledLR` applies a schedule to an optimizer's param groups, and
:class:`ReduceOnPlateau` multiplies any schedule by a factor that is cut when a
metric stops improving (torch's ``ReduceLROnPlateau`` decisions, on top of warmup and
cosine decay, which ``torch.optim.lr_scheduler.SequentialLR`` cannot combine)::

    optimizer = ravine.AdamW(model.parameters(), lr=1e-3)
    scheduler = ScheduledLR(
        optimizer,
        warmup_cosine(peak_lr=1e-3, warmup_steps=100, total_steps=10_000),
        plateau=ReduceOnPlateau(patience=3),
    )
    for step in range(10_000):
        ...
        optimizer.step()
        scheduler.step(metric=val_loss if step % 500 == 0 else None)
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import torch

__all__ = [
    "ReduceOnPlateau",
    "Schedule",
    "ScheduledLR",
    "constant",
    "cosine",
    "exponential",
    "join",
    "linear_warmup",
    "multiply",
    "multistep",
    "one_cycle",
    "step_decay",
    "warmup_cosine",
]

Schedule = Callable[[int], float]
"""A learning-rate schedule: the learning rate as a function of the step count (>= 0)."""


# --------------------------------------------------------------------------- validation


def _number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, or a ValueError naming ``name``, the value and the range."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    allowed = f"a finite number {' and '.join(bounds)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be {allowed} (got {name}={value!r})")
    number = float(value)
    in_range = (
        math.isfinite(number)
        and (low is None or (number > low if low_open else number >= low))
        and (high is None or (number < high if high_open else number <= high))
    )
    if not in_range:
        raise ValueError(f"{name} must be {allowed} (got {name}={value!r})")
    return number


def _integer(name: str, value: Any, *, low: int) -> int:
    """``value`` as an int >= ``low``, or a ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low} (got {name}={value!r})")
    return int(value)


def _increasing_integers(name: str, values: Any) -> tuple[int, ...]:
    """A strictly increasing sequence of integers >= 1, or a ValueError."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{name} must be a sequence of integers >= 1 in strictly increasing order "
            f"(got {name}={values!r})"
        )
    checked = tuple(_integer(f"{name}[{i}]", value, low=1) for i, value in enumerate(values))
    for i in range(1, len(checked)):
        if checked[i] <= checked[i - 1]:
            raise ValueError(
                f"{name} must be strictly increasing (got {name}[{i - 1}]={checked[i - 1]}, "
                f"{name}[{i}]={checked[i]})"
            )
    return checked


def _callable(name: str, value: Any) -> Schedule:
    if not callable(value):
        raise TypeError(f"{name} must be a callable step -> lr (got {name}={value!r})")
    return value


# --------------------------------------------------------------------------- schedules


class _Schedule:
    """A named schedule: ``rule(step, **arguments)``, picklable, with a readable repr."""

    __slots__ = ("_arguments", "_name", "_rule")

    def __init__(self, name: str, rule: Callable[..., float], **arguments: Any) -> None:
        self._name = name
        self._rule = rule
        self._arguments = arguments

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, Real) or not 0 <= step < math.inf:
            raise ValueError(f"step must be >= 0 (got step={step!r})")
        return self._rule(step, **self._arguments)

    def __repr__(self) -> str:
        arguments = ", ".join(f"{key}={value!r}" for key, value in self._arguments.items())
        return f"{self._name}({arguments})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_schedule, (self._name, self._rule, self._arguments))


def _rebuild_schedule(name: str, rule: Callable[..., float], arguments: dict) -> _Schedule:
    return _Schedule(name, rule, **arguments)


def _constant_rule(step: float, value: float) -> float:
    return value


def constant(value: float) -> Schedule:
    r"""The same learning rate at every step: :math:`\alpha_s = \alpha`.

    Args:
        value: the learning rate, finite and >= 0.
    """
    return _Schedule("constant", _constant_rule, value=_number("value", value, low=0))


def _step_decay_rule(step: float, init_value: float, step_size: int, gamma: float) -> float:
    return _scaled_power(init_value, gamma, step // step_size)


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    r"""Multiply by ``gamma`` every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``):

    .. math:: \alpha_s = \alpha_0 \, \gamma^{\lfloor s / \text{step\_size} \rfloor}

    Args:
        init_value: :math:`\alpha_0`, finite and >= 0.
        step_size: steps between decays, an integer >= 1.
        gamma: the decay factor, finite and > 0.
    """
    return _Schedule(
        "step_decay",
        _step_decay_rule,
        init_value=_number("init_value", init_value, low=0),
        step_size=_integer("step_size", step_size, low=1),
        gamma=_number("gamma", gamma, low=0, low_open=True),
    )


def _multistep_rule(
    step: float, init_value: float, milestones: tuple[int, ...], gamma: float
) -> float:
    return _scaled_power(init_value, gamma, bisect_right(milestones, step))


def multistep(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    r"""Multiply by ``gamma`` at each milestone (``torch.optim.lr_scheduler.MultiStepLR``):

    .. math:: \alpha_s = \alpha_0 \, \gamma^{\#\{m \in \text{milestones} : m \le s\}}

    Args:
        init_value: :math:`\alpha_0`, finite and >= 0.
        milestones: steps at which to decay, integers >= 1, strictly increasing.
        gamma: the decay factor, finite and > 0.
    """
    return _Schedule(
        "multistep",
        _multistep_rule,
        init_value=_number("init_value", init_value, low=0),
        milestones=_increasing_integers("milestones", milestones),
        gamma=_number("gamma", gamma, low=0, low_open=True),
    )


def _exponential_rule(step: float, init_value: float, gamma: float) -> float:
    return _scaled_power(init_value, gamma, step)


def _scaled_power(value: float, base: float, exponent: float) -> float:
    """``value * base**exponent``; inf (not OverflowError) once growth passes any float."""
    try:
        return value * base**exponent
    except OverflowError:
        return math.inf if value > 0 else 0.0


def exponential(init_value: float, gamma: float) -> Schedule:
    r"""Multiply by ``gamma`` every step (``torch.optim.lr_scheduler.ExponentialLR``):

    .. math:: \alpha_s = \alpha_0 \, \gamma^{s}

    Args:
        init_value: :math:`\alpha_0`, finite and >= 0.
        gamma: the decay factor, finite and > 0.
    """
    return _Schedule(
        "exponential",
        _exponential_rule,
        init_value=_number("init_value", init_value, low=0),
        gamma=_number("gamma", gamma, low=0, low_open=True),
    )


def _cosine_rule(step: float, init_value: float, total_steps: int, final_value: float) -> float:
    progress = min(step, total_steps) / total_steps
    return final_value + (init_value - final_value) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(init_value: float, total_steps: int, final_value: float = 0.0) -> Schedule:
    r"""Cosine annealing (Loshchilov & Hutter, 2017, "SGDR"), then hold ``final_value``:

    .. math::
        \alpha_s = \alpha_T + (\alpha_0 - \alpha_T) \, \tfrac{1}{2}
        \left(1 + \cos\left(\pi \, \min(s, T) / T\right)\right)

    For :math:`s \le T` this is ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T,
    eta_min=final_value)``; unlike torch, the rate does not rise again after :math:`T`.

    Args:
        init_value: :math:`\alpha_0`, finite and >= 0.
        total_steps: :math:`T`, an integer >= 1.
        final_value: :math:`\alpha_T`, finite and >= 0.
    """
    return _Schedule(
        "cosine",
        _cosine_rule,
        init_value=_number("init_value", init_value, low=0),
        total_steps=_integer("total_steps", total_steps, low=1),
        final_value=_number("final_value", final_value, low=0),
    )


def _linear_warmup_rule(
    step: float, peak_value: float, warmup_steps: int, init_value: float
) -> float:
    if step >= warmup_steps:
        return peak_value
    return init_value + (peak_value - init_value) * step / warmup_steps


def linear_warmup(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    r"""Linear ramp from ``init_value`` to ``peak_value``, then hold ``peak_value``:

    .. math::
        \alpha_s = \alpha_{\text{init}} + (\alpha_{\text{peak}} - \alpha_{\text{init}})
        \, \min(s, T_w) / T_w

    With ``warmup_steps=0`` the rate is ``peak_value`` from step 0.

    Args:
        peak_value: :math:`\alpha_{\text{peak}}`, finite and >= 0.
        warmup_steps: :math:`T_w`, an integer >= 0.
        init_value: :math:`\alpha_{\text{init}}`, finite and >= 0.
    """
    return _Schedule(
        "linear_warmup",
        _linear_warmup_rule,
        peak_value=_number("peak_value", peak_value, low=0),
        warmup_steps=_integer("warmup_steps", warmup_steps, low=0),
        init_value=_number("init_value", init_value, low=0),
    )


def _warmup_cosine_rule(
    step: float, peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float
) -> float:
    if step <= warmup_steps:
        return peak_lr if warmup_steps == 0 else peak_lr * step / warmup_steps
    if step >= total_steps:
        return final_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    peak_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0
) -> Schedule:
    r"""Linear warmup from 0, then cosine decay (Goyal et al., 2017; Loshchilov & Hutter, 2017):

    .. math::
        \alpha_s = \begin{cases}
        \alpha_{\text{peak}} \, s / T_w & s \le T_w \\
        \alpha_{\text{final}} + (\alpha_{\text{peak}} - \alpha_{\text{final}}) \,
        \tfrac{1}{2}\left(1 + \cos\left(\pi \, \frac{s - T_w}{T - T_w}\right)\right)
        & T_w < s < T \\
        \alpha_{\text{final}} & s \ge T
        \end{cases}

    ``warmup_steps=0`` starts at the peak. Example: ``warmup_cosine(1e-3, 100, 1000)``
    gives 0, 5e-4, 1e-3, 8.83e-4, 2.5e-4, 0 at steps 0, 50, 100, 300, 700, 1000.

    Args:
        peak_lr: :math:`\alpha_{\text{peak}}`, finite and >= 0.
        warmup_steps: :math:`T_w`, an integer with 0 <= T_w <= T.
        total_steps: :math:`T`, an integer >= 1.
        final_lr: :math:`\alpha_{\text{final}}`, finite, 0 <= final_lr <= peak_lr.
    """
    peak_lr = _number("peak_lr", peak_lr, low=0)
    warmup_steps = _integer("warmup_steps", warmup_steps, low=0)
    total_steps = _integer("total_steps", total_steps, low=1)
    final_lr = _number("final_lr", final_lr, low=0)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps "
            f"(got warmup_steps={warmup_steps}, total_steps={total_steps})"
        )
    if final_lr > peak_lr:
        raise ValueError(
            f"final_lr must be <= peak_lr (got final_lr={final_lr!r}, peak_lr={peak_lr!r})"
        )
    return _Schedule(
        "warmup_cosine",
        _warmup_cosine_rule,
        peak_lr=peak_lr,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        final_lr=final_lr,
    )


def _one_cycle_rule(
    step: float,
    max_lr: float,
    total_steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    anneal: str,
) -> float:
    # Same arithmetic, in the same order, as torch's OneCycleLR (three_phase=False).
    initial_lr = max_lr / div_factor
    min_lr = initial_lr / final_div_factor
    warmup_end = float(pct_start * total_steps) - 1
    last = total_steps - 1
    step = min(step, last)
    if step <= warmup_end:
        # warmup_end == 0 means the warmup ends at step 0 (torch divides by zero there)
        start, end, pct = initial_lr, max_lr, step / warmup_end if warmup_end > 0 else 1.0
    else:
        start, end, pct = max_lr, min_lr, (step - warmup_end) / (last - warmup_end)
    if anneal == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def one_cycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
) -> Schedule:
    r"""The 1cycle policy (Smith & Topin, 2018), as ``torch.optim.lr_scheduler.OneCycleLR``
    computes it with ``three_phase=False``.

    With :math:`\alpha_{\text{init}} = \alpha_{\max} / \text{div\_factor}`,
    :math:`\alpha_{\min} = \alpha_{\text{init}} / \text{final\_div\_factor}`,
    :math:`e = \text{pct\_start} \cdot T - 1` and :math:`s' = \min(s, T - 1)`:

    .. math::
        \alpha_s = \begin{cases}
        A(\alpha_{\text{init}}, \alpha_{\max}, s' / e) & s' \le e \\
        A(\alpha_{\max}, \alpha_{\min}, (s' - e) / (T - 1 - e)) & s' > e
        \end{cases}

    where :math:`A(a, b, p) = b + (a - b)\,\tfrac{1}{2}(1 + \cos \pi p)` for
    ``anneal="cos"`` and :math:`a + (b - a)\,p` for ``anneal="linear"``. The rate holds
    :math:`\alpha_{\min}` from step :math:`T - 1` on (torch raises after step :math:`T`).

    Args:
        max_lr: :math:`\alpha_{\max}`, finite and > 0.
        total_steps: :math:`T`, an integer >= 1.
        pct_start: fraction of the steps spent increasing, 0 <= pct_start <= 1.
        div_factor: finite and > 0.
        final_div_factor: finite and > 0.
        anneal: ``"cos"`` or ``"linear"``.
    """
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear' (got anneal={anneal!r})")
    arguments = dict(
        max_lr=_number("max_lr", max_lr, low=0, low_open=True),
        total_steps=_integer("total_steps", total_steps, low=1),
        pct_start=_number("pct_start", pct_start, low=0, high=1),
        div_factor=_number("div_factor", div_factor, low=0, low_open=True),
        final_div_factor=_number("final_div_factor", final_div_factor, low=0, low_open=True),
    )
    # Tiny divisors would make the initial or final rate infinite (and the curve NaN).
    initial_lr = arguments["max_lr"] / arguments["div_factor"]
    if not math.isfinite(initial_lr):
        raise ValueError(f"div_factor must leave max_lr / div_factor finite (got div_factor={div_factor!r})")
    if not math.isfinite(initial_lr / arguments["final_div_factor"]):
        raise ValueError(
            "final_div_factor must leave max_lr / div_factor / final_div_factor finite "
            f"(got final_div_factor={final_div_factor!r})"
        )
    return _Schedule("one_cycle", _one_cycle_rule, **arguments, anneal=anneal)


def _join_rule(step: float, schedules: tuple[Schedule, ...], boundaries: tuple[int, ...]) -> float:
    index = bisect_right(boundaries, step)
    offset = boundaries[index - 1] if index else 0
    return schedules[index](step - offset)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""One schedule after another (like ``optax.join_schedules``):

    .. math:: \alpha_s = \text{schedules}[i](s - b_{i}) \quad \text{for } b_i \le s < b_{i+1}

    with :math:`b_0 = 0` and :math:`b_1 < b_2 < \dots` the ``boundaries``; each schedule
    sees the step count relative to the boundary where it starts.

    Args:
        schedules: one or more callables ``step -> lr``.
        boundaries: ``len(schedules) - 1`` integers >= 1, strictly increasing.
    """
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence):
        raise ValueError(f"schedules must be a sequence of schedules (got schedules={schedules!r})")
    if len(schedules) == 0:
        raise ValueError("schedules must hold at least one schedule (got schedules=[])")
    schedules = tuple(_callable(f"schedules[{i}]", s) for i, s in enumerate(schedules))
    boundaries = _increasing_integers("boundaries", boundaries)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must have len(schedules) - 1 = {len(schedules) - 1} entries "
            f"(got {len(boundaries)}: boundaries={list(boundaries)})"
        )
    return _Schedule("join", _join_rule, schedules=schedules, boundaries=boundaries)


def _multiply_rule(step: float, schedules: tuple[Schedule, ...]) -> float:
    product = 1.0
    for schedule in schedules:
        product *= float(schedule(step))
    return product


def multiply(*schedules: Schedule) -> Schedule:
    r"""The pointwise product of schedules: :math:`\alpha_s = \prod_i f_i(s)`.

    ``multiply(schedule, constant(0.1))`` scales a schedule by 0.1.

    Args:
        schedules: one or more callables ``step -> value``.
    """
    if not schedules:
        raise ValueError("multiply needs at least one schedule (got none)")
    schedules = tuple(_callable(f"schedules[{i}]", s) for i, s in enumerate(schedules))
    return _Schedule("multiply", _multiply_rule, schedules=schedules)


# --------------------------------------------------------------------------- plateau


class ReduceOnPlateau:
    r"""A multiplier, cut by ``factor`` when a metric stops improving.

    The decisions are those of ``torch.optim.lr_scheduler.ReduceLROnPlateau``: a metric
    :math:`m` improves on the best so far :math:`b` when :math:`m < b (1 - \theta)`
    (``mode="min"``, ``threshold_mode="rel"``), :math:`m < b - \theta` (``"abs"``), or
    the mirror images for ``mode="max"``. After more than ``patience`` evaluations in a
    row without improvement the scale becomes :math:`\max(\text{scale} \cdot
    \text{factor}, \text{min\_scale})`, and the next ``cooldown`` evaluations count no
    bad ones. A NaN metric never improves, as in torch.

    Unlike torch's, this multiplies whatever schedule :class:`ScheduledLR` applies, so
    it composes with warmup and cosine decay; ``min_scale`` plays the part of
    ``min_lr / base_lr``. torch also skips a cut that would change the rate by less
    than ``eps=1e-8``; there is no such absolute floor here (set ``min_scale``).

    Args:
        mode: ``"min"`` (lower metric is better) or ``"max"``.
        factor: multiplier applied at each cut, 0 < factor < 1.
        patience: bad evaluations tolerated before a cut, an integer >= 0.
        threshold: minimum improvement, finite and >= 0.
        threshold_mode: ``"rel"`` or ``"abs"``.
        cooldown: evaluations after a cut during which bad ones are not counted, >= 0.
        min_scale: the scale never goes below this, 0 <= min_scale <= 1.
    """

    def __init__(
        self,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_scale: float = 0.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max' (got mode={mode!r})")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(
                f"threshold_mode must be 'rel' or 'abs' (got threshold_mode={threshold_mode!r})"
            )
        self.mode = mode
        self.factor = _number("factor", factor, low=0, high=1, low_open=True, high_open=True)
        self.patience = _integer("patience", patience, low=0)
        self.threshold = _number("threshold", threshold, low=0)
        self.threshold_mode = threshold_mode
        self.cooldown = _integer("cooldown", cooldown, low=0)
        self.min_scale = _number("min_scale", min_scale, low=0, high=1)
        self.scale = 1.0
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_evaluations = 0
        self.cooldown_left = 0

    def _improves(self, metric: float) -> bool:
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return metric < self.best * (1.0 - self.threshold)
            return metric < self.best - self.threshold
        if self.threshold_mode == "rel":
            return metric > self.best * (1.0 + self.threshold)
        return metric > self.best + self.threshold

    def update(self, metric: float | torch.Tensor) -> bool:
        """Record one evaluation of the metric; returns True when the scale was cut."""
        metric = float(metric)
        if self._improves(metric):
            self.best = metric
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_evaluations = 0
        if self.bad_evaluations > self.patience:
            self.scale = max(self.scale * self.factor, self.min_scale)
            self.cooldown_left = self.cooldown
            self.bad_evaluations = 0
            return True
        return False

    def state_dict(self) -> dict[str, float | int]:
        """The state that changes with evaluations (the settings come from the constructor)."""
        return {
            "scale": self.scale,
            "best": self.best,
            "bad_evaluations": self.bad_evaluations,
            "cooldown_left": self.cooldown_left,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        missing = {"scale", "best", "bad_evaluations", "cooldown_left"} - set(state)
        if missing:
            raise ValueError(
                f"plateau state is missing {sorted(missing)} (got keys {sorted(state)})"
            )
        self.scale = float(state["scale"])
        self.best = float(state["best"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.cooldown_left = int(state["cooldown_left"])

    def __repr__(self) -> str:
        return (
            f"ReduceOnPlateau(mode={self.mode!r}, factor={self.factor!r}, "
            f"patience={self.patience!r}, threshold={self.threshold!r}, "
            f"threshold_mode={self.threshold_mode!r}, cooldown={self.cooldown!r}, "
            f"min_scale={self.min_scale!r}; scale={self.scale!r})"
        )


# --------------------------------------------------------------------------- adapter


class ScheduledLR:
    r"""Drive the learning rates of any ``torch.optim.Optimizer`` with schedules.

    After ``t`` calls to :meth:`step`, param group ``g`` has

    .. math:: \text{lr}_g = \text{schedule}_g(t) \cdot \text{plateau.scale}

    (the scale is 1 without a plateau). Construction sets the rates for ``t = 0``; call
    :meth:`step` once after each ``optimizer.step()``, with ``metric=`` at the steps
    where you evaluate, to feed the plateau. A group whose ``lr`` is a 0-d tensor is
    updated in place with ``fill_``, so a compiled optimizer step sees the same tensor
    and is not recompiled; otherwise ``lr`` is set to a float.

    Groups added later with ``optimizer.add_param_group``: a single schedule drives
    every group, new ones included, from the next :meth:`step` on. With one schedule
    per group, append the new group's schedule to :attr:`schedules` as well;
    :meth:`step` raises if the counts differ.

    Schedules are functions and are not saved: :meth:`state_dict` holds the step count
    and the plateau's state, and :meth:`load_state_dict` on an adapter built with the
    same schedules resumes at exactly the learning rate where the saved run was.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (torch's or ravine's).
        schedule: a callable ``step -> lr``, or a sequence of them, one per param group.
        plateau: an optional :class:`ReduceOnPlateau` whose scale multiplies every rate.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule | Sequence[Schedule],
        plateau: ReduceOnPlateau | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (got {type(optimizer).__name__})"
            )
        if plateau is not None and not isinstance(plateau, ReduceOnPlateau):
            raise TypeError(
                f"plateau must be a ReduceOnPlateau or None (got {type(plateau).__name__})"
            )
        self.optimizer = optimizer
        self.plateau = plateau
        self.step_count = 0
        self.shared_schedule: Schedule | None = None
        self.schedules: list[Schedule] = []
        if callable(schedule):
            self.shared_schedule = schedule
        else:
            if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
                raise TypeError(
                    "schedule must be a callable step -> lr or a sequence of them "
                    f"(got schedule={schedule!r})"
                )
            self.schedules = [_callable(f"schedule[{i}]", s) for i, s in enumerate(schedule)]
            groups = len(optimizer.param_groups)
            if len(self.schedules) != groups:
                raise ValueError(
                    f"schedule must have one entry per param group: {groups} "
                    f"(got {len(self.schedules)} schedules)"
                )
        self._last_lr: list[float] = []
        self._apply()

    def _schedule_for(self, index: int) -> Schedule:
        if self.shared_schedule is not None:
            return self.shared_schedule
        groups = len(self.optimizer.param_groups)
        if len(self.schedules) != groups:
            raise ValueError(
                f"the optimizer has {groups} param groups but {len(self.schedules)} "
                "schedules were given; after optimizer.add_param_group, append the new "
                "group's schedule to .schedules"
            )
        return self.schedules[index]

    def _apply(self) -> None:
        scale = 1.0 if self.plateau is None else self.plateau.scale
        rates = []
        for index, group in enumerate(self.optimizer.param_groups):
            lr = float(self._schedule_for(index)(self.step_count)) * scale
            if not (math.isfinite(lr) and lr >= 0):
                raise ValueError(
                    f"the schedule of param group {index} gave lr={lr!r} at step "
                    f"{self.step_count}; learning rates must be finite and >= 0"
                )
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            rates.append(lr)
        self._last_lr = rates

    def step(self, metric: float | torch.Tensor | None = None) -> None:
        """Advance one step; ``metric`` (at evaluation points) feeds the plateau first."""
        if metric is not None:
            if self.plateau is None:
                raise ValueError(
                    f"metric was given (got metric={metric!r}) but this ScheduledLR has no "
                    "plateau; pass plateau=ReduceOnPlateau(...) to act on a metric"
                )
            self.plateau.update(metric)
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rate last set on each param group, as floats."""
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count and plateau state, and set the optimizer's rates to match."""
        if "step_count" not in state or "plateau" not in state:
            raise ValueError(
                f"state must hold 'step_count' and 'plateau' (got keys {sorted(state)})"
            )
        step_count = _integer("state['step_count']", state["step_count"], low=0)
        if (state["plateau"] is None) != (self.plateau is None):
            raise ValueError(
                "state and adapter disagree on the plateau "
                f"(state has {'none' if state['plateau'] is None else 'one'}, "
                f"this ScheduledLR has {'none' if self.plateau is None else 'one'})"
            )
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.step_count = step_count
        self._apply()

    def __repr__(self) -> str:
        schedule = self.shared_schedule if self.shared_schedule is not None else self.schedules
        return (
            f"ScheduledLR({type(self.optimizer).__name__}, schedule={schedule!r}, "
            f"plateau={self.plateau!r}, step_count={self.step_count})"
        )
