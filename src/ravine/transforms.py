r"""The math of ravine's optimizers: one small function per idea.

Every function here acts on lists of tensors (one entry per parameter) and knows
nothing about parameter groups, state dicts or hyperparameter validation; the
optimizers in :mod:`ravine.optim` compose them into update rules. Functions whose
names end in ``_`` update their first argument in place, like torch's.

Each function performs exactly the tensor operations of torch.optim's for-loop
implementation of the same idea, in the same order and dtype, so a composition of
them reproduces torch.optim's numbers bit for bit. They are written with
``torch._foreach_*`` calls, so one call handles a whole list of tensors.

Scalars that differ per tensor (bias corrections depend on each parameter's step
count) are passed as lists; a plain number applies to every tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Scalars = float | Sequence[float]

_FULL_PRECISION = (torch.float32, torch.float64, torch.complex64, torch.complex128)

__all__ = [
    "scalar",
    "scale_",
    "negate",
    "add_l2_penalty",
    "decay_weights_",
    "momentum_trace_",
    "nesterov_direction",
    "moving_average_",
    "moving_average_of_squares_",
    "accumulate_squares_",
    "running_maximum_",
    "root_of_",
    "centered_root_of_",
    "adam_denominator",
    "bias_correction",
    "bias_correction_root",
    "add_",
    "add_quotient_",
    "global_norm",
    "clip_by_value_",
    "raise_if_nonfinite",
    "all_finite",
    "scale_to_max_norm_",
    "clip_by_global_norm_",
]


def scalar(value: float | Tensor) -> float:
    """A hyperparameter as a Python number; a 1-element tensor is read.

    Arithmetic on a tensor hyperparameter (``1 - beta``) is done in the tensor's
    dtype *before* reading it, as torch.optim does, so both give the same numbers.
    """
    if isinstance(value, Tensor):
        return value.item()
    return value


def scale_(tensors: list[Tensor], factor: float) -> None:
    r""":math:`x \leftarrow c\,x`."""
    if all(tensor.dtype in _FULL_PRECISION for tensor in tensors):
        torch._foreach_mul_(tensors, factor)
    else:
        # torch's list multiply rounds the factor to a bfloat16/float16 tensor's dtype
        # first, while Tensor.mul_ keeps it in float32; the per-tensor call matches
        # torch.optim's for-loop results.
        for tensor in tensors:
            tensor.mul_(factor)


def negate(grads: list[Tensor]) -> list[Tensor]:
    r"""New tensors :math:`-g` (``maximize=True`` ascends the objective)."""
    return torch._foreach_neg(grads)


def add_l2_penalty(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    r"""New tensors :math:`g + \lambda\theta`: the gradient of an L2 penalty
    :math:`\tfrac{\lambda}{2}\lVert\theta\rVert^2` added to the loss's."""
    return torch._foreach_add(grads, params, alpha=weight_decay)


def decay_weights_(params: list[Tensor], factor: float) -> None:
    r"""Decoupled weight decay, :math:`\theta \leftarrow (1 - \eta\lambda)\,\theta` with
    ``factor`` :math:`= 1 - \eta\lambda` (Loshchilov & Hutter, 2019, "Decoupled Weight
    Decay Regularization")."""
    scale_(params, factor)


def apply_weight_decay(
    grads: list[Tensor], params: list[Tensor], lr: float | Tensor, weight_decay: float, decoupled: bool
) -> list[Tensor]:
    r"""Weight decay as Adam, NAdam and RAdam take it: decoupled, the parameters are
    scaled in place by :math:`1 - \eta\lambda` (:func:`decay_weights_`) and ``grads``
    come back unchanged; otherwise new tensors :math:`g + \lambda\theta`
    (:func:`add_l2_penalty`). Nothing happens when :math:`\lambda = 0`."""
    if weight_decay == 0:
        return grads
    if decoupled:
        decay_weights_(params, scalar(1 - lr * weight_decay))
        return grads
    return add_l2_penalty(grads, params, weight_decay)


