r"""Adamax: Adam with the infinity norm in place of the RMS."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_betas, check_range, scalar

__all__ = ["Adamax"]


class Adamax(RavineOptimizer):
    r"""Adamax (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization",
    section 7.1): Adam's second moment replaced by an exponentially weighted infinity
    norm, which needs no bias correction.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\,\lambda\theta_{t-1}) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,\frac{m_t}{u_t}

    Signature, defaults and ``state_dict`` (``step``, ``exp_avg``, ``exp_inf``
    :math:`= u_t`) are those of :class:`torch.optim.Adamax`.

    Args:
        lr: :math:`\eta` >= 0 (float or 1-element tensor). betas:
        :math:`(\beta_1, \beta_2)`, each in [0, 1). eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0 (L2 penalty). maximize: ascend instead of
        descend. impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``,
        the implementation that runs the step (see :mod:`ravine.optim.base`).
    """

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"], numbers_only=True)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)

    def init_state(self, group, param, state) -> None:
        state["step"] = self._new_step_tensor(group, param)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_inf"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def update(self, group, params, grads, states, steps) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grads = T.negate(grads)
        if group["weight_decay"] != 0:
            grads = T.add_l2_penalty(grads, params, group["weight_decay"])
        exp_avgs = [state["exp_avg"] for state in states]
        exp_infs = [state["exp_inf"] for state in states]
        T.moving_average_(exp_avgs, grads, beta1)
        weighted_infinity_norm_(exp_infs, grads, beta2, group["eps"])
        T.add_quotient_(params, exp_avgs, exp_infs, [-scalar(lr / T.bias_correction(beta1, step)) for step in steps])


def weighted_infinity_norm_(norms: list[Tensor], grads: list[Tensor], decay: float, eps: float) -> None:
    r""":math:`u \leftarrow \max(\beta u, |g| + \epsilon)` element-wise (Adamax's
    exponentially weighted infinity norm)."""
    T.scale_(norms, decay)
    magnitudes = torch._foreach_abs(grads)
    torch._foreach_add_(magnitudes, eps)
    torch._foreach_maximum_(norms, magnitudes)
