r"""Gradient clipping: by value and by global norm, as functions and as transforms.

The functions have the semantics of ``torch.nn.utils.clip_grad_value_`` and
``torch.nn.utils.clip_grad_norm_``: call them between ``loss.backward()`` and
``optimizer.step()``. The transform classes do the same inside a ravine optimizer's
step, over every gradient of every param group::

    optimizer = ravine.AdamW(model.parameters(), lr=3e-4)
    optimizer.gradient_transforms.append(ravine.ClipByGlobalNorm(1.0))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor

from ravine import transforms as T

__all__ = ["clip_grad_value_", "clip_grad_norm_", "ClipByValue", "ClipByGlobalNorm"]


def _check_clip_value(clip_value: float) -> float:
    value = float(clip_value)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"clip_value must be in (0, inf), got {clip_value}")
    return value


def _check_norm_arguments(max_norm: float, norm_type: float) -> tuple[float, float]:
    max_norm_value = float(max_norm)
    if not max_norm_value > 0:
        raise ValueError(f"max_norm must be in (0, inf], got {max_norm}")
    norm_type_value = float(norm_type)
    if not norm_type_value > 0:
        raise ValueError(f"norm_type must be in (0, inf] (2.0 for the Euclidean norm, inf for the largest entry), got {norm_type}")
    return max_norm_value, norm_type_value


def _grads(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    # A single tensor is accepted, as torch.nn.utils does.
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float) -> None:
    r"""Clamp every gradient entry to :math:`[-c, c]` in place:
    :math:`g_i \leftarrow \max(-c, \min(c, g_i))`.

    Cheap, but it changes the gradient's direction when some entries are clipped.
    """
    value = _check_clip_value(clip_value)
    grads = _grads(parameters)
    if grads:
        T.clip_by_value_(grads, value)


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    r"""Scale all gradients together so that their global norm is at most ``max_norm``.

    .. math::
        g \leftarrow \begin{cases} g & \lVert g\rVert \le c \\
                     \dfrac{c}{\lVert g\rVert}\, g & \lVert g\rVert > c \end{cases}

    (Pascanu, Mikolov & Bengio, 2013), with :math:`10^{-6}` added to the norm in the
    denominator as torch does. The direction is kept. Returns the total norm of
    the gradients *before* clipping, as a tensor. With ``error_if_nonfinite`` a NaN
    or infinite norm raises ``RuntimeError`` and leaves the gradients untouched.

    Example: :math:`g = [6, -8, 3, -4, 2]` has norm :math:`\sqrt{129} \approx 11.3578`;
    with :math:`c = 5` it becomes :math:`0.4402\,g = [2.6414, -3.5218, 1.3207, -1.7609, 0.8805]`.
    """
    max_norm, norm_type = _check_norm_arguments(max_norm, norm_type)
    return T.clip_by_global_norm_(_grads(parameters), max_norm, norm_type, error_if_nonfinite)


class ClipByValue:
    """Gradient transform: :func:`clip_grad_value_` inside an optimizer's step."""

    def __init__(self, clip_value: float) -> None:
        self.clip_value = _check_clip_value(clip_value)

    def __call__(self, grads: list[Tensor]) -> None:
        if grads:
            T.clip_by_value_(grads, self.clip_value)

    def __repr__(self) -> str:
        return f"ClipByValue({self.clip_value})"


class ClipByGlobalNorm:
    """Gradient transform: :func:`clip_grad_norm_` over all of an optimizer's gradients.

    ``last_norm`` holds the norm before clipping from the latest step. With
    ``error_if_nonfinite`` a non-finite norm makes the step raise before any
    parameter, gradient or state changes.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> None:
        self.max_norm, self.norm_type = _check_norm_arguments(max_norm, norm_type)
        self.error_if_nonfinite = error_if_nonfinite
        self.last_norm: Tensor | None = None
        self._pending_norm: Tensor | None = None

    def check(self, grads: list[Tensor]) -> None:
        # Measured once here, before anything is written, and used by __call__.
        self._pending_norm = T.global_norm(grads, self.norm_type)
        if self.error_if_nonfinite:
            T.raise_if_nonfinite(self._pending_norm, self.norm_type)

    def __call__(self, grads: list[Tensor]) -> None:
        total = self._pending_norm if self._pending_norm is not None else T.global_norm(grads, self.norm_type)
        self._pending_norm = None
        T.scale_to_max_norm_(grads, self.max_norm, total)
        self.last_norm = total

    def __repr__(self) -> str:
        return f"ClipByGlobalNorm({self.max_norm}, norm_type={self.norm_type})"