def momentum_trace_(
    buffers: list[Tensor | None], grads: list[Tensor], momentum: float, dampening: float
) -> list[Tensor]:
    r"""Heavy-ball velocity :math:`v \leftarrow \mu v + (1 - \tau) g`
    (Polyak, 1964; Sutskever et al., 2013).

    A missing buffer (``None``, the first step) starts as a copy of :math:`g`, without
    dampening, as torch.optim.SGD does. Returns the buffers, new ones included.
    """
    if all(buffer is not None for buffer in buffers):
        scale_(buffers, momentum)
        torch._foreach_add_(buffers, grads, alpha=1 - dampening)
        return list(buffers)
    result = []
    for buffer, grad in zip(buffers, grads, strict=True):
        if buffer is None:
            buffer = grad.detach().clone()
        else:
            buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        result.append(buffer)
    return result


def nesterov_direction(grads: list[Tensor], buffers: list[Tensor], momentum: float) -> list[Tensor]:
    r"""New tensors :math:`g + \mu v`: Nesterov's look-ahead step (Sutskever et al., 2013)."""
    return torch._foreach_add(grads, buffers, alpha=momentum)


def moving_average_(averages: list[Tensor], values: list[Tensor], decay: float | Tensor) -> None:
    r"""Exponential moving average :math:`m \leftarrow \beta m + (1 - \beta) x`."""
    torch._foreach_lerp_(averages, values, scalar(1 - decay))


def moving_average_of_squares_(averages: list[Tensor], values: list[Tensor], decay: float | Tensor) -> None:
    r"""Exponential moving average of squares :math:`s \leftarrow \beta s + (1 - \beta) x^2`."""
    scale_(averages, scalar(decay))
    torch._foreach_addcmul_(averages, values, values, value=scalar(1 - decay))


def accumulate_squares_(sums: list[Tensor], values: list[Tensor]) -> None:
    r"""Running sum of squares :math:`s \leftarrow s + x^2` (Adagrad; Duchi et al., 2011)."""
    torch._foreach_addcmul_(sums, values, values, value=1)


def running_maximum_(maxima: list[Tensor], values: list[Tensor]) -> None:
    r""":math:`\hat s \leftarrow \max(\hat s, s)` element-wise (AMSGrad; Reddi et al., 2018)."""
    torch._foreach_maximum_(maxima, values)


def root_of_(values: list[Tensor], eps: float) -> list[Tensor]:
    r"""New tensors :math:`\sqrt{s} + \epsilon`."""
    roots = torch._foreach_sqrt(values)
    torch._foreach_add_(roots, eps)
    return roots


def centered_root_of_(square_averages: list[Tensor], averages: list[Tensor], eps: float) -> list[Tensor]:
    r"""New tensors :math:`\sqrt{s - m^2} + \epsilon`: the root of a moving variance
    (centered RMSprop; Graves, 2013)."""
    roots = torch._foreach_addcmul(square_averages, averages, averages, value=-1)
    torch._foreach_sqrt_(roots)
    torch._foreach_add_(roots, eps)
    return roots


def adam_denominator(second_moments: list[Tensor], bias_correction2_roots: Scalars, eps: float) -> list[Tensor]:
    r"""New tensors :math:`\sqrt{v / (1 - \beta_2^t)} + \epsilon`, computed as
    :math:`\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon` (Kingma & Ba, 2015)."""
    denominators = torch._foreach_sqrt(second_moments)
    torch._foreach_div_(denominators, _scalar_or_list(bias_correction2_roots))
    torch._foreach_add_(denominators, eps)
    return denominators


def add_(params: list[Tensor], updates: list[Tensor], scale: float) -> None:
    r""":math:`\theta \leftarrow \theta + c\,u` (a descent step has :math:`c = -\eta`)."""
    torch._foreach_add_(params, updates, alpha=scale)


def add_quotient_(params: list[Tensor], numerators: list[Tensor], denominators: list[Tensor], scale: Scalars) -> None:
    r""":math:`\theta \leftarrow \theta + c\,n / d`, with one :math:`c` or one per tensor."""
    if isinstance(scale, (int, float)):
        torch._foreach_addcdiv_(params, numerators, denominators, value=scale)
    elif _all_equal(scale):
        torch._foreach_addcdiv_(params, numerators, denominators, value=scale[0])
    else:
        torch._foreach_addcdiv_(params, numerators, denominators, list(scale))


def _by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    return groups


