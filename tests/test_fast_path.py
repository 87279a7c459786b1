"""The compiled CPU step (impl="fast") against torch.optim's for-loop path and
ravine's plain path, table-driven, plus its contract: no rebuild when hyperparameters
change, clean fallback for what it does not take, a clear error when it is
unavailable, and no new tensors in steady-state steps."""

from __future__ import annotations

import warnings

import pytest
import torch

import ravine.kernels.cpu
import ravine.kernels.fast
import ravine.optim.base
from optimizer_table import CASES, all_option_sets, clone_options, option_id

FAST_CASES = [case for case in CASES if ravine.kernels.fast.spec_for(case.ravine_cls.__new__(case.ravine_cls)) is not None]
FAST_OPTION_SETS = [(case, options) for case, options in all_option_sets() if case in FAST_CASES]
# A 0-d tensor, small ones, one cut into several work items and inner chunks, and
# a non-contiguous one (which takes the plain path in the same step).
SHAPES = [(), (7,), (3, 4), (3001,), (5, 6)]
STEPS = 25


@pytest.fixture(autouse=True)
def small_items(monkeypatch):
    """Work items of 1000 elements, so one tensor spans several."""
    monkeypatch.setattr(ravine.kernels.fast, "ITEM_ELEMENTS", 1000)


def make_params(dtype, seed=0, contiguous_only=False):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES]
    if not contiguous_only:
        params[-1] = torch.randn(6, 5, generator=generator, dtype=torch.float64).to(dtype).t()
    return params


def set_grads(params, step):
    generator = torch.Generator().manual_seed(1000 + step)
    for index, p in enumerate(params):
        if index == 1 and step % 3 == 2:
            p.grad = None  # skipped steps: per-parameter step counts differ
        else:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)


def run(make_optimizer, base, steps=STEPS, lr_schedule=None):
    params = [p.clone().requires_grad_() for p in base]
    optimizer = make_optimizer(params)
    for step in range(steps):
        set_grads(params, step)
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(step)
        optimizer.step()
    return params, optimizer


def assert_identical(ours, theirs):
    params_a, opt_a = ours
    params_b, opt_b = theirs
    for a, b in zip(params_a, params_b):
        assert torch.equal(a.detach(), b.detach())
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        assert state_a[index].keys() == state_b[index].keys()
        for key in state_a[index]:
            assert torch.equal(state_a[index][key], state_b[index][key]), (index, key)


def uses_fast_path(optimizer) -> bool:
    plans = optimizer.__dict__.get("_plans", {}).values()
    return any(part.steps_taken for plan in plans for part in plan.fast_parts)


def assert_close(ours, theirs, rtol, atol):
    params_a, opt_a = ours
    params_b, opt_b = theirs
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key in state_a[index]:
            torch.testing.assert_close(state_a[index][key], state_b[index][key], rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "case,options", FAST_OPTION_SETS, ids=[f"{case.name}[{option_id(options)}]" for case, options in FAST_OPTION_SETS]
)
def test_fast_path_with_hardware_sqrt_matches_plain(hardware_sqrt, case, options):
    """The default: square roots correctly rounded, within one unit in the last
    place of torch's, so after 25 steps results agree to 1e-5 relative or 1e-6
    absolute (SGD, which takes none, is bit-equal)."""
    base = make_params(torch.float32)
    fast = run(lambda ps: case.ravine_cls(ps, **clone_options(options), impl="fast"), base)
    plain = run(lambda ps: case.ravine_cls(ps, **clone_options(options), impl="plain"), base)
    tensor_betas = any(isinstance(beta, torch.Tensor) for beta in options.get("betas", ()))
    assert uses_fast_path(fast[1]) == (not tensor_betas)
    if case.name == "sgd":
        assert_identical(fast, plain)
    else:
        assert_close(fast, plain, rtol=1e-5, atol=1e-6)



