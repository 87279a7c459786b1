"""Adafactor's compiled CPU step (ravine/kernels/adafactor.cpp) against
torch.optim.Adafactor and ravine's plain path.

The compiled step sums norms in double and in another order than torch, so it is
equal within rounding, not bit-equal: these tests switch exact mode off and compare
with a tolerance after many steps (float32: rtol 1e-5, atol 1e-6; float64: rtol 1e-12,
atol 1e-13; parameters are of order 1), with the learning rate changing every step
and some gradients missing in some steps (per-parameter step counts differ).
"""

from __future__ import annotations

import copy

import pytest
import torch

import ravine
import ravine.kernels.adafactor
import ravine.kernels.cpu
import ravine.optim.base

STEPS = 24
# Scalars, vectors, matrices (1 x N, N x 1, odd sizes), batches of matrices, empty.
SHAPES = [(), (1,), (7,), (1, 1), (5, 9), (1, 13), (13, 1), (3, 4, 5), (2, 3, 4, 5), (0,), (0, 3), (37, 129)]
OPTIONS = [
    {},
    {"weight_decay": 0.1, "maximize": True},
    {"eps": (1e-3, 1e-2), "d": 1.5, "beta2_decay": -0.5},
    {"lr": torch.tensor(0.02)},  # float32: alpha, alpha / clip and 1 - lr wd in float32, as torch
    {"lr": torch.tensor(0.05), "weight_decay": 0.1},
]
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 1e-13}}


def make_base(shapes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


def set_grads(params, step, skip=True):
    generator = torch.Generator().manual_seed(1000 + step)
    for index, p in enumerate(params):
        if skip and index == 2 and step % 3 == 2:
            p.grad = None  # a skipped parameter: step counts differ between parameters
        else:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)


def lr_at(step):
    return 0.01 * (1 + 0.5 * (step % 4))  # a new learning rate every step


def train(make, base, steps=STEPS, start=0, params=None, optimizer=None, grad_hook=None):
    if params is None:
        params = [p.clone().requires_grad_() for p in base]
        optimizer = make(params)
    for step in range(start, start + steps):
        set_grads(params, step)
        if grad_hook is not None:
            grad_hook(params, step)
        for group in optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = lr_at(step)
        optimizer.step()
    return params, optimizer


def compiled_steps(optimizer) -> int:
    return sum(group.steps_taken for group in optimizer.__dict__.get("_compiled", {}).values())


def assert_close(ours, theirs, dtype, skip_empty=False):
    params_a, opt_a = ours
    params_b, opt_b = theirs
    tolerance = TOLERANCE[dtype]
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), **tolerance)
    for a, b in zip(params_a, params_b):
        if skip_empty and a.numel() == 0:
            continue
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            torch.testing.assert_close(state_a[key].double(), state_b[key].double(), **tolerance)


def options_for(options):
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in options.items()}


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_compiled_step_matches_torch_and_plain(hardware_sqrt, threads, dtype, options):
    base = make_base(SHAPES, dtype)
    fast = train(lambda ps: ravine.Adafactor(ps, **options_for(options), impl="fast"), base)
    auto = train(lambda ps: ravine.Adafactor(ps, **options_for(options)), base)
    plain = train(lambda ps: ravine.Adafactor(ps, **options_for(options), impl="plain"), base)
    # torch.optim.Adafactor divides by zero on empty parameters: give it the others.
    nonempty = [p.numel() > 0 for p in base]
    reference_params = [p.clone().requires_grad_() for p in base]
    reference = torch.optim.Adafactor(
        [p for p, keep in zip(reference_params, nonempty) if keep], **options_for(options), foreach=False
    )
    reference = train(None, base, params=reference_params, optimizer=reference)
    assert compiled_steps(fast[1]) == STEPS and compiled_steps(auto[1]) == STEPS
    assert compiled_steps(plain[1]) == 0
    assert_close(fast, reference, dtype, skip_empty=True)
    assert_close(fast, plain, dtype)
    assert_close(auto, fast, dtype)
    # Empty parameters are left alone, their steps counted as the plain path counts them.
    for p, q, b in zip(fast[0], plain[0], base):
        if b.numel() == 0:
            assert fast[1].state[p]["step"] == plain[1].state[q]["step"]


