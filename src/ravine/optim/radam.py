r"""RAdam: Adam whose adaptive step is switched on as the variance estimate becomes reliable."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_betas, check_range, scalar

__all__ = ["RAdam"]


class RAdam(RavineOptimizer):
    r"""RAdam (Liu et al., 2020, "On the Variance of the Adaptive Learning Rate and
    Beyond"), with decoupled weight decay (Loshchilov & Hutter, 2019) as an option.

    Early on, :math:`v_t` averages too few squared gradients for :math:`1/\sqrt{v_t}` to
    be trusted; RAdam takes plain momentum steps until the length :math:`\rho_t` of the
    approximated simple moving average exceeds 5, then rectified Adam steps:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\,\lambda\theta_{t-1} \text{ for L2 decay}) \\
        \theta_{t-1} &\leftarrow (1 - \eta\lambda)\,\theta_{t-1} \quad\text{(decoupled decay)} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
        \hat m_t = m_t / (1 - \beta_1^t) \\
        \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
        \theta_t &= \theta_{t-1} - \eta\,\hat m_t \cdot
        \begin{cases}
            r_t\,\dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}, \quad
            r_t = \sqrt{\dfrac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
            & \text{if } \rho_t > 5 \\
            1 & \text{otherwise}
        \end{cases}

    Signature, defaults and ``state_dict`` (``step``, ``exp_avg``, ``exp_avg_sq``) are
    those of :class:`torch.optim.RAdam`.

    Args:
        lr: :math:`\eta` >= 0 (float or 1-element tensor). betas:
        :math:`(\beta_1, \beta_2)`, each in [0, 1). eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0. decoupled_weight_decay: decay the weights
        directly instead of adding :math:`\lambda\theta` to the gradient. maximize:
        ascend instead of descend. impl: (ravine only, keyword) ``"auto"``,
        ``"plain"`` or ``"fast"``, the implementation that runs the step (see
        :mod:`ravine.optim.base`).
    """

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
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
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(self, group, params, grads, states, steps) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if group["maximize"]:
            grads = T.negate(grads)
        grads = T.apply_weight_decay(grads, params, lr, weight_decay, group["decoupled_weight_decay"])
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        T.moving_average_(exp_avgs, grads, beta1)
        T.moving_average_of_squares_(exp_avg_sqs, grads, beta2)

        # eta * m_t / (1 - beta1^t), in torch.optim.RAdam's order of operations.
        updates = torch._foreach_div(exp_avgs, [T.bias_correction(beta1, step) for step in steps])
        T.scale_(updates, scalar(lr))
        rectified = [index for index, step in enumerate(steps) if variance_tractability(beta2, step) > 5.0]
        if rectified:
            # ... times sqrt(1 - beta2^t) / (sqrt(v_t) + eps) times r_t where rho_t > 5.
            adaptive = T.root_of_([exp_avg_sqs[i] for i in rectified], group["eps"])
            torch._foreach_reciprocal_(adaptive)
            _scale_each_(adaptive, [T.bias_correction(beta2, steps[i]) ** 0.5 for i in rectified])
            chosen = [updates[i] for i in rectified]
            torch._foreach_mul_(chosen, adaptive)
            _scale_each_(chosen, [rectification(beta2, steps[i]) for i in rectified])
        T.add_(params, updates, -1.0)


def variance_tractability(beta2: float, step: float) -> float:
    r""":math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`, the length of the
    simple moving average that :math:`v_t` approximates."""
    rho_inf = 2 / (1 - beta2) - 1
    return rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)


def rectification(beta2: float, step: float) -> float:
    r""":math:`r_t`, the factor that gives the adaptive step a variance independent of
    :math:`t` (for :math:`\rho_t > 5`)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = variance_tractability(beta2, step)
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def _scale_each_(tensors: list[Tensor], factors: list[float]) -> None:
    # As transforms.scale_, with one factor per tensor: torch's in-place list multiply
    # rounds the factors to bfloat16/float16 first, Tensor.mul_ does not.
    if all(tensor.dtype in (torch.float32, torch.float64) for tensor in tensors):
        torch._foreach_mul_(tensors, factors)
    else:
        for tensor, factor in zip(tensors, factors):
            tensor.mul_(factor)