def test_exact_and_hardware_square_roots_differ_in_the_last_bit(exact_sqrt):
    """The switch is real: torch's square root is not always correctly rounded."""
    base = make_params(torch.float32, contiguous_only=True)
    exact = run(lambda ps: ravine.Adam(ps, lr=0.01, impl="fast"), base)
    ravine.kernels.cpu.set_exact_sqrt(False)
    hardware = run(lambda ps: ravine.Adam(ps, lr=0.01, impl="fast"), base)
    assert not all(torch.equal(a, b) for a, b in zip(exact[0], hardware[0]))
    assert_close(exact, hardware, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,threads", [(torch.float32, 1), (torch.float64, 1), (torch.float32, 2)], ids=str)
@pytest.mark.parametrize(
    "case,options", FAST_OPTION_SETS, ids=[f"{case.name}[{option_id(options)}]" for case, options in FAST_OPTION_SETS]
)
def test_fast_path_bit_equal_to_torch_for_loop_and_plain(exact_sqrt, case, options, dtype, threads):
    base = make_params(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = run(lambda ps: case.ravine_cls(ps, **clone_options(options), impl="fast"), base)
        plain = run(lambda ps: case.ravine_cls(ps, **clone_options(options), impl="plain"), base)
    finally:
        torch.set_num_threads(previous)
    reference = run(lambda ps: case.torch_cls(ps, foreach=False, **clone_options(options)), base)
    # Tensor betas are not taken by the kernel; every other option set is.
    tensor_betas = any(isinstance(beta, torch.Tensor) for beta in options.get("betas", ()))
    assert uses_fast_path(fast[1]) == (not tensor_betas)
    assert not uses_fast_path(plain[1])
    assert_identical(fast, plain)
    assert_identical(fast, reference)


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda case: case.name)
def test_learning_rate_changing_every_step_builds_nothing(kernel, case, monkeypatch):
    compiles = ravine.kernels.cpu.build_info()["compiles"]
    prepared = []
    original = ravine.kernels.fast.prepare
    monkeypatch.setattr(ravine.kernels.fast, "prepare", lambda *a: prepared.append(1) or original(*a))
    base = make_params(torch.float32, contiguous_only=True)
    schedule = lambda step: 0.01 / (1 + step)  # noqa: E731
    options = clone_options(case.options[1])
    fast = run(lambda ps: case.ravine_cls(ps, **options, impl="fast"), base, steps=12, lr_schedule=schedule)
    reference = run(lambda ps: case.torch_cls(ps, foreach=False, **clone_options(options)), base, 12, schedule)
    assert_identical(fast, reference)
    assert ravine.kernels.cpu.build_info()["compiles"] == compiles
    # Plans are rebuilt only when the set of parameters with gradients changes
    # (parameter 1 skips every third step), never for a new learning rate.
    assert len(prepared) <= 2


def test_unsupported_tensors_fall_back_in_the_same_step(kernel):
    generator = torch.Generator().manual_seed(5)
    base = [
        torch.randn(50, generator=generator),
        torch.randn(40, generator=generator).to(torch.bfloat16),
        torch.randn(6, dtype=torch.complex64, generator=generator),
        torch.randn(8, 4, generator=generator).t(),
        torch.randn(30, generator=generator, dtype=torch.float64),
    ]

    def train(make):
        params = [p.clone().requires_grad_() for p in base]
        optimizer = make(params)
        for step in range(10):
            grads = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=grads)
            optimizer.step()
        return params, optimizer

    fast = train(lambda ps: ravine.Adam(ps, lr=0.01, impl="fast"))
    reference = train(lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False))
    assert_identical(fast, reference)
    plan = next(iter(fast[1]._plans.values()))
    assert {part.dtype for part in plan.fast_parts} == {torch.float32, torch.float64}
    assert sum(len(part.indices) for part in plan.fast_parts) == 2


def test_non_contiguous_gradient_takes_the_plain_path_for_that_step(kernel):
    base = [torch.randn(4, 6)]
    results = []
    for make in (lambda ps: ravine.SGD(ps, lr=0.1, momentum=0.9, impl="fast"), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)):
        params = [p.clone().requires_grad_() for p in base]
        optimizer = make(params)
        for step in range(4):
            grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
            params[0].grad = grad.t() if step == 2 else grad.t().contiguous()
            optimizer.step()
        results.append(params[0].detach())
    assert torch.equal(results[0], results[1])


