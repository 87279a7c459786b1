"""The fast path of ravine's optimizers: one compiled pass over flat memory per step.

:class:`ravine.optim.base.RavineOptimizer` asks :func:`spec_for` whether an optimizer
has a compiled step, and :func:`prepare` which of a group's parameters it can take:
dense float32/float64 CPU tensors, contiguous, with state of the same dtype and
layout. Those are updated by :mod:`ravine.kernels.cpu` in one call per dtype; the
others (bfloat16, complex, non-contiguous, another device) take the plain path in
the same step. A group whose hyperparameters the kernel cannot take (for instance
Adam's betas as tensors) uses the plain path for the whole step.

The per-step scalars (bias corrections, Adagrad's decayed learning rate) are
computed here with the very expressions of the plain path, once per distinct step
count, so both paths see the same numbers. The kernel's hyperparameters are call
arguments: a learning rate that changes every step rebuilds nothing.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ravine import transforms as T
from ravine.kernels import cpu

__all__ = ["IMPLEMENTATIONS", "Spec", "FastPart", "StateWatch", "spec_for", "prepare", "check_impl"]

IMPLEMENTATIONS = ("auto", "plain", "fast")

# Flags shared with cpu_step.cpp.
MAXIMIZE, NESTEROV, CENTERED, AMSGRAD, DECOUPLED, HAS_MOMENTUM, HAS_WEIGHT_DECAY = 1, 2, 4, 8, 16, 32, 64

# A tensor is cut into work items of at most this many elements, so that threads
# share a few large tensors as evenly as many small ones.
ITEM_ELEMENTS = 1 << 15
# Below this many elements in a call one thread is faster than waking others (the
# grain size torch uses for its own element-wise kernels).
PARALLEL_ELEMENTS = 1 << 15


class StateWatch:
    """The state tensors a cached plan points into, named as (state dict, key) pairs:
    :meth:`unchanged` turns False once a pair holds another tensor (a loaded state
    dict, a new buffer), so the plan is rebuilt. Checked every step, in C loops."""

    def __init__(self, entries: list[tuple[dict[str, Any], str]]) -> None:
        self.states = [state for state, _ in entries]
        self.keys = [key for _, key in entries]
        self.tensors = list(map(dict.get, self.states, self.keys))

    def unchanged(self) -> bool:
        return all(map(operator.is_, map(dict.get, self.states, self.keys), self.tensors))


def check_impl(impl: Any) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, got {impl!r}")
    return impl


@dataclass(frozen=True)
class Spec:
    """How an optimizer maps onto the kernel.

    ``arguments(group, steps)`` returns ``(flags, hyperparameters, per_tensor)``
    for one step, where ``per_tensor`` holds, for each distinct step count, the
    scalars that depend on it (or ``None`` when the group is not supported).
    """

    family: str
    arguments: Callable[[dict[str, Any], list[float]], tuple[int, list[float], dict[float, list[float]]] | None]
    scalars_per_tensor: int


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sgd(group, steps):
    if not all(_is_number(group[name]) for name in ("momentum", "dampening")):
        return None
    flags = MAXIMIZE * group["maximize"] | NESTEROV * group["nesterov"]
    weight_decay = T.scalar(group["weight_decay"])
    if weight_decay != 0:
        flags |= HAS_WEIGHT_DECAY
    if group["momentum"] != 0:
        flags |= HAS_MOMENTUM
    hp = [T.scalar(group["lr"]), group["momentum"], group["dampening"], weight_decay]
    # SGD's step list marks a momentum buffer created by this step with 0.
    return flags, hp, {step: [1.0 if step == 0.0 else 0.0] for step in set(steps)}


def _adagrad(group, steps):
    if not all(_is_number(group[name]) for name in ("lr_decay", "eps", "weight_decay")):
        return None
    flags = MAXIMIZE * group["maximize"] | HAS_WEIGHT_DECAY * (group["weight_decay"] != 0)
    lr = T.scalar(group["lr"])
    per = {step: [-lr / (1 + (step - 1) * group["lr_decay"])] for step in set(steps)}
    return flags, [group["eps"], group["weight_decay"]], per


def _rmsprop(group, steps):
    if not all(_is_number(group[name]) for name in ("alpha", "eps", "weight_decay", "momentum")):
        return None
    flags = MAXIMIZE * group["maximize"] | CENTERED * group["centered"]
    if group["weight_decay"] != 0:
        flags |= HAS_WEIGHT_DECAY
    if group["momentum"] > 0:
        flags |= HAS_MOMENTUM
    hp = [T.scalar(group["lr"]), group["alpha"], group["eps"], group["weight_decay"], group["momentum"]]
    return flags, hp, {0.0: []}


def _adam_family(group, flags: int) -> tuple[int, list[float]]:
    """Flags and hyperparameters that Adam, NAdam and RAdam share: 1 - beta1, beta2,
    1 - beta2, eps, weight_decay, and the decoupled decay factor 1 - lr wd (1 when the
    decay is added to the gradient or absent)."""
    beta1, beta2 = group["betas"]
    lr, weight_decay = group["lr"], group["weight_decay"]
    decay_factor = 1.0
    if weight_decay != 0:
        flags |= HAS_WEIGHT_DECAY
        if group["decoupled_weight_decay"]:
            flags |= DECOUPLED
            decay_factor = T.scalar(1 - lr * weight_decay)
    return flags, [T.scalar(1 - beta1), beta2, T.scalar(1 - beta2), group["eps"], weight_decay, decay_factor]


def _adam(group, steps):
    beta1, beta2 = group["betas"]
    if not all(_is_number(value) for value in (beta1, beta2, group["eps"], group["weight_decay"])):
        return None
    if group.get("state_dtype") is not None:
        return None
    lr = group["lr"]
    flags, hp = _adam_family(group, MAXIMIZE * group["maximize"] | AMSGRAD * group["amsgrad"])
    # The same expressions as Adam.update, so a tensor lr rounds the same way.
    per = {
        step: [-T.scalar(lr / T.bias_correction(beta1, step)), T.bias_correction_root(beta2, step)]
        for step in set(steps)
    }
    return flags, hp, per


def _adamax(group, steps):
    beta1, beta2 = group["betas"]
    if not all(_is_number(value) for value in (beta1, beta2, group["eps"], group["weight_decay"])):
        return None
    flags = MAXIMIZE * group["maximize"] | HAS_WEIGHT_DECAY * (group["weight_decay"] != 0)
    hp = [T.scalar(1 - beta1), beta2, group["eps"], group["weight_decay"]]
    lr = group["lr"]
    # The same expression as Adamax.update, so a tensor lr rounds the same way.
    per = {step: [-T.scalar(lr / T.bias_correction(beta1, step))] for step in set(steps)}
    return flags, hp, per


def _nadam(group, steps):
    from ravine.optim.nadam import momentum_coefficient

    beta1, beta2 = group["betas"]
    if not all(_is_number(value) for value in (beta1, beta2, group["eps"], group["weight_decay"], group["momentum_decay"])):
        return None
    lr = group["lr"]
    flags, hp = _adam_family(group, MAXIMIZE * group["maximize"])
    # NAdam's steps are (t, mu_product) pairs; the same expressions as NAdam.update.
    per = {}
    for step, mu_product in set(steps):
        mu = momentum_coefficient(beta1, group["momentum_decay"], step)
        mu_next = momentum_coefficient(beta1, group["momentum_decay"], step + 1)
        per[(step, mu_product)] = [
            T.bias_correction(beta2, step),
            T.scalar(-lr * (1.0 - mu) / (1.0 - mu_product)),
            T.scalar((-lr * mu_next) / (1.0 - mu_product * mu_next)),
        ]
    return flags, hp, per


def _radam(group, steps):
    from ravine.optim.radam import rectification, variance_tractability

    beta1, beta2 = group["betas"]
    if not all(_is_number(value) for value in (beta1, beta2, group["eps"], group["weight_decay"])):
        return None
    lr = group["lr"]
    flags, hp = _adam_family(group, MAXIMIZE * group["maximize"])
    hp.append(T.scalar(lr))
    # The same expressions as RAdam.update.
    per = {}
    for step in set(steps):
        rectified = variance_tractability(beta2, step) > 5.0
        per[step] = [
            T.bias_correction(beta1, step),
            1.0 if rectified else 0.0,
            T.bias_correction(beta2, step) ** 0.5 if rectified else 0.0,
            rectification(beta2, step) if rectified else 0.0,
        ]
    return flags, hp, per


def _lion(group, steps):
    beta1, beta2 = group["betas"]
    if not all(_is_number(value) for value in (beta1, beta2)):
        return None
    lr = T.scalar(group["lr"])
    weight_decay = T.scalar(group["weight_decay"])
    flags = MAXIMIZE * group["maximize"] | HAS_WEIGHT_DECAY * (weight_decay != 0)
    # The same expressions as Lion.update.
    return flags, [beta1, 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr * weight_decay], {0.0: []}


def _signum(group, steps):
    if not _is_number(group["momentum"]):
        return None
    momentum = group["momentum"]
    lr = T.scalar(group["lr"])
    weight_decay = T.scalar(group["weight_decay"])
    flags = MAXIMIZE * group["maximize"] | HAS_WEIGHT_DECAY * (weight_decay != 0) | HAS_MOMENTUM * (momentum != 0)
    # The same expressions as Signum.update.
    return flags, [momentum, 1 - momentum, -lr, 1 - lr * weight_decay], {0.0: []}


def _schedule_free(group, interpolation: float, extra: list[float]):
    """Schedule-free AdamW and SGD; the group's counters (``k``, ``scheduled_lr``,
    ``weight_sum``) have been advanced for this step. The same expressions as
    ``_ScheduleFree._move``."""
    from ravine.optim.schedulefree import _ScheduleFree

    lr = group["scheduled_lr"]
    averaging = _ScheduleFree._averaging(group)
    weight_decay = T.scalar(group["weight_decay"])
    flags = HAS_WEIGHT_DECAY * (weight_decay != 0)
    hp = [weight_decay, averaging, lr * (interpolation * (1 - averaging) - 1), -lr, *extra]
    return flags, hp, {0.0: []}


def _schedule_free_adamw(group, steps):
    if not _is_number(group["eps"]):
        return None
    beta1, beta2 = (T.scalar(beta) for beta in group["betas"])
    # The same expressions as ScheduleFreeAdamW.update.
    return _schedule_free(group, beta1, [beta2, 1 - beta2, 1 - beta2 ** group["k"], group["eps"]])


def _schedule_free_sgd(group, steps):
    return _schedule_free(group, T.scalar(group["momentum"]), [])


def _specs() -> dict[type, Spec]:
    from ravine.optim.adagrad import Adagrad
    from ravine.optim.adam import Adam, AdamW
    from ravine.optim.adamax import Adamax
    from ravine.optim.lion import Lion
    from ravine.optim.nadam import NAdam
    from ravine.optim.radam import RAdam
    from ravine.optim.rmsprop import RMSprop
    from ravine.optim.schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD
    from ravine.optim.sgd import SGD
    from ravine.optim.signum import Signum

    return {
        SGD: Spec("sgd", _sgd, 1),
        Adagrad: Spec("adagrad", _adagrad, 1),
        RMSprop: Spec("rmsprop", _rmsprop, 0),
        Adam: Spec("adam", _adam, 2),
        AdamW: Spec("adam", _adam, 2),
        Adamax: Spec("adamax", _adamax, 1),
        NAdam: Spec("nadam", _nadam, 3),
        RAdam: Spec("radam", _radam, 4),
        Lion: Spec("lion", _lion, 0),
        Signum: Spec("signum", _signum, 0),
        ScheduleFreeAdamW: Spec("sfadamw", _schedule_free_adamw, 0),
        ScheduleFreeSGD: Spec("sfsgd", _schedule_free_sgd, 0),
    }


_SPECS: dict[type, Spec] | None = None


def spec_for(optimizer: Any) -> Spec | None:
    """The kernel spec of ``optimizer``'s exact class (a subclass may change the rule)."""
    global _SPECS
    if _SPECS is None:
        _SPECS = _specs()
    return _SPECS.get(type(optimizer))


