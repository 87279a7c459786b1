"""Steady-state steps of the compiled LAMB, Adafactor, schedule-free and 8-bit steps
allocate no tensor (torch's memory profiler, which sees the plain path's temporaries).
The element-wise families are checked in tests/test_fast_path.py; Muon's Newton-Schulz
iteration works on matrix-sized temporaries, as torch.optim.Muon's does."""

from __future__ import annotations

import pytest
import torch

import ravine
from ravine.optim.quantized import AdamW8bit, SGD8bit

CASES = {
    "lamb": lambda params, impl: ravine.Lamb(params, lr=1e-3, weight_decay=0.01, impl=impl),
    "adafactor": lambda params, impl: ravine.Adafactor(params, weight_decay=0.01, impl=impl),
    "sfadamw": lambda params, impl: ravine.ScheduleFreeAdamW(params, lr=1e-3, weight_decay=0.01, impl=impl),
    "sfsgd": lambda params, impl: ravine.ScheduleFreeSGD(params, lr=1e-3, weight_decay=0.01, impl=impl),
    "adamw8bit": lambda params, impl: AdamW8bit(params, lr=1e-3, impl=impl),
    "sgd8bit": lambda params, impl: SGD8bit(params, lr=1e-3, momentum=0.9, impl=impl),
}


def allocated_bytes(make, impl: str) -> int:
    generator = torch.Generator().manual_seed(0)
    # Matrices and vectors, one above the 8-bit optimizers' min_8bit_size (4,096).
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in [(64, 128), (5000,), (3,), (10, 9)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer = make(params, impl)
    for _ in range(3):
        optimizer.step()
    storages = {id(t): t.untyped_storage().data_ptr() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        for _ in range(5):
            optimizer.step()
    after = {id(t): t.untyped_storage().data_ptr() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    assert after == storages  # state buffers updated in place
    return sum(event.cpu_memory_usage for event in profile.events() if event.cpu_memory_usage > 0)


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_steps_allocate_no_tensors(hardware_sqrt, name):
    assert allocated_bytes(CASES[name], "plain") > 0  # the profiler sees the plain path's temporaries
    assert allocated_bytes(CASES[name], "fast") == 0
