"""What every ravine optimizer shares: checking, state, gradient transforms, blocking.

A subclass states its update rule in :meth:`RavineOptimizer.update`, written with the
functions of :mod:`ravine.transforms`, and its hyperparameter ranges in
:meth:`RavineOptimizer.check_group`. This class does the rest, in two phases so that
a step that raises changes nothing:

1. check: every group's hyperparameters and every gradient's layout are checked
   (torch itself guards a gradient's shape, dtype and device), and gradient transforms that can fail (clipping with
   ``error_if_nonfinite``) measure what they need, before anything is written;
2. update: gradient transforms run, missing state is created, and the update rule
   runs over cache-sized blocks of parameters.

Implementations (``impl``, a keyword-only argument of every ravine optimizer):
``"plain"`` runs :meth:`RavineOptimizer.update`, the rule written with torch's
list operations; ``"fast"`` runs the compiled CPU step of :mod:`ravine.kernels`
(one pass over memory per step; the same operations and rounding as the plain path,
square roots aside: correctly rounded by default, torch's own with
``RAVINE_EXACT_SQRT=1``, which makes it bit-equal) and raises if it cannot be built; ``"auto"`` (the default) uses the compiled step when the optimizer
has one and it builds, else the plain path. Parameters the compiled step does not
take (not float32/float64, complex, non-contiguous, not on the CPU, state in
another dtype) take the plain path in the same step, whatever ``impl`` says.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ravine.kernels import cpu as _cpu
from ravine.kernels import fast as _fast
from ravine.transforms import all_finite, scalar

__all__ = ["NONFINITE_POLICIES", "RavineOptimizer", "betas_pair", "check_betas", "check_range", "scalar"]

logger = logging.getLogger("ravine")

#: What a step does when a gradient holds NaN or inf (see ``RavineOptimizer.nonfinite``).
NONFINITE_POLICIES = ("ignore", "skip", "raise")

# Parameters are updated in blocks of about this many elements: small tensors are
# batched into one list (one Python call for many tensors) and large contiguous ones
# are cut into slices, so that a block's parameters, gradients and state stay in
# cache across the several passes an update rule makes over them. Every operation is
# element-wise, so blocking never changes a result.
BLOCK_ELEMENTS = 1 << 18

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
    representable_in: torch.dtype | None = None,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high``.

    ``low_open``/``high_open`` exclude the bound. NaN is always rejected. A tensor
    must have exactly one element. ``representable_in`` (a floating dtype) also
    bounds the value by that dtype's largest finite number, in magnitude.
    """
    if representable_in is not None:
        largest = float(torch.finfo(representable_in).max)
        if high is None or high > largest:
            high, high_open = largest, False
        if low is None or low < -largest:
            low, low_open = -largest, False
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
    if representable_in is not None:
        allowed += f" (finite in {str(representable_in).removeprefix('torch.')})"
    if math.isnan(number):
        raise ValueError(f"{name} must be in {allowed}, got nan")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be in {allowed}, got {number}")


