r"""LAMB: Adam's direction, rescaled per tensor by a trust ratio, for large batches."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ravine import transforms as T
from ravine.kernels import cpu
from ravine.kernels import fast as _fast
from ravine.optim.base import RavineOptimizer, check_betas, check_range, scalar

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

    The compiled step (``impl="fast"``, and ``impl="auto"`` where it builds, except in
    exact mode, ``RAVINE_EXACT_SQRT=1``) makes two passes over memory: the first updates
    the moments and sums the squares of :math:`\theta` and :math:`u` in float64
    without storing :math:`u`, the second recomputes :math:`u` and moves
    :math:`\theta`. Each element of :math:`u` takes the plain path's operations; the
    norms are summed in another order than torch's, so the steps agree to about
    1e-6 (float32) or 1e-13 (float64) relative, not bit for bit.

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
        impl: (ravine only, keyword) ``"auto"``, ``"plain"`` or ``"fast"``, the
            implementation that runs the step (see :mod:`ravine.optim.base`).
    """

    own_compiled_step = True

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
        impl: str = "auto",
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
        super().__init__(params, defaults, impl=impl)

    def check_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
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
        if self.use_compiled_step(bit_equal=False):
            rest = _compiled_step(self, group, params, grads, states, steps)
            if not rest:
                return
            params, grads, states, steps = (
                [values[i] for i in rest] for values in (params, grads, states, steps)
            )
        self._plain_update(group, params, grads, states, steps)

    def _plain_update(self, group, params, grads, states, steps) -> None:
        """The rule with torch's list operations."""
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


# -- the compiled step (ravine/kernels/lamb.cpp) ----------------------------------------

MAXIMIZE, BIAS_CORRECTION, WEIGHT_DECAY = 1, 2, 4


def _library() -> ctypes.CDLL:
    library = cpu.load()
    entry = library.ravine_lamb_step
    if entry.restype is not None:
        entry.restype = None
        entry.argtypes = [
            ctypes.c_int64,  # dtype
            ctypes.c_int64,  # number of items
            ctypes.c_void_p,  # items (tensor, start, length)
            ctypes.c_int64,  # number of tensors
            ctypes.c_void_p,  # pointers: param, grad, exp_avg, exp_avg_sq per tensor
            ctypes.c_void_p,  # per tensor: 1 - beta1^t, sqrt(1 - beta2^t)
            ctypes.c_void_p,  # hyperparameters
            ctypes.c_int64,  # flags
            ctypes.c_void_p,  # partial sums, 2 per item (scratch)
            ctypes.c_void_p,  # norms and ratio, 3 per tensor (written)
            ctypes.c_int64,  # threads
        ]
    return library


class _Part:
    """The tensors of one block and dtype that the compiled step updates, with the
    tables it reads (kept between steps; only the gradients' addresses are refreshed)."""

    def __init__(self, dtype: torch.dtype, indices: list[int], params, states) -> None:
        self.dtype = dtype
        self.indices = indices
        self.pointers = np.zeros((len(indices), 4), dtype=np.int64)
        for row, i in enumerate(indices):
            self.pointers[row] = [
                params[i].data_ptr(), 0, states[i]["exp_avg"].data_ptr(), states[i]["exp_avg_sq"].data_ptr()
            ]
        items = []
        for row, i in enumerate(indices):
            numel = params[i].numel()
            size = _fast.ITEM_ELEMENTS
            items.extend((row, start, min(size, numel - start)) for start in range(0, numel, size))
        self.items = np.array(items, dtype=np.int64).reshape(-1, 3)
        self.numel = sum(params[i].numel() for i in indices)
        self.per_tensor = np.zeros((len(indices), 2), dtype=np.float64)
        self.partials = np.zeros((len(items), 2), dtype=np.float64)
        #: ||theta||, ||u|| and the trust ratio of each tensor in the last step.
        self.norms = np.zeros((len(indices), 3), dtype=np.float64)

    def grads_ready(self, grads: list[Tensor]) -> bool:
        """Whether every gradient is dense and contiguous (checked every step)."""
        return _fast.grad_pointers_into(self.pointers[:, 1], [grads[i] for i in self.indices])

    def run(self, library, hyperparameters: np.ndarray, flags: int, scalars: dict[float, tuple], steps) -> None:
        if len(scalars) == 1:
            self.per_tensor[:] = next(iter(scalars.values()))
        else:
            self.per_tensor[:] = [scalars[steps[i]] for i in self.indices]
        threads = torch.get_num_threads() if self.numel >= _fast.PARALLEL_ELEMENTS else 1
        library.ravine_lamb_step(
            cpu.DTYPES[self.dtype], self.items.shape[0], self.items.ctypes.data, len(self.indices),
            self.pointers.ctypes.data, self.per_tensor.ctypes.data, hyperparameters.ctypes.data, flags,
            self.partials.ctypes.data, self.norms.ctypes.data, threads,
        )


def _parts(optimizer: Lamb, params, states) -> tuple[list[_Part], list[int]]:
    """The compiled parts of a block and the indices left to the plain path, kept
    while the block's list of parameters is the same object (the optimizer's plan
    makes a new one whenever a parameter or a state tensor is replaced)."""
    cache = optimizer.__dict__.setdefault("_lamb_parts", {})
    entry = cache.get(id(params))
    if entry is None or entry[0] is not params:
        by_dtype: dict[torch.dtype, list[int]] = {}
        rest = []
        for i, (p, state) in enumerate(zip(params, states)):
            if _fast.eligible(p, [state.get("exp_avg"), state.get("exp_avg_sq")]):
                by_dtype.setdefault(p.dtype, []).append(i)
            else:
                rest.append(i)
        parts = [_Part(dtype, indices, params, states) for dtype, indices in by_dtype.items()]
        if len(cache) > 16:
            cache.clear()
        entry = cache[id(params)] = (params, parts, rest)
    return entry[1], entry[2]


def _compiled_step(optimizer: Lamb, group, params, grads, states, steps) -> list[int]:
    """Update what the compiled step can take; returns the indices left to the plain
    path (all of them when the group's hyperparameters are tensors)."""
    if not isinstance(group["eps"], (int, float)):
        return list(range(len(params)))
    parts, rest = _parts(optimizer, params, states)
    ready = [part for part in parts if part.grads_ready(grads)]
    rest = sorted([*rest, *(i for part in parts if part not in ready for i in part.indices)])
    if not ready:
        return rest
    lr = scalar(group["lr"])
    beta1, beta2 = (scalar(beta) for beta in group["betas"])
    weight_decay = scalar(group["weight_decay"])
    flags = MAXIMIZE * group["maximize"] | BIAS_CORRECTION * group["bias_correction"]
    flags |= WEIGHT_DECAY * (weight_decay != 0)
    # The same expressions as the plain path.
    hyperparameters = np.array([lr, 1 - beta1, beta2, 1 - beta2, group["eps"], weight_decay], dtype=np.float64)
    scalars = {
        step: (T.bias_correction(beta1, step), T.bias_correction_root(beta2, step))
        for step in {steps[i] for part in ready for i in part.indices}
    }
    library = _library()
    for part in ready:
        part.run(library, hyperparameters, flags, scalars, steps)
    return rest
