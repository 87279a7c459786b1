"""Batched runs (ravine.arena.batched) against the same runs one after another with
train(): equal parameters, losses and metrics, a learning rate per run, per-run
schedules and clipping, divergence, and what cannot be batched. The arena's sweep with
and without batching: tests/test_batched_sweep.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ravine import registry
from ravine.arena.batched import BATCHED_OPTIMIZERS, can_batch, train_batched
from ravine.arena.tasks import ResidualMLP, Task, TaskData, accuracy, get_task, register_task
from ravine.arena.train import SCHEDULES, TrainConfig, train

RTOL = 1e-4


def _load_blobs() -> TaskData:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(260, 6, generator=generator)
    targets = (inputs[:, 0] * inputs[:, 1] > 0).long() + (inputs[:, 2] > 0.5).long()
    return TaskData(inputs[:200], targets[:200], inputs[200:], targets[200:])


def _task(name: str, build, batched: bool = True) -> Task:
    def make_model(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    return register_task(
        Task(name, "three-class blobs", make_model, _load_blobs, nn.functional.cross_entropy,
             "accuracy", accuracy, True, epochs={"small": 2, "medium": 3, "full": 4}, batched=batched),
        replace=True,
    )


# 200 examples in batches of 32: 7 steps an epoch, the last one of 8 examples.
RESIDUAL = _task("test-batched-residual", lambda: ResidualMLP(6, 16, 3))
SEQUENTIAL = _task("test-batched-sequential", lambda: nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)))
# A model with no hand-written batched layers: trained through torch.func.vmap.
GENERIC = _task("test-batched-generic", lambda: nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)))
UNBATCHED = _task("test-batched-off", lambda: nn.Linear(6, 3), batched=False)


def _sequential(task: Task, configs: list[TrainConfig]):
    """train() on each config, keeping the model it trained (make_model is wrapped)."""
    results, models = [], []
    original = task.make_model

    def keep(seed: int) -> nn.Module:
        model = original(seed)
        models.append(model)
        return model

    task.make_model = keep
    try:
        for config in configs:
            results.append(train(task, config))
    finally:
        task.make_model = original
    return results, [dict(model.named_parameters()) for model in models]


def _assert_same_runs(sequential, batched) -> None:
    for one, many in zip(sequential, batched, strict=True):
        assert many.status == one.status and many.steps == one.steps
        assert many.diverged_at_step == one.diverged_at_step
        assert many.lr == one.lr and many.seed == one.seed and many.spec == one.spec
        assert many.eval_steps == one.eval_steps
        assert many.state_bytes == one.state_bytes
        for name in ("train_loss", "test_loss", "test_metric"):
            torch.testing.assert_close(
                torch.tensor(getattr(many, name), dtype=torch.float64),
                torch.tensor(getattr(one, name), dtype=torch.float64), rtol=RTOL, atol=1e-7, equal_nan=True,
            )
        for name in ("final_train_loss", "final_test_loss", "final_test_metric"):
            assert getattr(many, name) == pytest.approx(getattr(one, name), rel=RTOL, nan_ok=True)


def _assert_same_parameters(sequential_parameters, batched_parameters) -> None:
    for one, many in zip(sequential_parameters, batched_parameters, strict=True):
        assert set(one) == set(many)
        for name, value in one.items():
            torch.testing.assert_close(many[name], value.detach(), rtol=RTOL, atol=1e-6)


SPECS = [
    ("sgd", [0.05, 0.2, 0.5, 1.0]),
    ("momentum", [0.01, 0.05, 0.1, 0.3]),
    ("nesterov(weight_decay=0.01)", [0.01, 0.05, 0.1, 0.3]),
    ("adam", [1e-3, 1e-2, 3e-2, 1e-1]),
    ("amsgrad", [1e-3, 1e-2, 3e-2, 1e-1]),
    ("adamw(weight_decay=0.1)", [1e-3, 1e-2, 3e-2, 1e-1]),
    ("adam(weight_decay=0.01, maximize=False)", [1e-3, 1e-2, 3e-2, 1e-1]),
    ("rmsprop", [1e-3, 3e-3, 1e-2, 3e-2]),
    ("rmsprop-centered(momentum=0.5)", [1e-3, 3e-3, 1e-2, 3e-2]),
    ("adagrad(lr_decay=0.01)", [0.01, 0.03, 0.1, 0.3]),
    # the plain path (torch list operations) rather than the compiled step
    ("momentum(impl='plain')", [0.01, 0.05, 0.1, 0.3]),
    ("adamw(weight_decay=0.1, impl='plain')", [1e-3, 1e-2, 3e-2, 1e-1]),
]


@pytest.mark.parametrize("spec, lrs", SPECS, ids=[spec for spec, _ in SPECS])
def test_batched_runs_equal_sequential_runs(spec, lrs):
    configs = [TrainConfig(optimizer=spec, lr=lr, epochs=3, seed=seed) for lr, seed in zip(lrs, [0, 1, 0, 2])]
    sequential, sequential_parameters = _sequential(RESIDUAL, configs)
    batched, batched_parameters = train_batched(RESIDUAL, configs, return_parameters=True)
    _assert_same_runs(sequential, batched)
    _assert_same_parameters(sequential_parameters, batched_parameters)
    assert all(result.extra == {"batched_runs": 4} for result in batched)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("task", [SEQUENTIAL, GENERIC], ids=["linear-relu", "vmap"])
def test_schedules_and_per_run_clipping_equal_sequential_runs(schedule, task):
    # clip_norm 0.05 clips every step of every run, each by its own norm
    configs = [
        TrainConfig(optimizer="momentum", lr=lr, epochs=2, seed=seed, schedule=schedule, clip_norm=0.05)
        for lr, seed in [(0.05, 3), (0.2, 4), (0.5, 3)]
    ]
    sequential, sequential_parameters = _sequential(task, configs)
    batched, batched_parameters = train_batched(task, configs, return_parameters=True)
    _assert_same_runs(sequential, batched)
    _assert_same_parameters(sequential_parameters, batched_parameters)


def test_each_run_steps_with_its_own_learning_rate():
    # Same seed, same data, one plain SGD step: every run moves along the same gradient,
    # by its own lr, so (initial - final) / lr is the same for all of them.
    lrs = [0.01, 0.1, 1.0]
    configs = [TrainConfig(optimizer="sgd", lr=lr, steps=1, seed=0) for lr in lrs]
    _, parameters = train_batched(SEQUENTIAL, configs, return_parameters=True)
    initial = dict(SEQUENTIAL.make_model(0).named_parameters())
    for name, start in initial.items():
        moves = [(start.detach() - run[name]) / lr for run, lr in zip(parameters, lrs)]
        assert moves[0].abs().max() > 0
        torch.testing.assert_close(moves[1], moves[0], rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(moves[2], moves[0], rtol=1e-3, atol=1e-5)
        assert not torch.equal(parameters[0][name], parameters[2][name])


def test_a_diverging_run_stops_alone_as_it_does_on_its_own():
    configs = [TrainConfig(optimizer="sgd", lr=lr, epochs=3, seed=0) for lr in (0.1, 1e4, 0.5)]
    sequential, _ = _sequential(RESIDUAL, configs)
    batched = train_batched(RESIDUAL, configs)
    assert [result.status for result in sequential] == ["ok", "diverged", "ok"]
    _assert_same_runs(sequential, batched)


def test_mnist1d_mlp_runs_equal_sequential_runs():
    task = get_task("mnist1d-mlp")
    configs = [
        TrainConfig(optimizer="adamw", lr=lr, steps=40, seed=seed, schedule="warmup-cosine", clip_norm=1.0)
        for lr, seed in [(1e-3, 0), (1e-2, 1)]
    ]
    sequential, sequential_parameters = _sequential(task, configs)
    batched, batched_parameters = train_batched(task, configs, return_parameters=True)
    _assert_same_runs(sequential, batched)
    # nn.Linear's products in its order, the optimizer's own step: the same bits
    for one, many in zip(sequential_parameters, batched_parameters):
        assert all(torch.equal(many[name], value.detach()) for name, value in one.items())


def test_what_can_be_batched():
    assert get_task("mnist1d-mlp").batched and get_task("mnist1d-logreg").batched and get_task("digits-mlp").batched
    assert not get_task("mnist1d-cnn").batched and not get_task("quadratic-deep").batched
    for name in BATCHED_OPTIMIZERS:
        assert can_batch(RESIDUAL, name), name
    assert not can_batch(UNBATCHED, "adam")
    assert not can_batch("quadratic-deep", "adam")
    registry.register("test-torch-sgd", torch.optim.SGD)  # not a ravine rule: not batched
    assert not can_batch(RESIDUAL, "test-torch-sgd(lr=0.1)")


def test_train_batched_refuses_what_it_cannot_batch():
    with pytest.raises(ValueError, match="batch_size"):
        train_batched(RESIDUAL, [TrainConfig("sgd", lr=0.1), TrainConfig("sgd", lr=0.1, batch_size=16)])
    with pytest.raises(ValueError, match="optimizer"):
        train_batched(RESIDUAL, [TrainConfig("sgd", lr=0.1), TrainConfig("adam", lr=0.1)])
    with pytest.raises(ValueError, match="Task.batched"):
        train_batched(UNBATCHED, [TrainConfig("sgd", lr=0.1), TrainConfig("sgd", lr=0.2)])
    registry.register("test-torch-sgd", torch.optim.SGD)
    with pytest.raises(ValueError, match="cannot be batched"):
        train_batched(RESIDUAL, [TrainConfig("test-torch-sgd", lr=0.1), TrainConfig("test-torch-sgd", lr=0.2)])


def test_written_out_backward_equals_autograd():
    # The hand-written layers' forward and backward (no autograd) against autograd's
    # backward through the same batched layers, on four runs of the residual MLP.
    from ravine.arena.batched import _batched_forward, _batched_loss, _manual_training_step

    models = [RESIDUAL.make_model(seed) for seed in range(4)]
    names = [name for name, _ in models[0].named_parameters()]
    params = {
        name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_(True)
        for name in names
    }
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(4, 8, 6, generator=generator)
    targets = torch.randint(0, 3, (4, 8), generator=generator)
    losses = _batched_loss(nn.functional.cross_entropy)(_batched_forward(models[0], {})(params, inputs), targets)
    losses.sum().backward()
    manual_losses, gradients = _manual_training_step(models[0], {}, nn.functional.cross_entropy)(params, inputs, targets)
    assert torch.equal(manual_losses, losses.detach())
    computed = gradients()
    assert set(computed) == set(names)
    for name in names:
        assert params[name].grad.abs().max() > 0
        assert torch.equal(computed[name], params[name].grad), name
    # models the hand-written layers do not cover fall back to autograd
    assert _manual_training_step(GENERIC.make_model(0), {}, nn.functional.cross_entropy) is None
    assert _manual_training_step(models[0], {}, nn.functional.mse_loss) is None


def test_a_diverging_run_stops_alone_when_one_kernel_call_steps_every_run():
    # Adam's runs share every hyperparameter but the lr: one compiled-step call steps
    # them all, and a run that stops drops out of it.
    configs = [TrainConfig(optimizer="adam", lr=lr, epochs=3, seed=0) for lr in (1e-2, 1e5, 3e-2)]
    sequential, sequential_parameters = _sequential(RESIDUAL, configs)
    batched, batched_parameters = train_batched(RESIDUAL, configs, return_parameters=True)
    assert [result.status for result in sequential] == ["ok", "diverged", "ok"]
    _assert_same_runs(sequential, batched)
    for r in (0, 2):
        _assert_same_parameters([sequential_parameters[r]], [batched_parameters[r]])
