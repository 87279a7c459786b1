r"""Adam and AdamW: momentum plus per-parameter RMS scaling, with bias correction."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.optim.base import RavineOptimizer, check_betas, check_range, scalar
from ravine.optim.lowmem import check_real_params, check_working_range, resolve_state_dtype, restore_state_dtypes, run_in_working_precision

__all__ = ["Adam", "AdamW"]


class Adam(RavineOptimizer):
    r"""Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization"), with
    AMSGrad (Reddi, Kale & Kumar, 2018) and decoupled weight decay (AdamW;
    Loshchilov & Hutter, 2019) as options.

    .. math::
        g_t &= \pm\nabla f(\theta_{t-1}) \;(+\,\lambda\theta_{t-1} \text{ for L2 decay}) \\
        \theta_{t-1} &\leftarrow (1 - \eta\lambda)\,\theta_{t-1} \quad\text{(decoupled decay)} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \ \text{(AMSGrad)} \quad\text{or}\quad \hat v_t = v_t \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
                    \frac{m_t}{\sqrt{\hat v_t / (1 - \beta_2^t)} + \epsilon}

    With the defaults each step moves every coordinate by about :math:`\eta`,
    whatever the gradient's scale (three steps on :math:`x^2` from 2.0 with
    :math:`\eta = 0.01` give 1.99, 1.98, 1.97).

    Signature, defaults and ``state_dict`` (``step``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` with AMSGrad) are those of :class:`torch.optim.Adam`.

    Args:
        lr: :math:`\eta` >= 0 (float or 1-element tensor). betas:
        :math:`(\beta_1, \beta_2)`, each in [0, 1). eps: :math:`\epsilon` >= 0.
        weight_decay: :math:`\lambda` >= 0. amsgrad: use the running maximum of
        :math:`v_t`. maximize: ascend instead of descend. decoupled_weight_decay:
        decay the weights directly (AdamW) instead of adding :math:`\lambda\theta`
        to the gradient. state_dtype (ravine only, keyword): the dtype the moment
        buffers are stored in (``None``: the parameter's; ``torch.bfloat16`` halves
        a float32 model's state); the update runs in float32 and rounds the buffers
        back to nearest (see :mod:`ravine.optim.lowmem`). impl (ravine only,
        keyword): ``"auto"``, ``"plain"`` or ``"fast"``, the implementation that
        runs the step (see :mod:`ravine.optim.base`).
    """

    #: Each coordinate is updated from its own gradient and state alone.
    elementwise = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        state_dtype: torch.dtype | str | None = None,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        # Only a state dtype that is set enters the param groups, so the default
        # state_dict is torch.optim.Adam's.
        if state_dtype is not None:
            defaults["state_dtype"] = resolve_state_dtype(state_dtype)
        self.check_group(defaults)
        defaults["betas"] = tuple(_squeeze(beta) for beta in betas)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if group.get("state_dtype") is not None:
            resolve_state_dtype(group["state_dtype"])
            check_real_params(group, "state_dtype")
            check_working_range(group)

    def init_state(self, group, param, state) -> None:
        dtype = resolve_state_dtype(group.get("state_dtype"))
        state["step"] = self._new_step_tensor(group, param)
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict, _moment_dtype)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def update(self, group, params, grads, states, steps) -> None:
        if group.get("state_dtype") is not None:
            run_in_working_precision(self.update_rule, group, params, grads, states, steps)
        else:
            self.update_rule(group, params, grads, states, steps)

    def update_rule(self, group, params, grads, states, steps) -> None:
        """The update on tensors that share a dtype (see :meth:`update`)."""
        # A tensor lr is combined with other factors in tensor arithmetic, as
        # torch.optim does, so both give the same numbers.
        lr = group["lr"]
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if group["maximize"]:
            grads = T.negate(grads)
        grads = T.apply_weight_decay(grads, params, lr, weight_decay, group["decoupled_weight_decay"])
        exp_avgs = [state["exp_avg"] for state in states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        if isinstance(beta1, Tensor):
            # torch.optim casts a tensor beta1 to each parameter's dtype first.
            for dtype in {p.dtype for p in params}:
                same = [i for i, p in enumerate(params) if p.dtype == dtype]
                T.moving_average_([exp_avgs[i] for i in same], [grads[i] for i in same], beta1.to(dtype))
        else:
            T.moving_average_(exp_avgs, grads, beta1)
        T.moving_average_of_squares_(exp_avg_sqs, grads, beta2)
        if group["amsgrad"]:
            second_moments = [state["max_exp_avg_sq"] for state in states]
            T.running_maximum_(second_moments, exp_avg_sqs)
        else:
            second_moments = exp_avg_sqs
        denominators = T.adam_denominator(
            second_moments, [T.bias_correction_root(beta2, step) for step in steps], group["eps"]
        )
        T.add_quotient_(params, exp_avgs, denominators, [-scalar(lr / T.bias_correction(beta1, step)) for step in steps])


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019,
    "Decoupled Weight Decay Regularization").

    .. math::
        \theta_t = (1 - \eta\lambda)\,\theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
                   \frac{m_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    The decay shrinks the weights directly instead of passing through the adaptive
    scaling, so every weight is regularised equally. Signature and defaults
    (``weight_decay=0.01``) are those of :class:`torch.optim.AdamW`.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            state_dtype=state_dtype,
            impl=impl,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


_MOMENT_NAMES = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _moment_dtype(group: dict[str, Any], name: str, saved: dict[str, Any]) -> torch.dtype | None:
    return resolve_state_dtype(group.get("state_dtype")) if name in _MOMENT_NAMES else None


def _squeeze(value: float | Tensor) -> float | Tensor:
    # As torch.optim does: a 1-element tensor hyperparameter becomes 0-d.
    return value.squeeze() if isinstance(value, Tensor) and value.dim() != 0 else value
