r"""Optimizer state in less memory: moment buffers stored in a narrower dtype, and
the exact size of an optimizer's state.

``state_dtype=torch.bfloat16`` (on :class:`~ravine.optim.Adam`,
:class:`~ravine.optim.AdamW` and :class:`~ravine.optim.SGD`) stores the moment
buffers in bfloat16, halving the state of a float32 model. Every step reads the
stored buffers into the parameter's working precision (float32, or float64 for
float64 parameters), runs the unchanged update rule there, and rounds the new
buffers back to the stored dtype to nearest (round half to even):

.. math:: m_t = \operatorname{round}_{\text{bf16}}\bigl(\beta_1 m_{t-1} + (1 - \beta_1) g_t\bigr)

Rounding is deterministic (no stochastic rounding), so runs are reproducible.
Its known cost: with bfloat16's 8-bit significand an update smaller than half a
unit in the last place is lost, e.g. :math:`v \leftarrow 0.999\,v` when the
gradient vanishes leaves :math:`v` unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "STATE_DTYPES",
    "resolve_state_dtype",
    "run_in_working_precision",
    "restore_state_dtypes",
    "state_bytes",
    "state_bytes_per_parameter",
]

#: The dtypes ``state_dtype`` accepts, by name (a ``torch.dtype`` or its name).
STATE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_state_dtype(value: Any) -> torch.dtype | None:
    """``state_dtype`` as a ``torch.dtype`` (``None`` stays ``None``: the parameter's dtype).

    Accepts ``torch.float32``, ``torch.float64``, ``torch.bfloat16``, ``torch.float16``
    or their names (``"bfloat16"``, as a spec string writes it); anything else raises
    ``ValueError`` naming ``state_dtype`` and the allowed values.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in STATE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in STATE_DTYPES:
        return STATE_DTYPES[value.removeprefix("torch.")]
    raise ValueError(
        f"state_dtype must be None (the parameter's dtype) or one of {', '.join(STATE_DTYPES)} "
        f"(a torch.dtype or its name), got {value!r}"
    )


def check_real_params(group: dict[str, Any], option: str) -> None:
    """Raise ``ValueError`` if ``group`` holds complex parameters (narrow or quantized
    state is kept for real parameters only)."""
    if any(torch.is_complex(p) for p in group.get("params", ())):
        raise ValueError(f"{option} supports real parameters only; complex parameters are allowed with {option}=None")


def check_working_range(group: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``lr`` and ``weight_decay`` stay finite in the float32
    working precision of a narrow or quantized state step.

    Adam's first step divides ``lr`` by its bias correction :math:`1 - \\beta_1`, so its
    ``lr`` is bounded by float32's largest number times that. Checked before the step
    writes anything, so a value that would overflow mid-step is refused instead.
    """
    from ravine.optim.base import check_range, scalar  # base imports this module's users

    largest = float(torch.finfo(torch.float32).max)
    lr_bound = largest
    if "amsgrad" in group:  # the Adam family, whose first step divides lr by 1 - beta1
        beta1 = scalar(group["betas"][0])
        lr_bound = largest * (1.0 - beta1) if beta1 > 0 else largest
    check_range("lr", group["lr"], 0.0, lr_bound)
    check_range("weight_decay", group["weight_decay"], 0.0, largest)


def run_in_working_precision(
    rule: Callable[..., None],
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    steps: list[float],
) -> None:
    """Run an update ``rule`` on each parameter's tensors in its working precision,
    then round what it wrote back into the stored tensors.

    The working precision of a parameter is ``promote_types(param.dtype, float32)``:
    float32 for float32, bfloat16 and float16 parameters, float64 for float64 ones.
    A parameter, gradient or state tensor already in that dtype is passed as it is
    (no copy), so with float32 parameters and state this is the rule itself.
    """
    stored_and_working: list[tuple[Tensor, Tensor]] = []

    def widen(tensor: Tensor | None, dtype: torch.dtype, written: bool) -> Tensor | None:
        if tensor is None or tensor.dtype == dtype:
            return tensor
        working = tensor.to(dtype)
        if written:
            stored_and_working.append((tensor, working))
        return working

    work_params, work_grads, work_states = [], [], []
    for p, g, state in zip(params, grads, states, strict=True):
        dtype = torch.promote_types(p.dtype, torch.float32)
        work_params.append(widen(p, dtype, True))
        work_grads.append(widen(g, dtype, False))
        work_states.append({name: widen(value, dtype, True) for name, value in state.items()})
    rule(group, work_params, work_grads, work_states, steps)
    for stored, working in stored_and_working:
        stored.copy_(working)  # rounds to nearest


def restore_state_dtypes(
    optimizer: torch.optim.Optimizer,
    state_dict: dict[str, Any],
    stored_dtype: Callable[[dict[str, Any], str, dict[str, Any]], torch.dtype | None],
) -> None:
    """After ``torch.optim.Optimizer.load_state_dict`` (which casts every floating
    state tensor to its parameter's dtype), put back the dtypes the optimizer stores.

    ``stored_dtype(group, name, saved_state)`` names the dtype of state entry
    ``name`` (``None``: keep torch's cast). The saved tensor itself is copied, so
    nothing is lost to an intermediate cast.
    """
    saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
    params = [(group, p) for group in optimizer.param_groups for p in group["params"]]
    for saved_id, (group, p) in zip(saved_ids, params):
        saved = state_dict["state"].get(saved_id)
        if not saved or p not in optimizer.state:
            continue
        state = optimizer.state[p]
        for name, value in saved.items():
            dtype = stored_dtype(group, name, saved) if isinstance(value, Tensor) else None
            if dtype is not None:
                state[name] = value.to(dtype=dtype, device=p.device, copy=True)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in the optimizer's per-parameter state
    (``numel * element_size``): moment buffers, quantization scales and step counters."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total


def state_bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """:func:`state_bytes` divided by the number of parameter elements the optimizer holds."""
    seen, elements = set(), 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                elements += p.numel()
    if elements == 0:
        raise ValueError("the optimizer holds no parameter elements, so bytes per parameter is undefined")
    return state_bytes(optimizer) / elements
