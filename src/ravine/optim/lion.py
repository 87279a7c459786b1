r"""Lion: the sign of an interpolated momentum, found by program search."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, betas_pair, check_range, scalar

__all__ = ["Lion"]


class Lion(RavineOptimizer):
    r"""Lion, "EvoLved Sign Momentum" (Chen et al., 2023, "Symbolic Discovery of
    Optimization Algorithms").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \\
        c_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta\,\operatorname{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2)\, g_t \qquad (m_0 = 0)

    Every coordinate moves by exactly :math:`\eta` (or 0 where :math:`c_t = 0`), so
    Lion's update has a larger norm than Adam's: the paper uses a learning rate 3-10x
    smaller than AdamW's and a weight decay 3-10x larger, keeping :math:`\eta\lambda`
    about the same. It keeps one buffer per parameter (Adam keeps two). The weight
    decay is decoupled (as AdamW's).

    ``state_dict``: ``exp_avg`` (:math:`m`) per parameter; no step count, since the
    rule never reads one.

    Args:
        params: parameters or param groups.
        lr: :math:`\eta` >= 0 (float or 1-element tensor).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1].
        weight_decay: decoupled decay :math:`\lambda` >= 0.
        maximize: ascend the objective instead of descending it.
        impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``, the
            implementation that runs the step (see :mod:`ravine.optim.base`); the
            compiled step is bit-equal to the plain one.
    """

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True
    reads_step_counts = False

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        betas = betas_pair(group["betas"], "[0, 1]")
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)

    def init_state(self, group, param, state) -> None:
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def advance_steps(self, group, dense) -> list[float]:
        return [0.0] * len(dense)  # Lion counts no steps

    def update(self, group, params, grads, states, steps) -> None:
        lr = scalar(group["lr"])
        beta1, beta2 = (scalar(beta) for beta in group["betas"])
        weight_decay = scalar(group["weight_decay"])
        if group["maximize"]:
            grads = T.negate(grads)
        exp_avgs = [state["exp_avg"] for state in states]
        # Averages as b m + (1 - b) g (a multiply and an add, as the paper's code), not
        # as a lerp: the sign of c near 0 depends on that rounding.
        directions = torch._foreach_mul(exp_avgs, beta1)  # c = b1 m + (1 - b1) g
        torch._foreach_add_(directions, grads, alpha=1 - beta1)
        torch._foreach_sign_(directions)
        if weight_decay != 0:
            T.decay_weights_(params, 1 - lr * weight_decay)
        torch._foreach_mul_(directions, -lr)  # exact (signs); an alpha would refuse lr > float32's max
        torch._foreach_add_(params, directions)
        T.scale_(exp_avgs, beta2)  # m = b2 m + (1 - b2) g
        T.add_(exp_avgs, grads, 1 - beta2)
