"""Muon's float32-product orthogonalisation (taken on CPUs without a native bfloat16
matrix product where the compiled step, tests/test_compiled_muon.py, does not match
torch): the Newton-Schulz iteration with torch's roundings to bfloat16 but float32
matrix products, batched over same-shaped matrices.

Float32 adds up each dot product in another order than torch's bfloat16 kernel, so
a rounding to bfloat16 now and then lands one unit away, and the iteration carries
such differences on. The bounds below, in units of bfloat16 ulp at the largest
element of the orthogonalised matrix (``ulp_at_max``), were set from measurements:

* one Newton-Schulz step: at least 99% of the elements bit-equal to torch's (we saw
  99.998% here; a single ``addmm`` that rounded the product before adding, as a wrong
  emulation would, matched only 78% to 98% of torch's elements);
* five steps (the default): at most 5 ulp_at_max from torch's result and from a
  float64 reference of the same bfloat16-rounded iteration (torch's own result is
  up to 5 ulp_at_max from that reference too), bounded here by 8; the share of
  bit-equal elements depends on the shape, from about 30% (316 x 316) to 100%
  (a single row or column), and is asserted per shape below.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

import ravine
import ravine.kernels.cpu
import ravine.optim.muon as muon
from ravine.optim.muon import NS_COEFFICIENTS, adjusted_lr, zeropower_via_newton_schulz_float32

#: Largest difference, in bfloat16 ulp at the largest element of the result, between
#: the fast orthogonalisation and torch's (or the float64 reference); measured <= 5.
ULPS = 8
STEPS = 20
SHAPES = [(24, 24), (13, 40), (40, 13), (1, 17), (17, 1), (7, 3), (31, 32)]


@pytest.fixture(autouse=True)
def inexact_mode():
    """Exact mode off (the suite sets it), so impl="auto" takes the fast path."""
    old = ravine.kernels.cpu.exact()
    ravine.kernels.cpu.set_exact_sqrt(False)
    yield
    ravine.kernels.cpu.set_exact_sqrt(old)


@pytest.fixture(autouse=True)
def float32_path(monkeypatch):
    """As where the compiled step does not give torch's numbers: the float32 products."""
    monkeypatch.setattr(muon, "compiled_matches_torch", lambda: False)


@pytest.fixture(autouse=True)
def needs_fast_path():
    if muon._native_bfloat16_matmul("cpu"):
        pytest.skip("this CPU has a native bfloat16 matrix product: Muon keeps torch's")
    if ravine.kernels.cpu.unavailable_reason() is not None:
        pytest.skip("impl='fast' needs the compiled CPU library to build")


@pytest.fixture
def batches(monkeypatch):
    """The (batch, rows, columns) shapes the fast orthogonalisation is called with."""
    seen = []
    original = muon.zeropower_via_newton_schulz_float32

    def spy(matrices, *args):
        seen.append(tuple(matrices.shape))
        return original(matrices, *args)

    monkeypatch.setattr(muon, "zeropower_via_newton_schulz_float32", spy)
    return seen


def ulp_at_max(matrix: torch.Tensor) -> float:
    """One bfloat16 ulp (8 significant bits) at the largest magnitude in ``matrix``."""
    largest = matrix.abs().max().item() if matrix.numel() else 0.0
    return 2.0 ** (math.floor(math.log2(largest)) - 7) if largest > 0 else 2.0**-133


def float64_reference(matrix, coefficients=NS_COEFFICIENTS, steps=5, eps=1e-7):
    """The bfloat16-rounded iteration with float64 products (rounded through float32
    to bfloat16, as a float32 accumulator would be)."""
    a, b, c = coefficients
    ortho = matrix.bfloat16()
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        ortho = ortho.T
    ortho = ortho.div(ortho.norm().clamp(min=eps)).double()

    def round_(values):
        return values.float().bfloat16().double()

    for _ in range(steps):
        gram = round_(ortho @ ortho.T)
        polynomial = round_(b * gram + c * (gram @ gram))
        ortho = round_(a * ortho + polynomial @ ortho)
    return (ortho.T if tall else ortho).float()


def random_matrices(shape, count, seed):
    generator = torch.Generator().manual_seed(seed)
    scales = 10 ** (torch.rand(count, 1, 1, generator=generator, dtype=torch.float64) * 6 - 3)
    return (torch.randn((count, *shape), generator=generator, dtype=torch.float64) * scales).float()


# -- the orthogonalisation ----------------------------------------------------------


def test_one_step_rounds_where_torch_rounds():
    equal = total = 0
    for shape in [(24, 24), (13, 40), (40, 13), (64, 100)]:
        matrices = random_matrices(shape, 8, seed=sum(shape))
        fast = zeropower_via_newton_schulz_float32(matrices, NS_COEFFICIENTS, 1, 1e-7)
        for matrix, result in zip(matrices, fast):
            expected = torch_newton_schulz(matrix, NS_COEFFICIENTS, 1, 1e-7).float()
            equal += (result == expected).sum().item()
            total += expected.numel()
            assert (result - expected).abs().max().item() <= 2 * ulp_at_max(expected)
    assert equal / total >= 0.99


