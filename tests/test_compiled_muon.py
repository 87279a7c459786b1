"""Muon's compiled Newton-Schulz step (kernels/muon_ns.cpp): on CPUs without a native
bfloat16 matrix product it adds up each dot product in the order of torch's loops and
rounds where torch rounds, so it is bit-equal to torch.optim.Muon, in exact mode too
(the suite's default, which these tests keep)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

import ravine
import ravine.kernels.cpu
import ravine.optim.muon as muon
from ravine.optim.muon import NS_COEFFICIENTS, zeropower_via_newton_schulz_compiled

STEPS = 20


@pytest.fixture(autouse=True)
def compiled_step():
    if muon._native_bfloat16_matmul("cpu"):
        pytest.skip("this CPU has a native bfloat16 matrix product: Muon keeps torch's")
    reason = ravine.kernels.cpu.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the compiled CPU step is unavailable here: {reason}")
    assert muon.compiled_matches_torch()


@pytest.fixture
def batches(monkeypatch):
    """The (batch, rows, columns) shapes the compiled step is called with."""
    seen = []
    original = muon.zeropower_via_newton_schulz_compiled

    def spy(matrices, *args):
        seen.append(tuple(matrices.shape))
        return original(matrices, *args)

    monkeypatch.setattr(muon, "zeropower_via_newton_schulz_compiled", spy)
    return seen


# Sizes around the 64-element blocks and 16-element tails of torch's vectorised dot
# product and the 4-element groups of its partial sums; wide, tall and square.
SHAPES = [(2, 2), (2, 3), (3, 2), (5, 80), (80, 5), (13, 63), (63, 13), (16, 64), (64, 65), (65, 64), (31, 32), (79, 81), (130, 47)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_orthogonalisation_bit_equal_to_torch(shape, threads):
    generator = torch.Generator().manual_seed(sum(shape))
    scales = 10 ** (torch.rand(3, 1, 1, generator=generator, dtype=torch.float64) * 8 - 4)
    matrices = torch.randn((3, *shape), generator=generator, dtype=torch.float64) * scales
    for dtype in (torch.float32, torch.float64):
        ours = zeropower_via_newton_schulz_compiled(matrices.to(dtype), NS_COEFFICIENTS, 5, 1e-7)
        assert ours.dtype == torch.float32 and ours.shape == matrices.shape
        for matrix, result in zip(matrices.to(dtype), ours):
            assert torch.equal(result, torch_newton_schulz(matrix, NS_COEFFICIENTS, 5, 1e-7).float())


@pytest.mark.parametrize(
    "coefficients, steps, eps",
    [(NS_COEFFICIENTS, 0, 1e-7), (NS_COEFFICIENTS, 1, 1e-7), ((2.0, -1.5, 0.5), 2, 1e-7), (NS_COEFFICIENTS, 7, 1e-3),
     ((3.0, 0.0, 1.0), 3, 1e-7), ((1.5, -0.5, 0.0), 3, 1e-7), ((0.0, 1.0, -1.0), 2, 1e-7)],
    ids=str,
)
def test_steps_coefficients_and_eps(coefficients, steps, eps):
    generator = torch.Generator().manual_seed(1)
    for shape in [(9, 70), (70, 9), (24, 24)]:
        matrices = torch.randn((2, *shape), generator=generator)
        matrices[0] *= 1e-6  # below eps=1e-3: the clamp acts
        ours = zeropower_via_newton_schulz_compiled(matrices, coefficients, steps, eps)
        for matrix, result in zip(matrices, ours):
            assert torch.equal(result, torch_newton_schulz(matrix, coefficients, steps, eps).float())


def test_non_finite_gradients_give_torchs_numbers():
    matrices = torch.randn(3, 12, 20)
    matrices[0, 3, 4] = float("nan")
    matrices[1, 0, 0] = float("inf")
    matrices[2] *= 1e38  # bfloat16 overflows on the way
    ours = zeropower_via_newton_schulz_compiled(matrices, NS_COEFFICIENTS, 5, 1e-7)
    for matrix, result in zip(matrices, ours):
        expected = torch_newton_schulz(matrix, NS_COEFFICIENTS, 5, 1e-7).float()
        assert torch.equal(result.nan_to_num(), expected.nan_to_num())
        assert torch.equal(result.isnan(), expected.isnan())


OPTIONS = [
    {},
    {"lr": 0.02, "momentum": 0.9, "nesterov": False},
    {"lr": 0.02, "weight_decay": 0.0},
    {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"},
    {"lr": 0.02, "adjust_lr_fn": "original", "eps": 1e-3},
    {"lr": 0.02, "ns_steps": 2, "ns_coefficients": (2.0, -1.5, 0.5)},
    {"lr": torch.tensor(0.02), "weight_decay": 0.05},
]
OPTIMIZER_SHAPES = [(24, 24), (13, 40), (40, 13), (1, 17), (17, 1), (7, 3), (13, 40), (0, 5), (66, 70)]


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


def train(optimizer, params, options, steps=STEPS, first=0):
    for step in range(first, first + steps):
        set_grads(params, step)
        if not isinstance(options.get("lr"), torch.Tensor):
            for group in optimizer.param_groups:
                group["lr"] = options.get("lr", 1e-3) * (1 - step / (2 * STEPS))  # a new lr every step
        optimizer.step()


CASES = [(options, dtype, 1) for options in OPTIONS for dtype in (torch.float32, torch.float64)] + [
    (options, torch.float32, 2) for options in OPTIONS[:3]
]


@pytest.mark.parametrize("options, dtype, thread_count", CASES, ids=str)
@pytest.mark.parametrize("impl", ["auto", "fast"])
def test_muon_bit_equal_to_torch(options, dtype, thread_count, impl, batches):
    old = torch.get_num_threads()
    torch.set_num_threads(thread_count)
    try:
        params = make_params(dtype)
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        train(ravine.Muon(params, **options, impl=impl), params, options)
        train(torch.optim.Muon(twins, **copy.deepcopy(options)), twins, options)
    finally:
        torch.set_num_threads(old)
    for p, twin in zip(params, twins):
        assert torch.equal(p, twin)
    # Every matrix of at least 2 x 2 goes through the compiled step, one batch per
    # shape and step; 1 x N and N x 1 take torch's path (exact mode).
    assert sorted(set(batches)) == [(1, 7, 3), (1, 24, 24), (1, 40, 13), (1, 66, 70), (2, 13, 40)]
    assert len(batches) == 5 * STEPS


def test_impl_plain_never_calls_it(batches):
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    train(ravine.Muon(params, lr=0.02, impl="plain"), params, {"lr": 0.02}, steps=3)
    train(torch.optim.Muon(twins, lr=0.02), twins, {"lr": 0.02}, steps=3)
    assert batches == []
    assert all(torch.equal(p, twin) for p, twin in zip(params, twins))


def test_a_failed_check_keeps_torchs_path_in_exact_mode(monkeypatch, batches):
    monkeypatch.setattr(muon, "compiled_matches_torch", lambda: False)
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    train(ravine.Muon(params, lr=0.02), params, {"lr": 0.02}, steps=3)
    train(torch.optim.Muon(twins, lr=0.02), twins, {"lr": 0.02}, steps=3)
    assert batches == []
    assert all(torch.equal(p, twin) for p, twin in zip(params, twins))


def test_several_batches_per_shape(monkeypatch, batches):
    monkeypatch.setattr(muon, "BATCH_ELEMENTS", 600)  # 13 x 40 matrices: one per batch
    params = make_params(torch.float32)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    train(ravine.Muon(params, lr=0.02), params, {"lr": 0.02}, steps=3)
    train(torch.optim.Muon(twins, lr=0.02), twins, {"lr": 0.02}, steps=3)
    assert (1, 13, 40) in batches and (2, 13, 40) not in batches
    assert all(torch.equal(p, twin) for p, twin in zip(params, twins))


def test_parameters_it_cannot_take_use_torchs_path_in_the_same_step(batches):
    generator = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    params = [torch.nn.Parameter(torch.randn(12, 20, generator=generator).to(d)) for d in dtypes]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    train(ravine.Muon(params, lr=0.02), params, {"lr": 0.02}, steps=3)
    train(torch.optim.Muon(twins, lr=0.02), twins, {"lr": 0.02}, steps=3)
    assert batches == [(1, 12, 20)] * 3
    assert all(torch.equal(p, twin) for p, twin in zip(params, twins))


@pytest.mark.parametrize("first, second", [("auto", "plain"), ("plain", "auto")])
def test_state_dict_round_trip(first, second):
    params = make_params(torch.float32)
    optimizer = ravine.Muon(params, lr=0.02, impl=first)
    train(optimizer, params, {"lr": 0.02}, steps=4)
    saved = optimizer.state_dict()
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ravine.Muon(copies, lr=0.02, impl=second)
    resumed.load_state_dict(copy.deepcopy(saved))  # loading keeps the tensors it is given
    reference = torch.optim.Muon(twins, lr=0.02)
    reference.load_state_dict(copy.deepcopy(saved))
    train(resumed, copies, {"lr": 0.02}, steps=3, first=4)
    train(reference, twins, {"lr": 0.02}, steps=3, first=4)
    assert all(torch.equal(p, twin) for p, twin in zip(copies, twins))


def test_muon_with_adamw_equals_its_plain_path(batches, threads):
    def build(impl):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
        return model, ravine.optim.muon.muon_with_adamw(model, lr=0.02, adamw_lr=1e-3, impl=impl)

    (model, optimizer), (plain_model, plain) = build("auto"), build("plain")
    for step in range(STEPS):
        for m in (model, plain_model):
            set_grads(list(m.parameters()), step)
        optimizer.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain_model.parameters()))
    assert sorted(set(batches)) == [(1, 3, 20), (1, 20, 12)] and len(batches) == 2 * STEPS


@pytest.mark.parametrize("shape", [(70, 90), (90, 70), (130, 130)], ids=str)
def test_threads_sharing_one_matrix(shape, threads):
    """Fewer matrices than threads: the threads share each matrix's rows."""
    matrix = torch.randn((1, *shape), generator=torch.Generator().manual_seed(3))
    ours = zeropower_via_newton_schulz_compiled(matrix, NS_COEFFICIENTS, 5, 1e-7)
    assert torch.equal(ours[0], torch_newton_schulz(matrix[0], NS_COEFFICIENTS, 5, 1e-7).float())
