"""Every ravine optimizer against torch.optim's for-loop path, table-driven.

For each optimizer x option set x dtype, both optimizers take 100 steps from the same
parameters with the same gradients; parameters and state must agree within 1e-6
relative (in practice they agree bit for bit). The parameter set mixes shapes that
exercise ravine's blocking: a 0-d tensor, small tensors batched together, a tensor
large enough to be cut into slices, and a non-contiguous one. Some parameters skip
steps (no gradient), so per-parameter step counts differ.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ravine.optim.base
from optimizer_table import CASES, all_option_sets, clone_options, option_id

SHAPES = [(), (7,), (3, 4), (301,), (5, 6)]
STEPS = 100


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 64 elements, so that small tensors exercise batching and slicing."""
    monkeypatch.setattr(ravine.optim.base, "BLOCK_ELEMENTS", 64)


def make_params(dtype: torch.dtype, seed: int = 0, shapes: list[tuple[int, ...]] | None = None) -> list[torch.Tensor]:
    shapes = shapes or SHAPES
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]
    # A non-contiguous leaf: the transpose of a (6, 5) tensor.
    rows, columns = shapes[-1]
    params[-1] = torch.randn(columns, rows, generator=generator, dtype=torch.float64).to(dtype).t()
    return params


def gradient_stream(params: list[torch.Tensor], step: int, seed: int = 1) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed * 100_003 + step)
    grads: list[torch.Tensor | None] = []
    for index, p in enumerate(params):
        # The second parameter gets no gradient every third step.
        if index == 1 and step % 3 == 2:
            grads.append(None)
            continue
        g = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        grads.append(g)
    return grads


def run_pair(case, options, dtype, steps=STEPS):
    base = make_params(dtype, shapes=case.shapes)
    torch_params = [p.clone().requires_grad_() for p in base]
    ravine_params = [p.clone().requires_grad_() for p in base]
    torch_opt = case.torch_cls(torch_params, **case.torch_loop_options, **clone_options(options))
    ravine_opt = case.ravine_cls(ravine_params, **clone_options(options))
    for step in range(steps):
        for grads_for, params in ((gradient_stream(base, step), torch_params), (gradient_stream(base, step), ravine_params)):
            for p, g in zip(params, grads_for):
                p.grad = g
        torch_opt.step()
        ravine_opt.step()
    return torch_params, ravine_params, torch_opt, ravine_opt


def assert_state_close(torch_opt, ravine_opt, rtol, atol):
    torch_state = torch_opt.state_dict()["state"]
    ravine_state = ravine_opt.state_dict()["state"]
    assert torch_state.keys() == ravine_state.keys()
    for index in torch_state:
        assert torch_state[index].keys() == ravine_state[index].keys()
        for key, value in torch_state[index].items():
            other = ravine_state[index][key]
            assert other.dtype == value.dtype and other.shape == value.shape, (index, key)
            torch.testing.assert_close(other, value, rtol=rtol, atol=atol, msg=f"state {index}/{key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case,options",
    all_option_sets(),
    ids=[f"{case.name}[{option_id(options)}]" for case, options in all_option_sets()],
)
def test_matches_torch_for_loop(case, options, dtype):
    torch_params, ravine_params, torch_opt, ravine_opt = run_pair(case, options, dtype)
    for ours, theirs in zip(ravine_params, torch_params):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=0.0)
    assert_state_close(torch_opt, ravine_opt, rtol=1e-6, atol=0.0)
    # The run actually moved the parameters (a zero learning rate keeps them).
    base = make_params(dtype, shapes=case.shapes)
    moved = any(not torch.equal(p.detach(), b) for p, b in zip(ravine_params, base))
    lr = options.get("lr", 1.0)
    assert moved == (float(lr) != 0.0)


@pytest.mark.parametrize("case", [case for case in CASES if case.takes_complex], ids=lambda case: case.name)
def test_complex_parameters_match_torch(case):
    generator = torch.Generator().manual_seed(3)
    base = [torch.randn(4, 3, dtype=torch.complex64, generator=generator), torch.randn(5, dtype=torch.complex64, generator=generator)]
    torch_params = [p.clone().requires_grad_() for p in base]
    ravine_params = [p.clone().requires_grad_() for p in base]
    options = clone_options(case.options[-2])
    torch_opt = case.torch_cls(torch_params, **case.torch_loop_options, **clone_options(options))
    ravine_opt = case.ravine_cls(ravine_params, **options)
    for _ in range(20):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in base]
        for params in (torch_params, ravine_params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        torch_opt.step()
        ravine_opt.step()
    for ours, theirs in zip(ravine_params, torch_params):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", [case for case in CASES if not case.takes_complex], ids=lambda case: case.name)
def test_complex_parameters_refused_as_torch_refuses_them(case):
    """A clear ValueError when the parameters are given; torch raises at the first step."""
    matrix = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex"):
        case.ravine_cls([matrix])
    matrix.grad = torch.ones_like(matrix)
    with pytest.raises(RuntimeError, match="complex"):
        case.torch_cls([matrix]).step()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_training_with_closure_matches_torch(case):
    """A real model trained through ``step(closure)`` with two param groups."""
    torch.manual_seed(0)
    bias = case.takes_vectors
    model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=bias), torch.nn.Tanh(), torch.nn.Linear(16, 3, bias=bias))
    twin = copy.deepcopy(model)
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    options = clone_options(case.options[1])

    def groups(m):
        return [
            {"params": m[0].parameters()},
            {"params": m[2].parameters(), "lr": float(options.get("lr", 0.01)) / 2},
        ]

    optimizers = [
        case.torch_cls(groups(model), **case.torch_loop_options, **clone_options(options)),
        case.ravine_cls(groups(twin), **clone_options(options)),
    ]
    losses = {0: [], 1: []}
    for _ in range(30):
        for index, (m, opt) in enumerate(zip((model, twin), optimizers)):

            def closure(m=m, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(m(x), y)
                loss.backward()
                return loss

            losses[index].append(float(opt.step(closure)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[1][-1] < losses[1][0]
    for ours, theirs in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", [case for case in CASES if case.sparse], ids=lambda case: case.name)
def test_sparse_gradients_match_torch(case):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, 4, sparse=True)
    twin = copy.deepcopy(embedding)
    initial = embedding.weight.detach().clone()
    options = {"lr": 0.1, "momentum": 0.9} if case.name == "sgd" else {"lr": 0.1}
    torch_opt = case.torch_cls(embedding.parameters(), **options)
    ravine_opt = case.ravine_cls(twin.parameters(), **options)
    for step in range(10):
        index = torch.tensor([step % 5, 7, 7, 11])
        for module, opt in ((embedding, torch_opt), (twin, ravine_opt)):
            opt.zero_grad()
            module(index).pow(2).sum().backward()
            assert module.weight.grad.is_sparse
            opt.step()
    torch.testing.assert_close(twin.weight, embedding.weight, rtol=1e-6, atol=0.0)
    changed_rows = (twin.weight.detach() != initial).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [0, 1, 2, 3, 4, 7, 11]


@pytest.mark.parametrize("case", [case for case in CASES if not case.sparse], ids=lambda case: case.name)
def test_sparse_gradients_rejected_where_torch_rejects_them(case):
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    before = embedding.weight.detach().clone()
    optimizer = case.ravine_cls(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert torch.equal(embedding.weight.detach(), before)
    assert len(optimizer.state) == 0
    # torch rejects it too.
    with pytest.raises(RuntimeError, match="sparse"):
        case.torch_cls(embedding.parameters()).step()