def test_impl_is_checked_and_kept_out_of_the_state_dict(kernel):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="impl"):
        ravine.Adam([p], impl="turbo")
    optimizer = ravine.Adam([p], impl="plain")
    assert optimizer.impl == "plain"
    assert "impl" not in optimizer.state_dict()["param_groups"][0]
    assert set(optimizer.state_dict()["param_groups"][0]) == set(torch.optim.Adam([p]).state_dict()["param_groups"][0])


def test_impl_fast_raises_naming_the_reason_when_unavailable(monkeypatch):
    monkeypatch.setattr(ravine.kernels.cpu, "_library", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_failure", None)
    monkeypatch.setenv("RAVINE_DISABLE_KERNELS", "1")
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="impl='fast'.*RAVINE_DISABLE_KERNELS"):
        ravine.SGD([p], lr=0.1, impl="fast")
    # "auto" falls back to the plain path and still matches torch.
    optimizer = ravine.SGD([p], lr=0.1, momentum=0.9)
    twin = torch.nn.Parameter(p.detach().clone())
    reference = torch.optim.SGD([twin], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(3):
        p.grad = torch.ones(3)
        twin.grad = torch.ones(3)
        optimizer.step()
        reference.step()
    assert not uses_fast_path(optimizer)
    assert torch.equal(p.detach(), twin.detach())


def test_compile_failure_warns_once_and_uses_the_plain_path(monkeypatch):
    monkeypatch.setattr(ravine.kernels.cpu, "_library", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_failure", None)
    monkeypatch.setattr(ravine.optim.base, "_warned", set())
    monkeypatch.setattr(ravine.kernels.cpu, "_library_path", lambda compiler: ravine.kernels.cpu.Path("/nonexistent/x.so"))

    def failing_compile(compiler, target):
        raise ravine.kernels.cpu.KernelUnavailable("compiling cpu_step.cpp failed: simulated")

    monkeypatch.setattr(ravine.kernels.cpu, "_compile", failing_compile)
    p = torch.nn.Parameter(torch.randn(3))
    twin = torch.nn.Parameter(p.detach().clone())
    optimizer = ravine.Adam([p], lr=0.1)
    reference = torch.optim.Adam([twin], lr=0.1, foreach=False)
    p.grad = torch.ones(3)
    twin.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="simulated"):
        optimizer.step()
    reference.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        optimizer.step()
        ravine.Adam([p], lr=0.1).step()
    reference.step()
    assert not uses_fast_path(optimizer)


def allocations(profile) -> list[tuple[str, int]]:
    """The operations that allocated memory, with the bytes."""
    return [(event.key, event.self_cpu_memory_usage) for event in profile.key_averages() if event.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda case: case.name)
def test_steady_state_steps_allocate_no_tensors(kernel, case):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=generator).requires_grad_() for n in (100, 2000, 3)]
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    # Float hyperparameters: a tensor lr costs one 0-d temporary per step (the bias
    # correction computed in tensor arithmetic, as torch.optim does).
    options = {key: value for key, value in case.options[-2].items() if not isinstance(value, torch.Tensor)}
    options.pop("betas", None)
    if case.name == "sgd":
        options["weight_decay"] = 0.1  # so that the plain path makes temporaries to compare with
    optimizer = case.ravine_cls(params, **options, impl="fast")
    for _ in range(3):
        optimizer.step()
    assert uses_fast_path(optimizer)

    def storages():
        return {id(t): t.untyped_storage().data_ptr() for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)}

    before = storages()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        for _ in range(10):
            optimizer.step()
    if case.name == "nadam":
        # NAdam's step bookkeeping (multiplying the 0-d mu products) makes a few
        # scalar temporaries per parameter; no buffer of a parameter's size.
        assert sum(size for _, size in allocations(profile)) <= 10 * 16 * len(params)
    else:
        assert allocations(profile) == []
    assert storages() == before
    # The profiler does see allocations where there are some: the plain path's temporaries.
    plain = case.ravine_cls([p.detach().clone().requires_grad_() for p in params], **options, impl="plain")
    for p, g in zip(plain.param_groups[0]["params"], grads):
        p.grad = g
    plain.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        plain.step()
    assert allocations(profile) != []


