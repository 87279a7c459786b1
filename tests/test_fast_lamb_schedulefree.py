"""The compiled CPU steps of schedule-free AdamW and SGD (element-wise, bit-equal to
the ``schedulefree`` package and to the plain path with torch's square root) and of
LAMB (two passes, per-tensor norms summed in float64: within float rounding of the
plain path)."""

from __future__ import annotations


import pytest
import torch

import ravine
import ravine.kernels.cpu
import ravine.kernels.fast

schedulefree = pytest.importorskip("schedulefree")

# A 0-d tensor, a 1-element and an empty one, odd sizes, one cut into several work
# items and inner chunks, and a non-contiguous one (which takes the plain path).
SHAPES = [(), (1,), (0,), (7,), (3, 4), (3001,), (5, 6)]
STEPS = 25


@pytest.fixture(autouse=True)
def small_items(monkeypatch):
    """Work items of 1000 elements, so one tensor spans several, and threads used
    however small the call."""
    monkeypatch.setattr(ravine.kernels.fast, "ITEM_ELEMENTS", 1000)
    monkeypatch.setattr(ravine.kernels.fast, "PARALLEL_ELEMENTS", 0)


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in SHAPES]
    params[-1] = torch.randn(6, 5, generator=generator, dtype=torch.float64).to(dtype).t()
    return params


def gradients(params, step):
    """Gradients for one step; the 7-element tensor has none every third step."""
    generator = torch.Generator().manual_seed(1000 + step)
    grads = []
    for index, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        grads.append(None if index == 3 and step % 3 == 2 else grad)
    return grads


def run(make_optimizer, base, steps=STEPS, start=0, lr=None, params=None, optimizer=None):
    """Train fresh copies of ``base`` (or go on with ``params``/``optimizer``); the
    gradients are cloned, since the reference package overwrites them."""
    if params is None:
        params = [p.clone().requires_grad_() for p in base]
        optimizer = make_optimizer(params)
    for step in range(start, start + steps):
        for p, grad in zip(params, gradients(params, step)):
            p.grad = None if grad is None else grad.clone()
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr(step)
        optimizer.step()
    return params, optimizer


def varying_lr(base_lr):
    return lambda step: base_lr * (1 + 0.5 * ((step * 7) % 5) / 5)


def assert_params_equal(ours, theirs):
    for a, b in zip(ours, theirs):
        assert torch.equal(a.detach(), b.detach())


def assert_states_equal(ours, theirs, keys):
    for a, b in zip(ours[0], theirs[0]):
        state_a, state_b = ours[1].state.get(a, {}), theirs[1].state.get(b, {})
        for key in keys:
            assert (key in state_a) == (key in state_b)
            if key in state_a:
                assert torch.equal(state_a[key], state_b[key]), key


# -- schedule-free ----------------------------------------------------------------------

SF_ADAMW_OPTIONS = [
    {},
    {"lr": 0.01, "warmup_steps": 7},
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "r": 0.5, "weight_lr_power": 1.0},
    {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "warmup_steps": 4, "weight_decay": 0.05, "r": 1.0,
     "weight_lr_power": 0.0},
    {"lr": 0.01, "betas": (0.3, 0.5)},  # the averaging weight: lerp's other form
]
SF_SGD_OPTIONS = [
    {},
    {"lr": 0.1, "momentum": 0.5},
    {"lr": 0.1, "warmup_steps": 5},
    {"lr": 0.05, "weight_decay": 0.1, "momentum": 0.95},
    {"lr": 0.05, "r": 2.0, "weight_lr_power": 0.5, "warmup_steps": 3},
]
SF_CASES = [
    (ravine.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree, options) for options in SF_ADAMW_OPTIONS
] + [(ravine.ScheduleFreeSGD, schedulefree.SGDScheduleFree, options) for options in SF_SGD_OPTIONS]
SF_STATE = ("z", "exp_avg_sq")


def sf_id(value):
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "defaults"
    return str(value)


def reference(cls, **options):
    def make(params):
        optimizer = cls(params, **options)
        optimizer.train()
        return optimizer

    return make


