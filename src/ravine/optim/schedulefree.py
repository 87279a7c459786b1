r"""Schedule-Free AdamW and SGD: no learning-rate schedule, an average instead.

Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024, "The Road Less Scheduled"
(winner of the AlgoPerf 2024 self-tuning track). Three sequences are kept: :math:`z`,
the plain (base optimizer) iterate; :math:`x`, a weighted running average of the
:math:`z`'s, the point to evaluate and ship; and :math:`y`, an interpolation of the
two, the point where gradients are taken:

.. math::
    y_t &= (1 - \beta)\, z_t + \beta\, x_t \\
    z_{t+1} &= z_t - \gamma_t\, d_t(y_t) \\
    x_{t+1} &= (1 - c_{t+1})\, x_t + c_{t+1}\, z_{t+1}, \qquad
    c_{t+1} = \frac{w_{t+1}}{\sum_{i \le t+1} w_i}, \quad
    w_t = t^{\,r}\, (\max_{i \le t} \gamma_i)^{p}

with :math:`\gamma_t = \eta \min(1, t / T_{warmup})` (a linear warmup is the only
schedule) and :math:`d_t` the base direction: the gradient plus :math:`\lambda y_t`
(SGD), or the gradient divided by Adam's bias-corrected RMS, plus :math:`\lambda y_t`
(AdamW). The parameters hold :math:`y` while training; :meth:`eval` switches them to
:math:`x` (:math:`x = (y - (1 - \beta) z) / \beta`) and :meth:`train` back to
:math:`y`. ravine calls both around every evaluation it does (:func:`evaluation_mode`);
in your own loop call ``optimizer.eval()`` before evaluating or saving a checkpoint and
``optimizer.train()`` before training again.

The numbers equal those of the reference ``schedulefree`` package
(``AdamWScheduleFree``, ``SGDScheduleFree``), as do the constructor arguments, the
state (``z``, and ``exp_avg_sq`` for AdamW) and the group entries (``k``,
``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``), so checkpoints load both
ways. Two differences: a fresh optimizer starts in train mode (the reference starts in
eval mode and needs ``train()`` before its first step; before any step :math:`x = y =
z` and the switch moves nothing), and gradients are left as they were (the reference
overwrites them with the normalised direction).

On the CPU the step runs compiled where it can (``impl``, :mod:`ravine.kernels`): one
pass over y, z, the gradient and AdamW's second moment, with the package's operations
in its order, so bit-equal to it (AdamW's square roots aside, which are torch's own
with ``RAVINE_EXACT_SQRT=1`` and the hardware's, within one unit in the last place,
by default).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, betas_pair, check_range, scalar

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeSGD", "evaluation_mode", "has_evaluation_mode"]

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def has_evaluation_mode(optimizer: Any) -> bool:
    """Whether ``optimizer`` keeps separate training and evaluation points
    (``train()`` and ``eval()`` methods, as schedule-free optimizers have)."""
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


@contextlib.contextmanager
def evaluation_mode(optimizer: Any) -> Iterator[bool]:
    """Inside the block the parameters hold the point to evaluate.

    For an optimizer with ``train()``/``eval()`` methods that is in train mode, calls
    ``optimizer.eval()`` on entry and ``optimizer.train()`` on exit (also when the block
    raises); any other optimizer is left alone. Yields whether it switched::

        with evaluation_mode(optimizer):
            test_loss = evaluate(model)
    """
    groups = getattr(optimizer, "param_groups", [])
    training = all(group.get("train_mode", True) for group in groups)
    if not (has_evaluation_mode(optimizer) and training):
        yield False
        return
    optimizer.eval()
    try:
        yield True
    finally:
        optimizer.train()


class _ScheduleFree(RavineOptimizer):
    """What both schedule-free optimizers share: warmup, the averaging weights, the
    train/eval switch and the per-group counters."""

    #: Each coordinate is updated from its own gradient and state alone; the averaging
    #: weights depend only on the group's step count and learning rate.
    elementwise = True

    def _interpolation(self, group: dict[str, Any]) -> float:
        """:math:`\\beta` of :math:`y = (1 - \\beta) z + \\beta x`."""
        raise NotImplementedError

    def _check_schedule(self, group: dict[str, Any]) -> None:
        # lr and weight_decay scale tensors through torch's ``alpha`` arguments, which
        # refuse values beyond float32's range on float32 parameters.
        check_range("lr", group["lr"], 0.0, _FLOAT32_MAX)
        check_range("weight_decay", group["weight_decay"], 0.0, _FLOAT32_MAX)
        warmup_steps = group["warmup_steps"]
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        check_range("r", group["r"], 0.0)
        check_range("weight_lr_power", group["weight_lr_power"], 0.0)

    # -- train / eval --------------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> None:
        """Switch the parameters to :math:`x`, the averaged point (to evaluate or save)."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta = self._interpolation(group)
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "z" in state:
                        p.lerp_(end=state["z"].to(p.device), weight=1 - 1 / beta)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Switch the parameters back to :math:`y`, the point where gradients are taken."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta = self._interpolation(group)
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "z" in state:
                        p.lerp_(end=state["z"].to(p.device), weight=1 - beta)
                group["train_mode"] = True

    # -- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step; ``RuntimeError`` (changing nothing) when in eval mode."""
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"{type(self).__name__}.step() called in eval mode (param group {index}); call "
                    "optimizer.train() after evaluating and before training"
                )
        skipped = getattr(self, "skipped_steps", 0)
        loss = super().step(closure)
        if getattr(self, "skipped_steps", 0) == skipped:
            # Like the reference, a group whose parameters all lack gradients still counts the step.
            for group in self.param_groups:
                if all(p.grad is None for p in group["params"]):
                    self._advance_group(group)
        return loss

    def _advance_group(self, group: dict[str, Any]) -> None:
        """Count one step in the group: warmup, ``lr_max`` and the averaging weights."""
        k = group["k"]
        warmup_steps = group["warmup_steps"]
        schedule = (k + 1) / warmup_steps if k < warmup_steps else 1.0
        lr = scalar(group["lr"]) * schedule
        group["scheduled_lr"] = lr
        group["lr_max"] = max(lr, group["lr_max"])
        group["weight_sum"] = group["weight_sum"] + self._weight(group, k + 1)
        group["k"] = k + 1

    @staticmethod
    def _weight(group: dict[str, Any], k: int) -> float:
        try:
            return (k ** scalar(group["r"])) * (group["lr_max"] ** scalar(group["weight_lr_power"]))
        except OverflowError:  # huge r or weight_lr_power: the newest point outweighs all
            return math.inf

    @classmethod
    def _averaging(cls, group: dict[str, Any]) -> float:
        """:math:`c_{k} = w_k / \\sum_{i \\le k} w_i` of the step just counted (0 if the
        sum is 0; 1 if the weight overflowed, the limit of ever larger weights)."""
        weight_sum = group["weight_sum"]
        weight = cls._weight(group, group["k"])
        if weight_sum == 0:
            return 0.0
        if math.isinf(weight):
            return 1.0
        return weight / weight_sum

    def advance_steps(self, group, dense) -> list[float]:
        for p, state in dense:
            if "z" not in state:  # also a state entry left empty by another library
                self.init_state(group, p, state)
        self._advance_group(group)
        return [float(group["k"])] * len(dense)

    def _move(self, group, params, directions, states) -> None:
        r""":math:`y \leftarrow (1 - c) y + c z + \gamma(\beta(1 - c) - 1) d`,
        :math:`z \leftarrow z - \gamma d`: the step of :math:`z`, the average :math:`x`
        and :math:`y` at once, without forming :math:`x`."""
        lr = group["scheduled_lr"]
        averaging = self._averaging(group)
        beta = self._interpolation(group)
        weight_decay = scalar(group["weight_decay"])
        if weight_decay != 0:
            directions = torch._foreach_add(directions, params, alpha=weight_decay)  # decay taken at y
        zs = [state["z"] for state in states]
        torch._foreach_lerp_(params, zs, averaging)
        torch._foreach_add_(params, directions, alpha=lr * (beta * (1 - averaging) - 1))
        torch._foreach_sub_(zs, directions, alpha=lr)


