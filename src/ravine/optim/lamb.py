r"""LAMB: Adam's direction, rescaled per tensor by a trust ratio, for large batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_range, scalar
from ravine.optim.lion import check_betas

__all__ = ["Lamb"]


class Lamb(RavineOptimizer):
    r"""LAMB, "Layer-wise Adaptive Moments for Batch training" (You et al., 2020,
    "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

    For each parameter tensor :math:`\theta` (a layer's weight or bias):

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        r_t &= \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
               \quad\text{(without bias correction: } m_t / (\sqrt{v_t} + \epsilon)\text{)} \\
        u_t &= r_t + \lambda\,\theta_{t-1} \\
        \rho_t &= \lVert\theta_{t-1}\rVert / \lVert u_t\rVert
                 \quad (\rho_t = 1 \text{ when either norm is } 0) \\
        \theta_t &= \theta_{t-1} - \eta\,\rho_t\,u_t

    The norms are Euclidean norms over the whole tensor, so each tensor moves by
    :math:`\eta\lVert\theta\rVert` whatever the scale of its gradient: the step is
    relative to the weight's size, which keeps very large batches (and their large
    learning rates) stable. The weight decay :math:`\lambda\theta` is decoupled from
    the adaptive scaling (as AdamW's) but inside the trust ratio. Because of the
    per-tensor norms, LAMB is not elementwise: a tensor's update depends on all its
    entries. The ratio is computed in float64 on the host (one read per block of
    tensors).

    ``state_dict``: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter (Adam's keys).

    Args:
        params: parameters or param groups.
        lr: :math:`\eta` >= 0 (float or 1-element tensor).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0.
        bias_correction: divide the moments by :math:`1 - \beta^t` (the paper's
            algorithm omits it; most implementations keep Adam's, as here by default).
        maximize: ascend the objective instead of descending it.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "bias_correction": bias_correction,
            "maximize": maximize,
            "foreach": foreach,
        }
        self.check_group(defaults)
        super().__init__(params, defaults)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        betas = check_betas(group["betas"], "[0, 1)")
        check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        # weight_decay scales the parameters through torch's ``alpha``, which refuses
        # values beyond float32's range on float32 parameters.
        check_range("weight_decay", group["weight_decay"], 0.0, float(torch.finfo(torch.float32).max))
        if not isinstance(group["bias_correction"], bool):
            raise ValueError(f"bias_correction must be True or False, got {group['bias_correction']!r}")

    def init_state(self, group, param, state) -> None:
        state["step"] = self._new_step_tensor(group, param)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def block_elements(self, group: dict[str, Any]) -> int:
        # The trust ratio needs whole tensors: never cut one into slices.
        return 1 << 62

    def update(self, group, params, grads, states, steps) -> None:
        lr = scalar(group["lr"])
        beta1, beta2 = (scalar(beta) for beta in group["betas"])
        weight_decay = scalar(group["weight_decay"])
        if group["maximize"]:
            grads = T.negate(grads)
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        T.moving_average_(exp_avgs, grads, beta1)
        T.moving_average_of_squares_(exp_avg_sqs, grads, beta2)
        if group["bias_correction"]:
            denominators = T.adam_denominator(
                exp_avg_sqs, [T.bias_correction_root(beta2, step) for step in steps], group["eps"]
            )
            updates = torch._foreach_div(exp_avgs, denominators)
            torch._foreach_div_(updates, [T.bias_correction(beta1, step) for step in steps])
        else:
            updates = torch._foreach_div(exp_avgs, T.root_of_(exp_avg_sqs, group["eps"]))
        if weight_decay != 0:
            torch._foreach_add_(updates, params, alpha=weight_decay)
        ratios = trust_ratios(params, updates)
        torch._foreach_mul_(updates, [-lr * ratio for ratio in ratios])
        torch._foreach_add_(params, updates)


def trust_ratios(params: list[Tensor], updates: list[Tensor]) -> list[float]:
    r""":math:`\lVert\theta\rVert / \lVert u\rVert` per tensor, 1 where either norm is 0,
    in float64 (one read back to the host for the whole list). For DTensor parameters
    (FSDP2) the norms are those of the full tensors, reduced across the shards."""
    if not params:
        return []
    norms = torch._foreach_norm(params) + torch._foreach_norm(updates)
    # On a sharded DTensor the norm is a partial result per shard: reduce it across the
    # shards to the whole tensor's norm, the same on every rank.
    # (``full_tensor`` is DTensor's; plain tensors have no such method.)
    norms = [norm.full_tensor() if hasattr(norm, "full_tensor") else norm for norm in norms]
    values = torch.stack([norm.to("cpu", torch.float64) for norm in norms]).tolist()
    count = len(params)
    return [
        weight / update if weight > 0 and update > 0 else 1.0
        for weight, update in zip(values[:count], values[count:])
    ]
