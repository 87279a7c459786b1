"""Adafactor's compiled CPU step (``adafactor.cpp``), called by :class:`ravine.Adafactor`.

A group's parameters are described once in flat tables (pointers, shapes; one table
per dtype), kept between steps and rebuilt when the parameters or their state change.
A step then fills one small array of per-step scalars and makes one library call per
dtype for every tensor: no per-tensor Python work besides reading the gradients'
addresses, and no ``.item()``. The kernel takes dense, contiguous float32 and float64
CPU tensors with state of the same dtype; the others are left to the plain path, in
the same step.

The norms (the parameter's RMS for the relative step size, the update's RMS for
clipping, the row and column means) are summed in double and in another order than
torch's, so results equal torch.optim.Adafactor's within rounding, not bit for bit.
"""

from __future__ import annotations

import ctypes
import operator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ravine import transforms as T
from ravine.kernels import cpu, fast

__all__ = ["CompiledGroup", "build"]

# Flags shared with adafactor.cpp.
MAXIMIZE, HAS_WEIGHT_DECAY = 1, 2
# Columns of the tensor table: param, grad, row_var (or variance), col_var (or 0),
# batch, rows, cols.
COLUMNS = 7
GRAD = 1
# Below this many elements in a call one thread is faster than waking others.
PARALLEL_ELEMENTS = 1 << 15

_configured: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL:
    global _configured
    library = cpu.load()
    if _configured is not library:
        library.ravine_adafactor_step.restype = None
        library.ravine_adafactor_step.argtypes = [
            ctypes.c_int64,  # dtype
            ctypes.c_int64,  # number of tensors
            ctypes.c_void_p,  # table
            ctypes.c_void_p,  # per-tensor scalars
            ctypes.c_void_p,  # hyperparameters
            ctypes.c_int64,  # flags
            ctypes.c_int64,  # threads
        ]
        _configured = library
    return library


def _eligible(p: Tensor, state: dict[str, Any]) -> bool:
    if type(p.data) is not torch.Tensor:  # a tensor subclass (DTensor) has no plain storage
        return False
    if p.device.type != "cpu" or p.dtype not in cpu.DTYPES or p.is_sparse or not p.is_contiguous():
        return False
    if p.dim() > 1:
        row_var, col_var = state.get("row_var"), state.get("col_var")
        shapes = ((*p.shape[:-1], 1), (*p.shape[:-2], 1, p.shape[-1]))
        buffers = ((row_var, shapes[0]), (col_var, shapes[1]))
    else:
        buffers = ((state.get("variance"), p.shape),)
    return all(
        isinstance(b, Tensor) and type(b) is torch.Tensor and b.dtype == p.dtype and b.device == p.device
        and tuple(b.shape) == tuple(shape) and b.is_contiguous()
        for b, shape in buffers
    )


class _Part:
    """The parameters of one dtype: their table and per-step scalars."""

    def __init__(self, dtype: torch.dtype, indices: list[int], params: list[Tensor], states: list[dict]) -> None:
        self.dtype = dtype
        self.indices = indices
        self.table = np.zeros((len(indices), COLUMNS), dtype=np.int64)
        numel = 0
        for row, (p, state) in enumerate(zip(params, states)):
            if p.dim() > 1:
                rows, cols = p.shape[-2], p.shape[-1]
                batch = p.numel() // (rows * cols)
                buffers = (state["row_var"].data_ptr(), state["col_var"].data_ptr())
            else:
                batch, rows, cols = 1, 1, p.numel()
                buffers = (state["variance"].data_ptr(), 0)
            self.table[row] = (p.data_ptr(), 0, *buffers, batch, rows, cols)
            numel += p.numel()
        self.numel = numel
        self.per_tensor = np.zeros((len(indices), 3), dtype=np.float64)
        self.covers_all = False  # set by CompiledGroup when the part is every parameter
        self._getter = operator.itemgetter(*indices)

    def pick(self, grads: list[Tensor]) -> list[Tensor] | tuple[Tensor, ...]:
        """This part's gradients, in the order of its table."""
        picked = self._getter(grads)
        return picked if len(self.indices) > 1 else (picked,)


