"""Non-finite gradients: the ``nonfinite`` policy ("ignore", "skip", "raise") of every
registered optimizer, with clipping's ``error_if_nonfinite``, bfloat16 autocast and
AMP's GradScaler on CPU. The oracle for "skip" is a twin run that never saw the bad
step; for "ignore" it is torch.optim."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch

import ravine
from optimizer_table import CASES, clone_options

NAMES = ravine.available()


def make_model(seed: int = 0, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8, bias=bias), torch.nn.Tanh(), torch.nn.Linear(8, 2, bias=bias))


def backward(model, step: int, poison: float | None = None) -> None:
    generator = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator)
    for p in model.parameters():
        p.grad = None
    torch.nn.functional.mse_loss(model(x), y).backward()
    if poison is not None:
        next(iter(model.parameters())).grad[0, 0] = poison


def run(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        backward(model, step)
        optimizer.step()


def snapshot(model, optimizer):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict())


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    state_a, state_b = a[1]["state"], b[1]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        assert state_a[index].keys() == state_b[index].keys()
        for key, value in state_a[index].items():
            other = state_b[index][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, key)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_skip_changes_nothing_counts_and_logs(name, poison, caplog):
    model, twin = make_model(), make_model()
    optimizer, reference = ravine.create(name, model.parameters()), ravine.create(name, twin.parameters())
    optimizer.nonfinite = "skip"
    run(model, optimizer, 3)
    run(twin, reference, 3)
    before = snapshot(model, optimizer)
    backward(model, 3, poison)
    with caplog.at_level(logging.WARNING, logger="ravine"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))  # parameters, buffers and step counts
    assert optimizer.skipped_steps == 1
    assert "skipped a step with non-finite gradients" in caplog.text and "1 skipped so far" in caplog.text
    # the run goes on exactly like one that never saw the bad batch
    run(model, optimizer, 3, start=4)
    run(twin, reference, 3, start=4)
    assert_same(snapshot(model, optimizer), snapshot(twin, reference))
    assert optimizer.state_dict()["skipped_steps"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_raise_names_the_parameter_and_changes_nothing(name):
    model = make_model()
    optimizer = ravine.create(name, [{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    optimizer.nonfinite = "raise"
    run(model, optimizer, 2)
    before = snapshot(model, optimizer)
    backward(model, 2)
    model[2].bias.grad[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"param group (\d+), parameter (\d+) \(shape \(2,\)\)") as error:
        optimizer.step()
    # the named parameter is the bias (an optimizer may regroup parameters, as
    # MuonWithAdamW does)
    group, index = map(int, re.search(r"param group (\d+), parameter (\d+)", str(error.value)).groups())
    assert optimizer.param_groups[group]["params"][index] is model[2].bias
    assert_same(before, snapshot(model, optimizer))
    assert optimizer.skipped_steps == 0


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ignore_is_the_default_and_matches_torch(case):
    options = clone_options(case.options[-2])
    ours_model, torch_model = make_model(bias=case.takes_vectors), make_model(bias=case.takes_vectors)
    ours = case.ravine_cls(ours_model.parameters(), **clone_options(options))
    theirs = case.torch_cls(torch_model.parameters(), **clone_options(options))
    assert ours.nonfinite == "ignore" and "skipped_steps" not in ours.state_dict()
    for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
        run(model, optimizer, 2)
        backward(model, 2, float("nan"))
        optimizer.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        assert torch.equal(a.isnan(), b.isnan())  # the NaN spread as torch spreads it
        torch.testing.assert_close(a[~a.isnan()], b[~b.isnan()], rtol=1e-6, atol=0)
    assert ours_model[0].weight.isnan().any()


def test_policy_is_checked_and_skipped_steps_survive_a_state_dict():
    model = make_model()
    optimizer = ravine.Adam(model.parameters())
    with pytest.raises(ValueError, match="nonfinite must be one of 'ignore', 'skip', 'raise', got 'drop'"):
        optimizer.nonfinite = "drop"
    optimizer.nonfinite = "skip"
    for step in range(3):
        backward(model, step, float("nan") if step != 1 else None)
        optimizer.step()
    assert optimizer.skipped_steps == 2
    assert optimizer.state_dict()["state"][0]["step"].item() == 1.0
    fresh = ravine.Adam(make_model().parameters())
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.skipped_steps == 2


def test_skip_takes_precedence_over_clipping_error_if_nonfinite():
    model = make_model()
    optimizer = ravine.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clip = ravine.ClipByGlobalNorm(1.0, error_if_nonfinite=True)
    optimizer.gradient_transforms.append(clip)
    run(model, optimizer, 2)
    before = snapshot(model, optimizer)
    backward(model, 2, float("inf"))
    optimizer.nonfinite = "ignore"  # clipping's own check raises, and nothing changes
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    optimizer.nonfinite = "skip"  # checked first: the step is skipped, clipping never sees it
    optimizer.step()
    assert_same(before, snapshot(model, optimizer))
    assert optimizer.skipped_steps == 1
    # a finite step afterwards is clipped as usual
    backward(model, 3)
    optimizer.step()
    assert clip.last_norm is not None and torch.isfinite(clip.last_norm)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_sparse_gradients_are_checked(poison):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = ravine.SGD(embedding.parameters(), lr=0.1)
    optimizer.nonfinite = "skip"
    embedding(torch.tensor([1, 4])).sum().backward()
    embedding.weight.grad._values()[0, 0] = poison
    before = embedding.weight.detach().clone()
    optimizer.step()
    assert torch.equal(before, embedding.weight) and optimizer.skipped_steps == 1


def test_params_without_grads_and_empty_tensors_pass_the_check():
    weight, empty, unused = (torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(0)), torch.nn.Parameter(torch.ones(2)))
    optimizer = ravine.Adam([weight, empty, unused], lr=0.1)
    optimizer.nonfinite = "raise"
    weight.grad, empty.grad = torch.ones(3), torch.ones(0)
    optimizer.step()
    assert torch.allclose(weight, torch.full((3,), 0.9)) and optimizer.skipped_steps == 0


def test_bfloat16_autocast_overflow_is_skipped():
    model, twin = make_model(), make_model()
    optimizer, reference = ravine.AdamW(model.parameters(), lr=1e-2), ravine.AdamW(twin.parameters(), lr=1e-2)
    optimizer.nonfinite = "skip"
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    for step in range(4):
        for m, opt in ((model, optimizer), (twin, reference)):
            if step == 2 and opt is reference:
                continue  # the twin never sees the bad batch
            scale = 1e38 if step == 2 else 1.0  # overflows bfloat16's range in the forward
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m(x * scale)
            opt.zero_grad()
            (out.float() ** 2).mean().backward()
            opt.step()
    assert optimizer.skipped_steps == 1
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_grad_scaler_check_takes_precedence():
    """GradScaler finds the inf first and skips optimizer.step() itself: the optimizer
    counts nothing, and the scaler backs off, as with torch.optim."""
    results = []
    for cls in (ravine.Adam, torch.optim.Adam):
        model = make_model()
        optimizer = cls(model.parameters(), lr=1e-2)
        if cls is ravine.Adam:
            optimizer.nonfinite = "skip"
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
        scales = []
        for step in range(4):
            generator = torch.Generator().manual_seed(step)
            x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 2, generator=generator)
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss * (1e35 if step == 1 else 1.0)).backward()  # step 1 overflows
            scaler.step(optimizer)
            scaler.update()
            scales.append(scaler.get_scale())
        results.append(([p.detach().clone() for p in model.parameters()], scales, optimizer.state_dict()))
        if cls is ravine.Adam:
            assert optimizer.skipped_steps == 0
            assert optimizer.state_dict()["state"][0]["step"].item() == 3.0
    (ours, our_scales, _), (theirs, their_scales, _) = results
    assert our_scales == their_scales and our_scales[1] == 2.0**19  # backed off once
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_huge_finite_gradients_are_not_mistaken_for_overflow():
    """Squares of 1e30 overflow float32, so the fused norm is inf; the entries are
    finite, and the step must run (as torch.optim's would)."""
    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = ravine.SGD([weight], lr=1e-30)
    optimizer.nonfinite = "raise"
    weight.grad = torch.full((4,), 1e30)
    optimizer.step()
    assert optimizer.skipped_steps == 0
    torch.testing.assert_close(weight.detach(), torch.full((4,), -1.0))
