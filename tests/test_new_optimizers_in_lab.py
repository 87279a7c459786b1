"""NAdam, RAdam, Adamax, Adafactor and Muon by registry name in the lab: landscape
paths, an arena run and the advisor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ravine
from ravine.advise import advise
from ravine.arena.train import TrainConfig, train
from ravine.landscape import get_function, resolve_optimizer, run_many


def plain_loop(f, optimizer_cls, kwargs, start, steps):
    """The loop a user writes, with torch.optim's class: the positions it visits."""
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_cls([p], **kwargs)
    positions = [p.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        f(p[0], p[1]).backward()
        optimizer.step()
        positions.append(p.detach().clone())
    return torch.stack(positions).numpy()


@pytest.mark.parametrize(
    "name, torch_cls, lrs, batched",
    [
        ("nadam", torch.optim.NAdam, [1e-3, 3e-3], True),
        ("radam", torch.optim.RAdam, [1e-5, 3e-5], True),
        ("adamax", torch.optim.Adamax, [1e-3, 3e-3], True),
        ("adafactor", torch.optim.Adafactor, [1e-3, 3e-3], False),
    ],
)
def test_landscape_paths_equal_torch_plain_loops(name, torch_cls, lrs, batched):
    """The elementwise three share one batched parameter; Adafactor (whose step size
    reads the RMS of the whole parameter) runs path by path on a (2,) point."""
    assert resolve_optimizer(name).elementwise is batched
    f = get_function("rosenbrock")
    starts = [f.start, (0.5, -0.25)]
    paths = run_many(f, name, lrs=lrs, starts=starts, steps=40)
    assert len(paths) == len(lrs) * len(starts)
    for path in paths:
        assert not path.diverged
        expected = plain_loop(f, torch_cls, {"lr": path.lr}, path.start, 40)
        np.testing.assert_array_equal(path.positions, expected)
        assert not np.array_equal(path.positions[-1], path.positions[0])


@pytest.mark.parametrize("optimizer, fragment", [("muon", "acts on matrices"), (ravine.Muon, "acts on matrices")])
def test_landscape_refuses_muon_clearly(optimizer, fragment):
    with pytest.raises(ValueError, match=fragment):
        run_many("rosenbrock", optimizer, steps=5)


@pytest.mark.parametrize("spec", ["nadam", "radam", "adamax", "adafactor", "muon"])
def test_arena_trains_the_logistic_regression(spec):
    result = train("mnist1d-logreg", TrainConfig(spec, lr=0.01, steps=40))
    assert result.status == "ok"
    assert result.final_train_loss < result.initial_loss


def test_advisor_measures_exact_state_and_families():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))
    advice = advise(
        model, nn.functional.cross_entropy, (x, y), ["nadam", "muon", "adafactor"],
        range_steps=0, timing_repeats=2, warmup_steps=0,
    )
    rows = {row.name: row for row in advice.rows}
    assert rows["nadam"].family == "adam"
    assert rows["muon"].family == "adaptive"
    weights, biases = (5 * 4, 4 * 2), (4, 2)
    # NAdam: exp_avg and exp_avg_sq per element, a float32 step and mu_product per tensor.
    assert rows["nadam"].state_bytes == 8 * sum(weights + biases) + 8 * 4
    # Muon on the matrices (a momentum buffer), AdamW on the biases (moments and a step).
    assert rows["muon"].state_bytes == 4 * sum(weights) + 8 * sum(biases) + 4 * len(biases)
    # Adafactor: row and column factors for matrices, a full second moment for vectors.
    assert rows["adafactor"].state_bytes == 4 * (4 + 5 + 2 + 4) + 4 * sum(biases) + 4 * 4