class CompiledGroup:
    """What the compiled step keeps for one group's parameters between steps.

    ``rest`` lists the positions of the parameters the kernel cannot take (they go to
    the plain path). Valid while the same parameter and state lists come back (the
    optimizer rebuilds them whenever a parameter is replaced or a state dict loaded)
    and the state tensors are the same.
    """

    def __init__(self, params: list[Tensor], states: list[dict], state_table: dict) -> None:
        self.params = params
        self.states = states
        self.state_table = state_table
        full = [state_table.get(p, {}) for p in params]
        by_dtype: dict[torch.dtype, list[int]] = {}
        self.rest: list[int] = []
        for index, (p, state) in enumerate(zip(params, full)):
            if p.numel() == 0:
                continue  # nothing to update
            if _eligible(p, state):
                by_dtype.setdefault(p.dtype, []).append(index)
            else:
                self.rest.append(index)
        self.parts = [
            _Part(dtype, indices, [params[i] for i in indices], [full[i] for i in indices])
            for dtype, indices in by_dtype.items()
        ]
        self.state_count = len(state_table)
        # The state tensors the tables point into: a replaced one rebuilds them.
        self.watched = fast.StateWatch([
            (full[i], name) for part in self.parts for i in part.indices
            for name in (("row_var", "col_var") if params[i].dim() > 1 else ("variance",))
        ])
        #: Steps in which the kernel ran (a step may leave every parameter to the plain path).
        self.steps_taken = 0
        if len(self.parts) == 1 and len(self.parts[0].indices) == len(params):
            self.parts[0].covers_all = True

    def still_valid(self, params: list[Tensor], states: list[dict], state_table: dict) -> bool:
        return (
            params is self.params
            and states is self.states
            and state_table is self.state_table
            and len(state_table) == self.state_count
            and self.watched.unchanged()
        )

    @staticmethod
    def _scalars(lr: float | Tensor, beta2_decay: float, step: float) -> tuple[float, float, float]:
        # torch keeps a tensor lr a tensor: min(lr, 1/sqrt(t)) is then the tensor when
        # it is the smaller, and alpha and alpha / clip are formed in its dtype.
        relative_step = min(lr, 1 / (step**0.5))
        float32 = isinstance(relative_step, Tensor) and relative_step.dtype == torch.float32
        return step**beta2_decay, T.scalar(relative_step), 1.0 if float32 else 0.0

    def step(self, group: dict[str, Any], grads: list[Tensor], steps: list[float]) -> list[int]:
        """Update the parameters the kernel takes; return the positions left to the
        plain path (those of ``rest``, and any whose gradient is not contiguous;
        the optimizer has refused sparse ones, and torch guards a gradient's dtype)."""
        library = _library()
        lr_option = group["lr"]
        if isinstance(lr_option, Tensor) and lr_option.dtype not in (torch.float32, torch.float64):
            return list(range(len(grads)))  # a reduced-precision tensor lr: the plain path
        lr = T.scalar(lr_option)
        eps1, eps2 = group["eps"]
        weight_decay = group["weight_decay"]
        flags = MAXIMIZE * bool(group["maximize"]) | HAS_WEIGHT_DECAY * (weight_decay != 0)
        # As the plain path: with a tensor lr, 1 - lr wd is formed in its dtype.
        decay = T.scalar(1 - lr_option * weight_decay) if weight_decay != 0 else 1.0
        # The step-dependent scalars, with the plain path's expressions, once per count.
        per_step = {step: self._scalars(lr_option, group["beta2_decay"], step) for step in set(steps)}
        rest = list(self.rest)
        ran = False
        threads_available = torch.get_num_threads()
        for part in self.parts:
            table = part.table
            part_grads = grads if part.covers_all else part.pick(grads)
            skipped = []
            if all(grad.is_contiguous() for grad in part_grads):
                table[:, GRAD] = [grad.data_ptr() for grad in part_grads]
            else:
                for row, grad in enumerate(part_grads):
                    if grad.is_contiguous():
                        table[row, GRAD] = grad.data_ptr()
                    else:
                        skipped.append(row)
            if len(per_step) == 1:
                part.per_tensor[:] = next(iter(per_step.values()))
            else:
                part.per_tensor[:] = [per_step[steps[i]] for i in part.indices]
            if skipped:
                rest.extend(part.indices[row] for row in skipped)
                keep = np.ones(len(part.indices), dtype=bool)
                keep[skipped] = False
                table, per_tensor = np.ascontiguousarray(table[keep]), np.ascontiguousarray(part.per_tensor[keep])
            else:
                per_tensor = part.per_tensor
            if table.shape[0] == 0:
                continue
            epsilon1 = torch.finfo(part.dtype).eps if eps1 is None else eps1
            hyperparameters = np.asarray([epsilon1, eps2, group["d"], decay], dtype=np.float64)
            threads = threads_available if part.numel >= PARALLEL_ELEMENTS else 1
            ran = True
            library.ravine_adafactor_step(
                cpu.DTYPES[part.dtype],
                table.shape[0],
                table.ctypes.data,
                per_tensor.ctypes.data,
                hyperparameters.ctypes.data,
                flags,
                threads,
            )
        self.steps_taken += ran
        rest.sort()
        return rest


def build(params: list[Tensor], states: list[dict], state_table: dict) -> CompiledGroup:
    return CompiledGroup(params, states, state_table)
