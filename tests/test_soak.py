"""Soak: every registered optimizer, driven by a warmup + cosine schedule, on a noisy
quadratic for many steps: no NaN or inf, the loss goes down, and nothing grows (live
tensors, optimizer state bytes, Python allocations, resident memory). The 10,000-step
run is marked slow (``pytest -m slow tests/test_soak.py``); a 100-step run (state
bytes and resident memory only, for speed) is in the default suite."""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest
import torch

import ravine
from ravine import registry
from ravine.schedules import ScheduledLR, warmup_cosine

NAMES = ravine.available()
PEAK_LR = 1e-2


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def state_bytes(optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def resident_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(name: str, steps: int, trace: bool = True) -> dict:
    # ``trace`` also counts live tensors (a walk over every Python object: slow)
    """A noisy quadratic 0.5 * sum(h * x**2) + noise . x over an 8x8 matrix and a
    vector, curvatures 0.1 .. 10, noise scale 0.1; returns the measurements."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(8, 8, generator=generator))
    vector = torch.nn.Parameter(torch.randn(16, generator=generator))
    curvature_matrix = torch.logspace(-1, 1, 64).reshape(8, 8)
    curvature_vector = torch.logspace(-1, 1, 16)
    entry = registry.get(name)
    optimizer = entry.cls([matrix, vector], **{**entry.presets, "lr": PEAK_LR})
    scheduler = ScheduledLR(optimizer, warmup_cosine(peak_lr=PEAK_LR, warmup_steps=steps // 20, total_steps=steps))

    def loss_value() -> torch.Tensor:
        return 0.5 * ((curvature_matrix * matrix**2).sum() + (curvature_vector * vector**2).sum())

    with torch.no_grad():
        initial = loss_value().item()
    checkpoint = steps // 10
    measured: dict = {"initial": initial}
    if trace:
        tracemalloc.start()
    try:
        for step in range(steps):
            if step == checkpoint:
                measured["tensors"] = live_tensors() if trace else 0
                measured["state_bytes"] = state_bytes(optimizer)
                measured["traced"] = tracemalloc.get_traced_memory()[0]
                measured["resident"] = resident_bytes()
            optimizer.zero_grad()
            noise_matrix = torch.randn(8, 8, generator=generator)
            noise_vector = torch.randn(16, generator=generator)
            loss = loss_value() + 0.1 * ((noise_matrix * matrix).sum() + (noise_vector * vector).sum())
            loss.backward()
            optimizer.step()
            scheduler.step()
            if not torch.isfinite(matrix).all() or not torch.isfinite(vector).all():
                raise AssertionError(f"{name}: non-finite parameters at step {step}")
        measured["tensors_end"] = live_tensors() if trace else 0
        measured["state_bytes_end"] = state_bytes(optimizer)
        measured["traced_end"] = tracemalloc.get_traced_memory()[0]
        measured["resident_end"] = resident_bytes()
    finally:
        if trace:
            tracemalloc.stop()
    with torch.no_grad():
        measured["final"] = loss_value().item()
    return measured


def check(name: str, measured: dict) -> None:
    assert measured["final"] < measured["initial"], (name, measured["initial"], measured["final"])
    assert measured["tensors_end"] == measured["tensors"], name  # no tensor kept per step
    assert measured["state_bytes_end"] == measured["state_bytes"], name
    # Python allocations (tracemalloc reports 0 when not tracing)
    assert measured["traced_end"] - measured["traced"] < 256 * 1024, name
    assert measured["resident_end"] - measured["resident"] < 32 * 1024 * 1024, name


@pytest.mark.parametrize("name", NAMES)
def test_short_soak(name):
    check(name, soak(name, 100, trace=False))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_ten_thousand_steps(name):
    check(name, soak(name, 10_000))
