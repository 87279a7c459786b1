r"""Adagrad: per-parameter step sizes from the running sum of squared gradients."""

from __future__ import annotations

import math

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_range, scalar

__all__ = ["Adagrad"]


class Adagrad(RavineOptimizer):
    r"""Adagrad (Duchi, Hazan & Singer, 2011, "Adaptive Subgradient Methods for Online
    Learning and Stochastic Optimization").

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        \tilde\eta_t &= \eta / (1 + (t - 1)\,\delta) \\
        s_t &= s_{t-1} + g_t^2 \qquad (s_0 = \text{initial\_accumulator\_value}) \\
        \theta_t &= \theta_{t-1} - \tilde\eta_t\, g_t / (\sqrt{s_t} + \epsilon)

    Since :math:`s_t` only grows, each parameter's step shrinks over time: large for
    rarely seen (sparse) features, vanishing on long dense runs.

    Signature, defaults and ``state_dict`` (``step``, ``sum``, created at
    construction) are those of :class:`torch.optim.Adagrad`. Sparse gradients are
    supported, as in torch (without weight decay).

    Args:
        lr: :math:`\eta` >= 0. lr_decay: :math:`\delta` >= 0, finite. weight_decay: L2
        :math:`\lambda` >= 0. initial_accumulator_value: :math:`s_0` >= 0.
        eps: :math:`\epsilon` >= 0. maximize: ascend instead of descend.
        impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``, the
        implementation that runs the step (see :mod:`ravine.optim.base`).
    """

    supports_sparse = True

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)
        # torch.optim.Adagrad creates its state up front, so its state_dict is full
        # before the first step; so does this one.
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(group, p)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("lr_decay", group["lr_decay"], 0.0, math.inf, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("initial_accumulator_value", group["initial_accumulator_value"], 0.0)
        check_range("eps", group["eps"], 0.0)

    def init_state(self, group, param, state) -> None:
        value = group["initial_accumulator_value"]
        if torch.is_complex(param):
            value = complex(value, value)
        state["step"] = self._new_step_tensor(group, param)
        state["sum"] = torch.full_like(param, value, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def update(self, group, params, grads, states, steps) -> None:
        lr = scalar(group["lr"])
        if group["maximize"]:
            grads = T.negate(grads)
        if group["weight_decay"] != 0:
            grads = T.add_l2_penalty(grads, params, group["weight_decay"])
        sums = [state["sum"] for state in states]
        T.accumulate_squares_(sums, grads)
        roots = T.root_of_(sums, group["eps"])
        T.add_quotient_(params, grads, roots, [-lr / (1 + (step - 1) * scalar(group["lr_decay"])) for step in steps])

    def check_sparse_grad(self, group, param) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("Adagrad: weight_decay is not compatible with sparse gradients (use weight_decay=0)")

    def sparse_update(self, group, param, grad, state) -> None:
        # torch.optim.Adagrad's sparse update: only the rows present in the gradient.
        state["step"] += 1
        step = float(state["step"])
        if group["maximize"]:
            grad = -grad
        clr = scalar(group["lr"]) / (1 + (step - 1) * scalar(group["lr_decay"]))
        grad = grad.coalesce()  # the update is non-linear, so indices must be unique
        indices, values = grad._indices(), grad._values()
        state["sum"].add_(torch.sparse_coo_tensor(indices, values.pow(2), grad.size()))
        std_values = state["sum"].sparse_mask(grad)._values().sqrt_().add_(group["eps"])
        param.add_(torch.sparse_coo_tensor(indices, values / std_values, grad.size()), alpha=-clr)
