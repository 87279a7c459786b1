"""The worked examples of the seed text, with its numbers."""

from __future__ import annotations

import math

import pytest
import torch

import ravine
from ravine.schedules import warmup_cosine


def test_three_adam_steps_on_x_squared():
    """f(x) = x^2 from x = 2.0, lr 0.01, betas (0.9, 0.999), eps 1e-8."""
    x = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    optimizer = ravine.Adam([x], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    expected = [
        # (x after the step, m_t, v_t) as printed in the seed text
        (1.9900, 0.4000, 0.0160),
        (1.9800, 0.7580, 0.031824),
        (1.9700, 1.0782, 0.047474),
    ]
    for x_after, m, v in expected:
        optimizer.zero_grad()
        (x**2).backward()
        optimizer.step()
        state = optimizer.state[x]
        assert float(x.detach()) == pytest.approx(x_after, abs=5e-5)
        assert float(state["exp_avg"]) == pytest.approx(m, abs=5e-5)
        assert float(state["exp_avg_sq"]) == pytest.approx(v, abs=5e-7)
    # Each step moves x by almost exactly lr, whatever the gradient's size.
    assert float(x.detach()) == pytest.approx(2.0 - 3 * 0.01, abs=1e-3 * 0.01 * 3)


def test_adam_bias_corrected_moments_match_the_seed():
    x = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    optimizer = ravine.Adam([x], lr=0.01)
    hats = [(4.0000, 16.0000), (3.9895, 15.9200), (3.9786, 15.8406)]
    for step, (m_hat, v_hat) in enumerate(hats, start=1):
        optimizer.zero_grad()
        (x**2).backward()
        optimizer.step()
        state = optimizer.state[x]
        assert float(state["exp_avg"]) / (1 - 0.9**step) == pytest.approx(m_hat, abs=5e-4)
        assert float(state["exp_avg_sq"]) / (1 - 0.999**step) == pytest.approx(v_hat, abs=5e-4)


def test_global_norm_clipping_of_the_seed_vector():
    g = torch.tensor([6.0, -8.0, 3.0, -4.0, 2.0])
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = g.clone()
    norm = ravine.clip_grad_norm_([p], max_norm=5.0)
    assert float(norm) == pytest.approx(math.sqrt(129), abs=1e-6)
    assert float(norm) == pytest.approx(11.3578, abs=5e-5)
    assert 5.0 / float(norm) == pytest.approx(0.4402, abs=5e-5)
    assert p.grad.tolist() == pytest.approx([2.6414, -3.5218, 1.3207, -1.7609, 0.8805], abs=5e-4)
    assert float(p.grad.norm()) == pytest.approx(5.0, abs=1e-5)
    # The direction is kept.
    assert torch.allclose(p.grad / p.grad.norm(), g / g.norm(), atol=1e-7)


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.000000), (50, 0.000500), (100, 0.001000), (300, 0.000883), (700, 0.000250), (1000, 0.000000)],
)
def test_warmup_cosine_table(step, expected):
    schedule = warmup_cosine(peak_lr=1e-3, warmup_steps=100, total_steps=1000)
    assert round(schedule(step), 6) == pytest.approx(expected, abs=1e-12)
