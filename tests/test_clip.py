"""Clipping against torch.nn.utils, and as a transform inside an optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

import ravine


def grads_of(seed: int, scale: float = 3.0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3, 4), (5,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale
    return params


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, theirs = grads_of(0), grads_of(0)
    our_norm = ravine.clip_grad_norm_(ours, max_norm, norm_type)
    their_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    torch.testing.assert_close(our_norm, their_norm, rtol=1e-6, atol=0.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0.0)
    clipped_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours]), norm_type)
    assert float(clipped_norm) <= max_norm * (1 + 1e-5)


@pytest.mark.parametrize("clip_value", [0.1, 2.0])
def test_clip_grad_value_matches_torch(clip_value):
    ours, theirs = grads_of(1), grads_of(1)
    ravine.clip_grad_value_(ours, clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
        assert float(a.grad.abs().max()) <= float(torch.tensor(clip_value))


def test_single_tensor_and_no_grads_are_accepted():
    p = torch.nn.Parameter(torch.zeros(2))
    assert float(ravine.clip_grad_norm_(p, 1.0)) == 0.0
    p.grad = torch.tensor([3.0, 4.0])
    assert float(ravine.clip_grad_norm_(p, 1.0)) == pytest.approx(5.0)
    assert p.grad.tolist() == pytest.approx([0.6, 0.8], abs=1e-6)


def test_error_if_nonfinite_leaves_gradients_alone():
    params = grads_of(2)
    params[1].grad[0] = float("inf")
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        ravine.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "call,argument",
    [
        (lambda p: ravine.clip_grad_norm_(p, 0.0), "max_norm"),
        (lambda p: ravine.clip_grad_norm_(p, -1.0), "max_norm"),
        (lambda p: ravine.clip_grad_norm_(p, float("nan")), "max_norm"),
        (lambda p: ravine.clip_grad_norm_(p, 1.0, norm_type=0.0), "norm_type"),
        (lambda p: ravine.clip_grad_value_(p, 0.0), "clip_value"),
        (lambda p: ravine.clip_grad_value_(p, -2.0), "clip_value"),
        (lambda p: ravine.ClipByGlobalNorm(-1.0), "max_norm"),
        (lambda p: ravine.ClipByValue(float("inf")), "clip_value"),
    ],
)
def test_bad_clipping_arguments(call, argument):
    params = grads_of(3)
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=argument):
        call(params)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("transform,function", [
    (ravine.ClipByGlobalNorm(1.0), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0)),
    (ravine.ClipByValue(0.5), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.5)),
])
def test_clipping_transform_inside_the_optimizer_equals_clipping_by_hand(transform, function):
    """Clipping as a gradient transform spans every param group, like the function
    applied to all parameters before step()."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    composed = ravine.AdamW([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}], lr=0.01)
    composed.gradient_transforms.append(transform)
    reference = torch.optim.AdamW([{"params": twin[0].parameters()}, {"params": twin[2].parameters(), "lr": 0.02}], lr=0.01)
    x, y = torch.randn(32, 4) * 10, torch.randn(32, 1) * 10
    for _ in range(10):
        composed.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        composed.step()
        reference.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        function(list(twin.parameters()))
        reference.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    if isinstance(transform, ravine.ClipByGlobalNorm):
        assert float(transform.last_norm) > 1.0  # it really clipped
