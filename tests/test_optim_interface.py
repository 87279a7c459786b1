"""ravine's optimizers as torch.optim.Optimizers: signatures, state_dicts both ways,
hyperparameter errors, atomic steps, hooks, schedulers and AMP's GradScaler."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import ravine
from optimizer_table import CASES, all_error_sets, clone_options, option_id, shape_for


def make_model(seed: int = 0, case=None) -> torch.nn.Module:
    """A small MLP; without biases for an optimizer that takes matrices only."""
    torch.manual_seed(seed)
    bias = case is None or case.takes_vectors
    return torch.nn.Sequential(torch.nn.Linear(6, 8, bias=bias), torch.nn.ReLU(), torch.nn.Linear(8, 2, bias=bias))


def ones(case, *shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.ones(shape_for(case, shape)))


def train(model, optimizer, steps, start=0, seed=1):
    """``steps`` steps on a data stream that depends only on the step index."""
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(seed * 100_000 + step)
        x = torch.randn(16, 6, generator=generator)
        y = torch.randn(16, 2, generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def snapshot(model, optimizer):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(optimizer.state_dict())


def assert_same_snapshot(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index in state_a["state"]:
        for key, value in state_a["state"][index].items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)


# Keyword-only arguments ravine adds after torch's, with defaults that keep torch's
# behaviour: state_dtype (docs/memory.md), impl (the implementation that runs a step).
RAVINE_ONLY_KEYWORDS = {"state_dtype": None, "impl": "auto"}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_signature_and_defaults_equal_torch(case):
    ours = dict(inspect.signature(case.ravine_cls.__init__).parameters)
    theirs = inspect.signature(case.torch_cls.__init__).parameters
    for name, default in RAVINE_ONLY_KEYWORDS.items():
        if name in ours and name not in theirs:
            extra = ours.pop(name)
            assert (extra.kind, extra.default) == (inspect.Parameter.KEYWORD_ONLY, default), name
    assert list(ours) == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name
        assert ours[name].kind == parameter.kind, name
    assert issubclass(case.ravine_cls, torch.optim.Optimizer)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("direction", ["torch_to_ravine", "ravine_to_torch"])
def test_state_dict_round_trip_continues_identically(case, direction):
    """Train 10 steps with one library, load its state_dict into the other, train 10
    more; the result equals 20 uninterrupted steps of the first."""
    options = clone_options(case.options[-2])
    first_cls, second_cls = (
        (case.torch_cls, case.ravine_cls) if direction == "torch_to_ravine" else (case.ravine_cls, case.torch_cls)
    )
    reference = make_model(case=case)
    reference_opt = first_cls(reference.parameters(), **clone_options(options))
    train(reference, reference_opt, 20)

    model = make_model(case=case)
    first = first_cls(model.parameters(), **clone_options(options))
    train(model, first, 10)
    saved = copy.deepcopy(first.state_dict())
    second = second_cls(model.parameters(), **clone_options(options))
    second.load_state_dict(saved)
    assert second.state_dict()["param_groups"] == saved["param_groups"]
    train(model, second, 10, start=10)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_state_dict_format_equals_torch(case):
    options = clone_options(case.options[-2])
    models = [make_model(case=case), make_model(case=case)]
    optimizers = [case.torch_cls(models[0].parameters(), **clone_options(options)), case.ravine_cls(models[1].parameters(), **clone_options(options))]
    # Before any step (Adagrad fills its state at construction) and after three.
    for steps in (0, 3):
        for model, optimizer in zip(models, optimizers):
            train(model, optimizer, steps)
        theirs, ours = (optimizer.state_dict() for optimizer in optimizers)
        assert ours["param_groups"] == theirs["param_groups"]
        assert ours["state"].keys() == theirs["state"].keys()
        for index, entry in theirs["state"].items():
            assert ours["state"][index].keys() == entry.keys()
            for key, value in entry.items():
                other = ours["state"][index][key]
                assert (other.dtype, other.shape, other.device) == (value.dtype, value.shape, value.device), key


@pytest.mark.parametrize(
    "case,kwargs,argument",
    all_error_sets(),
    ids=[f"{case.name}[{option_id(kwargs)}]" for case, kwargs, argument in all_error_sets()],
)
def test_invalid_hyperparameter_raises_value_error_naming_it(case, kwargs, argument):
    with pytest.raises(ValueError) as error:
        case.ravine_cls(make_model(case=case).parameters(), **kwargs)
    message = str(error.value)
    assert argument in message
    # The message states what is allowed, not only what was wrong.
    assert any(word in message for word in ("must", "requires", "allowed"))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_step_that_raises_changes_nothing(case):
    """A bad hyperparameter in the *second* param group (set between steps, as a
    buggy schedule might) makes step() raise before the first group is written."""
    model = make_model(case=case)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = case.ravine_cls(groups, **clone_options(case.options[1]))
    train(model, optimizer, 3)
    before = snapshot(model, optimizer)
    good_lr = optimizer.param_groups[1]["lr"]
    for bad in (-1.0, float("nan")):
        optimizer.param_groups[1]["lr"] = bad
        with pytest.raises(ValueError, match="lr"):
            train(model, optimizer, 1, start=3)
        optimizer.param_groups[1]["lr"] = good_lr
        assert_same_snapshot(before, snapshot(model, optimizer))
    if not case.sparse:
        # A sparse gradient on the last parameter is refused before anything moves.
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        last = list(model.parameters())[-1]
        last.grad = torch.ones_like(last).to_sparse()
        with pytest.raises(RuntimeError, match="sparse"):
            optimizer.step()
        assert_same_snapshot(before, snapshot(model, optimizer))
    train(model, optimizer, 1, start=3)
    assert not torch.equal(next(model.parameters()).detach(), before[0][0])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_nonfinite_norm_with_error_if_nonfinite_changes_nothing(case):
    model = make_model(case=case)
    optimizer = case.ravine_cls(model.parameters(), **clone_options(case.options[1]))
    optimizer.gradient_transforms.append(ravine.ClipByGlobalNorm(1.0, error_if_nonfinite=True))
    train(model, optimizer, 2)
    before = snapshot(model, optimizer)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(model.parameters()).grad[0, 0] = float("nan")
    grads_before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.step()
    assert_same_snapshot(before, snapshot(model, optimizer))
    for p, g in zip(model.parameters(), grads_before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_add_param_group_zero_grad_and_hooks(case):
    model = make_model(case=case)
    first, second = model[0], model[2]
    optimizer = case.ravine_cls(first.parameters(), **clone_options(case.options[1]))
    optimizer.add_param_group({"params": second.parameters(), "lr": 0.001})
    assert len(optimizer.param_groups) == 2
    assert optimizer.param_groups[1]["lr"] == 0.001
    # Defaults fill the rest of the new group.
    assert optimizer.param_groups[1].keys() == optimizer.param_groups[0].keys()
    with pytest.raises(ValueError, match="lr"):
        optimizer.add_param_group({"params": [ones(case, 2)], "lr": -0.1})
    assert len(optimizer.param_groups) == 2

    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    before = [p.detach().clone() for p in model.parameters()]
    train(model, optimizer, 2)
    assert calls == ["pre", "post", "pre", "post"]
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_params_without_grads_and_empty_tensors_are_fine(case):
    used, unused, empty = ones(case, 3), ones(case, 4), ones(case, 0, 5)
    optimizer = case.ravine_cls([used, unused, empty], **clone_options(case.options[1]))
    used.grad = torch.full_like(used, 0.5)
    empty.grad = torch.ones(0, 5)
    optimizer.step()
    assert torch.equal(unused.detach(), torch.ones_like(unused))
    assert not torch.equal(used.detach(), torch.ones_like(used))
    assert torch.isfinite(used).all()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_torch_schedulers_drive_ravine_optimizers(case):
    model = make_model(case=case)
    optimizer = case.ravine_cls(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        train(model, optimizer, 1)
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_grad_scaler_unscales_before_the_step(case):
    """AMP's GradScaler (enabled where the device supports it) calls step() after
    unscaling; the result equals a plain step on the true gradients."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    models = [make_model(case=case), make_model(case=case)]
    optimizers = [case.ravine_cls(m.parameters(), **clone_options(case.options[1])) for m in models]
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for _ in range(3):
        optimizers[0].zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(models[0](x), y)).backward()
        scaler.step(optimizers[0])
        scaler.update()
        optimizers[1].zero_grad()
        torch.nn.functional.mse_loss(models[1](x), y).backward()
        optimizers[1].step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_differentiable_is_refused_clearly():
    with pytest.raises(ValueError, match="differentiable"):
        ravine.Adam(make_model().parameters(), differentiable=True)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_parameter_storage_swapped_between_steps(case):
    """``p.data = ...`` between steps (as pruning or dtype moves do) is honoured: the
    optimizer updates the new storage, as torch.optim does."""
    big = 300_000  # large enough to be cut into slices
    ours = [ones(case, big), ones(case, 3)]
    theirs = [ones(case, big), ones(case, 3)]
    optimizers = [case.ravine_cls(ours, lr=0.1), case.torch_cls(theirs, lr=0.1)]
    for step in range(3):
        for params, optimizer in zip((ours, theirs), optimizers):
            if step == 2:
                for p in params:
                    p.data = torch.full_like(p.data, 2.0)
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            optimizer.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=0.0)
    assert float(ours[0].flatten()[0]) != 1.0
