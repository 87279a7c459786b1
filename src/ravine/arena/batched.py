r"""Batched runs: train R copies of one small model at once, one learning rate and one
seed per copy, with the results the same runs give one after another.

A learning-rate grid or a set of seeds is R independent trainings of the same model.
Run one after another, each step of each run pays Python's and torch's per-call cost
for a handful of tiny matrix products. Here the R copies' parameters are stacked along
a new first dimension (run ``r`` is slice ``[r]`` of every tensor), one batched matrix
product (``torch.baddbmm``) computes every run's layer at once, and the per-run losses
are summed before ``backward()``: the runs share no parameter, so the gradient of the
sum with respect to run ``r``'s slice is run ``r``'s own gradient. One optimizer step
then updates every run, with the learning rate as a tensor of shape ``(R, 1, ..., 1)``
broadcast over each stacked parameter:

.. math:: \theta^{(r)}_t = \theta^{(r)}_{t-1} - \eta^{(r)}_t\, d^{(r)}_t
          \qquad r = 1, \dots, R

where :math:`d^{(r)}_t` is the optimizer's direction for run ``r`` (its momentum,
Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)`, ...), computed from run ``r``'s
gradient and state alone.

Each run is the run :func:`ravine.arena.train.train` would make with the same
:class:`~ravine.arena.train.TrainConfig`: the same initial weights (``make_model(seed)``),
its own data order (a generator seeded with its seed, one ``randperm`` per epoch), its
own schedule (the same rule of its own base learning rate), its own gradient clipping
(each run scaled by its own global norm), its own divergence test and its own
evaluations. The update is the optimizer's own: the compiled CPU step of
:mod:`ravine.kernels` on each run's slices with that run's hyperparameters (one call for
every run when they share all but the learning rate), when a run on its own would take
it, or else the plain path's operations with the learning rate applied where the
optimizer applies it. For the hand-written layers with the cross-entropy loss the
backward pass is written out too (no autograd graph): the same operations, in the
order autograd's backward runs them. Results agree within floating-point rounding; on the
MNIST-1D MLP they are bit for bit those of the sequential runs (only the recorded
mini-batch losses may differ in the last bit).

What can be batched:

* tasks whose ``Task.batched`` is true (built in: ``mnist1d-logreg``, ``mnist1d-mlp``,
  ``digits-mlp``): models without randomness or running statistics. Models made of
  ``nn.Linear``, ``nn.ReLU``, ``nn.Sequential`` and the MNIST-1D residual MLP run on
  hand-written batched layers; any other model of such a task runs through
  ``torch.func.vmap`` over ``torch.func.functional_call``, which is general but slower.
* optimizers whose update is element-wise: SGD (with momentum, dampening, Nesterov,
  weight decay), Adam, AdamW and AMSGrad, RMSprop (centered, momentum) and Adagrad,
  i.e. every name in :data:`BATCHED_OPTIMIZERS`. The learning rate may differ per run;
  every other hyperparameter is shared. Optimizers whose update reads a norm of a whole
  tensor (LAMB, LARS) or of all parameters would mix the runs, and are trained one
  after another instead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ravine import registry
from ravine import transforms as T
from ravine.arena.tasks import ResidualMLP, Task, get_task
from ravine.arena.train import (
    RunResult,
    TrainConfig,
    _make_scheduler,
    _peak_memory,
    _reset_peak_memory,
    evaluate,
    optimizer_state_bytes,
    run_result,
)
from ravine.kernels import cpu as _cpu
from ravine.kernels import fast as _fast
from ravine.optim import SGD, Adagrad, Adam, AdamW, RMSprop

__all__ = ["BATCHED_OPTIMIZERS", "can_batch", "train_batched"]

#: Registered optimizer names whose runs can be batched.
BATCHED_OPTIMIZERS = (
    "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "rmsprop-centered", "adam", "amsgrad", "adamw",
)

BatchedProgress = Callable[[int, int, int, float], None]
"""Called as ``callback(run, step, total_steps, loss)`` after each step of each run."""


def can_batch(task: Task | str, spec: str) -> bool:
    """Whether runs of optimizer ``spec`` on ``task`` can be trained together."""
    if isinstance(task, str):
        task = get_task(task)
    if not getattr(task, "batched", False):
        return False
    try:
        optimizer = registry.create(spec, [nn.Parameter(torch.zeros(1))])
    except ValueError:
        return False
    return _rule_for(optimizer) is not None


def train_batched(
    task: Task | str,
    configs: list[TrainConfig],
    progress: BatchedProgress | None = None,
    *,
    return_parameters: bool = False,
) -> list[RunResult] | tuple[list[RunResult], list[dict[str, Tensor]]]:
    """Train the runs ``configs`` describe together; return one :class:`RunResult` each,
    as :func:`ravine.arena.train.train` would for that config.

    The configs may differ in ``lr`` and ``seed`` only. Timings are shares: a run's
    ``time_per_step_s`` is the batched step's median time divided by the number of
    runs, and so on; ``peak_memory_bytes`` is the rise of all runs together divided
    by their number; ``extra["batched_runs"]`` says how many ran together. With
    ``return_parameters`` each run's final parameters come back as well, as state
    dicts of the task's model.

    Raises ``ValueError`` when the task or optimizer cannot be batched (see
    :func:`can_batch`) or the configs differ in anything but ``lr`` and ``seed``.
    """
    if isinstance(task, str):
        task = get_task(task)
    configs = list(configs)
    if not configs or not all(isinstance(config, TrainConfig) for config in configs):
        raise ValueError("configs must be a non-empty list of TrainConfig")
    shared = ("optimizer", "batch_size", "epochs", "steps", "schedule", "clip_norm",
              "divergence_factor", "divergence_patience")
    for name in shared:
        values = {repr(getattr(config, name)) for config in configs}
        if len(values) > 1:
            raise ValueError(
                f"batched runs must share {name}; got {', '.join(sorted(values))} "
                "(only lr and seed may differ)"
            )
    if not getattr(task, "batched", False):
        raise ValueError(f"task {task.name!r} cannot be batched (Task.batched is False); use train()")
    return _BatchedTraining(task, configs, progress).run(return_parameters)


# ---------------------------------------------------------------------------------------
# Batched forward passes


class _BatchedLinear(torch.autograd.Function):
    r"""R linear layers at once: :math:`y^{(r)} = x^{(r)} W^{(r)\top} + b^{(r)}`.

    The backward pass forms :math:`\partial W^{(r)} = g^{(r)\top} x^{(r)}` in that
    order (autograd's ``bmm`` backward would form :math:`(x^\top g)^\top`), as
    ``nn.Linear``'s backward does, so each run's gradients are those of its own layer.
    """

    @staticmethod
    def forward(ctx: Any, inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(inputs, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(inputs, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_inputs = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_inputs, grad_weight, grad_bias


def _linear(params: dict[str, Tensor], prefix: str, inputs: Tensor) -> Tensor:
    return _BatchedLinear.apply(inputs, params[prefix + "weight"], params.get(prefix + "bias"))


def _layer_forward(module: nn.Module, prefix: str) -> Callable[[dict[str, Tensor], Tensor], Tensor] | None:
    """A function ``(stacked params, inputs (R, B, ...)) -> outputs (R, B, ...)`` for the
    modules written out here; ``None`` for any other."""
    if type(module) is nn.Linear:
        return lambda params, inputs: _linear(params, prefix, inputs)
    if type(module) is nn.ReLU:
        return lambda params, inputs: inputs.relu()
    if type(module) is ResidualMLP:
        def residual(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
            hidden = _linear(params, prefix + "linear1.", inputs).relu()
            hidden = hidden + _linear(params, prefix + "linear2.", hidden).relu()
            return _linear(params, prefix + "linear3.", hidden)
        return residual
    if type(module) is nn.Sequential:
        layers = [_layer_forward(child, f"{prefix}{name}.") for name, child in module.named_children()]
        if any(layer is None for layer in layers):
            return None

        def chain(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
            for layer in layers:
                inputs = layer(params, inputs)
            return inputs
        return chain
    return None


def _batched_forward(model: nn.Module, buffers: dict[str, Tensor]) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    forward = _layer_forward(model, "")
    if forward is not None and not buffers:
        return forward
    # Any other model: torch.func maps the model's own forward over the run dimension.
    base = model

    def one_run(params: dict[str, Tensor], run_buffers: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return torch.func.functional_call(base, {**params, **run_buffers}, (inputs,))

    mapped = torch.func.vmap(one_run)
    return lambda params, inputs: mapped(params, buffers, inputs)


# ---------------------------------------------------------------------------------------
# Forward and backward written out (no autograd), for the hand-written layers with the
# cross-entropy loss: the same operations autograd's backward would run, in its order,
# without its graph and per-node cost.


class _Tape:
    """What a forward pass keeps for its backward pass, and the gradients it forms."""

    def __init__(self) -> None:
        self.saved: list[Any] = []
        self.grads: dict[str, Tensor] = {}


def _manual_layer(module: nn.Module, prefix: str) -> tuple[Callable, Callable] | None:
    """``(forward(params, x, tape), backward(params, grad, tape, need_input_grad))`` for
    the modules written out here; ``None`` for any other. ``backward`` pops what the
    matching ``forward`` pushed and returns the input's gradient (or ``None``)."""
    if type(module) is nn.Linear:
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        has_bias = module.bias is not None

        def linear_forward(params, x, tape):
            tape.saved.append(x)
            if not has_bias:
                return torch.bmm(x, params[weight_key].transpose(1, 2))
            return torch.baddbmm(params[bias_key].unsqueeze(1), x, params[weight_key].transpose(1, 2))

        def linear_backward(params, grad, tape, need_input_grad):
            x = tape.saved.pop()
            # the products of _BatchedLinear.backward, in nn.Linear's order
            tape.grads[weight_key] = torch.bmm(grad.transpose(1, 2), x)
            if has_bias:
                tape.grads[bias_key] = grad.sum(dim=1)
            return torch.bmm(grad, params[weight_key]) if need_input_grad else None
        return linear_forward, linear_backward
    if type(module) is nn.ReLU:
        def relu_forward(params, x, tape):
            output = x.relu()
            tape.saved.append(output)
            return output

        def relu_backward(params, grad, tape, need_input_grad):
            # autograd's threshold_backward: 0 where the output is <= 0
            return torch.ops.aten.threshold_backward(grad, tape.saved.pop(), 0)
        return relu_forward, relu_backward
    if type(module) is ResidualMLP:
        layers = [_manual_layer(child, prefix + name + ".") for name, child in
                  (("linear1", module.linear1), ("linear2", module.linear2), ("linear3", module.linear3))]
        relu = _manual_layer(nn.ReLU(), "")
        (f1, b1), (f2, b2), (f3, b3) = layers
        relu_forward, relu_backward = relu

        def residual_forward(params, x, tape):
            hidden = relu_forward(params, f1(params, x, tape), tape)
            hidden = hidden + relu_forward(params, f2(params, hidden, tape), tape)
            return f3(params, hidden, tape)

        def residual_backward(params, grad, tape, need_input_grad):
            grad_hidden = b3(params, grad, tape, True)
            grad_branch = b2(params, relu_backward(params, grad_hidden, tape, True), tape, True)
            grad_hidden = grad_hidden + grad_branch  # the two uses of the first hidden layer
            return b1(params, relu_backward(params, grad_hidden, tape, True), tape, need_input_grad)
        return residual_forward, residual_backward
    if type(module) is nn.Sequential:
        children = [_manual_layer(child, f"{prefix}{name}.") for name, child in module.named_children()]
        if not children or any(child is None for child in children):
            return None

        def chain_forward(params, x, tape):
            for forward, _ in children:
                x = forward(params, x, tape)
            return x

        def chain_backward(params, grad, tape, need_input_grad):
            for k in range(len(children) - 1, -1, -1):
                grad = children[k][1](params, grad, tape, need_input_grad or k > 0)
            return grad
        return chain_forward, chain_backward
    return None


def _manual_training_step(model: nn.Module, buffers: dict[str, Tensor], loss_fn: Callable) -> Callable | None:
    """A function ``(params, inputs, targets) -> (per-run losses (R,), backward)`` whose
    ``backward()`` returns every run's gradients of its own mean cross-entropy, as
    autograd would form them for the summed per-run losses; ``None`` when the model or
    the loss is not written out here."""
    layer = _manual_layer(model, "")
    if layer is None or buffers or loss_fn is not F.cross_entropy:
        return None
    forward, backward = layer

    @torch.no_grad()
    def step(params: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> tuple[Tensor, Callable]:
        tape = _Tape()
        outputs = forward(params, inputs, tape)
        runs, batch = targets.shape[:2]
        flat = outputs.reshape(runs * batch, -1)
        log_probabilities = torch.log_softmax(flat, dim=1)
        target = targets.reshape(-1)
        losses = F.nll_loss(log_probabilities, target, reduction="none").view(runs, batch).mean(dim=1)

        @torch.no_grad()
        def gradients() -> dict[str, Tensor]:
            # sum over runs, then each run's mean over its batch: 1 / batch per example
            grad = torch.ones(runs, 1, dtype=losses.dtype).expand(runs, batch) / batch
            grad = torch.ops.aten.nll_loss_backward(
                grad.reshape(-1), log_probabilities, target, None, 0, -100, torch.zeros((), dtype=losses.dtype)
            )
            grad = torch.ops.aten._log_softmax_backward_data(grad, log_probabilities, 1, log_probabilities.dtype)
            backward(params, grad.view(outputs.shape), tape, False)
            return tape.grads
        return losses, gradients
    return step


def _batched_loss(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-run losses ``(R,)`` from outputs ``(R, B, ...)`` and targets ``(R, B, ...)``."""
    if loss_fn is F.cross_entropy:
        def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
            runs, batch = targets.shape[:2]
            losses = F.cross_entropy(outputs.reshape(runs * batch, -1), targets.reshape(-1), reduction="none")
            return losses.view(runs, batch).mean(dim=1)
        return cross_entropy
    return torch.func.vmap(loss_fn)


# ---------------------------------------------------------------------------------------
# Batched update rules: the optimizers' math with a per-run learning rate.
#
# Every operation that does not involve the learning rate is the optimizer's own
# (ravine.transforms, with the same shared hyperparameters); the learning rate enters as
# a float64 tensor (R,) combined with the other factors as the optimizer combines its
# Python float, then rounded to the parameters' dtype and broadcast over each run.


def _per_run(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _add_scaled_(params: list[Tensor], directions: list[Tensor], factors: Tensor) -> None:
    r""":math:`\theta^{(r)} \leftarrow \theta^{(r)} + c^{(r)} d^{(r)}` for every run ``r``."""
    for param, direction in zip(params, directions, strict=True):
        param.addcmul_(direction, _per_run(factors, param))


def _add_scaled_quotient_(
    params: list[Tensor], numerators: list[Tensor], denominators: list[Tensor], factors: Tensor
) -> None:
    r""":math:`\theta^{(r)} \leftarrow \theta^{(r)} + c^{(r)} n^{(r)} / d^{(r)}` for every run ``r``."""
    # (c n) / d is the order in which addcdiv applies its scalar, so each run's numbers
    # are those of the optimizer's own step.
    for param, numerator, denominator in zip(params, numerators, denominators, strict=True):
        param.addcdiv_(numerator * _per_run(factors, param), denominator)


class _Rule:
    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group

    def init_state(self, params: list[Tensor]) -> dict[str, list[Tensor]]:
        return {}

    def update(self, params, grads, state, lr: Tensor, step: int) -> None:
        raise NotImplementedError

    def _gradient(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        group = self.group
        if group["maximize"]:
            grads = T.negate(grads)
        weight_decay = T.scalar(group["weight_decay"])
        if weight_decay != 0 and not group.get("decoupled_weight_decay", False):
            grads = T.add_l2_penalty(grads, params, weight_decay)
        return grads


class _SGDRule(_Rule):
    """:class:`ravine.optim.SGD`: momentum, dampening, Nesterov, L2 weight decay."""

    def init_state(self, params):
        return {"momentum_buffer": []} if self.group["momentum"] != 0 else {}

    def update(self, params, grads, state, lr, step):
        group = self.group
        momentum = group["momentum"]
        grads = self._gradient(params, grads)
        if momentum != 0:
            buffers = state["momentum_buffer"]
            if not buffers:  # the first step: the buffer starts as a copy of the gradient
                buffers.extend(grad.detach().clone() for grad in grads)
            else:
                T.momentum_trace_(buffers, grads, momentum, group["dampening"])
            grads = T.nesterov_direction(grads, buffers, momentum) if group["nesterov"] else buffers
        _add_scaled_(params, grads, -lr)


class _AdamRule(_Rule):
    """:class:`ravine.optim.Adam` and :class:`~ravine.optim.AdamW`, with AMSGrad."""

    def init_state(self, params):
        state = {
            "exp_avg": [torch.zeros_like(p) for p in params],
            "exp_avg_sq": [torch.zeros_like(p) for p in params],
        }
        if self.group["amsgrad"]:
            state["max_exp_avg_sq"] = [torch.zeros_like(p) for p in params]
        return state

    def update(self, params, grads, state, lr, step):
        group = self.group
        beta1, beta2 = (T.scalar(beta) for beta in group["betas"])
        weight_decay = T.scalar(group["weight_decay"])
        if weight_decay != 0 and group["decoupled_weight_decay"]:
            factors = 1 - lr * weight_decay
            for param in params:
                param.mul_(_per_run(factors, param))
        grads = self._gradient(params, grads)
        T.moving_average_(state["exp_avg"], grads, beta1)
        T.moving_average_of_squares_(state["exp_avg_sq"], grads, beta2)
        second_moments = state["exp_avg_sq"]
        if group["amsgrad"]:
            T.running_maximum_(state["max_exp_avg_sq"], second_moments)
            second_moments = state["max_exp_avg_sq"]
        denominators = T.adam_denominator(second_moments, T.bias_correction_root(beta2, step), group["eps"])
        _add_scaled_quotient_(params, state["exp_avg"], denominators, -(lr / T.bias_correction(beta1, step)))


class _RMSpropRule(_Rule):
    """:class:`ravine.optim.RMSprop`: centered and momentum variants."""

    def init_state(self, params):
        state = {"square_avg": [torch.zeros_like(p) for p in params]}
        if self.group["momentum"] > 0:
            state["momentum_buffer"] = [torch.zeros_like(p) for p in params]
        if self.group["centered"]:
            state["grad_avg"] = [torch.zeros_like(p) for p in params]
        return state

    def update(self, params, grads, state, lr, step):
        group = self.group
        grads = self._gradient(params, grads)
        T.moving_average_of_squares_(state["square_avg"], grads, group["alpha"])
        if group["centered"]:
            T.moving_average_(state["grad_avg"], grads, group["alpha"])
            roots = T.centered_root_of_(state["square_avg"], state["grad_avg"], group["eps"])
        else:
            roots = T.root_of_(state["square_avg"], group["eps"])
        if group["momentum"] > 0:
            buffers = state["momentum_buffer"]
            T.scale_(buffers, group["momentum"])
            torch._foreach_addcdiv_(buffers, grads, roots)
            _add_scaled_(params, buffers, -lr)
        else:
            _add_scaled_quotient_(params, grads, roots, -lr)


class _AdagradRule(_Rule):
    """:class:`ravine.optim.Adagrad`, with learning-rate decay."""

    def init_state(self, params):
        value = self.group["initial_accumulator_value"]
        return {"sum": [torch.full_like(p, value) for p in params]}

    def update(self, params, grads, state, lr, step):
        group = self.group
        grads = self._gradient(params, grads)
        T.accumulate_squares_(state["sum"], grads)
        roots = T.root_of_(state["sum"], group["eps"])
        _add_scaled_quotient_(params, grads, roots, -lr / (1 + (step - 1) * group["lr_decay"]))


_RULES: dict[type, type[_Rule]] = {
    SGD: _SGDRule, Adam: _AdamRule, AdamW: _AdamRule, RMSprop: _RMSpropRule, Adagrad: _AdagradRule,
}


def _rule_for(optimizer: torch.optim.Optimizer) -> type[_Rule] | None:
    if len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if any(isinstance(value, Tensor) and value.numel() != 1 for value in group.values()):
        return None
    if group.get("state_dtype") is not None:
        return None  # moment buffers kept in another dtype: the batched rules keep them in the parameter's
    # Exact classes only: a subclass may change the rule.
    return _RULES.get(type(optimizer))


def _clip_per_run_(grads: list[Tensor], max_norm: float) -> None:
    r"""Scale each run's gradients by :math:`\min(1, c / (\lVert g^{(r)}\rVert + 10^{-6}))`,
    with :math:`\lVert g^{(r)}\rVert` the global 2-norm of run ``r``'s gradients alone
    (as :func:`ravine.clip_grad_norm_` does for one run)."""
    runs = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(grad.reshape(runs, -1), dim=1) for grad in grads], dim=1)
    total = torch.linalg.vector_norm(norms, dim=1)  # each run's row is contiguous, as in clip_grad_norm_
    coefficients = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(_per_run(coefficients, grad))


class _KernelStep:
    """The optimizers' compiled CPU step (:mod:`ravine.kernels`) on every run's slices
    of the stacked tensors, each run with its own hyperparameters: the very step a run
    takes on its own when its optimizer uses the compiled path.

    The kernel reads one set of shared hyperparameters per call and a row of scalars
    per tensor; run ``r``'s slice of tensor ``t`` is the kernel's tensor ``r T + t``.
    When the live runs' shared hyperparameters are equal (the learning rate only enters
    the per-tensor scalars, as in Adam without decoupled decay and Adagrad) one call
    steps every run; otherwise one call per run.
    """

    #: Steps whose arguments are worked out at once while a run's learning rate stays put.
    BLOCK = 256

    def __init__(self, spec: Any, names: tuple[str, ...], tensors: list[Tensor], state: dict[str, list[Tensor]]) -> None:
        self.spec = spec
        self.runs = runs = tensors[0].shape[0]
        self.count = count = len(tensors)
        self.dtype = tensors[0].dtype
        sizes = [tensor[0].numel() for tensor in tensors]
        self.slice_bytes = np.array([size * tensors[0].element_size() for size in sizes], dtype=np.int64)
        items = [
            (t, start, min(_fast.ITEM_ELEMENTS, size - start))
            for t, size in enumerate(sizes)
            for start in range(0, size, _fast.ITEM_ELEMENTS)
        ]
        self.items = np.array(items, dtype=np.int64).reshape(-1, 3)
        self.run_items = [self.items + np.array([r * count, 0, 0], dtype=np.int64) for r in range(runs)]
        self.threads = torch.get_num_threads() if sum(sizes) >= _fast.PARALLEL_ELEMENTS else 1
        self.all_threads = torch.get_num_threads() if runs * sum(sizes) >= _fast.PARALLEL_ELEMENTS else 1
        offsets = np.arange(runs, dtype=np.int64)[:, None] * self.slice_bytes[None, :]
        # pointers[r * T + t] = (param, grad, state...) of run r's slice of tensor t
        pointers = np.zeros((runs, count, 2 + len(names)), dtype=np.int64)
        pointers[:, :, 0] = np.array([t.data_ptr() for t in tensors], dtype=np.int64)[None, :] + offsets
        for k, name in enumerate(names):
            bases = np.array([buffer.data_ptr() for buffer in state[name]], dtype=np.int64)
            pointers[:, :, 2 + k] = bases[None, :] + offsets
        self.pointers = pointers.reshape(runs * count, -1)
        self.offsets = offsets.reshape(-1)
        self.grad_pointers: list[int] | None = None
        self.per_tensor = np.zeros((runs * count, max(spec.scalars_per_tensor, 1)), dtype=np.float64)
        self.live: tuple[bool, ...] | None = None
        self.live_items = self.items
        self.cache: list[tuple[Any, tuple[int, list[float], dict[float, list[float]]]] | None] = [None] * runs

    def _arguments(self, r: int, group: dict[str, Any], step: float) -> tuple[int, list[float], list[float]] | None:
        """``spec.arguments`` for run ``r``'s group at ``step``: (flags, shared
        hyperparameters, per-tensor scalars). While the run's learning rate (a number)
        stays the same, the arguments of the next steps are worked out in one go."""
        lr = group["lr"]
        cached = self.cache[r]
        if cached is not None and type(lr) is float and cached[0] == lr:
            flags, hyperparameters, per_step = cached[1]
            if not self.spec.scalars_per_tensor:  # nothing depends on the step
                return flags, hyperparameters, []
            if step not in per_step:
                arguments = self.spec.arguments(group, [step + k for k in range(self.BLOCK)])
                if arguments is None:
                    return None
                self.cache[r] = (lr, arguments)
                flags, hyperparameters, per_step = arguments
            return flags, hyperparameters, per_step[step]
        arguments = self.spec.arguments(group, [step])
        if arguments is None:
            return None
        self.cache[r] = (lr, arguments)
        return arguments[0], arguments[1], arguments[2][step] if self.spec.scalars_per_tensor else []

    def update(self, grads: list[Tensor], groups: list[dict[str, Any]], alive: list[bool], step: float) -> bool:
        """One step of every live run; False (nothing written) when the kernel cannot
        take this step's hyperparameters."""
        arguments = [self._arguments(r, group, step) if alive[r] else None for r, group in enumerate(groups)]
        if any(argument is None for argument, live in zip(arguments, alive) if live):
            return False
        grads = [grad if grad.is_contiguous() else grad.contiguous() for grad in grads]
        grad_pointers = [grad.data_ptr() for grad in grads]
        if grad_pointers != self.grad_pointers:
            self.pointers[:, 1] = np.tile(np.array(grad_pointers, dtype=np.int64), self.runs) + self.offsets
            self.grad_pointers = grad_pointers
        live = tuple(alive)
        if live != self.live:
            self.live = live
            self.live_items = np.concatenate([self.run_items[r] for r in range(self.runs) if live[r]])
        family, dtype = _cpu.FAMILIES[self.spec.family], _cpu.DTYPES[self.dtype]
        count, per_tensor = self.count, self.per_tensor
        used = [(r, argument) for r, argument in enumerate(arguments) if argument is not None]
        if self.spec.scalars_per_tensor:  # run r's scalars in the rows of its tensors
            idle = [0.0] * self.spec.scalars_per_tensor
            rows = np.array([idle if argument is None else argument[2] for argument in arguments], dtype=np.float64)
            per_tensor.reshape(self.runs, count, -1)[:] = rows[:, None, :]
        first_flags, first_hyperparameters, _ = used[0][1]
        if all(flags == first_flags and hyperparameters == first_hyperparameters for _, (flags, hyperparameters, _) in used):
            _cpu.step(family, dtype, self.live_items, self.pointers, per_tensor,
                      np.asarray(first_hyperparameters, dtype=np.float64), first_flags, self.all_threads)
            return True
        for r, (flags, hyperparameters, _) in used:
            _cpu.step(family, dtype, self.run_items[r], self.pointers, per_tensor,
                      np.asarray(hyperparameters, dtype=np.float64), flags, self.threads)
        return True


def _kernel_spec(optimizer: torch.optim.Optimizer, dtype: torch.dtype) -> Any:
    """The compiled step's spec when a run of ``optimizer`` on its own would use it."""
    if getattr(optimizer, "impl", "plain") == "plain" or dtype not in _cpu.DTYPES:
        return None
    if optimizer.param_groups[0].get("state_dtype") is not None:
        return None
    spec = _fast.spec_for(optimizer)
    if spec is None or spec.arguments(optimizer.param_groups[0], [1.0]) is None:
        return None  # no compiled step, or not for these hyperparameters
    if _cpu.unavailable_reason() is not None:
        return None
    return spec


# ---------------------------------------------------------------------------------------
# The training loop


class _Run:
    """What one run measures, step by step, as train() does."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.train_losses: list[float] = []
        self.eval_steps: list[int] = []
        self.test_losses: list[float] = []
        self.test_metrics: list[float] = []
        self.initial_loss: float | None = None
        self.limit = math.inf
        self.above_since: int | None = None
        self.diverged_at: int | None = None
        self.steps = 0

    @property
    def active(self) -> bool:
        return self.diverged_at is None

    def check(self, step: int, value: float) -> bool:
        """Record the loss before a step; whether the run goes on (train()'s divergence test)."""
        config = self.config
        if self.initial_loss is None:
            self.initial_loss = value
            self.limit = value + config.divergence_factor * max(abs(value), 1e-8)
        if value > self.limit:
            self.above_since = step if self.above_since is None else self.above_since
        else:
            self.above_since = None
        if not math.isfinite(value) or (
            self.above_since is not None and step - self.above_since + 1 >= config.divergence_patience
        ):
            self.diverged_at = step if self.above_since is None else self.above_since
            self.train_losses.append(value if math.isfinite(value) else math.nan)
            return False
        return True


class _BatchedTraining:
    def __init__(self, task: Task, configs: list[TrainConfig], progress: BatchedProgress | None) -> None:
        self.task = task
        self.configs = configs
        self.progress = progress
        self.runs = [_Run(config) for config in configs]

    def run(self, return_parameters: bool) -> Any:
        task, configs = self.task, self.configs
        first = configs[0]
        count = len(configs)
        data = task.data
        steps_per_epoch = math.ceil(data.num_train / first.batch_size)
        total_steps = first.steps if first.steps is not None else first.epochs * steps_per_epoch

        wall_start = time.perf_counter()
        models = [task.make_model(config.seed) for config in configs]
        for model in models:
            model.train()
        # A real optimizer per run, on a throwaway parameter, gives each run's
        # hyperparameters (spec, presets and defaults, checked) and drives its schedule.
        probes = [
            registry.create(config.optimizer, [nn.Parameter(torch.zeros(1))],
                            **({} if config.lr is None else {"lr": config.lr}))
            for config in configs
        ]
        rule_class = _rule_for(probes[0])
        if rule_class is None:
            raise ValueError(
                f"optimizer {first.optimizer!r} cannot be batched; batched optimizers: "
                f"{', '.join(BATCHED_OPTIMIZERS)}"
            )
        base_lrs = [float(probe.param_groups[0]["lr"]) for probe in probes]
        state_bytes = _state_bytes_after_one_step(first, task.make_model(first.seed))
        rule = rule_class(dict(probes[0].param_groups[0]))
        # Each probe also carries its run's schedule, built as train() builds it, so the
        # learning rate of every step is the one the run would have on its own.
        schedulers = [_make_scheduler(first.schedule, probe, lr, total_steps) for probe, lr in zip(probes, base_lrs)]

        # Run r is slice [r] of every stacked tensor.
        named = [dict(model.named_parameters()) for model in models]
        params = {key: torch.stack([run[key].detach() for run in named]).requires_grad_(True) for key in named[0]}
        named_buffers = [dict(model.named_buffers()) for model in models]
        buffers = {key: torch.stack([run[key] for run in named_buffers]) for key in named_buffers[0]}
        names = list(params)
        tensors = [params[key] for key in names]
        forward = _batched_forward(models[0], buffers)
        per_run_loss = _batched_loss(task.loss_fn)
        manual_step = _manual_training_step(models[0], buffers, task.loss_fn)
        state = rule.init_state(tensors)
        kernel_spec = _kernel_spec(probes[0], tensors[0].dtype)
        kernel = None
        if kernel_spec is not None:
            state_names = probes[0].state_names(probes[0].param_groups[0])
            if "momentum_buffer" in state_names and not state.get("momentum_buffer"):
                state["momentum_buffer"] = [torch.zeros_like(t) for t in tensors]  # SGD: filled on step 1
            kernel = _KernelStep(kernel_spec, state_names, tensors, state)
        memory_before, memory_method = _reset_peak_memory()

        shuffles = {seed: torch.Generator().manual_seed(seed) for seed in sorted({c.seed for c in configs})}
        alive = torch.ones(count, dtype=torch.bool)
        live = alive.tolist()  # the same, as a list
        groups = [probe.param_groups[0] for probe in probes]
        step_durations: list[float] = []
        optimizer_durations: list[float] = []

        self._evaluate(models, params, 0)
        step = 0
        while step < total_steps and any(run.active for run in self.runs):
            # Each run draws its epoch's order from its own seed's generator, as train()
            # does; runs that share a seed share the order.
            orders = {seed: torch.randperm(data.num_train, generator=g) for seed, g in shuffles.items()}
            order = torch.stack([orders[config.seed] for config in configs])
            for start in range(0, data.num_train, first.batch_size):
                if step >= total_steps:
                    break
                index = order[:, start : start + first.batch_size]
                rows = index.reshape(-1)  # one gather for every run's batch
                inputs = data.train_inputs.index_select(0, rows).view(*index.shape, *data.train_inputs.shape[1:])
                targets = data.train_targets.index_select(0, rows).view(*index.shape, *data.train_targets.shape[1:])
                began = time.perf_counter()
                for tensor in tensors:
                    tensor.grad = None
                if manual_step is not None:
                    losses, gradients = manual_step(params, inputs, targets)
                else:
                    losses = per_run_loss(forward(params, inputs), targets)
                values = losses.detach().tolist()
                stopped = []
                for index_, (run, value) in enumerate(zip(self.runs, values)):
                    if run.active and not run.check(step, value):
                        stopped.append(index_)
                if stopped:
                    alive[stopped] = False
                    live = alive.tolist()
                    if not any(live):
                        break
                if manual_step is not None:
                    computed = gradients()
                    grads = [computed[key] for key in names]
                else:
                    losses.sum().backward()
                    grads = [tensor.grad for tensor in tensors]
                if first.clip_norm is not None:
                    _clip_per_run_(grads, first.clip_norm)
                step_began = time.perf_counter()
                with torch.no_grad():
                    if kernel is None or not kernel.update(
                        grads, groups, live, _kernel_step_count(rule, step),
                    ):
                        lr = torch.tensor([float(group["lr"]) for group in groups], dtype=torch.float64) * alive
                        rule.update(tensors, grads, state, lr, step + 1)
                ended = time.perf_counter()
                for scheduler in schedulers:
                    if scheduler is not None:
                        scheduler.step()
                if stopped:
                    self._retire(stopped, tensors, state)
                active = sum(live)
                step_durations.append((ended - began) / active)
                optimizer_durations.append((ended - step_began) / active)
                step += 1
                for index_, (run, value) in enumerate(zip(self.runs, values)):
                    if run.active:
                        run.train_losses.append(value)
                        run.steps = step
                        if self.progress is not None:
                            self.progress(index_, step, total_steps, value)
            if step % steps_per_epoch == 0 or step >= total_steps:
                finished = self._evaluate(models, params, step)
                if finished:
                    alive[finished] = False
                    live = alive.tolist()
                    self._retire(finished, tensors, state)

        for run in self.runs:
            if run.diverged_at is None and run.above_since is not None:
                run.diverged_at = run.above_since  # the budget ran out far above the start
        peak_memory = max(0, _peak_memory() - memory_before)
        wall = time.perf_counter() - wall_start
        parameter_count = sum(p[0].numel() for p in tensors)
        parameter_bytes = sum(p[0].numel() * p.element_size() for p in tensors)
        results = [
            run_result(
                task,
                config,
                lr,
                steps_planned=total_steps,
                steps=run.steps,
                steps_per_epoch=steps_per_epoch,
                diverged_at=run.diverged_at,
                initial_loss=run.initial_loss,
                train_losses=run.train_losses,
                eval_steps=run.eval_steps,
                test_losses=run.test_losses,
                test_metrics=run.test_metrics,
                step_durations=step_durations[: run.steps],
                optimizer_durations=optimizer_durations[: run.steps],
                wall_time_s=wall / count,
                state_bytes=state_bytes,
                parameter_count=parameter_count,
                parameter_bytes=parameter_bytes,
                peak_memory_bytes=peak_memory // count,
                peak_memory_method=f"{memory_method}, shared by {count} batched runs",
                extra={"batched_runs": count},
            )
            for config, lr, run in zip(configs, base_lrs, self.runs, strict=True)
        ]
        if not return_parameters:
            return results
        final = [{key: params[key][r].detach().clone() for key in names} for r in range(count)]
        return results, final

    @torch.no_grad()
    def _evaluate(self, models: list[nn.Module], params: dict[str, Tensor], step: int) -> list[int]:
        """Test loss and metric of every active run, by train()'s own evaluate() on the
        run's model holding its slice of the stacked parameters; returns the runs whose
        test loss is not finite (they diverged here)."""
        diverged = []
        for r, (run, model) in enumerate(zip(self.runs, models)):
            if not run.active:
                continue
            for name, parameter in model.named_parameters():
                parameter.copy_(params[name][r])
            loss, metric = evaluate(self.task, model)
            run.eval_steps.append(step)
            run.test_losses.append(loss)
            run.test_metrics.append(metric)
            if not math.isfinite(loss):
                run.diverged_at = step
                diverged.append(r)
        return diverged

    @torch.no_grad()
    def _retire(self, runs: list[int], tensors: list[Tensor], state: dict[str, list[Tensor]]) -> None:
        """Zero the weights and state of runs that diverged (their learning rate is
        zero from now on), so that their slices stay finite."""
        for r in runs:
            for tensor in tensors:
                tensor[r].zero_()
            for buffers in state.values():
                for buffer in buffers:
                    buffer[r].zero_()


def _kernel_step_count(rule: _Rule, step: int) -> float:
    """The step count the compiled step reads: SGD's marks a momentum buffer this step
    creates with 0; the others count steps from 1."""
    if isinstance(rule, _SGDRule):
        return 0.0 if step == 0 else 1.0
    return float(step + 1)


def _state_bytes_after_one_step(config: TrainConfig, model: nn.Module) -> int:
    """Bytes of the run's optimizer state after one step on zero gradients (on a
    throwaway ``model``), as train() measures after its first step."""
    optimizer = registry.create(config.optimizer, model.parameters(), **({} if config.lr is None else {"lr": config.lr}))
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    return optimizer_state_bytes(optimizer)
