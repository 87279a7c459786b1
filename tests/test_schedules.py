"""Schedules against their formulas and torch's schedulers; the ScheduledLR adapter."""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler

import ravine
from ravine.schedules import (
    ReduceOnPlateau,
    ScheduledLR,
    constant,
    cosine,
    exponential,
    join,
    linear_warmup,
    multiply,
    multistep,
    one_cycle,
    step_decay,
    warmup_cosine,
)

NAN, INF = float("nan"), float("inf")


def torch_lrs(make_scheduler, base_lr: float, steps: int) -> list[float]:
    """Learning rates a torch scheduler gives at steps 0 .. steps-1."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for step in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        if step < steps - 1:  # OneCycleLR may not step past its last step
            optimizer.step()
            scheduler.step()
    return rates


# --------------------------------------------------------------------------- formulas


def test_warmup_cosine_worked_example():
    # The seed's Example 3: T = 1000, T_w = 100, peak 1e-3.
    schedule = warmup_cosine(peak_lr=1e-3, warmup_steps=100, total_steps=1000)
    table = {0: 0.000000, 50: 0.000500, 100: 0.001000, 300: 0.000883, 700: 0.000250, 1000: 0.0}
    for step, expected in table.items():
        assert f"{schedule(step):.6f}" == f"{expected:.6f}", step
    exact = 1e-3 * 0.5 * (1 + math.cos(math.pi * 200 / 900))
    assert schedule(300) == pytest.approx(exact, rel=1e-15)
    assert schedule(700) == pytest.approx(2.5e-4, rel=1e-12)
    assert schedule(5000) == 0.0


@pytest.mark.parametrize(
    "schedule, table",
    [
        (constant(0.3), {0: 0.3, 1: 0.3, 10**6: 0.3}),
        (step_decay(1.0, 10, gamma=0.5), {0: 1.0, 9: 1.0, 10: 0.5, 25: 0.25}),
        (multistep(1.0, [3, 7], gamma=0.1), {0: 1.0, 2: 1.0, 3: 0.1, 6: 0.1, 7: 0.01, 100: 0.01}),
        (exponential(2.0, 0.5), {0: 2.0, 1: 1.0, 3: 0.25}),
        (cosine(1.0, 100), {0: 1.0, 50: 0.5, 100: 0.0, 150: 0.0}),
        (cosine(1.0, 100, final_value=0.2), {0: 1.0, 50: 0.6, 100: 0.2, 400: 0.2}),
        (linear_warmup(1.0, 10, init_value=0.2), {0: 0.2, 5: 0.6, 10: 1.0, 50: 1.0}),
        (linear_warmup(0.5, 0), {0: 0.5, 7: 0.5}),
        (warmup_cosine(1.0, 0, 100), {0: 1.0, 50: 0.5, 100: 0.0}),
        (warmup_cosine(1.0, 50, 50, final_lr=0.1), {25: 0.5, 50: 1.0, 51: 0.1, 99: 0.1}),
        (warmup_cosine(1.0, 10, 110, final_lr=0.2), {5: 0.5, 10: 1.0, 60: 0.6, 110: 0.2, 200: 0.2}),
        (
            join([linear_warmup(1.0, 10), constant(0.5), exponential(0.5, 0.9)], [10, 20]),
            {0: 0.0, 5: 0.5, 9: 0.9, 10: 0.5, 19: 0.5, 20: 0.5, 22: 0.5 * 0.81},
        ),
        (join([constant(0.7)], []), {0: 0.7, 99: 0.7}),
        (join([lambda s: 1.0, lambda s: 1.0 / (s + 1)], [5]), {4: 1.0, 5: 1.0, 6: 0.5}),
        (multiply(cosine(1.0, 100), constant(0.1)), {0: 0.1, 50: 0.05, 100: 0.0}),
        (multiply(linear_warmup(1.0, 4), lambda s: 2.0), {1: 0.5, 4: 2.0}),
    ],
    ids=repr,
)
def test_schedule_values(schedule, table):
    for step, expected in table.items():
        assert schedule(step) == pytest.approx(expected, rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize(
    "schedule, make_scheduler, base_lr, steps",
    [
        (step_decay(0.1, 30, 0.5), lambda o: lr_scheduler.StepLR(o, 30, 0.5), 0.1, 300),
        (step_decay(0.2, 7), lambda o: lr_scheduler.StepLR(o, 7), 0.2, 60),
        (
            multistep(0.1, [20, 75, 150], 0.3),
            lambda o: lr_scheduler.MultiStepLR(o, [20, 75, 150], 0.3),
            0.1,
            300,
        ),
        (exponential(0.1, 0.99), lambda o: lr_scheduler.ExponentialLR(o, 0.99), 0.1, 300),
        (exponential(0.05, 1.01), lambda o: lr_scheduler.ExponentialLR(o, 1.01), 0.05, 200),
        (cosine(0.1, 250), lambda o: lr_scheduler.CosineAnnealingLR(o, 250), 0.1, 251),
        (
            cosine(0.1, 300, final_value=1e-3),
            lambda o: lr_scheduler.CosineAnnealingLR(o, 300, eta_min=1e-3),
            0.1,
            301,
        ),
    ],
    ids=["StepLR", "StepLR-default-gamma", "MultiStepLR", "ExponentialLR", "ExponentialLR-growth",
         "CosineAnnealingLR", "CosineAnnealingLR-eta_min"],
)
def test_schedule_matches_torch(schedule, make_scheduler, base_lr, steps):
    expected = torch_lrs(make_scheduler, base_lr, steps)
    ours = [schedule(step) for step in range(steps)]
    assert ours == pytest.approx(expected, rel=1e-10, abs=1e-15)


@pytest.mark.parametrize(
    "max_lr, total_steps, pct_start, div_factor, final_div_factor, anneal",
    [
        (0.1, 300, 0.3, 25.0, 1e4, "cos"),
        (0.1, 300, 0.3, 25.0, 1e4, "linear"),
        (1.0, 200, 0.25, 10.0, 100.0, "cos"),
        (0.01, 257, 0.45, 5.0, 1e3, "linear"),
        (0.1, 100, 0.0, 25.0, 1e4, "cos"),
        (0.1, 100, 1.0, 25.0, 1e4, "cos"),
        (0.3, 7, 0.5, 25.0, 1e4, "cos"),
    ],
)
def test_one_cycle_matches_torch(
    max_lr, total_steps, pct_start, div_factor, final_div_factor, anneal
):
    expected = torch_lrs(
        lambda o: lr_scheduler.OneCycleLR(
            o,
            max_lr=max_lr,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            cycle_momentum=False,
        ),
        max_lr,
        total_steps,
    )
    schedule = one_cycle(max_lr, total_steps, pct_start, div_factor, final_div_factor, anneal)
    assert [schedule(step) for step in range(total_steps)] == pytest.approx(expected, rel=1e-12)
    # After the last step the rate holds the minimum (torch raises past total_steps).
    assert schedule(total_steps + 100) == schedule(total_steps - 1)


def test_one_cycle_warmup_ending_at_step_zero():
    # pct_start * T - 1 == 0: torch divides by zero; here the warmup ends at max_lr.
    schedule = one_cycle(0.1, 10, pct_start=0.1)
    assert schedule(0) == 0.1
    assert schedule(9) == pytest.approx(0.1 / 25 / 1e4)


def test_schedules_pickle_and_repr():
    schedule = join([linear_warmup(1.0, 10), cosine(1.0, 90)], [10])
    clone = pickle.loads(pickle.dumps(schedule))
    assert [clone(s) for s in range(0, 120, 7)] == [schedule(s) for s in range(0, 120, 7)]
    assert repr(warmup_cosine(1e-3, 100, 1000)) == (
        "warmup_cosine(peak_lr=0.001, warmup_steps=100, total_steps=1000, final_lr=0.0)"
    )


@settings(max_examples=150, deadline=None)
@given(
    peak=st.floats(0.0, 10.0),
    final_fraction=st.floats(0.0, 1.0),
    warmup=st.integers(0, 300),
    extra=st.integers(0, 300),
    step=st.integers(0, 1000),
)
def test_warmup_cosine_bounds_and_monotone_decay(peak, final_fraction, warmup, extra, step):
    final = peak * final_fraction
    total = max(warmup + extra, 1)
    schedule = warmup_cosine(peak, warmup, total, final_lr=final)
    lr = schedule(step)
    tolerance = 1e-12 * max(peak, 1.0)
    assert -tolerance <= lr <= peak + tolerance
    if step >= warmup:
        assert lr >= final - tolerance
        assert schedule(step + 1) <= lr + tolerance
    else:
        assert schedule(step + 1) >= lr - tolerance


@settings(max_examples=100, deadline=None)
@given(
    total=st.integers(1, 500),
    pct_start=st.floats(0.0, 1.0),
    anneal=st.sampled_from(["cos", "linear"]),
    step=st.integers(0, 600),
)
def test_one_cycle_stays_between_min_and_max(total, pct_start, anneal, step):
    lr = one_cycle(1.0, total, pct_start=pct_start, anneal=anneal)(step)
    assert 1.0 / 25 / 1e4 * (1 - 1e-12) <= lr <= 1.0 + 1e-12


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: constant(-1.0), "value must be a finite number >= 0 (got value=-1.0)"),
        (lambda: constant(NAN), "value=nan"),
        (lambda: constant(INF), "value=inf"),
        (lambda: constant("0.1"), "value='0.1'"),
        (lambda: step_decay(0.1, 0), "step_size must be an integer >= 1 (got step_size=0)"),
        (lambda: step_decay(0.1, 1.5), "step_size=1.5"),
        (lambda: step_decay(0.1, 10, gamma=0.0), "gamma must be a finite number > 0"),
        (lambda: step_decay(0.1, 10, gamma=NAN), "gamma=nan"),
        (lambda: step_decay(-0.1, 10), "init_value=-0.1"),
        (lambda: multistep(0.1, [10, 5]), "milestones must be strictly increasing"),
        (lambda: multistep(0.1, [10, 10]), "milestones must be strictly increasing"),
        (lambda: multistep(0.1, [0, 5]), "milestones[0] must be an integer >= 1"),
        (lambda: multistep(0.1, 10), "milestones must be a sequence"),
        (lambda: exponential(0.1, -0.5), "gamma=-0.5"),
        (lambda: exponential(INF, 0.9), "init_value=inf"),
        (lambda: cosine(0.1, 0), "total_steps must be an integer >= 1 (got total_steps=0)"),
        (lambda: cosine(0.1, 10, final_value=-1.0), "final_value=-1.0"),
        (lambda: linear_warmup(1.0, -1), "warmup_steps must be an integer >= 0"),
        (lambda: linear_warmup(INF, 10), "peak_value=inf"),
        (lambda: linear_warmup(1.0, 10, init_value=NAN), "init_value=nan"),
        (
            lambda: warmup_cosine(1e-3, 200, 100),
            "warmup_steps must be <= total_steps (got warmup_steps=200, total_steps=100)",
        ),
        (lambda: warmup_cosine(1e-3, 10, 100, final_lr=2e-3), "final_lr must be <= peak_lr"),
        (lambda: warmup_cosine(NAN, 10, 100), "peak_lr=nan"),
        (lambda: warmup_cosine(1e-3, 0, 0), "total_steps=0"),
        (lambda: warmup_cosine(1e-3, -5, 100), "warmup_steps=-5"),
        (lambda: one_cycle(0.0, 100), "max_lr must be a finite number > 0 (got max_lr=0.0)"),
        (lambda: one_cycle(0.1, 0), "total_steps=0"),
        (lambda: one_cycle(0.1, 100, pct_start=1.5), "pct_start must be a finite number >= 0 and <= 1"),
        (lambda: one_cycle(0.1, 100, div_factor=0.0), "div_factor=0.0"),
        (lambda: one_cycle(0.1, 100, final_div_factor=-1.0), "final_div_factor=-1.0"),
        (lambda: one_cycle(0.1, 100, anneal="exp"), "anneal must be 'cos' or 'linear'"),
        (lambda: join([constant(1.0), constant(2.0)], []), "boundaries must have len(schedules) - 1 = 1"),
        (lambda: join([constant(1.0), constant(2.0)], [0]), "boundaries[0] must be an integer >= 1"),
        (lambda: join([constant(1.0)] * 3, [10, 10]), "boundaries must be strictly increasing"),
        (lambda: join([], []), "schedules must hold at least one schedule"),
        (lambda: multiply(), "multiply needs at least one schedule"),
        (lambda: warmup_cosine(1e-3, 10, 100)(-1), "step must be >= 0 (got step=-1)"),
        (lambda: ReduceOnPlateau(mode="mean"), "mode must be 'min' or 'max'"),
        (lambda: ReduceOnPlateau(factor=1.0), "factor must be a finite number > 0 and < 1"),
        (lambda: ReduceOnPlateau(factor=0.0), "factor=0.0"),
        (lambda: ReduceOnPlateau(patience=-1), "patience must be an integer >= 0"),
        (lambda: ReduceOnPlateau(threshold=-1e-4), "threshold=-0.0001"),
        (lambda: ReduceOnPlateau(threshold_mode="pct"), "threshold_mode must be 'rel' or 'abs'"),
        (lambda: ReduceOnPlateau(cooldown=-1), "cooldown=-1"),
        (lambda: ReduceOnPlateau(min_scale=2.0), "min_scale must be a finite number >= 0 and <= 1"),
    ],
)
def test_invalid_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def _sgd(groups: int = 1, lr=0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)], lr=lr
    )


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: ScheduledLR("sgd", constant(0.1)), TypeError, "optimizer must be a torch.optim.Optimizer"),
        (lambda: ScheduledLR(_sgd(), 0.1), TypeError, "schedule must be a callable"),
        (lambda: ScheduledLR(_sgd(), constant(0.1), plateau=0.5), TypeError, "plateau must be a ReduceOnPlateau"),
        (lambda: ScheduledLR(_sgd(2), [constant(0.1)]), ValueError, "one entry per param group: 2 (got 1"),
        (lambda: ScheduledLR(_sgd(), lambda s: NAN), ValueError, "gave lr=nan at step 0"),
        (lambda: ScheduledLR(_sgd(), lambda s: -1.0), ValueError, "gave lr=-1.0 at step 0"),
        (lambda: ScheduledLR(_sgd(), constant(0.1)).step(metric=1.0), ValueError, "no plateau"),
        (
            lambda: ScheduledLR(_sgd(), constant(0.1)).load_state_dict(
                ScheduledLR(_sgd(), constant(0.1), ReduceOnPlateau()).state_dict()
            ),
            ValueError,
            "disagree on the plateau",
        ),
        (lambda: ScheduledLR(_sgd(), constant(0.1)).load_state_dict({}), ValueError, "'step_count'"),
    ],
)
def test_adapter_invalid_use(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


# --------------------------------------------------------------------------- adapter


OPTIMIZERS = [
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.AdamW, {}),
    (ravine.SGD, {"momentum": 0.9, "nesterov": True}),
    (ravine.Adagrad, {}),
    (ravine.RMSprop, {}),
    (ravine.Adam, {}),
    (ravine.AdamW, {"weight_decay": 0.1}),
]


@pytest.mark.parametrize(
    "cls, options", OPTIMIZERS, ids=[f"{cls.__module__}.{cls.__name__}" for cls, _ in OPTIMIZERS]
)
def test_adapter_sets_schedule_values_on_any_optimizer(cls, options):
    model = torch.nn.Linear(3, 1)
    optimizer = cls(model.parameters(), lr=1.0, **options)
    schedule = warmup_cosine(1e-2, 5, 20)
    scheduler = ScheduledLR(optimizer, schedule)
    assert optimizer.param_groups[0]["lr"] == schedule(0) == 0.0
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    for step in range(1, 25):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] == schedule(step)
        assert scheduler.get_last_lr() == [schedule(step)]
    assert scheduler.step_count == 24


def test_adapter_one_schedule_per_group_and_added_groups():
    optimizer = _sgd(2)
    first, second = cosine(1.0, 10), linear_warmup(0.5, 4)
    scheduler = ScheduledLR(optimizer, [first, second])
    scheduler.step()
    assert scheduler.get_last_lr() == [first(1), second(1)]

    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match="append the new group's schedule"):
        scheduler.step()
    third = constant(0.01)
    scheduler.schedules.append(third)
    scheduler.step()
    assert scheduler.get_last_lr() == [first(3), second(3), third(3)]


def test_adapter_shared_schedule_drives_added_groups():
    optimizer = _sgd(1)
    schedule = cosine(1.0, 10)
    scheduler = ScheduledLR(optimizer, schedule)
    scheduler.step()
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 123.0})
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [schedule(2), schedule(2)]


def test_adapter_updates_tensor_lr_in_place():
    parameter = torch.nn.Parameter(torch.ones(3))
    lr = torch.tensor(0.5)
    optimizer = torch.optim.SGD([parameter], lr=lr, momentum=0.9)
    schedule = exponential(0.1, 0.5)
    scheduler = ScheduledLR(optimizer, schedule)
    for step in range(1, 6):
        parameter.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is lr
        assert lr.item() == pytest.approx(schedule(step), rel=1e-6)
    assert scheduler.get_last_lr() == [schedule(5)]


def _metric(step: int) -> float:
    """A loss that falls, stalls, wiggles and falls again: enough to trigger several cuts."""
    return 1.0 / (1 + step // 8) + 0.002 * ((step * 7) % 5) + (0.5 if 40 <= step < 43 else 0.0)


PLATEAU_SETTINGS = [
    {"mode": "min", "factor": 0.5, "patience": 2, "threshold": 1e-4, "threshold_mode": "rel", "cooldown": 0},
    {"mode": "min", "factor": 0.5, "patience": 1, "threshold": 0.02, "threshold_mode": "abs", "cooldown": 2},
    {"mode": "max", "factor": 0.3, "patience": 3, "threshold": 1e-3, "threshold_mode": "rel", "cooldown": 1},
    {"mode": "max", "factor": 0.8, "patience": 0, "threshold": 0.002, "threshold_mode": "abs", "cooldown": 0},
    {"mode": "min", "factor": 0.2, "patience": 1, "threshold": 1e-4, "threshold_mode": "rel", "cooldown": 0,
     "min_scale": 0.01},
]


@pytest.mark.parametrize("options", PLATEAU_SETTINGS, ids=str)
def test_plateau_decisions_equal_torch(options):
    base_lr = 0.2
    min_scale = options.get("min_scale", 0.0)
    torch_options = {k: v for k, v in options.items() if k != "min_scale"}
    reference_optimizer = _sgd(lr=base_lr)
    reference = lr_scheduler.ReduceLROnPlateau(
        reference_optimizer, min_lr=base_lr * min_scale, **torch_options
    )
    scheduler = ScheduledLR(_sgd(), constant(base_lr), plateau=ReduceOnPlateau(**options))
    sign = 1.0 if options["mode"] == "min" else -1.0
    ours, theirs = [], []
    for step in range(60):
        metric = sign * _metric(step)
        reference.step(metric)
        scheduler.step(metric=torch.tensor(metric, dtype=torch.float64))  # a 0-d tensor works too
        theirs.append(reference_optimizer.param_groups[0]["lr"])
        ours.append(scheduler.get_last_lr()[0])
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert len(set(theirs)) >= 3  # the sequence exercised at least two cuts
    # torch also skips a cut that changes lr by less than eps=1e-8; stay clear of that regime
    assert min(theirs) > 1e-6


def test_plateau_composes_with_warmup_cosine():
    # torch's SequentialLR cannot put ReduceLROnPlateau on top of warmup + cosine; here the
    # rate must be warmup_cosine(t) times the multiplier torch's plateau logic arrives at.
    schedule = warmup_cosine(peak_lr=1e-2, warmup_steps=20, total_steps=400, final_lr=1e-4)
    scheduler = ScheduledLR(_sgd(), schedule, plateau=ReduceOnPlateau(factor=0.5, patience=1))
    multiplier_optimizer = _sgd(lr=1.0)
    multiplier = lr_scheduler.ReduceLROnPlateau(multiplier_optimizer, factor=0.5, patience=1)
    for step in range(1, 401):
        metric = _metric(step // 10) if step % 10 == 0 else None  # evaluate every 10 steps
        if metric is not None:
            multiplier.step(metric)
        scheduler.step(metric=metric)
        expected = schedule(step) * multiplier_optimizer.param_groups[0]["lr"]
        assert scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert scheduler.plateau.scale == pytest.approx(multiplier_optimizer.param_groups[0]["lr"])
    assert scheduler.plateau.scale <= 0.25


def test_state_dict_resume_equals_uninterrupted_run():
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = ravine.SGD(model.parameters(), lr=1.0, momentum=0.9)
        scheduler = ScheduledLR(
            optimizer,
            warmup_cosine(peak_lr=0.05, warmup_steps=10, total_steps=100, final_lr=1e-3),
            plateau=ReduceOnPlateau(factor=0.5, patience=1, cooldown=1),
        )
        return model, optimizer, scheduler

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))

    def run(model, optimizer, scheduler, steps):
        rates = []
        for step in steps:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
            scheduler.step(metric=_metric(step // 5) if step % 5 == 0 else None)
            rates.append(optimizer.param_groups[0]["lr"])
        return rates

    uninterrupted = run(*build(), range(1, 101))

    model, optimizer, scheduler = build()
    first_half = run(model, optimizer, scheduler, range(1, 51))
    saved = pickle.dumps((model.state_dict(), optimizer.state_dict(), scheduler.state_dict()))
    assert scheduler.plateau.scale < 1.0  # the saved state includes a cut

    model, optimizer, scheduler = build()
    model_state, optimizer_state, scheduler_state = pickle.loads(saved)
    model.load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    assert scheduler.get_last_lr() == [first_half[-1]]
    second_half = run(model, optimizer, scheduler, range(51, 101))
    assert first_half + second_half == uninterrupted
