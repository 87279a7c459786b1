"""What every ravine optimizer shares: checking, state, gradient transforms, blocking.

A subclass states its update rule in :meth:`RavineOptimizer.update`, written with the
functions of :mod:`ravine.transforms`, and its hyperparameter ranges in
:meth:`RavineOptimizer.check_group`. This class does the rest, in two phases so that
a step that raises changes nothing:

1. check: every group's hyperparameters and every gradient (shape, dtype, device,
   layout) are checked, and gradient transforms that can fail (clipping with
   ``error_if_nonfinite``) measure what they need, before anything is written;
2. update: gradient transforms run, missing state is created, and the update rule
   runs over cache-sized blocks of parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from ravine.transforms import scalar

__all__ = ["RavineOptimizer", "check_range", "scalar"]

# Parameters are updated in blocks of about this many elements: small tensors are
# batched into one list (one Python call for many tensors) and large contiguous ones
# are cut into slices, so that a block's parameters, gradients and state stay in
# cache across the several passes an update rule makes over them. Every operation is
# element-wise, so blocking never changes a result.
BLOCK_ELEMENTS = 1 << 16

# torch's CPU kernels round reduced-precision floats differently in their vectorised
# body and their scalar tail, so slicing a bfloat16 or float16 tensor would move the
# tails and change results in the last bit. Only full-precision tensors are sliced.
_SLICEABLE_DTYPES = (torch.float32, torch.float64)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high``.

    ``low_open``/``high_open`` exclude the bound. NaN is always rejected. A tensor
    must have exactly one element.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got a tensor of shape {tuple(value.shape)}")
        number = value.item()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    else:
        number = value
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
    if math.isnan(number):
        raise ValueError(f"{name} must be in {allowed}, got nan")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be in {allowed}, got {number}")


def check_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


class RavineOptimizer(torch.optim.Optimizer):
    """Base class: a torch.optim.Optimizer whose step is checked, blocked and atomic.

    Subclasses define :meth:`check_group`, :meth:`state_names`,
    :meth:`init_state` and :meth:`update`.

    ``gradient_transforms`` is a list of callables applied, in order, to the list of
    all gradients (across every group) at the start of each step, before the update
    rule: for instance :class:`ravine.ClipByGlobalNorm`. A transform may define
    ``check(grads)`` to validate before anything is written.
    """

    #: Whether the update rule needs complex parameters viewed as real pairs.
    real_view_for_complex = True
    #: Whether sparse gradients are accepted (see :meth:`sparse_update`).
    supports_sparse = False

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self.gradient_transforms: list[Callable[[list[Tensor]], Any]] = []
        super().__init__(params, defaults)

    # -- hooks for subclasses ---------------------------------------------------

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for any hyperparameter of ``group`` out of range."""

    def init_state(self, group: dict[str, Any], param: Tensor, state: dict[str, Any]) -> None:
        """Fill a parameter's empty state, with torch.optim's keys and dtypes."""

    def update(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        steps: list[float],
    ) -> None:
        """Apply the update rule to one block of parameters with dense gradients.

        ``states`` holds each parameter's state buffers (viewed like the parameter,
        see :meth:`state_names`); ``steps`` holds each parameter's step count after
        this step's increment, for optimizers that count steps.
        """
        raise NotImplementedError

    def state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Names of the per-parameter state tensors the update rule reads and writes."""
        return ()

    def advance_steps(self, group: dict[str, Any], dense: list[tuple[Tensor, dict[str, Any]]]) -> list[float]:
        """Count this step in each parameter's state; return the counts after it.

        The default increments the ``step`` tensor that torch.optim keeps per
        parameter; optimizers without one override this.
        """
        step_tensors = [state["step"] for _, state in dense]
        torch._foreach_add_(step_tensors, 1)
        return [float(t) for t in step_tensors]

    def check_sparse_grad(self, group: dict[str, Any], param: Tensor) -> None:
        """Raise if ``param``'s sparse gradient cannot be used with ``group``'s options."""

    def sparse_update(self, group: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        """Update one parameter whose gradient is sparse (if ``supports_sparse``),
        including its step count."""
        raise NotImplementedError

    # -- torch.optim.Optimizer interface -----------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # Check the group as it now stands (defaults filled in); undo on failure so a
        # rejected group leaves the optimizer as it was.
        try:
            self._check_group_types(self.param_groups[-1])
            self.check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Phase 1: check everything, write nothing.
        work = []
        for group in self.param_groups:
            self.check_group(group)
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                self._check_grad(group, p)
            work.append((group, params))
        if self.gradient_transforms:
            all_grads = [p.grad for _, params in work for p in params if not p.grad.is_sparse]
            for transform in self.gradient_transforms:
                check = getattr(transform, "check", None)
                if check is not None:
                    check(all_grads)

        # Phase 2: write.
        if self.gradient_transforms:
            for transform in self.gradient_transforms:
                transform(all_grads)
        for group, params in work:
            if params:
                self._update_group(group, params)
        return loss

    # -- internals -----------------------------------------------------------------

    def _check_group_types(self, group: dict[str, Any]) -> None:
        if group.get("differentiable", False):
            raise ValueError(
                "differentiable=True is not supported by ravine's optimizers (allowed: False); "
                "use torch.optim for a step that autograd can differentiate through"
            )
        for flag in ("maximize", "nesterov", "amsgrad", "centered", "capturable", "decoupled_weight_decay"):
            if flag in group:
                check_flag(flag, group[flag])
        for option in ("foreach", "fused"):
            if group.get(option) is not None:
                check_flag(option, group[option])

    def _check_grad(self, group: dict[str, Any], p: Tensor) -> None:
        # torch itself refuses a .grad of the wrong shape, dtype or device; what is
        # left to check is the layout.
        if p.grad.is_sparse:
            if not self.supports_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (optimizers that do: SGD, Adagrad)"
                )
            self.check_sparse_grad(group, p)

    def _state_of(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        state = self.state.get(p)
        if state is None:
            state = {}
            self.init_state(group, p, state)
            # Like torch.optim, keep no entry for a parameter whose rule has no state
            # (plain SGD), so state_dicts match.
            if state or self.state_names(group):
                self.state[p] = state
        return state

    def _new_step_tensor(self, group: dict[str, Any], p: Tensor) -> Tensor:
        # torch.optim keeps the step count as a float tensor on the CPU, or on the
        # parameter's device when capturable or fused.
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        if group.get("capturable") or group.get("fused"):
            return torch.zeros((), dtype=torch.float32 if group.get("fused") else dtype, device=p.device)
        return torch.tensor(0.0, dtype=dtype)

    def _update_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        dense = []
        for p in params:
            state = self._state_of(group, p)
            if p.grad.is_sparse:
                self.sparse_update(group, p, p.grad, state)
            else:
                dense.append((p, state))
        if not dense:
            return
        steps = self.advance_steps(group, dense)
        for block in self._blocks(dense, self.state_names(group), steps):
            self.update(group, *block)

    def _blocks(
        self, dense: list[tuple[Tensor, dict[str, Any]]], names: tuple[str, ...], steps: list[float]
    ) -> Iterator[tuple[list[Tensor], list[Tensor], list[dict[str, Any]], list[float]]]:
        """Yield (params, grads, states, steps) in cache-sized blocks.

        Complex tensors are viewed as real pairs when the update rule needs it.
        Large tensors whose parameter, gradient and state are all contiguous are cut
        into flat slices; their state views share storage with the real state.
        """
        params: list[Tensor] = []
        grads: list[Tensor] = []
        states: list[dict[str, Any]] = []
        block_steps: list[float] = []
        size = 0
        for (p, state), step in zip(dense, steps, strict=True):
            tensors = [p, p.grad] + [state.get(name) for name in names]
            if self.real_view_for_complex and torch.is_complex(p):
                tensors = [None if t is None else torch.view_as_real(t) for t in tensors]
            numel = tensors[0].numel()
            sliceable = (
                numel > BLOCK_ELEMENTS
                and tensors[0].dtype in _SLICEABLE_DTYPES
                and all(t is None or t.is_contiguous() for t in tensors)
            )
            if not sliceable:
                params.append(tensors[0])
                grads.append(tensors[1])
                states.append(dict(zip(names, tensors[2:])))
                block_steps.append(step)
                size += numel
                if size >= BLOCK_ELEMENTS:
                    yield params, grads, states, block_steps
                    params, grads, states, block_steps = [], [], [], []
                    size = 0
                continue
            if params:
                yield params, grads, states, block_steps
                params, grads, states, block_steps = [], [], [], []
                size = 0
            flat = [None if t is None else t.view(-1) for t in tensors]
            for start in range(0, numel, BLOCK_ELEMENTS):
                length = min(BLOCK_ELEMENTS, numel - start)
                part = [None if t is None else t.narrow(0, start, length) for t in flat]
                yield [part[0]], [part[1]], [dict(zip(names, part[2:]))], [step]
        if params:
            yield params, grads, states, block_steps
