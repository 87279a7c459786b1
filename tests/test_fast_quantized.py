"""The compiled step of the 8-bit optimizers (ravine.kernels.quantized) against their
plain path: the same codes, scales, step counts and parameters, bit for bit (square
roots through torch's own function, as conftest.py sets), over many steps with a
learning rate that changes every step; close with the hardware square root."""

from __future__ import annotations


import pytest
import torch

import ravine
import ravine.kernels.quantized as compiled
from ravine.optim.quantized import Adam8bit, AdamW8bit, Lion8bit, SGD8bit, _codebook, _nearest_codes

STEPS = 22
# Below and above min_8bit_size (4096), sizes that are not a multiple of the block
# (256), one spanning several work items (see small_items), a matrix, 1 element, empty.
SHAPES = [(5000,), (300,), (9001,), (4096,), (4095,), (64, 100), (1,), (0,)]

CASES = {
    "adamw": (AdamW8bit, {"lr": 1e-2}),
    "adamw-amsgrad-maximize": (AdamW8bit, {"lr": 1e-2, "amsgrad": True, "maximize": True, "weight_decay": 0.1}),
    "adam-l2": (Adam8bit, {"lr": 1e-2, "weight_decay": 0.05}),
    "adam-amsgrad-betas": (Adam8bit, {"lr": 1e-2, "amsgrad": True, "betas": (0.3, 0.9), "eps": 1e-6}),
    "adam-tensor-lr": (Adam8bit, {"lr": torch.tensor(1e-2), "weight_decay": 0.01, "decoupled_weight_decay": True}),
    "adam-quantize-all": (Adam8bit, {"lr": 1e-2, "min_8bit_size": 0}),
    "sgd-momentum": (SGD8bit, {"lr": 0.05, "momentum": 0.9}),
    "sgd-dampening-wd-maximize": (
        SGD8bit, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01, "maximize": True}
    ),
    "sgd-nesterov": (SGD8bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "sgd-no-momentum": (SGD8bit, {"lr": 0.05}),
}


@pytest.fixture(autouse=True)
def small_items(monkeypatch):
    """Work items of 3 blocks, so one tensor spans several."""
    monkeypatch.setattr(compiled, "ITEM_BLOCKS", 3)


def make_params(shapes=SHAPES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def clone(params):
    return [p.detach().clone() for p in params]


def set_grads(params, step):
    generator = torch.Generator().manual_seed(1000 + step)
    for index, p in enumerate(params):
        if index == 1 and step % 3 == 2:
            p.grad = None  # a skipped parameter: step counts differ between parameters
        else:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype) * (1 + index % 3)


def make(cls, options, params, impl):
    options = dict(options)
    if isinstance(options.get("lr"), torch.Tensor):
        options["lr"] = options["lr"].clone()
    return cls(params, impl=impl, **options)


def run(optimizer, params, steps=STEPS, first=0):
    for step in range(first, first + steps):
        set_grads(params, step)
        for group in optimizer.param_groups:
            lr = 0.01 * (1 + step % 4) / (1 + step)  # a new learning rate every step
            group["lr"] = torch.tensor(lr) if isinstance(group["lr"], torch.Tensor) else lr
        optimizer.step()


def compiled_parts(optimizer):
    """How many parameters the plan of the largest step gave the 8-bit kernel and the
    element-wise one (float32 state); (0, 0) when no plan was made."""
    plans = list(optimizer.__dict__.get("_quantized_plans", {}).values())
    if not plans:
        return 0, 0
    plan = max(plans, key=lambda plan: len(plan.params))
    return (len(plan.part.indices) if plan.part is not None else 0), len(plan.float_indices)


def assert_states_equal(a, b, params_a, params_b):
    for pa, pb in zip(params_a, params_b):
        sa, sb = a.state.get(pa, {}), b.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == sb[key].dtype, key
                torch.testing.assert_close(value, sb[key], rtol=0, atol=0, equal_nan=True, msg=key)
            else:
                assert value == sb[key], key


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_bit_equal_to_plain(exact_sqrt, threads, case):
    cls, options = CASES[case]
    fast_params, plain_params = make_params(), make_params()
    fast = make(cls, options, fast_params, "fast")
    plain = make(cls, options, plain_params, "plain")
    run(fast, fast_params)
    run(plain, plain_params)
    for a, b in zip(fast_params, plain_params):
        assert torch.equal(a, b)
    assert_states_equal(fast, plain, fast_params, plain_params)
    quantized, floats = compiled_parts(fast)
    if case == "sgd-no-momentum":
        assert (quantized, floats) == (0, len(SHAPES))  # no state: all element-wise
    elif case == "adam-quantize-all":
        assert quantized == len(SHAPES)
    else:
        assert quantized == 4 and floats == 4  # 5000, 9001, 4096, 64x100 are 8-bit
    assert compiled_parts(plain) == (0, 0)


