r"""Stochastic gradient descent, with momentum, dampening, Nesterov and L2 weight decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_range, scalar
from ravine.optim.lowmem import check_real_params, check_working_range, resolve_state_dtype, restore_state_dtypes, run_in_working_precision

__all__ = ["SGD"]


class SGD(RavineOptimizer):
    r"""Stochastic gradient descent (Robbins & Monro, 1951), optionally with momentum.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        v_t &= \mu v_{t-1} + (1 - \tau) g_t \qquad (v_1 = g_1) \\
        d_t &= g_t + \mu v_t \ \text{(Nesterov)} \quad\text{or}\quad d_t = v_t \\
        \theta_t &= \theta_{t-1} - \eta\, d_t

    Heavy-ball momentum is Polyak (1964); the Nesterov form is that of Sutskever et
    al. (2013), "On the importance of initialization and momentum in deep learning".
    With ``momentum=0`` the update is :math:`\theta_t = \theta_{t-1} - \eta g_t`.

    Signature, defaults, param groups and ``state_dict`` are those of
    :class:`torch.optim.SGD`; the state holds ``momentum_buffer`` once a step with
    momentum has run. ``foreach``, ``fused`` and ``differentiable`` are accepted for
    compatibility; ravine chooses its own implementation. Sparse gradients are
    supported, as in torch.

    Args:
        params: parameters or param groups.
        lr: learning rate :math:`\eta` (float or 1-element tensor), >= 0.
        momentum: :math:`\mu`, >= 0.
        dampening: :math:`\tau`, in [0, 1].
        weight_decay: L2 coefficient :math:`\lambda`, >= 0.
        nesterov: use Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: ascend the objective instead of descending it.
        impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``, the
            implementation that runs the step (see :mod:`ravine.optim.base`).
        state_dtype: (ravine only, keyword) the dtype the momentum buffer is stored
            in (``None``: the parameter's); the update runs in float32 and rounds
            the buffer back to nearest (see :mod:`ravine.optim.lowmem`). Dense
            gradients only.
    """

    real_view_for_complex = False
    supports_sparse = True

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        # Only a state dtype that is set enters the param groups, so the default
        # state_dict is torch.optim.SGD's.
        if state_dtype is not None:
            defaults["state_dtype"] = resolve_state_dtype(state_dtype)
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0)
        check_range("dampening", group["dampening"], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group["nesterov"] and (scalar(group["momentum"]) <= 0 or scalar(group["dampening"]) != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening = 0 "
                f"(got momentum={group['momentum']}, dampening={group['dampening']})"
            )
        if group.get("state_dtype") is not None:
            resolve_state_dtype(group["state_dtype"])
            check_real_params(group, "state_dtype")
            check_working_range(group)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def block_elements(self, group: dict[str, Any]) -> int:
        # Plain SGD reads each tensor once, so cache-sized blocks gain nothing and
        # one call over every tensor saves the per-call cost.
        if group["momentum"] == 0 and group["weight_decay"] == 0 and not group["maximize"]:
            return 1 << 62
        return super().block_elements(group)

    def advance_steps(self, group: dict[str, Any], dense: list[tuple[Tensor, dict[str, Any]]]) -> list[float]:
        # SGD keeps no step count; 0 marks a momentum buffer created by this step,
        # which starts as a copy of the gradient.
        if group["momentum"] == 0:
            return [1.0] * len(dense)
        counts = []
        for p, state in dense:
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.empty_like(
                    p, dtype=resolve_state_dtype(group.get("state_dtype")), memory_format=torch.preserve_format
                )
                counts.append(0.0)
            else:
                counts.append(1.0)
        return counts

    def update(self, group, params, grads, states, steps) -> None:
        if group.get("state_dtype") is not None:
            run_in_working_precision(self.update_rule, group, params, grads, states, steps)
        else:
            self.update_rule(group, params, grads, states, steps)

    def update_rule(self, group, params, grads, states, steps) -> None:
        """The update on tensors that share a dtype (see :meth:`update`)."""
        lr = scalar(group["lr"])
        momentum = group["momentum"]
        weight_decay = scalar(group["weight_decay"])
        owned = False  # whether `grads` are new tensors this step may overwrite
        if group["maximize"]:
            grads, owned = T.negate(grads), True
        if weight_decay != 0:
            grads, owned = T.add_l2_penalty(grads, params, weight_decay), True
        if momentum != 0:
            buffers = [state["momentum_buffer"] for state in states]
            fresh = [i for i, step in enumerate(steps) if step == 0.0]
            for i in fresh:
                buffers[i].copy_(grads[i])
            if fresh:
                older = [i for i, step in enumerate(steps) if step != 0.0]
                if older:
                    T.momentum_trace_(
                        [buffers[i] for i in older], [grads[i] for i in older], momentum, group["dampening"]
                    )
            else:
                T.momentum_trace_(buffers, grads, momentum, group["dampening"])
            if not group["nesterov"]:
                grads = buffers
            elif owned:
                torch._foreach_add_(grads, buffers, alpha=momentum)
            else:
                grads = T.nesterov_direction(grads, buffers, momentum)
        T.add_(params, grads, -lr)

    def check_sparse_grad(self, group: dict[str, Any], param: Tensor) -> None:
        if group.get("state_dtype") is not None:
            raise RuntimeError("SGD with a state_dtype takes dense gradients only; use state_dtype=None for sparse ones")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(
            self,
            state_dict,
            lambda group, name, saved: resolve_state_dtype(group.get("state_dtype")) if name == "momentum_buffer" else None,
        )

    def sparse_update(self, group, param, grad, state) -> None:
        # The same operations on one sparse gradient; the momentum buffer is sparse too.
        lr = scalar(group["lr"])
        momentum = group["momentum"]
        weight_decay = scalar(group["weight_decay"])
        if group["maximize"]:
            grad = -grad
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = T.momentum_trace_([state.get("momentum_buffer")], [grad], momentum, group["dampening"])[0]
            state["momentum_buffer"] = buffer
            grad = grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer
        param.add_(grad, alpha=-lr)
