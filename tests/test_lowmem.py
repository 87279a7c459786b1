"""Low-memory optimizer state: bfloat16 moment buffers (``state_dtype``) and 8-bit
block-wise quantized moments (:mod:`ravine.optim.quantized`), against float32 state,
analytic error bounds and byte counts computed from shapes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ravine
from ravine.optim.lowmem import state_bytes, state_bytes_per_parameter
from ravine.optim.quantized import (
    Adam8bit,
    AdamW8bit,
    Lion8bit,
    SGD8bit,
    dequantize_blockwise,
    dynamic_codebook,
    quantize_blockwise,
)

# (low-memory class, its kwargs, float32-state twin, its kwargs)
LOW_MEMORY = {
    "adam-bf16": (ravine.Adam, {"lr": 1e-2, "state_dtype": torch.bfloat16}, ravine.Adam, {"lr": 1e-2}),
    "adamw-bf16": (ravine.AdamW, {"lr": 1e-2, "state_dtype": "bfloat16"}, ravine.AdamW, {"lr": 1e-2}),
    "amsgrad-bf16": (
        ravine.Adam, {"lr": 1e-2, "amsgrad": True, "state_dtype": torch.bfloat16}, ravine.Adam, {"lr": 1e-2, "amsgrad": True}
    ),
    "momentum-bf16": (
        ravine.SGD, {"lr": 0.05, "momentum": 0.9, "state_dtype": torch.bfloat16}, ravine.SGD, {"lr": 0.05, "momentum": 0.9}
    ),
    "adam-8bit": (Adam8bit, {"lr": 1e-2}, ravine.Adam, {"lr": 1e-2}),
    "adamw-8bit": (AdamW8bit, {"lr": 1e-2}, ravine.AdamW, {"lr": 1e-2}),
    "amsgrad-8bit": (Adam8bit, {"lr": 1e-2, "amsgrad": True}, ravine.Adam, {"lr": 1e-2, "amsgrad": True}),
    "momentum-8bit": (SGD8bit, {"lr": 0.05, "momentum": 0.9}, ravine.SGD, {"lr": 0.05, "momentum": 0.9}),
    "nesterov-8bit": (
        SGD8bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, ravine.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}
    ),
    "lion-8bit": (Lion8bit, {"lr": 1e-3}, ravine.Lion, {"lr": 1e-3}),
}


def least_squares(seed: int = 0):
    """A 128x64 weight (8192 elements: quantized) and a 64 bias (float32 state)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=generator)
    target = x @ (torch.randn(128, 64, generator=generator) / 10) + 0.01 * torch.randn(256, 64, generator=generator)
    weight = torch.nn.Parameter(torch.zeros(128, 64))
    bias = torch.nn.Parameter(torch.zeros(64))
    return x, target, [weight, bias]