# Share of bit-equal elements after five steps, at least (measured on these matrices:
# 24x24 0.95, 13x40 1.0, 40x13 0.98, 31x32 0.87, 1x17, 17x1 and 7x3 1.0, averages over 6
# matrices, at most 3 ulp_at_max from torch's; other random matrices gave shares down to
# 0.19 for a single 64x64 matrix and 0.27 at 316x316, so the bounds leave room).
MIN_EQUAL_SHARE = {(24, 24): 0.4, (13, 40): 0.6, (40, 13): 0.6, (1, 17): 0.99, (17, 1): 0.99, (7, 3): 0.9, (31, 32): 0.6}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_five_steps_match_torch_and_the_float64_reference(shape, threads):
    matrices = random_matrices(shape, 6, seed=7 * sum(shape))
    fast = zeropower_via_newton_schulz_float32(matrices, NS_COEFFICIENTS, 5, 1e-7)
    assert fast.dtype == torch.float32 and fast.shape == matrices.shape
    assert torch.equal(fast, fast.bfloat16().float())  # bfloat16 values
    equal = 0
    for matrix, result in zip(matrices, fast):
        expected = torch_newton_schulz(matrix, NS_COEFFICIENTS, 5, 1e-7).float()
        reference = float64_reference(matrix)
        ulp = ulp_at_max(expected)
        assert (result - expected).abs().max().item() <= ULPS * ulp
        assert (result - reference).abs().max().item() <= ULPS * ulp
        equal += (result == expected).float().mean().item()
    assert equal / len(matrices) >= MIN_EQUAL_SHARE[shape]


@pytest.mark.parametrize("options", [dict(steps=0), dict(steps=2, coefficients=(2.0, -1.5, 0.5)), dict(eps=1e-3)])
def test_other_steps_coefficients_and_eps(options):
    steps = options.get("steps", 5)
    coefficients = options.get("coefficients", NS_COEFFICIENTS)
    eps = options.get("eps", 1e-7)
    matrices = random_matrices((9, 14), 4, seed=3)
    matrices[0] *= 1e-6  # its norm is below eps=1e-3: the clamp acts
    fast = zeropower_via_newton_schulz_float32(matrices, coefficients, steps, eps)
    for matrix, result in zip(matrices, fast):
        expected = torch_newton_schulz(matrix, coefficients, steps, eps).float()
        if steps == 0:
            assert torch.equal(result, expected)  # only the norm and the division: exact
        assert (result - expected).abs().max().item() <= ULPS * ulp_at_max(expected)


def test_batches_equal_single_matrices():
    matrices = random_matrices((20, 33), 5, seed=11)
    together = zeropower_via_newton_schulz_float32(matrices, NS_COEFFICIENTS, 5, 1e-7)
    for index in range(len(matrices)):
        alone = zeropower_via_newton_schulz_float32(matrices[index : index + 1], NS_COEFFICIENTS, 5, 1e-7)
        assert torch.equal(together[index], alone[0])


# -- the optimizer ------------------------------------------------------------------


OPTIONS = [
    {},
    {"lr": 0.02, "momentum": 0.9, "nesterov": False},
    {"lr": 0.02, "weight_decay": 0.0},
    {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"},
    {"lr": 0.02, "adjust_lr_fn": "original", "eps": 1e-3},
    {"lr": 0.02, "ns_steps": 2, "ns_coefficients": (2.0, -1.5, 0.5)},
]
OPTIMIZER_SHAPES = [(24, 24), (13, 40), (40, 13), (1, 17), (17, 1), (7, 3), (13, 40), (0, 5)]


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype))
        for shape in OPTIMIZER_SHAPES
    ]


def set_grads(params, step):
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)


def set_lr(optimizer, options, step):
    for group in optimizer.param_groups:
        group["lr"] = options.get("lr", 1e-3) * (1 - step / (2 * STEPS))  # a new lr every step


def step_bound(options, step, shape, orthogonal, param, dtype):
    """How far one step of the fast path may move a parameter from torch's, from the
    same state: the learning rate times ULPS bfloat16 ulp at the update's largest
    element, plus a few roundings of the parameter's own dtype."""
    lr = options.get("lr", 1e-3) * (1 - step / (2 * STEPS))
    scale = adjusted_lr(lr, options.get("adjust_lr_fn"), shape)
    return scale * ULPS * ulp_at_max(orthogonal) + 4 * torch.finfo(dtype).eps * max(1.0, param.abs().max().item())