def betas_pair(betas: Any, allowed: str) -> tuple[Any, Any]:
    """Raise ``ValueError`` unless ``betas`` is a pair; return it. ``allowed`` names
    the range of each beta in the message; the caller checks the values."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), each in {allowed}, got {betas!r}")
    return betas[0], betas[1]


def check_betas(betas: Any, *, numbers_only: bool = False) -> None:
    """Raise ``ValueError`` unless ``betas`` is a pair with each beta in [0, 1) (Adam's
    range); with ``numbers_only`` a tensor beta is refused too (optimizers whose
    per-step scalars are computed on the host from the betas)."""
    for index, beta in enumerate(betas_pair(betas, "[0, 1)")):
        if numbers_only and isinstance(beta, Tensor):
            raise ValueError(f"betas[{index}] must be a number in [0, 1), got a tensor")
        check_range(f"betas[{index}]", beta, 0.0, 1.0, high_open=True)


def narrowest_dtype(group: dict[str, Any]) -> torch.dtype | None:
    """The floating dtype with the smallest range among ``group``'s parameters (None
    when it has none): a hyperparameter that scales them must be representable in it."""
    dtypes = [p.dtype for p in group.get("params", ()) if p.is_floating_point()]
    return min(dtypes, key=lambda dtype: torch.finfo(dtype).max, default=None)


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

    ``nonfinite`` says what a step does when any gradient holds NaN or inf:
    ``"ignore"`` (the default, as torch.optim: the update runs and spreads them),
    ``"skip"`` (nothing changes, not even step counts; :attr:`skipped_steps` counts it
    and a warning goes to the ``"ravine"`` logger) or ``"raise"`` (``RuntimeError``
    naming the first such parameter; nothing changes). The check is one fused pass
    over all gradients in phase 1, before gradient transforms, so ``"skip"`` wins
    over clipping's ``error_if_nonfinite``. ``skipped_steps`` is saved in
    :meth:`state_dict` (key ``"skipped_steps"``, present once a policy is set).
    """

    _nonfinite = "ignore"
    #: Steps skipped because of non-finite gradients (policy ``"skip"``).
    skipped_steps = 0

    #: Whether the update rule needs complex parameters viewed as real pairs.
    real_view_for_complex = True
    #: Whether the update rule reads the step counts (bias corrections, lr decay);
    #: when not, they are still counted in the state but never read back.
    reads_step_counts = True
    #: Whether sparse gradients are accepted (see :meth:`sparse_update`).
    supports_sparse = False
    #: Whether the optimizer has a compiled step of its own, which its :meth:`update`
    #: calls when :meth:`use_compiled_step` says so (steps that are not element-wise,
    #: such as Adafactor's and LAMB's). Element-wise optimizers are described in
    #: :mod:`ravine.kernels.fast` instead and need no code in :meth:`update`.
    own_compiled_step = False

    def __init__(self, params: Any, defaults: dict[str, Any], *, impl: str = "auto") -> None:
        self.gradient_transforms: list[Callable[[list[Tensor]], Any]] = []
        #: "auto", "plain" or "fast" (see the module docstring); kept out of the
        #: param groups so that state_dicts stay torch.optim's.
        self.impl = _fast.check_impl(impl)
        if impl == "fast":
            if _fast.spec_for(self) is None and not self.own_compiled_step:
                raise ValueError(f"impl='fast': {type(self).__name__} has no compiled step (use impl='auto' or 'plain')")
            reason = _cpu.unavailable_reason()
            if reason is not None:
                raise _cpu.KernelUnavailable(f"impl='fast': the compiled CPU step is unavailable: {reason}")
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

    def block_elements(self, group: dict[str, Any]) -> int:
        """About how many elements one call of :meth:`update` should see."""
        return BLOCK_ELEMENTS

    def advance_steps(self, group: dict[str, Any], dense: list[tuple[Tensor, dict[str, Any]]]) -> list[float]:
        """Count this step in each parameter's state; return the counts after it.

        The default increments the ``step`` tensor that torch.optim keeps per
        parameter; optimizers without one override this.
        """
        step_tensors = [state["step"] for _, state in dense]
        if not step_tensors:
            return []
        # Kept tensors (a list of ones to add, a buffer to read the counts into) so
        # that a steady-state step allocates nothing: adding the number 1 would wrap
        # it in a new tensor for every parameter.
        kept = self.__dict__.setdefault("_step_tensors", {})
        key = (len(step_tensors), step_tensors[0].dtype, step_tensors[0].device)
        if key not in kept:
            one = torch.ones((), dtype=step_tensors[0].dtype, device=step_tensors[0].device)
            kept[key] = ([one] * len(step_tensors), torch.empty(len(step_tensors), dtype=step_tensors[0].dtype))
        ones, buffer = kept[key]
        torch._foreach_add_(step_tensors, ones)
        if not self.reads_step_counts:
            return [0.0] * len(step_tensors)
        try:
            return torch.stack(step_tensors, out=buffer).tolist()  # one read instead of one per tensor
        except RuntimeError:  # counts on several devices or in several dtypes
            return [t.item() for t in step_tensors]

    def check_sparse_grad(self, group: dict[str, Any], param: Tensor) -> None:
        """Raise if ``param``'s sparse gradient cannot be used with ``group``'s options."""

    def sparse_update(self, group: dict[str, Any], param: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        """Update one parameter whose gradient is sparse (if ``supports_sparse``),
        including its step count."""
        raise NotImplementedError

    @property
    def nonfinite(self) -> str:
        """The policy for NaN or inf gradients: "ignore", "skip" or "raise"."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, policy: str) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {policy!r}")
        self._nonfinite = policy

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
            work.append((group, params, self._check_sparse(group, params)))
        if self._nonfinite != "ignore" and not self._grads_finite(work):
            return loss  # skipped (or raised): nothing was written
        if self.gradient_transforms:
            all_grads = [p.grad for _, params, _ in work for p in params if not p.grad.is_sparse]
            for transform in self.gradient_transforms:
                check = getattr(transform, "check", None)
                if check is not None:
                    check(all_grads)

        # Phase 2: write.
        if self.gradient_transforms:
            for transform in self.gradient_transforms:
                transform(all_grads)
        for group, params, has_sparse in work:
            if params:
                self._update_group(group, params, has_sparse)
        return loss

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if self._nonfinite != "ignore" or self.skipped_steps:
            state_dict["skipped_steps"] = self.skipped_steps
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, as torch.optim does (floating state is cast to each
        parameter's dtype and device, step counts are kept), after checking that it
        fits: the same number of groups, of parameters per group, and state buffers
        of each parameter's shape. torch pairs saved state with parameters by order
        alone, so a state dict from another model would otherwise load silently."""
        self._check_fits(state_dict)
        super().load_state_dict(state_dict)
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._plans = {}

    # -- internals -----------------------------------------------------------------

    def _grads_finite(self, work: list[tuple[dict[str, Any], list[Tensor], bool]]) -> bool:
        """Apply the non-finite policy; True when the step may go on."""
        grads = [p.grad._values() if p.grad.is_sparse else p.grad for _, params, _ in work for p in params]
        if all_finite(grads):
            return True
        if self._nonfinite == "raise":
            for group_index, group in enumerate(self.param_groups):
                for param_index, p in enumerate(group["params"]):
                    grad = p.grad
                    if grad is not None and not all_finite([grad._values() if grad.is_sparse else grad]):
                        raise RuntimeError(
                            f"non-finite gradient (NaN or inf) in param group {group_index}, parameter "
                            f"{param_index} (shape {tuple(p.shape)}); nothing was updated. Set "
                            "optimizer.nonfinite = 'skip' to skip such steps"
                        )
        self.skipped_steps += 1
        logger.warning(
            "%s: skipped a step with non-finite gradients (NaN or inf); %d skipped so far",
            type(self).__name__, self.skipped_steps,
        )
        return False

    def _check_fits(self, state_dict: Any) -> None:
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as optimizer.state_dict() returns")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups but this optimizer has "
                f"{len(self.param_groups)}"
            )
        for group_index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {group_index} has {len(saved['params'])} parameters in the state dict "
                    f"but {len(group['params'])} in this optimizer"
                )
            options = {**group, **{key: value for key, value in saved.items() if key != "params"}}
            names = self.state_names(options)
            for param_index, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
                entry = state_dict["state"].get(saved_id, {})
                for name in names:
                    buffer = entry.get(name)
                    if isinstance(buffer, Tensor) and buffer.shape != p.shape:
                        raise ValueError(
                            f"param group {group_index}, parameter {param_index}: state {name!r} has shape "
                            f"{tuple(buffer.shape)} in the state dict but the parameter has shape "
                            f"{tuple(p.shape)}; the state dict belongs to other parameters (state is "
                            "matched by order)"
                        )

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

    def _check_sparse(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """Raise for sparse gradients the rule cannot take; return whether any is sparse."""
        # torch itself refuses a .grad of the wrong shape, dtype or device; what is
        # left to check is the layout.
        sparse = [p for p in params if p.grad.is_sparse]
        for p in sparse:
            if not self.supports_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (optimizers that do: SGD, Adagrad)"
                )
            self.check_sparse_grad(group, p)
        return bool(sparse)

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

    def _update_group(self, group: dict[str, Any], params: list[Tensor], has_sparse: bool) -> None:
        if has_sparse:
            for p in params:
                if p.grad.is_sparse:
                    self.sparse_update(group, p, p.grad, self._state_of(group, p))
            params = [p for p in params if not p.grad.is_sparse]
            if not params:
                return
        names = self.state_names(group)
        block_elements = self.block_elements(group)
        impl = getattr(self, "impl", "auto")
        key = (id(group), names, block_elements, tuple(map(id, params)), impl)
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is not None and plan.still_valid(self.state):
            steps = self.advance_steps(group, plan.dense)
        else:
            if names:
                dense = [(p, self._state_of(group, p)) for p in params]
            else:
                dense = [(p, {}) for p in params]  # a rule without state (plain SGD) keeps none
            steps = self.advance_steps(group, dense)  # may create buffers, so before the plan
            plan = _Plan.build(dense, names, self.real_view_for_complex, block_elements, self.state)
            spec = self._fast_spec(group, impl)
            if spec is not None:
                plan.add_fast_parts(spec, names, self.real_view_for_complex, block_elements)
            if len(plans) > 64:
                plans.clear()
            plans[key] = plan
        blocks = plan.blocks
        if plan.fast_parts and _fast.run_parts(plan.spec, plan.fast_parts, group, steps):
            blocks = plan.rest_blocks
        for block in blocks:
            block_steps = [steps[index] for index in block.indices]
            self.update(group, block.params, block.grads(), block.states, block_steps)


    def use_compiled_step(self, bit_equal: bool) -> bool:
        """Whether :meth:`update` should call the optimizer's own compiled step.

        ``impl="plain"``: no. ``impl="fast"``: yes (the constructor has checked that
        the library builds). ``impl="auto"``: yes when the library builds (else a
        warning, once, and the plain path), except in exact mode (``RAVINE_EXACT_SQRT=1``,
        results bit-equal to torch.optim's) when the step is not ``bit_equal``.
        """
        impl = getattr(self, "impl", "auto")
        if impl == "plain" or not self.own_compiled_step:
            return False
        if impl == "auto" and not bit_equal and _cpu.exact():
            return False
        reason = _cpu.unavailable_reason()
        if reason is not None:
            if impl == "fast":
                raise _cpu.KernelUnavailable(f"impl='fast': the compiled CPU step is unavailable: {reason}")
            _warn_once(reason)
            return False
        return True

    def _fast_spec(self, group: dict[str, Any], impl: str) -> _fast.Spec | None:
        """The compiled step's spec for ``group``, or None for the plain path."""
        if impl == "plain" or group.get("state_dtype") is not None:
            return None
        spec = _fast.spec_for(self)
        if spec is None:
            return None
        reason = _cpu.unavailable_reason()
        if reason is not None:
            if impl == "fast":
                raise _cpu.KernelUnavailable(f"impl='fast': the compiled CPU step is unavailable: {reason}")
            _warn_once(reason)
            return None
        return spec


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _warned or reason.startswith("disabled by"):
        return
    _warned.add(reason)
    warnings.warn(f"ravine: the compiled CPU step is unavailable, using the plain path: {reason}", RuntimeWarning, stacklevel=3)