# Large tensors, cut into row ranges shared by the threads (column sums through
# per-thread partial sums): a matrix, a batch of matrices, a vector; and a 1 x N matrix
# that goes whole to one thread. Then many tensors, each whole to one thread.
LARGE = [(300, 401), (2, 300, 250), (100_003,), (1, 70_001)]
MANY = [(17, 61)] * 20 + [(3, 11, 29)] * 10 + [(1001,)] * 10 + [(5,)] * 5


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", [LARGE, MANY], ids=["large", "many"])
def test_large_calls_split_over_threads_match_torch(hardware_sqrt, threads, dtype, shapes):
    base = make_base(shapes, dtype)
    fast = train(lambda ps: ravine.Adafactor(ps, weight_decay=0.01, impl="fast"), base, steps=6)
    reference = train(lambda ps: torch.optim.Adafactor(ps, weight_decay=0.01, foreach=False), base, steps=6)
    assert compiled_steps(fast[1]) == 6
    assert_close(fast, reference, dtype)


def test_ineligible_parameters_take_the_plain_path_in_the_same_step(hardware_sqrt):
    generator = torch.Generator().manual_seed(5)
    base = [
        torch.randn(6, 5, generator=generator),
        torch.randn(4, 7, generator=generator).to(torch.bfloat16),
        torch.randn(8, 4, generator=generator).t(),  # non-contiguous
        torch.randn(9, generator=generator, dtype=torch.float64),
        torch.randn(3, 4, generator=generator, dtype=torch.float64),
        torch.randn(11, generator=generator).to(torch.bfloat16),
    ]
    fast = train(lambda ps: ravine.Adafactor(ps, impl="fast"), base)
    plain = train(lambda ps: ravine.Adafactor(ps, impl="plain"), base)
    assert compiled_steps(fast[1]) == STEPS
    compiled = next(iter(fast[1]._compiled.values()))
    assert compiled.rest == [1, 2, 5]
    assert {part.dtype for part in compiled.parts} == {torch.float32, torch.float64}
    for index, (a, b) in enumerate(zip(fast[0], plain[0])):
        if index in compiled.rest:  # the plain path's own operations: bit-equal
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.double(), b.double(), **TOLERANCE[a.dtype])
    # eps1=None is each parameter's own dtype's epsilon, in both paths.
    for a, b in zip(fast[0], plain[0]):
        for key in fast[1].state[a]:
            torch.testing.assert_close(fast[1].state[a][key].double(), plain[1].state[b][key].double(), rtol=1e-5, atol=1e-6)


def test_non_contiguous_gradient_takes_the_plain_path_for_that_step(hardware_sqrt):
    base = make_base([(6, 4), (5,), (3, 3)], torch.float32)

    def transpose_some(params, step):
        if step == 3:
            params[0].grad = params[0].grad.t().contiguous().t()  # same values, not contiguous

    fast = train(lambda ps: ravine.Adafactor(ps, impl="fast"), base, grad_hook=transpose_some)
    reference = train(lambda ps: torch.optim.Adafactor(ps, foreach=False), base, grad_hook=transpose_some)
    assert compiled_steps(fast[1]) == STEPS
    assert_close(fast, reference, torch.float32)


@pytest.mark.parametrize("first, second", [("fast", "plain"), ("plain", "fast")])
def test_state_dict_round_trip_between_fast_and_plain(hardware_sqrt, first, second):
    base = make_base(SHAPES[:9] + [(37, 129)], torch.float32)
    params, optimizer = train(lambda ps: ravine.Adafactor(ps, impl=first), base, steps=10)
    saved = optimizer.state_dict()
    assert "impl" not in saved["param_groups"][0]
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = ravine.Adafactor(resumed_params, impl=second)
    resumed.load_state_dict(saved)
    resumed = train(None, base, steps=10, start=10, params=resumed_params, optimizer=resumed)
    resumed_optimizer = resumed[1]
    # The same run with torch.optim throughout.
    reference = train(lambda ps: torch.optim.Adafactor(ps, foreach=False), base, steps=20)
    assert_close(resumed, reference, torch.float32)
    assert compiled_steps(resumed_optimizer) == (10 if second == "fast" else 0)


def test_loading_a_state_dict_into_a_running_compiled_step(hardware_sqrt):
    base = make_base([(5, 9), (7,)], torch.float32)
    params, optimizer = train(lambda ps: ravine.Adafactor(ps, impl="fast"), base, steps=5)
    saved = copy.deepcopy(optimizer.state_dict())  # state_dict() holds the live tensors
    saved_params = [p.detach().clone() for p in params]
    train(None, base, steps=5, start=5, params=params, optimizer=optimizer)
    # Back to step 5: new state tensors, which the compiled step must pick up.
    with torch.no_grad():
        for p, q in zip(params, saved_params):
            p.copy_(q)
    optimizer.load_state_dict(saved)
    again = train(None, base, steps=5, start=5, params=params, optimizer=optimizer)
    reference = train(lambda ps: torch.optim.Adafactor(ps, foreach=False), base, steps=10)
    assert_close(again, reference, torch.float32)