def eligible(p: Tensor, buffers: list[Tensor | None]) -> bool:
    """Whether a compiled step can take ``p`` with state ``buffers``: a dense,
    contiguous float32/float64 CPU tensor (not a subclass such as DTensor), each
    buffer present, contiguous and of its dtype, device and shape."""
    if type(p.data) is not torch.Tensor:  # a tensor subclass (DTensor) has no plain storage to point at
        return False
    if p.device.type != "cpu" or p.dtype not in cpu.DTYPES or p.is_sparse or not p.is_contiguous():
        return False
    return all(
        b is not None and b.dtype == p.dtype and b.device == p.device and b.shape == p.shape and b.is_contiguous()
        for b in buffers
    )


class FastPart:
    """The parameters of one group and dtype that the kernel updates, with the flat
    tables it reads: work items and one row of pointers per tensor."""

    def __init__(self, spec: Spec, dtype: torch.dtype, indices: list[int], dense, names) -> None:
        self.spec = spec
        self.dtype = dtype
        self.indices = indices
        self.params = [dense[i][0] for i in indices]
        buffers = [[dense[i][1][name] for name in names] for i in indices]
        self.pointers = np.zeros((len(indices), 2 + len(names)), dtype=np.int64)
        self.pointers[:, 0] = [p.data_ptr() for p in self.params]
        for k in range(len(names)):
            self.pointers[:, 2 + k] = [row[k].data_ptr() for row in buffers]
        items = []
        for t, p in enumerate(self.params):
            numel = p.numel()
            for start in range(0, numel, ITEM_ELEMENTS):
                items.append((t, start, min(ITEM_ELEMENTS, numel - start)))
        self.items = np.array(items, dtype=np.int64).reshape(-1, 3)
        self.numel = sum(p.numel() for p in self.params)
        self.per_tensor = np.zeros((len(indices), max(spec.scalars_per_tensor, 1)), dtype=np.float64)
        #: Steps this part has taken (a step may go to the plain path instead).
        self.steps_taken = 0

    def grads_ready(self) -> bool:
        """Whether every gradient is dense and contiguous (checked every step)."""
        return grad_pointers_into(self.pointers[:, 1], [p.grad for p in self.params])

    def run(self, flags: int, hyperparameters: np.ndarray, per_step: dict[float, list[float]], steps: list[float]) -> None:
        if self.spec.scalars_per_tensor:
            if len(per_step) == 1:
                self.per_tensor[:] = next(iter(per_step.values()))
            else:
                self.per_tensor[:] = [per_step[steps[i]] for i in self.indices]
        threads = torch.get_num_threads() if self.numel >= PARALLEL_ELEMENTS else 1
        self.steps_taken += 1
        cpu.step(
            cpu.FAMILIES[self.spec.family],
            cpu.DTYPES[self.dtype],
            self.items,
            self.pointers,
            self.per_tensor,
            hyperparameters,
            flags,
            threads,
        )


