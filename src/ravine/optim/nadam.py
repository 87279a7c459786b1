r"""NAdam: Adam with Nesterov momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_betas, check_range, scalar

__all__ = ["NAdam"]


class NAdam(RavineOptimizer):
    r"""NAdam (Dozat, 2016, "Incorporating Nesterov Momentum into Adam"), with
    decoupled weight decay (NAdamW; Loshchilov & Hutter, 2019) as an option.

    The momentum coefficient warms up with the step count :math:`t` (momentum decay
    :math:`\psi`), and the step looks ahead by mixing the next momentum into the
    current gradient:

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\,\lambda\theta_{t-1} \text{ for L2 decay}) \\
        \theta_{t-1} &\leftarrow (1 - \eta\lambda)\,\theta_{t-1} \quad\text{(decoupled decay)} \\
        \mu_t &= \beta_1\bigl(1 - \tfrac12\, 0.96^{t\psi}\bigr), \qquad
        \Pi_t = \textstyle\prod_{i \le t} \mu_i \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta\,
            \frac{\frac{1 - \mu_t}{1 - \Pi_t}\, g_t + \frac{\mu_{t+1}}{1 - \Pi_t\mu_{t+1}}\, m_t}
                 {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    Signature, defaults and ``state_dict`` (``step``, ``mu_product`` :math:`= \Pi_t`,
    ``exp_avg``, ``exp_avg_sq``) are those of :class:`torch.optim.NAdam`.

    Args:
        lr: :math:`\eta` >= 0 (float or 1-element tensor). betas:
        :math:`(\beta_1, \beta_2)`, each in [0, 1). eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0. momentum_decay: :math:`\psi` >= 0.
        decoupled_weight_decay: decay the weights directly (NAdamW) instead of adding
        :math:`\lambda\theta` to the gradient. maximize: ascend instead of descend.
        impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``, the
        implementation that runs the step (see :mod:`ravine.optim.base`).
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
        momentum_decay: float = 4e-3,
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
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"], numbers_only=True)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum_decay", group["momentum_decay"], 0.0)

    def init_state(self, group, param, state) -> None:
        state["step"] = self._new_step_tensor(group, param)
        mu_product = self._new_step_tensor(group, param)
        mu_product.fill_(1.0)
        state["mu_product"] = mu_product
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def advance_steps(self, group, dense) -> list[tuple[float, float]]:
        """Count the step and multiply ``mu_product`` by this step's :math:`\\mu_t`;
        returns ``(t, \\Pi_t)`` per parameter, which :meth:`update` reads."""
        steps = super().advance_steps(group, dense)
        beta1 = group["betas"][0]
        mu_products = [state["mu_product"] for _, state in dense]
        torch._foreach_mul_(mu_products, [momentum_coefficient(beta1, group["momentum_decay"], step) for step in steps])
        try:
            products = torch.stack(mu_products).tolist()  # one read instead of one per tensor
        except RuntimeError:  # products on several devices or in several dtypes
            products = [t.item() for t in mu_products]
        return list(zip(steps, products))

    def update(self, group, params, grads, states, steps) -> None:
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        momentum_decay = group["momentum_decay"]
        weight_decay = group["weight_decay"]
        if group["maximize"]:
            grads = T.negate(grads)
        grads = T.apply_weight_decay(grads, params, lr, weight_decay, group["decoupled_weight_decay"])
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        T.moving_average_(exp_avgs, grads, beta1)
        T.moving_average_of_squares_(exp_avg_sqs, grads, beta2)
        # sqrt(v / (1 - beta2^t)) + eps, dividing before the root as torch.optim.NAdam does.
        denominators = torch._foreach_div(exp_avg_sqs, [T.bias_correction(beta2, step) for step, _ in steps])
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, group["eps"])
        gradient_scales, momentum_scales = [], []
        for step, mu_product in steps:
            mu = momentum_coefficient(beta1, momentum_decay, step)
            mu_next = momentum_coefficient(beta1, momentum_decay, step + 1)
            gradient_scales.append(scalar(-lr * (1.0 - mu) / (1.0 - mu_product)))
            momentum_scales.append(scalar((-lr * mu_next) / (1.0 - mu_product * mu_next)))
        T.add_quotient_(params, grads, denominators, gradient_scales)
        T.add_quotient_(params, exp_avgs, denominators, momentum_scales)


def momentum_coefficient(beta1: float, momentum_decay: float, step: float) -> float:
    r""":math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t\psi})`, NAdam's warming-up momentum."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