@pytest.mark.parametrize("case", ["adamw", "adamw-amsgrad-maximize", "adam-l2"])
def test_compiled_adam_with_hardware_sqrt_close_to_plain(hardware_sqrt, case):
    # The hardware square root is correctly rounded, torch's (VML) within one unit in
    # the last place of it: the parameters move apart by a few units in the last
    # place over the steps, and a state value next to a midpoint can round to the
    # neighbouring code.
    cls, options = CASES[case]
    fast_params, plain_params = make_params(), make_params()
    fast = make(cls, options, fast_params, "fast")
    plain = make(cls, options, plain_params, "plain")
    run(fast, fast_params)
    run(plain, plain_params)
    assert compiled_parts(fast)[0] == 4
    for a, b in zip(fast_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(fast_params, plain_params):
        for key, value in fast.state[pa].items():
            other = plain.state[pb][key]
            if value.dtype == torch.uint8:
                differ = (value.int() - other.int()).abs()
                assert differ.max() <= 1 and differ.float().mean() < 1e-3, key
            else:
                torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("case", ["sgd-momentum", "sgd-nesterov"])
def test_compiled_sgd_bit_equal_with_hardware_sqrt_too(hardware_sqrt, case):
    cls, options = CASES[case]
    fast_params, plain_params = make_params(), make_params()
    run(make(cls, options, fast_params, "fast"), fast_params)
    run(make(cls, options, plain_params, "plain"), plain_params)
    for a, b in zip(fast_params, plain_params):
        assert torch.equal(a, b)


def test_impl_auto_uses_the_compiled_step_in_exact_mode(exact_sqrt):
    params = make_params()
    optimizer = AdamW8bit(params)
    run(optimizer, params, steps=2)
    assert compiled_parts(optimizer) == (4, 4)


@pytest.mark.parametrize("case", ["adamw-amsgrad-maximize", "sgd-dampening-wd-maximize"])
def test_ineligible_parameters_take_the_plain_path_in_the_same_step(exact_sqrt, case):
    cls, options = CASES[case]

    def params():
        generator = torch.Generator().manual_seed(5)
        return [
            torch.randn(6000, generator=generator),  # compiled
            torch.randn(5000, generator=generator, dtype=torch.float64),  # 8-bit state, float64: plain
            torch.randn(100, 70, generator=generator).t(),  # 8-bit state, non-contiguous: plain
            torch.randn(50, generator=generator, dtype=torch.float64),  # float64 state: element-wise kernel
            torch.randn(5000, generator=generator).to(torch.bfloat16),  # plain
            torch.randn(30, generator=generator).to(torch.bfloat16),  # plain
        ]

    fast_params, plain_params = params(), params()
    fast = make(cls, options, fast_params, "fast")
    plain = make(cls, options, plain_params, "plain")
    run(fast, fast_params)
    run(plain, plain_params)
    assert compiled_parts(fast) == (1, 1)
    for a, b in zip(fast_params, plain_params):
        assert torch.equal(a, b)
    assert_states_equal(fast, plain, fast_params, plain_params)


def test_non_contiguous_gradient_takes_the_plain_path_for_that_step(exact_sqrt):
    fast_params, plain_params = make_params(), make_params()
    fast = AdamW8bit(fast_params, impl="fast")
    plain = AdamW8bit(plain_params, impl="plain")
    for step in range(6):
        for params, optimizer in ((fast_params, fast), (plain_params, plain)):
            set_grads(params, step)
            if step == 3:
                params[5].grad = params[5].grad.t().contiguous().t()  # 64x100, not contiguous
            optimizer.step()
    for a, b in zip(fast_params, plain_params):
        assert torch.equal(a, b)
    assert_states_equal(fast, plain, fast_params, plain_params)


@pytest.mark.parametrize("case", ["adamw-amsgrad-maximize", "sgd-nesterov"])
def test_state_dict_round_trip_between_compiled_and_plain(exact_sqrt, case):
    cls, options = CASES[case]
    reference_params = make_params()
    reference = make(cls, options, reference_params, "plain")
    run(reference, reference_params, steps=2 * 10)
    for first, second in (("fast", "plain"), ("plain", "fast")):
        params = make_params()
        optimizer = make(cls, options, params, first)
        run(optimizer, params, steps=10)
        saved = optimizer.state_dict()
        continued_params = clone(params)
        continued = make(cls, options, continued_params, second)
        continued.load_state_dict(saved)
        run(continued, continued_params, steps=10, first=10)
        for a, b in zip(continued_params, reference_params):
            assert torch.equal(a, b)
        assert_states_equal(continued, reference, continued_params, reference_params)


def test_a_raising_step_changes_nothing(exact_sqrt):
    params = make_params()
    optimizer = AdamW8bit(params, impl="fast", amsgrad=True)
    run(optimizer, params, steps=3)
    optimizer.nonfinite = "raise"
    before_params = clone(params)
    before_state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
    set_grads(params, 3)
    params[2].grad[7] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        optimizer.step()
    optimizer.param_groups[0]["lr"] = -1.0
    params[2].grad[7] = 0.0
    with pytest.raises(ValueError, match="lr"):
        optimizer.step()
    for p, before in zip(params, before_params):
        assert torch.equal(p, before)
    for p, state in before_state.items():
        for key, value in state.items():
            assert torch.equal(optimizer.state[p][key], value)


def test_non_finite_values_round_as_on_the_plain_path(exact_sqrt):
    fast_params, plain_params = make_params(), make_params()
    fast = AdamW8bit(fast_params, impl="fast")
    plain = AdamW8bit(plain_params, impl="plain")
    for params, optimizer in ((fast_params, fast), (plain_params, plain)):
        run(optimizer, params, steps=2)
        set_grads(params, 2)
        params[0].grad[3] = float("inf")
        params[2].grad[300] = float("nan")
        params[2].grad[4000] = -float("inf")
        optimizer.step()
        run(optimizer, params, steps=2, first=3)
    for a, b in zip(fast_params, plain_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert_states_equal(fast, plain, fast_params, plain_params)


def test_impl_fast_and_lion8bit(kernel):
    assert AdamW8bit([torch.zeros(3)], impl="fast").impl == "fast"
    assert SGD8bit([torch.zeros(3)], impl="fast", momentum=0.9).impl == "fast"
    with pytest.raises(ValueError, match="impl"):
        Adam8bit([torch.zeros(3)], impl="quick")
    # Lion8bit rounds stochastically with torch's generator: plain path only.
    with pytest.raises(ValueError, match="no compiled step"):
        Lion8bit([torch.zeros(3)], impl="fast")
    assert Lion8bit([torch.zeros(3)], impl="plain").impl == "plain"


def test_impl_fast_raises_naming_the_reason_when_unavailable(monkeypatch):
    monkeypatch.setattr(ravine.kernels.cpu, "_library", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_failure", None)
    monkeypatch.setenv("RAVINE_DISABLE_KERNELS", "1")
    with pytest.raises(ravine.kernels.cpu.KernelUnavailable, match="RAVINE_DISABLE_KERNELS"):
        AdamW8bit([torch.zeros(3)], impl="fast")
    # impl="auto" takes the plain path, silently for a deliberate disable.
    params = make_params()
    optimizer = AdamW8bit(params)
    run(optimizer, params, steps=2)
    assert compiled_parts(optimizer) == (0, 0)


def test_learning_rate_changing_every_step_builds_nothing(exact_sqrt, monkeypatch):
    built = []
    original = compiled.Plan.__init__
    monkeypatch.setattr(compiled.Plan, "__init__", lambda self, *a: built.append(1) or original(self, *a))
    params = make_params(SHAPES[:6])
    optimizer = AdamW8bit(params, impl="fast")
    for step in range(6):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.param_groups[0]["lr"] = 1e-3 / (1 + step)
        optimizer.step()
    assert len(built) == 1


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_encoding_table_gives_the_plain_paths_codes(signed):
    table = compiled.encoding_table(signed).to(torch.int64) & 0xFFFFFFFF
    _, midpoints, below = _codebook(signed, torch.device("cpu"))
    threshold = table >> 16
    reverse = torch.where((table >> 8) & 1 == 1, 0x7FFF, 0)
    # Every bucket's first and last patterns and the patterns around its threshold,
    # and random ones.
    buckets = torch.arange(1 << 17, dtype=torch.int64) << 15
    patterns = [buckets | low for low in (0, 1, 0x7FFE, 0x7FFF)]
    for delta in (-1, 0, 1):
        patterns.append(buckets | ((threshold + delta).clamp(0, 0x7FFF) ^ reverse))
    generator = torch.Generator().manual_seed(0)
    patterns.append(torch.randint(0, 1 << 32, (1 << 20,), generator=generator, dtype=torch.int64))
    bits = torch.cat(patterns)
    values = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    entry = table[bits >> 15]
    low = (bits & 0x7FFF) ^ torch.where((entry >> 8) & 1 == 1, 0x7FFF, 0)
    codes = (entry & 0xFF) + (low >= (entry >> 16)).long()
    assert torch.equal(codes, _nearest_codes(values, midpoints, below).long())