def uses_fast_path(optimizer) -> bool:
    plans = optimizer.__dict__.get("_plans", {}).values()
    return any(part.steps_taken for plan in plans for part in plan.fast_parts)


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=lambda n: f"threads={n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ours,theirs,options", SF_CASES, ids=sf_id)
def test_schedule_free_fast_bit_equal_to_the_package_and_plain(exact_sqrt, ours, theirs, options, dtype, threads):
    base = make_params(dtype)
    lr = varying_lr(options.get("lr", 0.01))
    fast = run(lambda ps: ours(ps, **options, impl="fast"), base, lr=lr)
    plain = run(lambda ps: ours(ps, **options, impl="plain"), base, lr=lr)
    package = run(reference(theirs, foreach=False, **options), base, lr=lr)
    assert uses_fast_path(fast[1])
    assert_params_equal(fast[0], plain[0])
    assert_params_equal(fast[0], package[0])
    assert_states_equal(fast, plain, SF_STATE)
    assert_states_equal(fast, package, SF_STATE)
    for group, other in zip(fast[1].param_groups, package[1].param_groups):
        for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
            assert group[key] == other[key]
    # The evaluation point and back.
    for optimizer in (fast[1], package[1]):
        optimizer.eval()
    assert_params_equal(fast[0], package[0])
    for optimizer in (fast[1], package[1]):
        optimizer.train()
    assert_params_equal(fast[0], package[0])
    # Steps after the switch still match.
    run(None, None, steps=3, start=STEPS, params=fast[0], optimizer=fast[1])
    run(None, None, steps=3, start=STEPS, params=package[0], optimizer=package[1])
    assert_params_equal(fast[0], package[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ours,theirs,options", SF_CASES, ids=sf_id)
def test_schedule_free_fast_with_hardware_sqrt_matches_plain(hardware_sqrt, ours, theirs, options, dtype):
    base = make_params(dtype)
    fast = run(lambda ps: ours(ps, **options), base)  # the default: "auto"
    plain = run(lambda ps: ours(ps, **options, impl="plain"), base)
    assert uses_fast_path(fast[1])
    if ours is ravine.ScheduleFreeSGD:  # no square root: bit-equal in either mode
        assert_params_equal(fast[0], plain[0])
        return
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(fast[0], plain[0]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol * 0.1)
    for a, b in zip(fast[0], plain[0]):
        for key in SF_STATE:
            if key in fast[1].state.get(a, {}):
                torch.testing.assert_close(fast[1].state[a][key], plain[1].state[b][key], rtol=rtol, atol=rtol * 0.1)


@pytest.mark.parametrize("cls", [ravine.ScheduleFreeAdamW, ravine.ScheduleFreeSGD], ids=sf_id)
@pytest.mark.parametrize("first,second", [("fast", "plain"), ("plain", "fast")])
def test_schedule_free_state_dict_round_trip_between_fast_and_plain(exact_sqrt, cls, first, second):
    base = make_params(torch.float32)
    options = {"lr": 0.01, "warmup_steps": 5, "weight_decay": 0.01}
    straight = run(lambda ps: cls(ps, **options, impl=first), base, steps=12)
    params, optimizer = run(lambda ps: cls(ps, **options, impl=first), base, steps=6)
    optimizer.eval()  # saved at the evaluation point, as a checkpoint would be
    saved_params = [p.detach().clone() for p in params]
    saved = optimizer.state_dict()
    resumed_params = [p.clone().requires_grad_() for p in saved_params]
    resumed = cls(resumed_params, **options, impl=second)
    resumed.load_state_dict(saved)
    resumed.train()
    run(None, None, steps=6, start=6, params=resumed_params, optimizer=resumed)
    assert uses_fast_path(resumed) == (second == "fast")
    for a, b in zip(resumed_params, straight[0]):
        # eval() then train() moves y by two lerps, so equal within rounding only.
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    # Without the switch the round trip is exact.
    params, optimizer = run(lambda ps: cls(ps, **options, impl=first), base, steps=6)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = cls(resumed_params, **options, impl=second)
    resumed.load_state_dict(optimizer.state_dict())
    run(None, None, steps=6, start=6, params=resumed_params, optimizer=resumed)
    assert_params_equal(resumed_params, straight[0])


def test_schedule_free_step_in_eval_mode_raises_and_changes_nothing(kernel):
    def make(params):
        return ravine.ScheduleFreeAdamW(params, lr=0.01, impl="fast")

    params, optimizer = run(make, make_params(torch.float32), 3)
    optimizer.eval()
    before = [p.detach().clone() for p in params]
    state = {key: value.clone() for key, value in optimizer.state[params[5]].items()}
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="eval mode"):
        optimizer.step()
    assert_params_equal(params, before)
    assert all(torch.equal(value, optimizer.state[params[5]][key]) for key, value in state.items())
    assert optimizer.param_groups[0]["k"] == 3


@pytest.mark.parametrize("cls", [ravine.ScheduleFreeAdamW, ravine.ScheduleFreeSGD], ids=sf_id)
def test_schedule_free_ineligible_params_take_the_plain_path_in_the_same_step(exact_sqrt, cls):
    generator = torch.Generator().manual_seed(3)
    base = [
        torch.randn(50, generator=generator),
        torch.randn(40, generator=generator).to(torch.bfloat16),
        torch.randn(8, 4, generator=generator).t(),
        torch.randn(30, generator=generator, dtype=torch.float64),
        torch.randn(6, dtype=torch.complex64, generator=generator),
    ]
    fast = run(lambda ps: cls(ps, lr=0.05, weight_decay=0.01, impl="fast"), base, steps=8)
    plain = run(lambda ps: cls(ps, lr=0.05, weight_decay=0.01, impl="plain"), base, steps=8)
    assert_params_equal(fast[0], plain[0])
    plan = next(iter(fast[1]._plans.values()))
    assert {part.dtype for part in plan.fast_parts} == {torch.float32, torch.float64}


@pytest.mark.parametrize("cls", [ravine.ScheduleFreeAdamW, ravine.ScheduleFreeSGD, ravine.Lamb], ids=sf_id)
def test_impl_fast_raises_when_unavailable_and_auto_falls_back(monkeypatch, cls):
    monkeypatch.setattr(ravine.kernels.cpu, "_library", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_failure", None)
    monkeypatch.setenv("RAVINE_DISABLE_KERNELS", "1")
    p = torch.nn.Parameter(torch.randn(30))
    with pytest.raises(RuntimeError, match="impl='fast'.*RAVINE_DISABLE_KERNELS"):
        cls([p], impl="fast")
    twin = torch.nn.Parameter(p.detach().clone())
    optimizer, plain = cls([p]), cls([twin], impl="plain")
    for step in range(3):
        p.grad = torch.full((30,), float(step + 1))
        twin.grad = p.grad.clone()
        optimizer.step()
        plain.step()
    assert torch.equal(p.detach(), twin.detach())
    assert not optimizer.__dict__.get("_lamb_parts")


def test_schedule_free_impl_is_checked_and_kept_out_of_the_state_dict():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="impl"):
        ravine.ScheduleFreeSGD([p], impl="turbo")
    optimizer = ravine.ScheduleFreeAdamW([p], impl="plain")
    assert "impl" not in optimizer.state_dict()["param_groups"][0]
    theirs = schedulefree.AdamWScheduleFree([p]).state_dict()["param_groups"][0]
    assert set(optimizer.state_dict()["param_groups"][0]) == set(theirs)


# -- LAMB ---------------------------------------------------------------------------------

LAMB_OPTIONS = [
    {},
    {"weight_decay": 0.01},
    {"bias_correction": False},
    {"maximize": True, "weight_decay": 0.1},
    {"betas": (0.5, 0.9), "eps": 1e-3},  # the moving average: lerp's other form
    {"betas": (0.0, 0.0), "eps": 0.0, "bias_correction": False, "weight_decay": 0.05},
    {"lr": torch.tensor(0.02), "weight_decay": 0.01},
]


def lamb_id(value):
    if isinstance(value, dict):
        return ",".join(f"{k}={v.item() if isinstance(v, torch.Tensor) else v}" for k, v in value.items()) or "defaults"
    return str(value)


def lamb_params(dtype, seed=0):
    params = make_params(dtype, seed)
    params.append(torch.zeros(9, dtype=dtype))  # ||theta|| = 0 at first: ratio 1
    return params


def uses_lamb_kernel(optimizer) -> bool:
    return any(parts for _, parts, _ in optimizer.__dict__.get("_lamb_parts", {}).values())


def assert_lamb_close(ours, theirs, dtype):
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(ours[0], theirs[0]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol * 0.1)
    for a, b in zip(ours[0], theirs[0]):
        state_a, state_b = ours[1].state.get(a, {}), theirs[1].state.get(b, {})
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            torch.testing.assert_close(state_a[key], state_b[key], rtol=rtol, atol=rtol * 0.1)


@pytest.mark.parametrize("threads", [1, 2], indirect=True, ids=lambda n: f"threads={n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=lamb_id)
def test_lamb_fast_matches_plain(hardware_sqrt, options, dtype, threads):
    base = lamb_params(dtype)
    lr = None if isinstance(options.get("lr"), torch.Tensor) else varying_lr(0.01)  # a tensor lr stays
    fast = run(lambda ps: ravine.Lamb(ps, **options), base, lr=lr)  # the default: "auto"
    plain = run(lambda ps: ravine.Lamb(ps, **options, impl="plain"), base, lr=lr)
    assert uses_lamb_kernel(fast[1])
    assert_lamb_close(fast, plain, dtype)
    # Every tensor with elements moved.
    assert all(not torch.equal(p, q) for p, q in zip(fast[0], base) if p.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lamb_results_do_not_depend_on_the_number_of_threads(hardware_sqrt, dtype):
    results = []
    for count in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            results.append(run(lambda ps: ravine.Lamb(ps, lr=0.01, weight_decay=0.01), lamb_params(dtype), steps=10))
        finally:
            torch.set_num_threads(previous)
    assert_params_equal(results[0][0], results[1][0])


def test_lamb_trust_ratio_is_one_where_a_norm_is_zero(exact_sqrt):
    """A zero tensor moves by -lr u (ratio 1), exactly as the plain path (with torch's
    square root, u is the plain path's bit for bit); a zero update (zero gradient, no
    decay) leaves the tensor as it was."""
    zero = [torch.zeros(2000), torch.zeros(5)]
    fast, plain = ([p.clone().requires_grad_() for p in zero] for _ in range(2))
    optimizers = ravine.Lamb(fast, lr=0.1, impl="fast"), ravine.Lamb(plain, lr=0.1, impl="plain")
    for params, optimizer in zip((fast, plain), optimizers):
        for index, p in enumerate(params):
            p.grad = torch.linspace(-1, 1, p.numel()) * (index + 1)
        optimizer.step()
    assert_params_equal(fast, plain)
    _, parts, _ = next(iter(optimizers[0]._lamb_parts.values()))
    assert parts[0].norms[:, 2].tolist() == [1.0, 1.0]
    still = torch.nn.Parameter(torch.randn(100))
    before = still.detach().clone()
    optimizer = ravine.Lamb([still], lr=0.1, impl="fast")
    still.grad = torch.zeros(100)
    optimizer.step()
    assert torch.equal(still.detach(), before)


def test_lamb_trust_ratio_is_the_plain_paths(hardware_sqrt):
    from ravine.optim.lamb import trust_ratios

    generator = torch.Generator().manual_seed(2)
    base = [torch.randn(size, generator=generator, dtype=torch.float64) for size in (3001, 7)]
    params = [p.clone().requires_grad_() for p in base]
    optimizer = ravine.Lamb(params, lr=0.1, weight_decay=0.1)
    grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad
    optimizer.step()
    # The first step's u from zero moments, in float64:
    # m / (sqrt(v) / sqrt(1 - beta2) + eps) / (1 - beta1) + wd theta.
    updates = []
    for p, grad in zip(base, grads):
        m, v = 0.1 * grad, 0.001 * grad * grad
        updates.append(m / (v.sqrt() / (0.001**0.5) + 1e-6) / 0.1 + 0.1 * p)
    _, parts, _ = next(iter(optimizer._lamb_parts.values()))
    expected = trust_ratios(base, updates)
    assert parts[0].norms[:, 2].tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lamb_ineligible_params_take_the_plain_path_in_the_same_step(hardware_sqrt, dtype):
    generator = torch.Generator().manual_seed(4)
    base = [
        torch.randn(50, generator=generator, dtype=dtype),
        torch.randn(40, generator=generator).to(torch.bfloat16),
        torch.randn(8, 4, generator=generator).t(),
        torch.randn(30, generator=generator, dtype=torch.float64 if dtype == torch.float32 else torch.float32),
        torch.randn(6, dtype=torch.complex64, generator=generator),
    ]
    fast = run(lambda ps: ravine.Lamb(ps, lr=0.05, weight_decay=0.01), base, steps=8)
    plain = run(lambda ps: ravine.Lamb(ps, lr=0.05, weight_decay=0.01, impl="plain"), base, steps=8)
    # bfloat16 and the non-contiguous tensor take the plain path: bit-equal.
    assert torch.equal(fast[0][1], plain[0][1]) and torch.equal(fast[0][2], plain[0][2])
    for a, b in zip(fast[0], plain[0]):
        rtol = 1e-2 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol * 0.1)
    _, parts, rest = next(iter(fast[1]._lamb_parts.values()))
    assert {part.dtype for part in parts} == {torch.float32, torch.float64}
    assert rest == [1, 2]


def test_lamb_non_contiguous_gradient_takes_the_plain_path_for_that_step(hardware_sqrt):
    results = []
    for impl in ("fast", "plain"):
        p = torch.nn.Parameter(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)))
        optimizer = ravine.Lamb([p], lr=0.1, impl=impl)
        for step in range(4):
            grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(step))
            p.grad = grad.t() if step == 3 else grad.t().contiguous()
            optimizer.step()
            if step == 2:
                before = [p.detach().clone(), *(t.clone() for t in optimizer.state[p].values())]
        results.append((p.detach(), before, optimizer))
    # The last step starts from close states and takes the same (plain) path.
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lamb_in_exact_mode_auto_takes_the_plain_path_and_fast_the_kernel(exact_sqrt):
    base = lamb_params(torch.float32)
    auto = run(lambda ps: ravine.Lamb(ps, lr=0.01, weight_decay=0.01), base, steps=5)
    plain = run(lambda ps: ravine.Lamb(ps, lr=0.01, weight_decay=0.01, impl="plain"), base, steps=5)
    fast = run(lambda ps: ravine.Lamb(ps, lr=0.01, weight_decay=0.01, impl="fast"), base, steps=5)
    assert not uses_lamb_kernel(auto[1])
    assert_params_equal(auto[0], plain[0])
    assert uses_lamb_kernel(fast[1])
    assert_lamb_close(fast, plain, torch.float32)


