r"""Adafactor: adaptive steps from a factored second moment, with relative step sizes."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor

from ravine import transforms as T
from ravine.kernels import adafactor as _compiled_step
from ravine.optim.base import RavineOptimizer, check_range, scalar

__all__ = ["Adafactor"]

# Parameter types that are certainly not DTensors.
_PLAIN_TYPES = {torch.Tensor, torch.nn.Parameter}


class Adafactor(RavineOptimizer):
    r"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with
    Sublinear Memory Cost"), as :class:`torch.optim.Adafactor` implements it.

    For a parameter with two or more dimensions the second moment of an
    :math:`n \times m` matrix (the last two dimensions) is kept as a row factor
    :math:`R` (:math:`n \times 1`) and a column factor :math:`C` (:math:`1 \times m`), so
    the state takes :math:`n + m` numbers instead of :math:`nm`; vectors and scalars
    keep a full second moment :math:`V`. With :math:`\hat\beta_{2,t} = 1 - t^{\tau}`:

    .. math::
        G_t &= \pm\nabla f(\theta_{t-1}) \\
        \rho_t &= \min(\eta, 1/\sqrt t), \qquad
        \alpha_t = \max\bigl(\epsilon_2, \mathrm{RMS}(\theta_{t-1})\bigr)\,\rho_t \\
        \theta_{t-1} &\leftarrow (1 - \eta\lambda)\,\theta_{t-1} \\
        R_t &= \hat\beta_{2,t} R_{t-1} + (1 - \hat\beta_{2,t})\,\mathrm{mean}_{\text{cols}}(G_t^2), \qquad
        C_t = \hat\beta_{2,t} C_{t-1} + (1 - \hat\beta_{2,t})\,\mathrm{mean}_{\text{rows}}(G_t^2) \\
        \hat V_t &= \frac{R_t C_t}{\max(\mathrm{mean}(R_t), \epsilon_1)}
            \quad\text{or, for vectors,}\quad
            \hat V_t = \hat\beta_{2,t}\hat V_{t-1} + (1 - \hat\beta_{2,t})\,G_t^2 \\
        U_t &= G_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        \theta_t = \theta_{t-1} - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)}\, U_t

    There is no first moment. Signature, defaults and ``state_dict`` (``step``;
    ``row_var`` of shape ``(..., n, 1)`` and ``col_var`` of shape ``(..., 1, m)`` for
    parameters of two or more dimensions, ``variance`` otherwise) are those of
    :class:`torch.optim.Adafactor`. Complex parameters and DTensor parameters (FSDP2's
    sharded ones) are refused (``ValueError`` when they are given; torch raises at the
    first step on both).

    Args:
        lr: :math:`\eta` >= 0 (float or 1-element tensor), also the cap of the relative
        step size. beta2_decay: :math:`\tau` <= 0. eps: :math:`(\epsilon_1, \epsilon_2)`,
        each >= 0; :math:`\epsilon_1` None means the machine epsilon of the parameter's
        dtype (torch applies the first parameter's to every parameter of a step, which
        differs only in a group that mixes dtypes). d: clipping threshold :math:`d` >= 1
        of the update's RMS. weight_decay: :math:`\lambda` >= 0 (decoupled). maximize:
        ascend instead of descend. impl (ravine only, keyword): ``"auto"``, ``"plain"``
        or ``"fast"``, the implementation that runs the step (see
        :mod:`ravine.optim.base`). The compiled step (:mod:`ravine.kernels.adafactor`)
        sums the norms in double and in another order than torch, so it equals
        torch's results within rounding; in exact mode (``RAVINE_EXACT_SQRT=1``)
        ``"auto"`` keeps the plain path, which is bit-equal.
    """

    #: The step size depends on the whole tensor's RMS: coordinates are not independent.
    elementwise = False
    real_view_for_complex = False
    #: The compiled step (ravine/kernels/adafactor.cpp) sums norms in another order
    #: than torch, so it is equal within rounding: exact mode keeps the plain path.
    own_compiled_step = True

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        impl: str = "auto",
    ) -> None:
        defaults = {
            "lr": lr,
            "beta2_decay": beta2_decay,
            "eps": eps,
            "d": d,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
        }
        self.check_group(defaults)
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("beta2_decay", group["beta2_decay"], None, 0.0)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be a pair (eps1, eps2), eps1 None or >= 0 and eps2 >= 0, got {eps!r}")
        # eps1 and eps2 are compared with values in the parameters' dtype, eps1 squared.
        # Every step checks the group: the parameters are read through sets of their
        # dtypes and types, one pass, instead of several calls per parameter.
        params = group.get("params", ())
        dtypes = {p.dtype for p in params}
        dtype = min(
            (d for d in dtypes if d.is_floating_point), key=lambda d: torch.finfo(d).max, default=None
        )  # as base.narrowest_dtype
        if eps[0] is not None:
            root_of_largest = None if dtype is None else math.sqrt(torch.finfo(dtype).max)
            check_range("eps[0]", eps[0], 0.0, root_of_largest, representable_in=dtype)
        check_range("eps[1]", eps[1], 0.0, representable_in=dtype)
        check_range("d", group["d"], 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        if all(not d.is_complex for d in dtypes) and {type(p) for p in params} <= _PLAIN_TYPES:
            return
        for p in params:
            if torch.is_complex(p):
                raise ValueError(
                    f"params must be real: Adafactor does not support complex parameters, got {p.dtype}"
                )
            if hasattr(p, "placements") and hasattr(p, "full_tensor"):
                raise ValueError(
                    "params must be plain tensors: Adafactor does not support DTensor (FSDP2, "
                    "sharded) parameters, as torch.optim.Adafactor does not (its step fails on "
                    f"them); got a DTensor with placements {tuple(p.placements)}"
                )

    def init_state(self, group, param, state) -> None:
        state["step"] = self._new_step_tensor(group, param)
        grad = param.grad
        if grad.dim() > 1:
            state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
            state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
        else:
            state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        # Only ``variance`` has the parameter's shape; the factors are read from
        # ``self.state`` in :meth:`update` (parameters are never sliced, see
        # :meth:`block_elements`).
        return ("variance",)

    def block_elements(self, group: dict[str, Any]) -> int:
        # RMS and the factors span whole tensors, so a tensor is never cut into slices.
        return sys.maxsize

    def update(self, group, params, grads, states, steps) -> None:
        if self.use_compiled_step(bit_equal=False):
            # One compiled call per dtype for every parameter it takes (dense,
            # contiguous float32/float64 CPU tensors); the rest take the plain path.
            # Tables are kept per parameter list: the optimizer passes the same list
            # while the group's parameters with gradients and their state stay the same.
            kept = self.__dict__.setdefault("_compiled", {})
            key = (id(group), id(params))
            compiled = kept.get(key)
            if compiled is None or not compiled.still_valid(params, states, self.state):
                if len(kept) > 64:
                    kept.clear()
                compiled = kept[key] = _compiled_step.build(params, states, self.state)
            rest = compiled.step(group, grads, steps)
            if not rest:
                return
            params = [params[i] for i in rest]
            grads = [grads[i] for i in rest]
            steps = [steps[i] for i in rest]
        self.plain_update(group, params, grads, steps)

    def plain_update(self, group, params, grads, steps) -> None:
        """The update rule with torch's operations, one parameter at a time."""
        lr = group["lr"]
        eps1, eps2 = group["eps"]
        if group["maximize"]:
            grads = T.negate(grads)
        for param, grad, step in zip(params, grads, steps):
            if param.numel() == 0:
                continue  # nothing to update (torch.optim.Adafactor divides by zero here)
            state = self.state[param]
            epsilon1 = torch.finfo(param.dtype).eps if eps1 is None else eps1
            relative_step = min(lr, 1 / (step**0.5))
            alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * relative_step
            if group["weight_decay"] != 0:
                param.mul_(scalar(1 - lr * group["weight_decay"]))
            decay_complement = step ** group["beta2_decay"]  # 1 - beta2_t
            if grad.dim() > 1:
                estimate = factored_second_moment_(state["row_var"], state["col_var"], grad, decay_complement, epsilon1)
            else:
                state["variance"].lerp_(grad * grad, decay_complement)
                estimate = state["variance"].clone()
            # Clamping at eps1^2 before the root keeps eps1 on the gradient's scale.
            update = estimate.clamp_(min=epsilon1 * epsilon1).rsqrt_()
            update.mul_(grad)
            clip = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * group["d"]))
            param.add_(update, alpha=scalar(-alpha / clip))


def factored_second_moment_(
    row_var: Tensor, col_var: Tensor, grad: Tensor, decay_complement: float, eps1: float
) -> Tensor:
    r"""Update the row and column factors of :math:`E[G^2]` and return the rank-one
    estimate :math:`R C / \max(\mathrm{mean}(R), \epsilon_1)` (Shazeer & Stern, 2018).

    :math:`R \leftarrow R + c\,(\mathrm{mean}_{\text{cols}}(G^2) - R)` and likewise
    :math:`C` over rows, with :math:`c = 1 - \hat\beta_2`; the means are taken as squared
    norms over the dimension, without forming :math:`G^2`.
    """
    row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
    row_var.lerp_(row_mean, decay_complement)
    col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
    col_var.lerp_(col_mean, decay_complement)
    estimate = row_var @ col_var
    estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
    return estimate