def grad_pointers_into(column: np.ndarray, grads: list[Tensor], dtype: torch.dtype | None = None) -> bool:
    """Write the addresses of ``grads`` into ``column`` (a compiled step's table) if
    every gradient is dense and contiguous (and of ``dtype``, when given); return
    whether they were. Runs for every tensor of every step, so in list comprehensions."""
    if not all([grad.layout is torch.strided and grad.is_contiguous() for grad in grads]):
        return False
    if dtype is not None and not all([grad.dtype == dtype for grad in grads]):
        return False
    column[:] = [grad.data_ptr() for grad in grads]
    return True


def prepare(spec: Spec, dense, names) -> tuple[list[FastPart], set[int]]:
    """The fast parts of a group (one per dtype) and the indices they cover."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, (p, state) in enumerate(dense):
        if eligible(p, [state.get(name) for name in names]):
            by_dtype.setdefault(p.dtype, []).append(index)
    parts = [FastPart(spec, dtype, indices, dense, names) for dtype, indices in by_dtype.items()]
    covered = {index for indices in by_dtype.values() for index in indices}
    return parts, covered


def run_parts(spec: Spec, parts: list[FastPart], group: dict[str, Any], steps: list[float]) -> bool:
    """Update every fast part; False (nothing written) when this step cannot use them."""
    arguments = spec.arguments(group, [steps[i] for part in parts for i in part.indices])
    if arguments is None:
        return False
    if not all(part.grads_ready() for part in parts):
        return False
    flags, hp, per_step = arguments
    hyperparameters = np.asarray(hp, dtype=np.float64)
    for part in parts:
        part.run(flags, hyperparameters, per_step, steps)
    return True