# -- optimizers torch.optim does not ship: the compiled step against the plain one ---------

# The option sets of tests/test_optim_beyond_torch.py, with a tensor learning rate.
SIGN_OPTION_SETS = [
    (ravine.Lion, {"lr": 0.01}),
    (ravine.Lion, {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.5}),
    (ravine.Lion, {"lr": torch.tensor(0.01), "weight_decay": 0.1, "maximize": True}),
    (ravine.Signum, {"lr": 0.01}),
    (ravine.Signum, {"lr": 0.01, "momentum": 0.0}),
    (ravine.Signum, {"lr": torch.tensor(0.01), "momentum": 0.5, "weight_decay": 0.2, "maximize": True}),
    (ravine.Signum, {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.2, "maximize": True}),
]


def sign_id(value):
    if isinstance(value, type):
        return value.__name__
    return option_id(value)


@pytest.mark.parametrize("dtype,threads", [(torch.float32, 1), (torch.float64, 1), (torch.float32, 2)], ids=str)
@pytest.mark.parametrize("cls,options", SIGN_OPTION_SETS, ids=sign_id)
def test_lion_and_signum_fast_path_bit_equal_to_plain(kernel, cls, options, dtype, threads):
    """No square root: the compiled step is bit-equal to the plain one, with several
    tensors (one cut into work items, one non-contiguous that stays on the plain
    path) and parameters that skip steps."""
    base = make_params(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = run(lambda ps: cls(ps, **clone_options(options), impl="fast"), base)
        plain = run(lambda ps: cls(ps, **clone_options(options), impl="plain"), base)
    finally:
        torch.set_num_threads(previous)
    assert uses_fast_path(fast[1])
    assert not uses_fast_path(plain[1])
    assert_identical(fast, plain)
    assert not all(torch.equal(a.detach(), b) for a, b in zip(fast[0], base))


@pytest.mark.parametrize("cls,options", SIGN_OPTION_SETS, ids=sign_id)
def test_lion_and_signum_signs_of_zero_match_the_plain_path(kernel, cls, options):
    """sign(0) = sign(-0) = 0, and maximizing signSGD negates the sign (giving -0):
    parameters of +0 and -0 with zero gradients come out with the same bits."""
    values = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0] * 5)
    grads = torch.tensor([0.0, 0.0, -0.0, -0.0, 0.0, 1e-30] * 5)
    results = []
    for impl in ("fast", "plain"):
        p = values.clone().requires_grad_()
        optimizer = cls([p], **clone_options(options), impl=impl)
        for _ in range(3):
            p.grad = grads.clone()
            optimizer.step()
        results.append(p.detach().view(torch.int32) if p.dtype == torch.float32 else p.detach())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("cls", [ravine.Lion, ravine.Signum], ids=lambda cls: cls.__name__)
def test_lion_and_signum_learning_rate_changing_every_step_builds_nothing(kernel, cls, monkeypatch):
    prepared = []
    original = ravine.kernels.fast.prepare
    monkeypatch.setattr(ravine.kernels.fast, "prepare", lambda *a: prepared.append(1) or original(*a))
    base = make_params(torch.float32, contiguous_only=True)
    schedule = lambda step: 0.01 / (1 + step)  # noqa: E731
    fast = run(lambda ps: cls(ps, lr=0.01, weight_decay=0.1, impl="fast"), base, steps=12, lr_schedule=schedule)
    plain = run(lambda ps: cls(ps, lr=0.01, weight_decay=0.1, impl="plain"), base, steps=12, lr_schedule=schedule)
    assert_identical(fast, plain)
    assert len(prepared) <= 2