class ScheduleFreeAdamW(_ScheduleFree):
    r"""Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled"): see
    :mod:`ravine.optim.schedulefree` for the averaging; the base direction is

    .. math::
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        d_t &= \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda\, y_t

    and :math:`\beta_1` is the interpolation :math:`\beta` between :math:`z` and
    :math:`x` (it replaces Adam's momentum). Defaults, arguments and numbers are those
    of ``schedulefree.AdamWScheduleFree``; ``lr`` peaks higher than Adam's (0.0025).

    Args:
        params: parameters or param groups.
        lr: :math:`\eta` >= 0.
        betas: :math:`(\beta_1, \beta_2)`, :math:`\beta_1` in (0, 1) (:meth:`eval`
            divides by it), :math:`\beta_2` in [0, 1).
        eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0, applied at :math:`y`.
        warmup_steps: linear warmup over this many steps (integer >= 0).
        r: power of :math:`t` in the averaging weights (>= 0; 0 averages uniformly).
        weight_lr_power: power :math:`p` of the largest learning rate so far in the
            weights (>= 0), so warmup steps count little in the average.
        foreach: accepted for compatibility; ravine always works on lists of tensors.
        impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``, the
            implementation that runs the step (see :mod:`ravine.optim.base`); the
            compiled step is bit-equal to the plain path with ``RAVINE_EXACT_SQRT=1``
            (square roots aside, within one unit in the last place, otherwise).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = None,
        *,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "r": r,
            "k": 0,
            "warmup_steps": warmup_steps,
            "train_mode": True,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            "foreach": foreach,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        self._check_schedule(group)
        betas = betas_pair(group["betas"], "(0, 1) and [0, 1)")
        check_range("betas[0]", betas[0], 0.0, 1.0, low_open=True, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)

    def _interpolation(self, group: dict[str, Any]) -> float:
        return scalar(group["betas"][0])

    def init_state(self, group, param, state) -> None:
        state["z"] = torch.clone(param, memory_format=torch.preserve_format).detach()
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("z", "exp_avg_sq")

    def update(self, group, params, grads, states, steps) -> None:
        beta2 = scalar(group["betas"][1])
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        T.moving_average_of_squares_(exp_avg_sqs, grads, beta2)
        bias_correction2 = 1 - beta2 ** group["k"]
        denominators = torch._foreach_div(exp_avg_sqs, bias_correction2)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        directions = torch._foreach_div(grads, denominators)
        self._move(group, params, directions, states)


class ScheduleFreeSGD(_ScheduleFree):
    r"""Schedule-Free SGD (Defazio et al., 2024, "The Road Less Scheduled"): see
    :mod:`ravine.optim.schedulefree` for the averaging; the base direction is the
    gradient plus :math:`\lambda y_t`, and ``momentum`` is the interpolation
    :math:`\beta` between :math:`z` and :math:`x`. Defaults, arguments and numbers are
    those of ``schedulefree.SGDScheduleFree`` (``lr=1.0``, ``momentum=0.9``).

    Args:
        params: parameters or param groups.
        lr: :math:`\eta` >= 0.
        momentum: :math:`\beta` in (0, 1).
        weight_decay: :math:`\lambda` >= 0, applied at :math:`y`.
        warmup_steps, r, weight_lr_power, foreach, impl: as :class:`ScheduleFreeAdamW`
            (the compiled step takes no square root: always bit-equal).
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = None,
        *,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "r": r,
            "k": 0,
            "warmup_steps": warmup_steps,
            "train_mode": True,
            "weight_sum": 0.0,
            "lr_max": -1.0,
            "scheduled_lr": 0.0,
            "weight_lr_power": weight_lr_power,
            "weight_decay": weight_decay,
            "foreach": foreach,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        self._check_schedule(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, low_open=True, high_open=True)

    def _interpolation(self, group: dict[str, Any]) -> float:
        return scalar(group["momentum"])

    def init_state(self, group, param, state) -> None:
        state["z"] = torch.clone(param, memory_format=torch.preserve_format).detach()

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("z",)

    def update(self, group, params, grads, states, steps) -> None:
        self._move(group, params, grads, states)
