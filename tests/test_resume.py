"""Exact resume: a run interrupted at any step and resumed from a file (optimizer,
schedule, model and RNG state) continues bit for bit like the uninterrupted run, for
every registered optimizer and two schedules; state dicts load across dtypes as
torch.optim's do; state dicts that do not fit are refused, naming group and parameter."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ravine
from optimizer_table import CASES, clone_options
from ravine.schedules import ReduceOnPlateau, ScheduledLR, warmup_cosine

NAMES = ravine.available()
TOTAL = 12
SCHEDULES = ["warmup_cosine", "plateau"]


def make_model(seed: int, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16, bias=bias), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3, bias=bias)
    )


def make_run(name: str, schedule: str, seed: int = 0):
    model = make_model(seed)
    optimizer = ravine.create(name, model.parameters())
    lr = optimizer.param_groups[0]["lr"]
    lr = float(lr) if not isinstance(lr, torch.Tensor) else lr.item()
    curve = warmup_cosine(peak_lr=lr, warmup_steps=3, total_steps=TOTAL)
    plateau = ReduceOnPlateau(patience=0, factor=0.5) if schedule == "plateau" else None
    scheduler = ScheduledLR(optimizer, curve, plateau=plateau)
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, steps: int) -> None:
    """Random batches and dropout from torch's global generator, so its state matters."""
    data = torch.randn(64, 5, generator=torch.Generator().manual_seed(7))
    targets = torch.randn(64, 3, generator=torch.Generator().manual_seed(8))
    dtype = next(model.parameters()).dtype
    data, targets = data.to(dtype), targets.to(dtype)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, 64, (8,))
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data[index]), targets[index])
        loss.backward()
        optimizer.step()
        plateau = scheduler.plateau is not None
        scheduler.step(metric=loss.item() if plateau else None)


def checkpoint(path: Path, model, optimizer, scheduler) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        },
        path,
    )


def restore(path: Path, model, optimizer, scheduler) -> None:
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])


def assert_identical(model_a, optimizer_a, model_b, optimizer_b) -> None:
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = optimizer_a.state_dict(), optimizer_b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, entry in state_a["state"].items():
        assert entry.keys() == state_b["state"][index].keys()
        for key, value in entry.items():
            other = state_b["state"][index][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), (index, key)
            else:
                assert value == other, (index, key)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("interrupt_at", [5])
def test_interrupted_run_resumes_bit_identically(name, schedule, interrupt_at, tmp_path):
    torch.manual_seed(123)
    uninterrupted = make_run(name, schedule)
    train(*uninterrupted, TOTAL)

    torch.manual_seed(123)
    first_half = make_run(name, schedule)
    train(*first_half, interrupt_at)
    checkpoint(tmp_path / "run.pt", *first_half)
    del first_half
    torch.manual_seed(999)  # a new process: other RNG state, other initial weights
    resumed = make_run(name, schedule, seed=1)
    restore(tmp_path / "run.pt", *resumed)
    train(*resumed, TOTAL - interrupt_at)

    assert resumed[2].step_count == TOTAL
    assert resumed[2].get_last_lr() == uninterrupted[2].get_last_lr()
    assert_identical(uninterrupted[0], uninterrupted[1], resumed[0], resumed[1])