def test_exact_mode_keeps_auto_on_the_bit_equal_plain_path(kernel):
    previous = ravine.kernels.cpu._exact_sqrt
    ravine.kernels.cpu.set_exact_sqrt(True)
    try:
        base = make_base([(5, 9), (7,), (2, 3, 4)], torch.float32)
        auto = train(lambda ps: ravine.Adafactor(ps), base)
        fast = train(lambda ps: ravine.Adafactor(ps, impl="fast"), base)
        reference = train(lambda ps: torch.optim.Adafactor(ps, foreach=False), base)
    finally:
        ravine.kernels.cpu.set_exact_sqrt(previous)
    assert compiled_steps(auto[1]) == 0
    for a, b in zip(auto[0], reference[0]):
        assert torch.equal(a, b)
    assert compiled_steps(fast[1]) == STEPS  # impl="fast" asks for the compiled step
    assert_close(fast, reference, torch.float32)


def test_impl_fast_raises_when_unavailable_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(ravine.kernels.cpu, "_library", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_failure", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_exact_sqrt", False)
    monkeypatch.setenv("RAVINE_DISABLE_KERNELS", "1")
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="impl='fast'.*RAVINE_DISABLE_KERNELS"):
        ravine.Adafactor([p], impl="fast")
    with pytest.raises(ValueError, match="impl"):
        ravine.Adafactor([p], impl="turbo")
    base = [p.detach().clone()]
    auto = train(lambda ps: ravine.Adafactor(ps), base, steps=3)
    reference = train(lambda ps: torch.optim.Adafactor(ps, foreach=False), base, steps=3)
    assert compiled_steps(auto[1]) == 0
    assert torch.equal(auto[0][0], reference[0][0])


def test_a_raising_step_changes_nothing(hardware_sqrt):
    base = make_base([(5, 9), (7,)], torch.float32)
    params, optimizer = train(lambda ps: ravine.Adafactor(ps, impl="fast"), base, steps=3)
    optimizer.nonfinite = "raise"
    before = [p.detach().clone() for p in params]
    state_before = {k: {n: t.clone() for n, t in v.items()} for k, v in optimizer.state_dict()["state"].items()}
    set_grads(params, 3)
    params[0].grad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.step()
    optimizer.param_groups[0]["d"] = 0.5  # out of range: refused before anything is written
    set_grads(params, 4)
    with pytest.raises(ValueError, match="d must be"):
        optimizer.step()
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
    for k, v in optimizer.state_dict()["state"].items():
        for n, t in v.items():
            assert torch.equal(t, state_before[k][n])


def test_several_groups_keep_their_own_tables(hardware_sqrt):
    base = make_base([(5, 9), (7,), (3, 4, 5), (6,)], torch.float32)

    def make(impl):
        def build(ps):
            groups = [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.1, "maximize": True}]
            return ravine.Adafactor(groups, impl=impl) if impl else torch.optim.Adafactor(groups, foreach=False)
        return build

    fast = train(make("fast"), base)
    reference = train(make(None), base)
    assert len({key[0] for key in fast[1]._compiled}) == 2
    assert_close(fast, reference, torch.float32)


def test_replaced_state_tensors_rebuild_the_tables(hardware_sqrt):
    base = make_base([(5, 9), (7,)], torch.float32)
    params, optimizer = train(lambda ps: ravine.Adafactor(ps, impl="fast"), base, steps=4)
    reference = train(lambda ps: torch.optim.Adafactor(ps, foreach=False), base, steps=4)
    for ours, theirs in ((optimizer, params), (reference[1], reference[0])):
        for p in theirs:
            state = ours.state[p]
            for name in ("row_var", "col_var", "variance"):
                if name in state:
                    state[name] = state[name].clone()  # the old tensors are freed
    import gc

    gc.collect()
    ours = train(None, base, steps=4, start=4, params=params, optimizer=optimizer)
    theirs = train(None, base, steps=4, start=4, params=reference[0], optimizer=reference[1])
    assert_close(ours, theirs, torch.float32)