class _Block:
    """Parameters (or slices of them) updated together by one call of the rule."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.states: list[dict[str, Tensor]] = []
        self.indices: list[int] = []
        self.sources: list[Tensor] = []  # the parameters whose .grad each entry reads
        self.views: list[tuple[bool, int, int] | None] = []  # (real view, start, length)
        self.size = 0

    def add(self, index, source, param, state, view) -> None:
        self.params.append(param)
        self.states.append(state)
        self.indices.append(index)
        self.sources.append(source)
        self.views.append(view)
        self.size += param.numel()

    def grads(self) -> list[Tensor]:
        if not any(self.views):
            return [source.grad for source in self.sources]
        grads = []
        for source, view in zip(self.sources, self.views):
            grad = source.grad
            if view is not None:
                real, start, length = view
                if real:
                    grad = torch.view_as_real(grad)
                if length >= 0:
                    grad = grad.reshape(-1).narrow(0, start, length)
            grads.append(grad)
        return grads


class _Plan:
    """How a group's parameters are cut into cache-sized blocks.

    Small tensors are batched into one list (one Python call for many tensors) and
    large contiguous ones are cut into flat slices, so that a block's parameters,
    gradients and state stay in cache across the several passes an update rule
    makes over them. Every operation is element-wise, so blocking never changes a
    result. The plan holds views of the state tensors; it is rebuilt whenever a
    state tensor is replaced (``load_state_dict``, a new buffer).
    """

    def __init__(self, blocks, dense, watched, state_table) -> None:
        self.blocks: list[_Block] = blocks
        self.dense: list[tuple[Tensor, dict[str, Any]]] = dense
        self.watched = _fast.StateWatch(watched)
        self.params = [p for p, _ in dense]
        self.pointers = [p.data_ptr() for p in self.params]
        self.state_table = state_table
        self.state_count = len(state_table)
        # The compiled step's share of the parameters, and blocks for the rest.
        self.spec: _fast.Spec | None = None
        self.fast_parts: list[_fast.FastPart] = []
        self.rest_blocks: list[_Block] = blocks

    def add_fast_parts(self, spec: _fast.Spec, names, real_view_for_complex: bool, block_elements: int) -> None:
        parts, covered = _fast.prepare(spec, self.dense, names)
        if parts:
            self.spec = spec
            self.fast_parts = parts
            rest = _Plan.build(self.dense, names, real_view_for_complex, block_elements, self.state_table, skip=covered)
            self.rest_blocks = rest.blocks

    def still_valid(self, state_table: dict) -> bool:
        # A replaced or cleared state table, a parameter whose storage was swapped
        # (``p.data = ...``, a dtype or device move) or a replaced state tensor makes
        # the cached views stale. (State is meant to be replaced through
        # load_state_dict, which drops every plan.)
        return (
            state_table is self.state_table
            and len(state_table) == self.state_count
            and [p.data_ptr() for p in self.params] == self.pointers
            and self.watched.unchanged()
        )

    @staticmethod
    def build(
        dense: list[tuple[Tensor, dict[str, Any]]],
        names: tuple[str, ...],
        real_view_for_complex: bool,
        block_elements: int,
        state_table: dict,
        skip: set[int] = frozenset(),
    ) -> _Plan:
        blocks: list[_Block] = []
        watched = []
        current = _Block()
        for index, (p, state) in enumerate(dense):
            buffers = [state.get(name) for name in names]
            watched.extend((state, name) for name in names)
            if index in skip:
                continue
            real = real_view_for_complex and torch.is_complex(p)
            tensors = [p, *buffers]
            if real:
                tensors = [None if t is None else torch.view_as_real(t) for t in tensors]
            numel = tensors[0].numel()
            sliceable = (
                numel > block_elements
                and tensors[0].dtype in _SLICEABLE_DTYPES
                and p.grad.is_contiguous()
                and all(t is None or t.is_contiguous() for t in tensors)
            )
            if not sliceable:
                current.add(index, p, tensors[0], dict(zip(names, tensors[1:])), (True, 0, -1) if real else None)
                if current.size >= block_elements:
                    blocks.append(current)
                    current = _Block()
                continue
            flat = [None if t is None else t.view(-1) for t in tensors]
            for start in range(0, numel, block_elements):
                length = min(block_elements, numel - start)
                part = [None if t is None else t.narrow(0, start, length) for t in flat]
                current.add(index, p, part[0], dict(zip(names, part[1:])), (real, start, length))
                if current.size >= block_elements:
                    blocks.append(current)
                    current = _Block()
        if current.params:
            blocks.append(current)
        return _Plan(blocks, dense, watched, state_table)