def test_lamb_tensor_eps_takes_the_plain_path(hardware_sqrt):
    base = lamb_params(torch.float64)
    eps = torch.tensor(1e-6, dtype=torch.float64)
    fast = run(lambda ps: ravine.Lamb(ps, lr=0.01, eps=eps), base, steps=3)
    plain = run(lambda ps: ravine.Lamb(ps, lr=0.01, eps=eps, impl="plain"), base, steps=3)
    assert_params_equal(fast[0], plain[0])


def test_lamb_nonfinite_gradient_raises_and_changes_nothing(hardware_sqrt):
    params, optimizer = run(lambda ps: ravine.Lamb(ps, lr=0.01, impl="fast"), lamb_params(torch.float32), steps=3)
    optimizer.nonfinite = "raise"
    before = [p.detach().clone() for p in params]
    states = [{key: value.clone() for key, value in optimizer.state[p].items()} for p in params if p in optimizer.state]
    for p in params:
        p.grad = torch.ones_like(p)
    params[5].grad[17] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.step()
    assert_params_equal(params, before)
    after = [optimizer.state[p] for p in params if p in optimizer.state]
    for saved, state in zip(states, after):
        assert all(torch.equal(value, state[key]) for key, value in saved.items())


@pytest.mark.parametrize("first,second", [("fast", "plain"), ("plain", "fast")])
def test_lamb_state_dict_round_trip_between_fast_and_plain(hardware_sqrt, first, second):
    base = lamb_params(torch.float64)
    options = {"lr": 0.01, "weight_decay": 0.01}
    straight = run(lambda ps: ravine.Lamb(ps, **options, impl=first), base, steps=12)
    params, optimizer = run(lambda ps: ravine.Lamb(ps, **options, impl=first), base, steps=6)
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = ravine.Lamb(resumed_params, **options, impl=second)
    resumed.load_state_dict(optimizer.state_dict())
    run(None, None, steps=6, start=6, params=resumed_params, optimizer=resumed)
    assert uses_lamb_kernel(resumed) == (second == "fast")
    assert resumed.state_dict()["state"][5]["step"].item() == 12
    for a, b in zip(resumed_params, straight[0]):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-13)


def test_lamb_learning_rate_changing_every_step_rebuilds_nothing(hardware_sqrt, monkeypatch):
    import ravine.optim.lamb as lamb

    built = []
    original = lamb._Part.__init__
    monkeypatch.setattr(lamb._Part, "__init__", lambda self, *a: built.append(1) or original(self, *a))
    params = [torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    optimizer = ravine.Lamb(params, lr=0.1)
    for step in range(5):
        optimizer.param_groups[0]["lr"] = 0.1 / (step + 1)
        for p in params:
            p.grad = torch.randn_like(p)  # new gradient tensors every step
        optimizer.step()
    assert len(built) == 2  # one part per dtype, built once