def global_norm(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor:
    r"""The norm of all tensors taken together as one vector:
    :math:`\lVert g\rVert_p = (\sum_i \lVert g_i\rVert_p^p)^{1/p}`; ``inf`` gives the
    largest absolute entry. An empty list has norm 0."""
    if not tensors:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    first_device = tensors[0].device
    norms = []
    for group in _by_device_and_dtype(tensors).values():
        norms.extend(n.to(first_device) for n in torch._foreach_norm(group, norm_type))
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (no NaN, no inf).

    One fused pass per device and dtype, the Euclidean norm of each tensor
    (``torch._foreach_norm``, torch's fastest norm on the CPU; NaN and inf entries make
    it NaN or inf), then a single read on the host. A non-finite norm can also come
    from finite entries whose squares overflow (above about 1e19 in float32), so those
    tensors are looked at again, entry by entry. Empty tensors are skipped.
    """
    suspects = []
    verdicts = []
    for group in _by_device_and_dtype([t for t in tensors if t.numel() > 0]).values():
        norms = torch.stack(torch._foreach_norm(group, 2.0))
        finite = torch.isfinite(norms)
        verdicts.append((group, finite))
    if not verdicts:
        return True
    if len(verdicts) == 1:
        everything_finite = bool(verdicts[0][1].all())
    else:
        everything_finite = bool(torch.stack([finite.all().cpu() for _, finite in verdicts]).all())
    if everything_finite:
        return True
    for group, finite in verdicts:
        suspects.extend(t for t, ok in zip(group, finite.tolist()) if not ok)
    return all(bool(torch.isfinite(t).all()) for t in suspects)


def raise_if_nonfinite(total_norm: Tensor, norm_type: float) -> None:
    """``RuntimeError`` if a global norm is NaN or infinite (nothing is clipped then)."""
    if not bool(torch.isfinite(total_norm)):
        raise RuntimeError(
            f"the total norm of order {float(norm_type)} for gradients is non-finite "
            f"({float(total_norm)}), so it cannot be clipped; pass error_if_nonfinite=False to "
            "clip anyway"
        )


def scale_to_max_norm_(grads: list[Tensor], max_norm: float, total_norm: Tensor) -> None:
    r""":math:`g \leftarrow g \cdot \min(1, c / (\lVert g\rVert + 10^{-6}))`, given the norm."""
    if not grads:
        return
    # Multiplying by a clamped coefficient (instead of branching on the norm) keeps the
    # step free of host synchronisation, as torch.nn.utils.clip_grad_norm_ does.
    coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
    for (device, _), group in _by_device_and_dtype(grads).items():
        torch._foreach_mul_(group, coefficient.to(device))


def clip_by_value_(grads: list[Tensor], clip_value: float) -> None:
    r""":math:`g_i \leftarrow \max(-c, \min(c, g_i))` element-wise."""
    torch._foreach_clamp_min_(grads, -clip_value)
    torch._foreach_clamp_max_(grads, clip_value)


def clip_by_global_norm_(
    grads: list[Tensor], max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False
) -> Tensor:
    r"""Scale all gradients together so their global norm is at most ``max_norm``:

    .. math:: g \leftarrow g \cdot \min\!\left(1, \frac{c}{\lVert g\rVert + 10^{-6}}\right)

    (Pascanu et al., 2013). Returns the norm before clipping. With
    ``error_if_nonfinite`` a NaN or infinite norm raises ``RuntimeError`` before any
    gradient is touched.
    """
    total = global_norm(grads, norm_type)
    if error_if_nonfinite:
        raise_if_nonfinite(total, norm_type)
    scale_to_max_norm_(grads, max_norm, total)
    return total


def _all_equal(values: Sequence[float]) -> bool:
    first = values[0]
    return all(value == first for value in values)


def _scalar_or_list(values: Scalars) -> float | list[float]:
    if isinstance(values, (int, float)):
        return values
    return values[0] if _all_equal(values) else list(values)


def bias_correction(beta: float | Tensor, step: float) -> float | Tensor:
    r""":math:`1 - \beta^t`, the factor that unbiases a zero-initialised moving average."""
    return 1 - beta**step


def bias_correction_root(beta: float | Tensor, step: float) -> float:
    r""":math:`\sqrt{1 - \beta^t}`."""
    return scalar((1 - beta**step) ** 0.5)