_CHILD = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    import test_resume as R
    torch.set_num_threads(1)
    for name in R.NAMES:
        run = R.make_run(name, "plateau", seed=5)
        R.restore(R.Path({folder!r}) / f"{{name}}.pt", *run)
        R.train(*run, R.TOTAL - 4)
        torch.save(run[1].state_dict(), R.Path({folder!r}) / f"{{name}}-end.pt")
        torch.save(run[0].state_dict(), R.Path({folder!r}) / f"{{name}}-model.pt")
    """
)


def test_resume_in_a_fresh_process(tmp_path):
    """The second half runs in a new Python process, for every optimizer at once."""
    finals = {}
    for name in NAMES:
        torch.manual_seed(3)
        run = make_run(name, "plateau")
        train(*run, 4)
        checkpoint(tmp_path / f"{name}.pt", *run)
        train(*run, TOTAL - 4)
        finals[name] = run
    child = _CHILD.format(tests=str(Path(__file__).parent), folder=str(tmp_path))
    subprocess.run([sys.executable, "-c", child], check=True, timeout=120)
    for name, (model, optimizer, _) in finals.items():
        resumed_model = make_model(0)
        resumed_model.load_state_dict(torch.load(tmp_path / f"{name}-model.pt", weights_only=True))
        for a, b in zip(model.parameters(), resumed_model.parameters()):
            assert torch.equal(a, b), name
        ours, theirs = optimizer.state_dict(), torch.load(tmp_path / f"{name}-end.pt", weights_only=True)
        for index, entry in ours["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, theirs["state"][index][key]), (name, index, key)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_float32_state_loads_into_float64_parameters_as_torch_does(case):
    options = clone_options(case.options[-2])
    source = make_model(0, bias=case.takes_vectors)
    optimizer = case.ravine_cls(source.parameters(), **clone_options(options))
    train(source, optimizer, ScheduledLR(optimizer, lambda step: 1e-3), 3)
    saved = copy.deepcopy(optimizer.state_dict())

    results = []
    for cls in (case.ravine_cls, case.torch_cls):
        target = make_model(0, bias=case.takes_vectors).double()
        loader = cls(target.parameters(), **clone_options(options))
        loader.load_state_dict(copy.deepcopy(saved))
        results.append((target, loader))
    (ours_model, ours), (torch_model, theirs) = results
    for index, entry in theirs.state_dict()["state"].items():
        for key, value in entry.items():
            mine = ours.state_dict()["state"][index][key]
            assert (mine.dtype, mine.device) == (value.dtype, value.device), key
            assert torch.equal(mine, value), key
            if key == "step":
                assert mine.dtype == torch.float32  # step counts stay float32, as in torch
            else:
                assert mine.dtype == torch.float64
    torch.manual_seed(0)
    train(ours_model, ours, ScheduledLR(ours, lambda step: 1e-3), 2)
    torch.manual_seed(0)
    train(torch_model, theirs, ScheduledLR(theirs, lambda step: 1e-3), 2)
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_that_does_not_fit_is_refused_naming_group_and_parameter(name):
    trained = make_model(0)
    optimizer = ravine.create(name, trained.parameters())
    torch.manual_seed(0)
    train(trained, optimizer, ScheduledLR(optimizer, lambda step: 1e-3), 2)
    saved = optimizer.state_dict()
    other = torch.nn.Sequential(torch.nn.Linear(16, 3), torch.nn.Linear(5, 16))
    params = list(other.parameters())
    if any(isinstance(v, torch.Tensor) and v.dim() > 0 for entry in saved["state"].values() for v in entry.values()):
        # Same number of tensors, but the two layers in swapped order: shapes differ.
        target = ravine.create(name, params)
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(
            ValueError,
            match=r"param group 0, parameter \d: state '\w+' has shape \([\d, ]+\) in the state dict but the parameter has shape \([\d, ]+\)",
        ):
            target.load_state_dict(saved)
        after = target.state_dict()
        assert after["state"].keys() == before["state"].keys()  # nothing was loaded
        for index, entry in before["state"].items():
            for key, value in entry.items():
                assert torch.equal(after["state"][index][key], value)
    # Whether or not the rule keeps buffers, group and parameter counts must fit.
    two_groups = ravine.create(name, [{"params": params[:2]}, {"params": params[2:]}])
    # (an optimizer may regroup what it is given, as MuonWithAdamW does)
    with pytest.raises(
        ValueError,
        match=f"the state dict has {len(saved['param_groups'])} param groups but this optimizer has {len(two_groups.param_groups)}",
    ):
        two_groups.load_state_dict(saved)
    too_few = ravine.create(name, params[:3])
    with pytest.raises(ValueError, match=r"param groups but this optimizer has|param group \d+ has \d+ parameters in the state dict but \d+ in this optimizer|param group \d+, parameter \d+: state '\w+' has shape"):
        too_few.load_state_dict(saved)
    with pytest.raises(ValueError, match="state_dict must be a dict with 'state' and 'param_groups'"):
        too_few.load_state_dict({"state": {}})
