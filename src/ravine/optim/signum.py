r"""Signum and signSGD: steps along the sign of the momentum or of the gradient."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_range, scalar

__all__ = ["Signum"]


class Signum(RavineOptimizer):
    r"""Signum, and signSGD with ``momentum=0`` (Bernstein, Wang, Azizzadenesheli &
    Anandkumar, 2018, "signSGD: Compressed Optimisation for Non-Convex Problems").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \\
        m_t &= \beta m_{t-1} + (1 - \beta)\, g_t \qquad (m_0 = 0) \\
        \theta_t &= (1 - \eta\lambda)\,\theta_{t-1} - \eta\,\operatorname{sign}(m_t)

    With :math:`\beta = 0` this is signSGD, :math:`\theta_t = \theta_{t-1} -
    \eta\,\operatorname{sign}(g_t)`: the sign of the gradient alone, one bit per weight,
    is enough to drive training (the paper's point: workers can send one bit per
    coordinate instead of a 32-bit float, and a majority vote of the signs still
    converges). Every coordinate moves by exactly :math:`\eta` (0 where :math:`m_t =
    0`), like Adam's steps with :math:`\beta_1 = \beta_2 = 0`. The weight decay is
    decoupled (as AdamW's).

    ``state_dict``: ``momentum_buffer`` (:math:`m`) per parameter when ``momentum`` is
    not 0, nothing otherwise (as :class:`torch.optim.SGD`); no step count.

    Args:
        params: parameters or param groups.
        lr: :math:`\eta` >= 0 (float or 1-element tensor).
        momentum: :math:`\beta` in [0, 1); 0 gives signSGD.
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
        lr: float | Tensor = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)

    def init_state(self, group, param, state) -> None:
        if scalar(group["momentum"]) != 0:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if scalar(group["momentum"]) != 0 else ()

    def advance_steps(self, group, dense) -> list[float]:
        # No step count. A group switched to momentum between steps gets its buffers now.
        if scalar(group["momentum"]) != 0:
            for p, state in dense:
                if "momentum_buffer" not in state:
                    self.init_state(group, p, state)
        return [0.0] * len(dense)

    def update(self, group, params, grads, states, steps) -> None:
        lr = scalar(group["lr"])
        momentum = scalar(group["momentum"])
        weight_decay = scalar(group["weight_decay"])
        if momentum != 0:
            buffers = [state["momentum_buffer"] for state in states]
            if group["maximize"]:
                grads = T.negate(grads)
            T.scale_(buffers, momentum)  # m = b m + (1 - b) g
            T.add_(buffers, grads, 1 - momentum)
            directions = torch._foreach_sign(buffers)
        else:
            directions = torch._foreach_sign(grads)
            if group["maximize"]:
                torch._foreach_neg_(directions)
        if weight_decay != 0:
            T.decay_weights_(params, 1 - lr * weight_decay)
        torch._foreach_mul_(directions, -lr)  # exact (signs); an alpha would refuse lr > float32's max
        torch._foreach_add_(params, directions)
