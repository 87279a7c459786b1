"""The compiled CPU step of ravine's 8-bit optimizers (:mod:`ravine.optim.quantized`).

``quantized.cpp`` updates every parameter with 8-bit state of a group in one call:
per group of four blocks it reads the codes back to float32, runs the float32 rule
(Adam's or SGD's, with the operations and rounding of the plain path) and quantizes
the new state to the nearest code with the plain path's own lookup table, so the
codes, scales and parameters are bit-equal to ``impl="plain"``'s (square roots
aside: torch's own in exact mode, see :mod:`ravine.kernels.cpu`). Parameters whose
state stayed float32 (below ``min_8bit_size``) go to the element-wise compiled step
of :mod:`ravine.kernels.fast` in the same step. What neither takes (float64 or
bfloat16 parameters with 8-bit state, non-contiguous tensors, another device,
hyperparameters given as tensors where the float step refuses them) stays on the
plain path.

The pointer tables are built once per list of parameters and kept between steps
(gradient pointers are refreshed every step).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ravine.kernels import cpu
from ravine.kernels import fast

__all__ = ["ITEM_BLOCKS", "encoding_table", "run"]

#: Blocks of 256 elements per work item (32,768 elements): threads share a few large
#: tensors as evenly as many small ones, and blocks never straddle items.
ITEM_BLOCKS = 128
_BLOCK = 256
_FAMILIES = {"sgd": 0, "adam": 1}

_configured: ctypes.CDLL | None = None
_books: tuple[np.ndarray, list[Tensor]] | None = None


def _library() -> ctypes.CDLL:
    global _configured
    library = cpu.load()
    if _configured is not library:
        function = library.ravine_quantized8_step
        function.restype = None
        function.argtypes = [
            ctypes.c_int64,  # family
            ctypes.c_int64,  # number of items
            ctypes.c_void_p,  # items
            ctypes.c_void_p,  # pointers
            ctypes.c_int64,  # slots per tensor
            ctypes.c_void_p,  # per-tensor scalars
            ctypes.c_int64,  # scalars per tensor
            ctypes.c_void_p,  # hyperparameters
            ctypes.c_int64,  # flags
            ctypes.c_void_p,  # codebooks
            ctypes.c_int64,  # threads
        ]
        _configured = library
    return library


def encoding_table(signed: bool) -> Tensor:
    """The kernel's nearest-code table (int32, one entry per float32 bucket of the
    plain path's table, the top 17 bits of a value): the plain path's code for the
    bucket's smallest values (bits 0-7), whether the bucket's values fall as their
    low 15 bits rise (bit 8: negative values, and the inf/NaN exponent), and the
    threshold t (bits 16-31, 0x8000 for none): the plain path's code is one more
    exactly where the low 15 bits, reversed when bit 8 is set, are >= t.

    The plain path compares a value with ``midpoints[table[bucket]]``; within a bucket
    that comparison is monotone in the value (NaN compares false, and the inf/NaN
    buckets are reversed so that +inf comes last), so a binary search over the low
    bits of all buckets at once finds each threshold, with the plain path's own
    comparison.
    """
    from ravine.optim.quantized import _TABLE_SHIFT, _codebook

    _, midpoints, below = _codebook(signed, torch.device("cpu"))
    span = 1 << _TABLE_SHIFT
    buckets = np.arange(1 << (32 - _TABLE_SHIFT), dtype=np.uint32)
    below = below.numpy().astype(np.uint32)
    midpoint = midpoints.numpy()[below]
    reverse = ((buckets >> 16) == 1) | (((buckets >> 8) & 0xFF) == 0xFF)
    flip = np.where(reverse, span - 1, 0).astype(np.uint32)
    base = buckets << _TABLE_SHIFT

    def above(low: np.ndarray) -> np.ndarray:
        values = (base | (np.minimum(low, span - 1) ^ flip)).view(np.float32)
        with np.errstate(invalid="ignore"):
            return (values > midpoint) & (low < span)

    first, last = np.zeros_like(buckets), np.full_like(buckets, span)  # the threshold lies in [first, last]
    for _ in range(_TABLE_SHIFT + 1):
        middle = (first + last) >> 1
        hit = above(middle)
        last = np.where(hit, middle, last)
        first = np.where(hit, first, middle + 1)
    entry = below | (reverse.astype(np.uint32) << 8) | (last << 16)
    return torch.from_numpy(entry.view(np.int32).copy())


def _codebook_pointers() -> np.ndarray:
    """Addresses of the signed and the unsigned codebook's values and encoding
    table (kept alive here)."""
    global _books
    if _books is None:
        from ravine.optim.quantized import _codebook

        tensors = []
        for signed in (True, False):
            tensors += [_codebook(signed, torch.device("cpu"))[0].contiguous(), encoding_table(signed)]
        _books = (np.array([t.data_ptr() for t in tensors], dtype=np.int64), tensors)
    return _books[0]


class _Part:
    """The parameters of one update call that the 8-bit kernel takes, with its tables."""

    def __init__(self, family: str, names: tuple[str, ...], indices: list[int], params: list[Tensor], fulls) -> None:
        self.family = family
        self.indices = indices
        self.params = [params[i] for i in indices]
        self.pointers = np.zeros((len(indices), 3 + 2 * len(names)), dtype=np.int64)
        items = []
        for t, (i, p) in enumerate(zip(indices, self.params)):
            full = fulls[i]
            row = [p.data_ptr(), 0, p.numel()]
            for name in names:
                row += [full[name].data_ptr(), full[name + "_absmax"].data_ptr()]
            self.pointers[t] = row
            blocks = -(-p.numel() // _BLOCK)
            for first in range(0, blocks, ITEM_BLOCKS):
                items.append((t, first, min(ITEM_BLOCKS, blocks - first)))
        self.items = np.array(items, dtype=np.int64).reshape(-1, 3)
        self.numel = sum(p.numel() for p in self.params)
        self.per_tensor = np.zeros((len(indices), 2), dtype=np.float64)

    def grads_ready(self, grads: list[Tensor]) -> bool:
        return fast.grad_pointers_into(self.pointers[:, 1], [grads[i] for i in self.indices], torch.float32)

    def run(self, flags: int, hyperparameters: np.ndarray, per_step: dict[float, list[float]], steps: list[float]) -> None:
        if len(per_step) == 1:
            values = next(iter(per_step.values()))
            self.per_tensor[:, : len(values)] = values
        else:
            for t, i in enumerate(self.indices):
                values = per_step[steps[i]]
                self.per_tensor[t, : len(values)] = values
        threads = torch.get_num_threads() if self.numel >= fast.PARALLEL_ELEMENTS else 1
        _library().ravine_quantized8_step(
            _FAMILIES[self.family],
            self.items.shape[0],
            self.items.ctypes.data,
            self.pointers.ctypes.data,
            self.pointers.shape[1],
            self.per_tensor.ctypes.data,
            self.per_tensor.shape[1],
            hyperparameters.ctypes.data,
            flags,
            _codebook_pointers().ctypes.data,
            threads,
        )


def _takes_8bit(p: Tensor, full: dict[str, Any], names: tuple[str, ...]) -> bool:
    """Whether the 8-bit kernel can update ``p``: every state buffer 8-bit, float32
    contiguous CPU tensors of the expected sizes."""
    if not names or type(p.data) is not torch.Tensor:
        return False
    if p.device.type != "cpu" or p.dtype != torch.float32 or p.is_sparse or not p.is_contiguous():
        return False
    blocks = -(-p.numel() // _BLOCK)
    for name in names:
        codes, absmax = full.get(name), full.get(name + "_absmax")
        if not isinstance(codes, Tensor) or not isinstance(absmax, Tensor):
            return False
        if codes.dtype != torch.uint8 or codes.device != p.device or codes.numel() != p.numel() or not codes.is_contiguous():
            return False
        if absmax.dtype != torch.float32 or absmax.device != p.device or absmax.numel() != blocks or not absmax.is_contiguous():
            return False
    return True


class Plan:
    """How one update call's parameters split between the 8-bit kernel, the
    element-wise kernel (float32 state) and the plain path."""

    def __init__(self, optimizer, group, params, states, family: str) -> None:
        self.params, self.states = params, states
        self.family = family
        spec = fast.Spec(family, fast._adam if family == "adam" else fast._sgd, 2 if family == "adam" else 1)
        self.spec = spec
        names = optimizer.state_names(group)
        fulls = [optimizer.state.get(p, {}) for p in params]
        quantized = [i for i, p in enumerate(params) if _takes_8bit(p, fulls[i], names)]
        # The scales the tables point at: a replaced one rebuilds the plan. (The code
        # tensors, like every state tensor, are watched by the optimizer's own plan,
        # which passes new lists when one is replaced.)
        self.watched = fast.StateWatch([(fulls[i], name + "_absmax") for i in quantized for name in names])
        has_8bit_state = {i for i, full in enumerate(fulls) if any(name + "_absmax" in full for name in names)}
        self.part = _Part(family, names, quantized, params, fulls) if quantized else None
        # Parameters with float32 state: the element-wise step (its own eligibility checks).
        dense = [(p, {} if i in has_8bit_state else states[i]) for i, p in enumerate(params)]
        candidates = [i for i in range(len(params)) if i not in has_8bit_state]
        self.float_parts, covered = fast.prepare(spec, [dense[i] for i in candidates], names)
        self.float_indices = [candidates[i] for i in sorted(covered)]
        # prepare() numbers parameters within `candidates`; map steps back through it.
        self.candidates = candidates
        taken = set(quantized) | set(self.float_indices)
        self.rest = [i for i in range(len(params)) if i not in taken]

    def still_valid(self, params, states) -> bool:
        return (
            params is self.params
            and states is self.states
            and self.watched.unchanged()
        )

    def run(self, group, grads: list[Tensor], steps: list[float]) -> list[int]:
        """Update what the kernels take; return the indices left to the plain path."""
        everything = list(range(len(self.params)))
        if self.part is None and not self.float_parts:
            return everything
        taken = [i for i in (self.part.indices if self.part else [])] + self.float_indices
        arguments = self.spec.arguments(group, [steps[i] for i in taken])
        if arguments is None:
            return everything
        if self.part is not None and not self.part.grads_ready(grads):
            return everything
        if not all(part.grads_ready() for part in self.float_parts):
            return everything
        flags, hp, per_step = arguments
        hyperparameters = np.asarray(hp, dtype=np.float64)
        if self.part is not None:
            self.part.run(flags, hyperparameters, per_step, steps)
        candidate_steps = [steps[i] for i in self.candidates]
        for part in self.float_parts:
            part.run(flags, hyperparameters, per_step, candidate_steps)
        return self.rest


def run(optimizer, group, params: list[Tensor], grads: list[Tensor], states, steps: list[float], family: str) -> list[int]:
    """One compiled step for ``params`` (one update call of an 8-bit optimizer); the
    indices it left to the plain path."""
    plans = optimizer.__dict__.setdefault("_quantized_plans", {})
    key = (id(group), id(params), id(states))
    plan = plans.get(key)
    if plan is None or not plan.still_valid(params, states):
        if len(plans) > 64:
            plans.clear()
        plan = plans[key] = Plan(optimizer, group, params, states, family)
    return plan.run(group, grads, steps)