def train(optimizer, x, target, params, steps, seed=0):
    torch.manual_seed(seed)  # Lion8bit's stochastic rounding draws from torch's generator
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = ((x @ params[0] + params[1] - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# -- the codebook and the round trip -------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_codebook_values(signed):
    codebook = dynamic_codebook(signed)
    assert codebook.shape == (256,) and codebook.dtype == torch.float32
    assert torch.all(codebook[1:] > codebook[:-1])  # 256 distinct sorted values
    assert codebook[-1] == 1.0 and (codebook == 0).sum() == 1
    if signed:
        # Decade 10^-6 holds one midpoint of [0.1, 1]: 0.55e-6; the top decade 64
        # steps of 0.9/64, the largest midpoint 1 - 0.9/128.
        positive = codebook[codebook > 0]
        assert positive[0].item() == pytest.approx(0.55e-6, rel=1e-6)
        assert codebook[0].item() == pytest.approx(-(1 - 0.9 / 128), rel=1e-6)
        assert (codebook < 0).sum() == 127
    else:
        # Decade 10^-6 holds two: (0.1 + 0.225) 1e-6 and (0.55 + 0.225) 1e-6.
        assert codebook[0] == 0
        assert codebook[1].item() == pytest.approx(0.325e-6, rel=1e-6)
        assert codebook[2].item() == pytest.approx(0.775e-6, rel=1e-6)
        assert codebook[-2].item() == pytest.approx(1 - 0.9 / 256, rel=1e-6)


def analytic_error_bound(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    """Half the code spacing of the decade |x| lies in: in (10^-(j+1), 10^-j] there are
    n_j = 2^(6-j) (signed) or 2^(7-j) (unsigned) codes 0.9 10^-j / n_j apart; below
    10^-7 the nearest code is at most |x| away (0 is a code)."""
    magnitude = normalized.abs().double()
    decade = torch.floor(-torch.log10(magnitude.clamp_min(1e-30))).clamp(min=0)  # j with x in (10^-(j+1), 10^-j]
    decade = torch.where(magnitude == 10.0 ** (-decade), decade - 1, decade).clamp(min=0)  # upper ends belong below
    codes = 2.0 ** ((6 if signed else 7) - decade)
    bound = 0.9 * 10.0 ** (-decade) / codes / 2
    return torch.where(magnitude < 1e-7, magnitude, bound)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_within_analytic_bound_per_block(signed):
    generator = torch.Generator().manual_seed(0)
    count = 256 * 12 + 100  # twelve full blocks and a short one
    values = torch.randn(count, generator=generator) * torch.logspace(-9, 2, count).flip(0)
    values[256:512] = 0.0  # an all-zero block
    if not signed:
        values = values.abs()
    codes, absmax = quantize_blockwise(values, signed)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (13,)
    restored = dequantize_blockwise(codes, absmax, signed)
    for block in range(13):
        part = slice(256 * block, min(256 * (block + 1), count))
        scale = values[part].abs().max()
        assert absmax[block] == scale
        error = (restored[part] - values[part]).abs().double()
        if scale == 0:
            assert torch.all(restored[part] == 0)
            continue
        bound = analytic_error_bound(values[part] / scale, signed) * scale.double()
        assert torch.all(error <= bound * (1 + 1e-5) + 1e-12 * scale), block
        # The largest magnitude of a block is stored exactly when it is positive (1 is a code).
        top = values[part].argmax()
        if values[part][top] == scale:
            assert restored[part][top] == values[part][top]


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_lookup_equals_bucketize(signed):
    from ravine.optim.quantized import _codebook, _nearest_codes

    codebook, midpoints, table = _codebook(signed, torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    count = 200_000
    values = (torch.rand(count, generator=generator) * 2 - 1) * torch.logspace(-12, 0, count)
    if not signed:
        values = values.abs()
    # Every midpoint, its float32 neighbours on both sides, zeros, the ends, denormals.
    up, down = torch.nextafter(midpoints, torch.tensor(2.0)), torch.nextafter(midpoints, torch.tensor(-2.0))
    edges = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, codebook[0].item()])
    values = torch.cat([values, midpoints, up, down, edges])
    assert torch.equal(_nearest_codes(values, midpoints, table), torch.bucketize(values, midpoints, out_int32=True))


def test_stochastic_rounding_is_unbiased_and_between_neighbours():
    codebook = dynamic_codebook(True)
    x = torch.full((256 * 400,), 0.5)
    x[0] = 1.0  # every block's absmax is 1 (first block) or 0.5
    x = x.view(400, 256)
    x[:, 0] = 1.0
    x = x.reshape(-1)
    torch.manual_seed(0)
    codes, absmax = quantize_blockwise(x, True, stochastic=True)
    restored = dequantize_blockwise(codes, absmax, True)
    body = restored.view(400, 256)[:, 1:]
    below, above = codebook[codebook <= 0.5].max(), codebook[codebook >= 0.5].min()
    assert set(body.unique().tolist()) <= {below.item(), above.item()}
    # Mean within 4 standard errors of 0.5.
    spread = (above - below).item() / 2
    assert abs(body.mean().item() - 0.5) < 4 * spread / math.sqrt(body.numel())


# -- tracking float32 state ------------------------------------------------------------


# Relative parameter distance to the float32-state run after 100 steps, as measured
# (adam/adamw/amsgrad-bf16 0.0006/0.0006/0.0002, momentum-bf16 0.0015, adam/adamw/
# amsgrad-8bit 0.0022, momentum/nesterov-8bit 0.030/0.027, lion-8bit 0.041: Lion's
# +-lr steps make coordinates near the optimum flip); the bounds are about 3x that.
TRACKING_BOUNDS = {
    "adam-bf16": 0.002, "adamw-bf16": 0.002, "amsgrad-bf16": 0.002, "momentum-bf16": 0.005,
    "adam-8bit": 0.007, "adamw-8bit": 0.007, "amsgrad-8bit": 0.007, "momentum-8bit": 0.09, "nesterov-8bit": 0.09,
    "lion-8bit": 0.12,
}


@pytest.mark.parametrize("name", list(LOW_MEMORY))
def test_low_memory_state_tracks_float32_state(name):
    low_cls, low_kwargs, full_cls, full_kwargs = LOW_MEMORY[name]
    x, target, params = least_squares()
    full_losses = train(full_cls(params, **full_kwargs), x, target, params, 100)
    full_params = [p.detach().clone() for p in params]
    x, target, params = least_squares()
    low_losses = train(low_cls(params, **low_kwargs), x, target, params, 100)
    distance = math.sqrt(sum(((p - q) ** 2).sum().item() for p, q in zip(params, full_params)))
    size = math.sqrt(sum((q**2).sum().item() for q in full_params))
    assert distance / size < TRACKING_BOUNDS[name]
    assert low_losses[-1] < 0.5 * low_losses[0]
    assert low_losses[-1] == pytest.approx(full_losses[-1], rel=0.1, abs=1e-4)


def test_adam_8bit_quantizes_large_tensors_only_and_min_8bit_size_zero_quantizes_all():
    x, target, params = least_squares()
    optimizer = Adam8bit(params, lr=1e-2)
    train(optimizer, x, target, params, 2)
    weight, bias = (optimizer.state[p] for p in params)
    assert weight["exp_avg"].dtype == torch.uint8 and weight["exp_avg_sq"].dtype == torch.uint8
    assert weight["exp_avg_absmax"].shape == (32,) and weight["exp_avg_sq_absmax"].dtype == torch.float32
    assert bias["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in bias
    x, target, params = least_squares()
    optimizer = Adam8bit(params, lr=1e-2, min_8bit_size=0)
    train(optimizer, x, target, params, 2)
    assert optimizer.state[params[1]]["exp_avg"].dtype == torch.uint8


# -- state dicts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in LOW_MEMORY if name.endswith("bf16")])
def test_bf16_state_dtype_is_bfloat16_in_state_dict(name):
    low_cls, low_kwargs, _, _ = LOW_MEMORY[name]
    x, target, params = least_squares()
    optimizer = low_cls(params, **low_kwargs)
    train(optimizer, x, target, params, 2)
    saved = optimizer.state_dict()
    assert saved["param_groups"][0]["state_dtype"] == torch.bfloat16
    for entry in saved["state"].values():
        for key, value in entry.items():
            expected = torch.float32 if key == "step" else torch.bfloat16
            assert value.dtype == expected, key


def test_default_state_dtype_keeps_torch_param_groups():
    params = [torch.nn.Parameter(torch.ones(3))]
    assert ravine.Adam(params).state_dict()["param_groups"] == torch.optim.Adam(params).state_dict()["param_groups"]
    assert ravine.SGD(params).state_dict()["param_groups"] == torch.optim.SGD(params).state_dict()["param_groups"]


@pytest.mark.parametrize("name", list(LOW_MEMORY))
def test_state_dict_round_trip_is_exact(name):
    """10 steps, save, load into a fresh optimizer (through torch's float cast), 10
    more: equal bit for bit to 20 uninterrupted steps; the loaded state equals the saved."""
    low_cls, low_kwargs, _, _ = LOW_MEMORY[name]
    x, target, params = least_squares()
    reference = low_cls(params, **low_kwargs)
    train(reference, x, target, params, 10)
    train(reference, x, target, params, 10, seed=1)
    expected = [p.detach().clone() for p in params]

    x, target, params = least_squares()
    first = low_cls(params, **low_kwargs)
    train(first, x, target, params, 10)
    saved = copy.deepcopy(first.state_dict())
    second = low_cls(params, **low_kwargs)
    second.load_state_dict(saved)
    loaded = second.state_dict()
    for index, entry in saved["state"].items():
        assert loaded["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert loaded["state"][index][key].dtype == value.dtype, key
            assert torch.equal(loaded["state"][index][key], value), key
    train(second, x, target, params, 10, seed=1)
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)
    assert state_bytes(second) == state_bytes(reference)


# -- invalid input and atomic steps ---------------------------------------------------------


@pytest.mark.parametrize("cls", [ravine.Adam, ravine.AdamW, ravine.SGD])
@pytest.mark.parametrize("bad", ["int8", torch.int8, "bf16", 16, torch.complex64])
def test_invalid_state_dtype_raises_value_error(cls, bad):
    with pytest.raises(ValueError) as error:
        cls([torch.nn.Parameter(torch.ones(2))], lr=0.1, state_dtype=bad)
    message = str(error.value)
    assert "state_dtype" in message and "bfloat16" in message and "float32" in message and "None" in message


def test_invalid_state_dtype_in_added_group_and_complex_params_are_refused():
    optimizer = ravine.Adam([torch.nn.Parameter(torch.ones(2))], state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "state_dtype": "int8"})
    assert len(optimizer.param_groups) == 1
    with pytest.raises(ValueError, match="state_dtype"):
        ravine.SGD([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))], momentum=0.9, state_dtype="bfloat16")
    with pytest.raises(ValueError, match="8-bit"):
        Adam8bit([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_8bit_size"):
            AdamW8bit([torch.nn.Parameter(torch.ones(2))], min_8bit_size=bad)


@pytest.mark.parametrize("name", list(LOW_MEMORY))
def test_step_that_raises_changes_nothing(name):
    low_cls, low_kwargs, _, _ = LOW_MEMORY[name]
    x, target, params = least_squares()
    optimizer = low_cls([{"params": [params[0]]}, {"params": [params[1]]}], **low_kwargs)
    train(optimizer, x, target, params, 3)
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(optimizer.state_dict())
    optimizer.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        train(optimizer, x, target, params, 1)
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    after = optimizer.state_dict()["state"]
    for index, entry in before_state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[index][key], value), key
    if not name.startswith("momentum") and not name.startswith("nesterov"):
        return
    # SGD with a state dtype or 8-bit state refuses sparse gradients before any write.
    optimizer.param_groups[1]["lr"] = 0.05
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.ones_like(params[1]).to_sparse()
    with pytest.raises(RuntimeError, match="sparse|dense"):
        optimizer.step()
    assert torch.equal(params[0].detach(), before_params[0])


# -- bytes ---------------------------------------------------------------------------------------


def expected_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """State bytes from shapes: float32 buffers 4 B, bfloat16 2 B, 8-bit 1 B per element
    plus a 4-byte scale per 256 elements (tensors of >= 4096 elements), a 4-byte step
    tensor per parameter for Adam."""
    buffers = {"adam": 2, "amsgrad": 3, "momentum": 1, "lion": 1}[name.split("-")[0]]
    step = 4 if name.split("-")[0] in ("adam", "amsgrad") else 0
    total = 0
    for shape in shapes:
        count = math.prod(shape)
        if name.endswith("bf16"):
            per_buffer = 2 * count
        elif name.endswith("8bit") and count >= 4096:
            per_buffer = count + 4 * math.ceil(count / 256)
        else:
            per_buffer = 4 * count
        total += buffers * per_buffer + step
    return total


@pytest.mark.parametrize(
    "name", ["adam-bf16", "amsgrad-bf16", "momentum-bf16", "adam-8bit", "amsgrad-8bit", "momentum-8bit", "lion-8bit"]
)
def test_exact_bytes_per_parameter(name):
    low_cls, low_kwargs, _, _ = LOW_MEMORY[name]
    shapes = [(300, 70), (70,), (70, 10), (10,), (4096,), (4095,)]
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    optimizer = low_cls(params, **low_kwargs)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert state_bytes(optimizer) == expected_bytes(name, shapes)
    assert state_bytes_per_parameter(optimizer) == expected_bytes(name, shapes) / sum(math.prod(s) for s in shapes)


def test_adam_8bit_holds_at_most_2_1_bytes_per_parameter_for_a_large_tensor():
    parameter = torch.nn.Parameter(torch.zeros(1_000_000))
    optimizer = AdamW8bit([parameter])
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    # 2 x 1,000,000 codes + 2 x 3907 float32 scales + a 4-byte step
    assert state_bytes(optimizer) == 2_000_000 + 2 * 4 * 3907 + 4
    assert state_bytes_per_parameter(optimizer) <= 2.1


# -- everywhere ravine lists optimizers ---------------------------------------------------------------


REGISTERED = {
    "adam-bf16": (ravine.Adam, {"state_dtype": torch.bfloat16}),
    "adamw-bf16": (ravine.AdamW, {"state_dtype": torch.bfloat16}),
    "momentum-bf16": (ravine.SGD, {"momentum": 0.9, "state_dtype": torch.bfloat16}),
    "adam-8bit": (Adam8bit, {}),
    "adamw-8bit": (AdamW8bit, {"weight_decay": 0.01}),
    "momentum-8bit": (SGD8bit, {"momentum": 0.9}),
    "lion-8bit": (Lion8bit, {}),
}


@pytest.mark.parametrize("name", list(REGISTERED))
def test_registry_names(name):
    cls, expected = REGISTERED[name]
    assert name in ravine.available()
    optimizer = ravine.create(f"{name}(lr=0.01)", [torch.nn.Parameter(torch.zeros(5000))])
    assert type(optimizer) is cls
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01
    for key, value in expected.items():
        assert group[key] == value, key


def test_spec_string_sets_state_dtype_by_name():
    optimizer = ravine.create("adam(state_dtype='bfloat16')", [torch.nn.Parameter(torch.zeros(3))])
    assert optimizer.param_groups[0]["state_dtype"] == torch.bfloat16
    with pytest.raises(ValueError, match="state_dtype"):
        ravine.registry.check_spec("adamw(state_dtype='int8')")


def test_landscape_paths():
    from ravine.landscape.paths import run_many

    # Two coordinates are below min_8bit_size, so the 8-bit optimizers keep float32
    # state there and follow their float twins exactly; min_8bit_size=0 quantizes.
    pairs = [("adam-8bit", "adam"), ("momentum-8bit", "momentum"), ("lion-8bit", "lion")]
    paths = run_many("rosenbrock", [spec for pair in pairs for spec in pair], steps=50, dtype=torch.float32)
    for low, full in zip(paths[::2], paths[1::2]):
        assert torch.equal(torch.as_tensor(low.positions), torch.as_tensor(full.positions))
    quantized, bf16, full = run_many(
        "rosenbrock", ["adam-8bit(min_8bit_size=0)", "adam-bf16", "adam"], steps=50, lrs=[0.01], dtype=torch.float32
    )
    # Measured largest coordinate gap to float32 state over 50 steps: 0.023 (8-bit,
    # both coordinates in one block) and 0.0008 (bfloat16).
    for path, bound in ((quantized, 0.05), (bf16, 0.002)):
        points = torch.as_tensor(path.positions)
        assert torch.isfinite(points).all() and not path.diverged
        assert (points - torch.as_tensor(full.positions)).abs().max() < bound


def test_arena_one_epoch():
    from ravine.arena.train import TrainConfig, train as train_run

    full = train_run("mnist1d-mlp", TrainConfig("adamw", lr=1e-2, epochs=1))
    for name in ("adamw-bf16", "adamw-8bit"):
        result = train_run("mnist1d-mlp", TrainConfig(name, lr=1e-2, epochs=1))
        assert result.status == "ok"
        assert result.state_bytes < full.state_bytes
        assert abs(result.final_test_metric - full.final_test_metric) < 0.05


def test_docs_example_runs_and_its_byte_count_holds():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "memory.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, "docs/memory.md", "exec"), namespace)
    optimizer = namespace["optimizer"]
    # weight: 2 x 1,048,576 codes + 2 x 4,096 scales x 4 B + step; bias (1,024 < 4,096):
    # two float32 buffers + step
    expected = 2 * 1_048_576 + 2 * 4 * 4_096 + 4 + 2 * 4 * 1_024 + 4
    assert expected == 2_138_120 and "2138120" in code
    assert state_bytes(optimizer) == expected


# The 8-bit step as first written: a chunk of at most 65,536 elements at a time,
# each dequantized, updated and quantized by the public quantize/dequantize
# functions. The step in ravine.optim.quantized must give the same codes and scales.
_REFERENCE_CHUNK = 1 << 16


class _ReferenceQuantizedStep:
    def update(self, group, params, grads, states, steps):
        from ravine.optim.quantized import BlockwiseQuantizedState

        names = self.state_names(group)
        batch, size = [], 0
        for p, g, state, step in zip(params, grads, states, steps, strict=True):
            full = self.state.get(p, {})
            quantized = [name for name in names if name + "_absmax" in full]
            if not quantized:
                batch.append((p, g, state, step, None))
                size += p.numel()
            elif not (p.is_contiguous() and g.is_contiguous()):
                work = dict(state)
                for name in quantized:
                    work[name] = dequantize_blockwise(full[name], full[name + "_absmax"], name in SIGNED)
                batch.append((p, g, work, step, (full, quantized, 0)))
                size += p.numel()
            else:
                flat_p, flat_g = p.view(-1), g.view(-1)
                for start in range(0, p.numel(), _REFERENCE_CHUNK):
                    length = min(_REFERENCE_CHUNK, p.numel() - start)
                    first, last = start // 256, -(-(start + length) // 256)
                    work = dict(state)
                    for name in quantized:
                        work[name] = dequantize_blockwise(
                            full[name].view(-1)[start:start + length], full[name + "_absmax"][first:last], name in SIGNED
                        )
                    part = slice(start, start + length)
                    batch.append((flat_p[part], flat_g[part], work, step, (full, quantized, start)))
                    size += length
                    if size >= _REFERENCE_CHUNK:
                        self._reference_run(group, batch, BlockwiseQuantizedState)
                        batch, size = [], 0
            if size >= _REFERENCE_CHUNK:
                self._reference_run(group, batch, BlockwiseQuantizedState)
                batch, size = [], 0
        if batch:
            self._reference_run(group, batch, BlockwiseQuantizedState)

    def _reference_run(self, group, batch, mixin):
        from ravine.optim.lowmem import run_in_working_precision

        rule = super(mixin, self).update  # the float optimizer's rule
        run_in_working_precision(rule, group, *[[e[i] for e in batch] for i in range(4)])
        for _, _, work, _, source in batch:
            if source is None:
                continue
            full, names, start = source
            for name in names:
                codes, absmax = quantize_blockwise(work[name], name in SIGNED, stochastic=self.stochastic_rounding)
                full[name].view(-1)[start:start + codes.numel()].copy_(codes.view(-1))
                full[name + "_absmax"][start // 256:start // 256 + absmax.numel()].copy_(absmax)


SIGNED = ("exp_avg", "momentum_buffer")
REFERENCE_CASES = {
    "adamw-8bit": (AdamW8bit, {"lr": 1e-2}),
    "amsgrad-8bit": (Adam8bit, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    "nesterov-8bit": (SGD8bit, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "lion-8bit": (Lion8bit, {"lr": 1e-3, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_8bit_step_gives_the_codes_and_scales_of_the_chunk_by_chunk_step(name):
    cls, kwargs = REFERENCE_CASES[name]
    reference_cls = type("Reference" + cls.__name__, (_ReferenceQuantizedStep, cls), {})
    # Sizes: not multiples of 256, below min_8bit_size, over one work buffer
    # (2**18 elements), a 2-d tensor, and a non-contiguous one (a transpose).
    shapes = [(300, 70), (5000,), (100,), (70_001,), (1000, 300), (4097,)]
    runs = []
    for optimizer_cls in (reference_cls, cls):
        torch.manual_seed(0)
        params = [torch.randn(shape, requires_grad=True) for shape in shapes]
        params.append(torch.randn(90, 80).t().requires_grad_())
        optimizer = optimizer_cls(params, **kwargs)
        generator = torch.Generator().manual_seed(1)
        torch.manual_seed(2)  # stochastic rounding draws from the global generator
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator) * 10.0 ** (step % 3 - 1)
            optimizer.step()
        runs.append((params, optimizer.state_dict()["state"]))
    (ref_params, ref_state), (params, state) = runs
    for ref_p, p in zip(ref_params, params):
        assert torch.equal(ref_p.view(torch.int32), p.view(torch.int32))
    assert ref_state.keys() == state.keys()
    quantized = 0
    for index in ref_state:
        assert ref_state[index].keys() == state[index].keys()
        for key, value in ref_state[index].items():
            assert value.dtype == state[index][key].dtype, key
            assert torch.equal(value.reshape(-1).view(torch.uint8), state[index][key].reshape(-1).view(torch.uint8)), key
            quantized += key.endswith("_absmax")
    assert quantized >= 5  # the comparison covered 8-bit state


@pytest.mark.parametrize("signed", [True, False])
def test_block_normalization_and_nearest_codes_into_buffers(signed):
    from ravine.optim.quantized import _codebook, _nearest_codes_into, _normalize_blocks

    codebook, midpoints, table = _codebook(signed, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(64, 256, generator=generator) * torch.logspace(-30, 3, 64)[:, None]
    values[5] = 0.0
    values[6] = -0.0
    values[7, :10] = -0.0
    values[8] = -values[8].abs()
    if not signed:
        values = values.abs()
    expected_absmax = values.abs().amax(dim=1)
    scale = torch.where(expected_absmax > 0, expected_absmax, torch.ones_like(expected_absmax))
    expected_normalized = values / scale[:, None]
    normalized, absmax = _normalize_blocks(values.clone())
    assert torch.equal(absmax.view(torch.int32), expected_absmax.view(torch.int32))  # no -0.0 scales
    assert torch.equal(normalized, expected_normalized)
    flat = torch.cat([normalized.view(-1), midpoints, torch.nextafter(midpoints, torch.tensor(2.0))])
    scratch = [torch.empty(flat.numel(), dtype=dtype) for dtype in (torch.int32, torch.int32, torch.float32)]
    codes = _nearest_codes_into(flat, table, midpoints, *scratch)
    assert torch.equal(codes, torch.bucketize(flat, midpoints, out_int32=True))


@pytest.mark.parametrize("spec", ["adam-bf16", "adamw-8bit", "momentum-bf16", "momentum-8bit", "lion-8bit"])
def test_values_that_overflow_the_float32_working_precision_are_refused_before_any_step(spec):
    """Narrow and quantized state steps compute in float32: an lr or weight decay that
    would overflow there is refused by name instead of failing halfway through a step."""
    weight = torch.nn.Parameter(torch.randn(5000))
    largest = float(torch.finfo(torch.float32).max)
    for argument in ("lr", "weight_decay"):
        with pytest.raises(ValueError, match=argument):
            ravine.create(f"{spec}({argument}={largest * 10:.3e})", [weight])
    # Adam's first step divides lr by 1 - beta1: the bound is float32's largest times that.
    if spec.startswith("adam"):
        with pytest.raises(ValueError, match=r"lr must be in \[0.0, 3.40282\d*e\+37\]"):
            ravine.create(f"{spec}(lr=1e38)", [weight])
        optimizer = ravine.create(f"{spec}(lr=3e37)", [weight])
        weight.grad = torch.ones_like(weight)
        optimizer.step()  # the largest allowed lr steps without an overflow error
