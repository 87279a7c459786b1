r"""RMSprop: per-parameter step sizes from a moving root mean square of gradients."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_range, scalar

__all__ = ["RMSprop"]


class RMSprop(RavineOptimizer):
    r"""RMSprop (Hinton, 2012, Neural Networks for Machine Learning, lecture 6e), with
    the centered variant of Graves (2013, "Generating Sequences With Recurrent Neural
    Networks").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        s_t &= \alpha s_{t-1} + (1 - \alpha) g_t^2 \\
        m_t &= \alpha m_{t-1} + (1 - \alpha) g_t \quad\text{(centered only)} \\
        r_t &= \sqrt{s_t} + \epsilon \quad\text{or, centered,}\quad r_t = \sqrt{s_t - m_t^2} + \epsilon \\
        b_t &= \mu b_{t-1} + g_t / r_t, \quad \theta_t = \theta_{t-1} - \eta\, b_t \quad\text{(momentum > 0)} \\
        \theta_t &= \theta_{t-1} - \eta\, g_t / r_t \quad\text{(otherwise)}

    Signature, defaults and ``state_dict`` (``step``, ``square_avg``, and
    ``momentum_buffer`` / ``grad_avg`` when used) are those of
    :class:`torch.optim.RMSprop`.

    Args:
        lr: :math:`\eta` >= 0. alpha: smoothing :math:`\alpha` in [0, 1]. eps:
        :math:`\epsilon` >= 0. weight_decay: L2 :math:`\lambda` >= 0. momentum:
        :math:`\mu` >= 0. centered: normalise by the moving variance.
        maximize: ascend instead of descend. impl: (ravine only, keyword)
        ``"auto"``, ``"plain"`` or ``"fast"``, the implementation that runs the step
        (see :mod:`ravine.optim.base`).
    """

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True
    # torch.optim.RMSprop counts steps in its state but its rule never uses them.
    reads_step_counts = False

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("alpha", group["alpha"], 0.0, 1.0)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum", group["momentum"], 0.0)

    def init_state(self, group, param, state) -> None:
        state["step"] = self._new_step_tensor(group, param)
        state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        names = ("square_avg",)
        if group["momentum"] > 0:
            names += ("momentum_buffer",)
        if group["centered"]:
            names += ("grad_avg",)
        return names

    def update(self, group, params, grads, states, steps) -> None:
        lr = scalar(group["lr"])
        alpha = group["alpha"]
        if group["maximize"]:
            grads = T.negate(grads)
        if group["weight_decay"] != 0:
            grads = T.add_l2_penalty(grads, params, group["weight_decay"])
        square_avgs = [state["square_avg"] for state in states]
        T.moving_average_of_squares_(square_avgs, grads, alpha)
        if group["centered"]:
            grad_avgs = [state["grad_avg"] for state in states]
            T.moving_average_(grad_avgs, grads, alpha)
            roots = T.centered_root_of_(square_avgs, grad_avgs, group["eps"])
        else:
            roots = T.root_of_(square_avgs, group["eps"])
        if group["momentum"] > 0:
            buffers = [state["momentum_buffer"] for state in states]
            T.scale_(buffers, group["momentum"])
            torch._foreach_addcdiv_(buffers, grads, roots)
            T.add_(params, buffers, -lr)
        else:
            T.add_quotient_(params, grads, roots, -lr)