# Every option set in float32 and float64 on one thread; two threads (slow on a busy
# 2-core machine) for a few.
STEP_CASES = [(options, dtype, 1) for options in OPTIONS for dtype in (torch.float32, torch.float64)] + [
    (options, torch.float32, 2) for options in OPTIONS[:3]
]


@pytest.mark.parametrize("options, dtype, thread_count", STEP_CASES, ids=str)
def test_each_step_matches_torch_from_the_same_state(options, dtype, thread_count):
    """Every step starts from torch's parameters and momentum buffers, so the bound is
    the one of a single orthogonalisation; the learning rate changes every step."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(thread_count)
    try:
        check_each_step(options, dtype)
    finally:
        torch.set_num_threads(old_threads)


def check_each_step(options, dtype):
    params = make_params(dtype)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = ravine.Muon(params, **options, impl="fast")
    reference = torch.optim.Muon(twins, **options)
    for step in range(STEPS):
        set_grads(params, step)
        set_grads(twins, step)
        set_lr(fast, options, step)
        set_lr(reference, options, step)
        with torch.no_grad():
            for p, twin in zip(params, twins):
                p.copy_(twin)
                if step > 0:
                    fast.state[p]["momentum_buffer"].copy_(reference.state[twin]["momentum_buffer"])
        fast.step()
        reference.step()
        for p, twin in zip(params, twins):
            if p.numel() == 0:
                assert p.shape == twin.shape
                continue
            buffer = reference.state[twin]["momentum_buffer"]
            direction = twin.grad.lerp(buffer, options.get("momentum", 0.95)) if options.get("nesterov", True) else buffer
            orthogonal = torch_newton_schulz(
                direction, options.get("ns_coefficients", NS_COEFFICIENTS), options.get("ns_steps", 5),
                options.get("eps", 1e-7),
            ).float()
            bound = step_bound(options, step, p.shape, orthogonal, twin, dtype)
            assert (p.detach() - twin.detach()).abs().max().item() <= bound
            assert torch.equal(fast.state[p]["momentum_buffer"], buffer)  # element-wise: bit-equal


@pytest.mark.parametrize("options", OPTIONS[:4], ids=str)
def test_twenty_steps_stay_close_to_torch_and_plain(options, batches):
    params = make_params(torch.float32)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = ravine.Muon(params, **options)  # impl="auto": fast outside exact mode
    plain = ravine.Muon(plain_params, **options, impl="plain")
    reference = torch.optim.Muon(twins, **options)
    for step in range(STEPS):
        for group in (params, plain_params, twins):
            set_grads(group, step)
        for optimizer in (fast, plain, reference):
            set_lr(optimizer, options, step)
            optimizer.step()
    # Every step's update differs from torch's by at most lr x ULPS ulp of a bfloat16
    # number below 2 (the orthogonalised entries are about 1 at most).
    bound = sum(
        adjusted_lr(options.get("lr", 1e-3) * (1 - step / (2 * STEPS)), options.get("adjust_lr_fn"), (40, 13))
        for step in range(STEPS)
    ) * ULPS * 2.0**-7
    for p, q, twin in zip(params, plain_params, twins):
        assert torch.equal(q, twin)  # the plain path is torch's, bit for bit
        if p.numel():
            assert (p - twin).abs().max().item() <= bound
    # one batch per shape and step (the two 13 x 40 matrices together); plain: none
    assert sorted(set(batches)) == [(1, 0, 5), (1, 1, 17), (1, 7, 3), (1, 17, 1), (1, 24, 24), (1, 40, 13), (2, 13, 40)]
    assert len(batches) == 7 * STEPS


def test_exact_mode_and_impl_plain_keep_torchs_bfloat16_products():
    ravine.kernels.cpu.set_exact_sqrt(True)
    for impl in ("auto", "plain"):
        params = make_params(torch.float32)
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        optimizer = ravine.Muon(params, lr=0.02, impl=impl)
        reference = torch.optim.Muon(twins, lr=0.02)
        for step in range(3):
            set_grads(params, step)
            set_grads(twins, step)
            optimizer.step()
            reference.step()
        assert all(torch.equal(p, twin) for p, twin in zip(params, twins))


def test_native_bfloat16_products_keep_torchs_path(monkeypatch):
    monkeypatch.setattr(muon, "_native_bfloat16_matmul", lambda device_type: True)
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = ravine.Muon(params, lr=0.02, impl="fast")
    reference = torch.optim.Muon(twins, lr=0.02)
    for step in range(3):
        set_grads(params, step)
        set_grads(twins, step)
        optimizer.step()
        reference.step()
    assert all(torch.equal(p, twin) for p, twin in zip(params, twins))


def test_several_batches_per_shape_give_the_same_numbers(monkeypatch):
    def run():
        params = make_params(torch.float32)
        optimizer = ravine.Muon(params, lr=0.02, impl="fast")
        for step in range(3):
            set_grads(params, step)
            optimizer.step()
        return params

    whole = run()
    monkeypatch.setattr(muon, "BATCH_ELEMENTS", 600)  # 13 x 40 matrices: one per batch
    for p, q in zip(whole, run()):
        assert torch.equal(p, q)


def test_parameters_it_cannot_take_use_torchs_path_in_the_same_step(batches):
    generator = torch.Generator().manual_seed(5)
    shapes_dtypes = [((12, 20), torch.float32), ((12, 20), torch.bfloat16), ((12, 20), torch.float16)]
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(d)) for s, d in shapes_dtypes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = ravine.Muon(params, lr=0.02, impl="fast")
    reference = torch.optim.Muon(twins, lr=0.02)
    for step in range(3):
        set_grads(params, step)
        set_grads(twins, step)
        optimizer.step()
        reference.step()
    assert batches == [(1, 12, 20)] * 3  # float32: the fast path
    assert (params[0] - twins[0]).abs().max().item() <= 3 * 0.02 * ULPS * 2.0**-7
    assert torch.equal(params[1], twins[1]) and torch.equal(params[2], twins[2])  # torch's path


def test_impl_fast_raises_when_the_library_is_unavailable(monkeypatch):
    monkeypatch.setattr(ravine.kernels.cpu, "_library", None)
    monkeypatch.setattr(ravine.kernels.cpu, "_failure", None)
    monkeypatch.setenv("RAVINE_DISABLE_KERNELS", "1")
    with pytest.raises(RuntimeError, match="impl='fast'"):
        ravine.Muon(make_params(torch.float32), impl="fast")
    with pytest.raises(ValueError, match="impl"):
        ravine.Muon(make_params(torch.float32), impl="turbo")


@pytest.mark.parametrize("first, second", [("fast", "plain"), ("plain", "fast")])
def test_state_dict_round_trip_between_fast_and_plain(first, second):
    params = make_params(torch.float32)
    optimizer = ravine.Muon(params, lr=0.02, impl=first)
    for step in range(4):
        set_grads(params, step)
        optimizer.step()
    saved = optimizer.state_dict()
    assert set(saved["param_groups"][0]) == set(torch.optim.Muon(make_params(torch.float32)).state_dict()["param_groups"][0])
    assert set(saved["state"][0]) == {"momentum_buffer"}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ravine.Muon(copies, lr=0.02, impl=second)
    resumed.load_state_dict(copy.deepcopy(saved))  # loading keeps the tensors it is given
    reference = torch.optim.Muon(twins, lr=0.02)
    reference.load_state_dict(copy.deepcopy(saved))
    for step in range(4, 7):
        for group in (params, copies, twins):
            set_grads(group, step)
        for o in (optimizer, resumed, reference):
            o.step()
    for p, resumed_p, twin in zip(params, copies, twins):
        if second == "plain":
            assert torch.equal(resumed_p, twin)
        else:
            assert torch.equal(resumed_p, p)  # the same fast steps from the same state
        assert torch.equal(resumed.state[resumed_p]["momentum_buffer"], reference.state[twin]["momentum_buffer"])


def test_muon_with_adamw_fast_matches_plain(batches, threads):
    def build(impl):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
        return model, ravine.optim.muon.muon_with_adamw(model, lr=0.02, adamw_lr=1e-3, impl=impl)

    (fast_model, fast), (plain_model, plain) = build("fast"), build("plain")
    assert fast.impl == "fast" and plain.impl == "plain"
    for step in range(STEPS):
        for model in (fast_model, plain_model):
            set_grads(list(model.parameters()), step)  # the same gradients for both
        fast.step()
        plain.step()
    bound = STEPS * 0.02 * adjusted_lr(1.0, None, (20, 12)) * ULPS * 2.0**-7
    for p, q in zip(fast_model.parameters(), plain_model.parameters()):
        if p.ndim == 2:
            assert (p - q).abs().max().item() <= bound
        else:
            assert torch.equal(p, q)  # AdamW's groups: the same path
    assert sorted(set(batches)) == [(1, 3, 20), (1, 20, 12)] and len(batches) == 2 * STEPS


def test_tensor_learning_rate(batches):
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = ravine.Muon(params, lr=torch.tensor(0.02), weight_decay=0.05, impl="fast")
    reference = torch.optim.Muon(twins, lr=torch.tensor(0.02), weight_decay=0.05)
    for step in range(5):
        set_grads(params, step)
        set_grads(twins, step)
        fast.step()
        reference.step()
    bound = 5 * adjusted_lr(0.02, None, (40, 13)) * ULPS * 2.0**-7
    for p, twin in zip(params, twins):
        if p.numel():
            assert (p - twin).abs().max().item() <= bound
    assert len(batches) == 7 * 5
