"""The advisor: exact optimizer-state bytes, step times, the learning-rate range test,
the recommendation rule, validation and the `ravine advise` command."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from ravine.advise import (
    Advice,
    OptimizerAdvice,
    advise,
    format_bytes,
    lr_range_test,
    parse_duration,
    parse_size,
    recommend,
    split_specs,
    suggest_lr,
)
from ravine.advise_cli import DEFAULT_TASK, advise_command


@pytest.fixture(autouse=True)
def one_thread():
    # Several processes share the CPU; one torch thread keeps these timings from stalling.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def regression_problem(seed: int = 0, examples: int = 64, features: int = 8):
    """Least squares: loss = mean((X w - y)^2), Hessian 2/n X^T X; SGD diverges above 2/L."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, features, generator=generator)
    targets = inputs @ torch.randn(features, 1, generator=generator)
    largest = torch.linalg.eigvalsh(2 / examples * inputs.T @ inputs).max().item()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Linear(features, 1, bias=False)
    return model, nn.functional.mse_loss, (inputs, targets), largest


# --------------------------------------------------------------------------------------
# Exact state bytes: (spec, state bytes per parameter element, step counters per tensor)

STATE_TABLE = [
    ("sgd", 0, 0),
    ("momentum", 1, 0),
    ("nesterov", 1, 0),
    ("sgd(momentum=0.5)", 1, 0),
    ("adagrad", 1, 1),
    ("rmsprop", 1, 1),
    ("rmsprop-centered", 2, 1),
    ("adam", 2, 1),
    ("amsgrad", 3, 1),
    ("adamw", 2, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_bytes_are_exact_for_every_optimizer(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    inputs, targets = torch.randn(4, 10, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    advice = advise(
        model, nn.functional.mse_loss, (inputs, targets), optimizers=[spec for spec, _, _ in STATE_TABLE],
        range_steps=0, timing_repeats=1, warmup_steps=0,
    )
    elements, tensors = 10 * 5 + 5 + 5 * 3 + 3, 4
    assert advice.parameter_count == elements and advice.parameter_tensors == tensors
    element_size = torch.finfo(dtype).bits // 8
    for (spec, copies, steps), row in zip(STATE_TABLE, advice.rows):
        # `step` is a float32 scalar tensor per parameter tensor, whatever the parameter dtype.
        expected = copies * element_size * elements + 4 * steps * tensors
        assert row.spec == spec
        assert row.state_bytes == expected, spec
        assert row.state_bytes_per_parameter == pytest.approx(expected / elements)
        assert row.range_test is None and row.suggested_lr is None


def test_float32_bytes_per_parameter_match_the_known_answers():
    model = nn.Linear(1000, 100, bias=False)  # one tensor: the step counter adds 4 B in all
    batch = (torch.randn(2, 1000), torch.randn(2, 100))
    advice = advise(model, nn.functional.mse_loss, batch, range_steps=0, timing_repeats=1, warmup_steps=0)
    per_parameter = {row.spec: row.state_bytes_per_parameter for row in advice.rows}
    known = {"sgd": 0, "momentum": 4, "nesterov": 4, "adagrad": 4, "rmsprop": 4,
             "rmsprop-centered": 8, "adam": 8, "amsgrad": 12, "adamw": 8}
    for spec, value in known.items():
        assert per_parameter[spec] == pytest.approx(value, abs=1e-4), spec


def test_step_times_are_positive_and_the_training_step_contains_the_optimizer_step():
    model, loss_fn, batch, _ = regression_problem()
    advice = advise(model, loss_fn, batch, optimizers=["sgd", "adam"], range_steps=0, timing_repeats=5)
    for row in advice.rows:
        assert 0 < row.optimizer_step_ms <= row.train_step_ms < 1000
        assert math.isfinite(row.train_step_ms)


def test_advise_leaves_the_model_and_the_random_state_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    generator = torch.Generator().manual_seed(1)

    def batch():
        return torch.randn(8, 6, generator=generator), torch.randint(0, 2, (8,), generator=generator)

    advice = advise(model, nn.functional.cross_entropy, batch, optimizers=["adam", "momentum"],
                    range_steps=20, timing_repeats=2)
    assert all(row.range_test.steps_run >= 1 for row in advice.rows)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)


# --------------------------------------------------------------------------------------
# Learning-rate range test


def test_range_test_on_least_squares_suggests_a_stable_lr_and_stops_at_the_blow_up():
    model, loss_fn, batch, largest = regression_problem()
    bound = 2 / largest  # gradient descent diverges above this step size
    test = lr_range_test(model, loss_fn, batch, "sgd", lr_range=(1e-5, 100.0), steps=100)
    assert test.stopped_early and test.steps_run < 95
    assert "4x the best" in test.stop_reason
    assert test.suggested_lr is not None
    assert bound / 100 < test.suggested_lr < bound
    assert test.valley[0] < test.suggested_lr < test.valley[1]
    # The sweep is exponential: first lr is lr_min and the ratio between steps is constant.
    assert test.lrs[0] == pytest.approx(1e-5)
    ratio = (100.0 / 1e-5) ** (1 / 99)
    assert all(b / a == pytest.approx(ratio) for a, b in zip(test.lrs, test.lrs[1:]))
    # Smoothed losses are the bias-corrected EMA (beta 0.98) of the raw losses.
    average = 0.0
    for step, (raw, smooth) in enumerate(zip(test.losses, test.smoothed_losses)):
        average = 0.98 * average + 0.02 * raw
        assert smooth == pytest.approx(average / (1 - 0.98 ** (step + 1)), rel=1e-9)
    # The stop rule: the last smoothed loss is the first above 4x the best before it.
    assert test.smoothed_losses[-1] > 4 * min(test.smoothed_losses[:-1])
    assert all(
        value <= 4 * min(test.smoothed_losses[: index + 1])
        for index, value in enumerate(test.smoothed_losses[:-1])
    )


def test_range_test_draws_fresh_batches_from_a_callable():
    model, loss_fn, (inputs, targets), largest = regression_problem()
    calls = []

    def batch():
        calls.append(1)
        rows = torch.randint(0, len(inputs), (16,))
        return inputs[rows], targets[rows]

    test = lr_range_test(model, loss_fn, batch, "momentum", lr_range=(1e-5, 100.0), steps=60)
    assert len(calls) == test.steps_run
    assert test.stopped_early
    assert test.suggested_lr is not None and test.suggested_lr < 2 / largest


def test_suggest_lr_is_the_middle_of_the_descent_even_with_a_noisy_plateau():
    lrs = [10 ** (-6 + 6 * i / 119) for i in range(120)]  # 1e-6 .. 1, 20 points per decade

    def curve(lr):
        if lr <= 1e-3:
            return 2.0
        if lr <= 1e-1:
            return 2.0 - math.log10(lr / 1e-3) / 2  # 2 -> 1, straight in log lr
        return 1.0 + 50 * (lr - 1e-1)

    clean = [curve(lr) for lr in lrs]
    suggested, (low, high) = suggest_lr(lrs, clean)
    assert suggested == pytest.approx(1e-2, rel=0.15)
    assert low == pytest.approx(10 ** -2.8, rel=0.15) and high == pytest.approx(10 ** -1.2, rel=0.15)
    wobbly = [value + 0.03 * math.sin(7 * i) for i, value in enumerate(clean)]
    assert suggest_lr(lrs, wobbly)[0] == pytest.approx(1e-2, rel=0.5)


@pytest.mark.parametrize(
    "losses",
    [[1.0] * 50, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 0.5, float("nan"), float("nan")]],
    ids=["flat", "rising", "too-few-finite"],
)
def test_suggest_lr_gives_none_without_a_clear_descent(losses):
    lrs = [10.0 ** (i - 10) for i in range(len(losses))]
    assert suggest_lr(lrs, losses) == (None, None)


# --------------------------------------------------------------------------------------
# Recommendation rule


def row(spec, family, state_bytes, train_ms, lr=None):
    return OptimizerAdvice(
        spec=spec, name=spec, family=family, parameter_count=1000, state_bytes=state_bytes,
        state_tensors=2, optimizer_step_ms=train_ms / 4, train_step_ms=train_ms,
        range_test=None,
    )


ROWS = [
    row("amsgrad", "adam", 12_008, 1.2),
    row("adam", "adam", 8_008, 1.0),
    row("adamw", "adam", 8_008, 1.0),
    row("momentum", "momentum", 4_000, 0.8),
    row("rmsprop", "adaptive", 4_008, 0.7),
    row("sgd", "sgd", 0, 0.5),
]

RULE_TABLE = [
    # memory budget (B), time budget (ms), expected pick, expected exclusions
    (None, None, "adam", set()),  # Adam family first; smaller state beats amsgrad; adam is listed before adamw
    (10_000, None, "adam", {"amsgrad"}),
    (8_000, None, "momentum", {"amsgrad", "adam", "adamw"}),
    (8_000, 0.75, "rmsprop", {"amsgrad", "adam", "adamw", "momentum"}),
    (4_004, None, "momentum", {"amsgrad", "adam", "adamw", "rmsprop"}),
    (0, None, "sgd", {"amsgrad", "adam", "adamw", "momentum", "rmsprop"}),
    (None, 0.6, "sgd", {"amsgrad", "adam", "adamw", "momentum", "rmsprop"}),
    (None, 0.4, None, {"amsgrad", "adam", "adamw", "momentum", "rmsprop", "sgd"}),
]


@pytest.mark.parametrize("memory_budget, time_budget, expected, excluded", RULE_TABLE)
def test_recommendation_follows_the_rule(memory_budget, time_budget, expected, excluded):
    best, text, why = recommend(ROWS, memory_budget, time_budget)
    assert (best.spec if best else None) == expected
    assert set(why) == excluded
    if best is None:
        assert text.startswith("No optimizer fits")
        assert "sgd" in text and "0 B" in text and "0.5 ms" in text
    else:
        # The text cites the measured bytes and milliseconds of the choice.
        assert text.startswith(f"Use {expected}")
        assert format_bytes(best.state_bytes) in text and f"{best.train_step_ms:.3g} ms" in text
    for spec in excluded:
        assert spec in text
    if memory_budget is not None and excluded:
        assert "budget" in why[next(iter(excluded))]


def test_advise_recommendation_uses_the_measured_rows():
    model, loss_fn, batch, _ = regression_problem()
    advice = advise(model, loss_fn, batch, optimizers=["sgd", "momentum", "adam"], memory_budget="40B",
                    range_steps=20, timing_repeats=2)
    # 8 parameters: adam keeps 68 B, momentum 32 B, sgd none.
    assert [r.state_bytes for r in advice.rows] == [0, 32, 68]
    assert advice.recommended == "momentum" and advice.excluded.keys() == {"adam"}
    assert advice.memory_budget == 40
    assert "32 B" in advice.recommendation


# --------------------------------------------------------------------------------------
# Results: dict, table, plot


def test_advice_serializes_tabulates_and_plots(tmp_path):
    model, loss_fn, batch, _ = regression_problem()
    advice = advise(model, loss_fn, batch, optimizers=["sgd", "adam(lr=0.1)"], lr_range=(1e-5, 100.0),
                    range_steps=40, timing_repeats=2, time_budget="1s")
    assert isinstance(advice, Advice)
    data = json.loads(json.dumps(advice.to_dict(), allow_nan=False))
    assert data["recommended"] == "adam(lr=0.1)" and data["time_budget_ms"] == 1000.0
    first = data["optimizers"][0]
    assert first["state_bytes"] == 0
    assert len(first["range_test"]["lrs"]) == first["range_test"]["steps_run"]
    assert advice.row("adam(lr=0.1)").name == "adam"
    table = advice.to_table()
    assert table.row_count == 2
    path = advice.plot(tmp_path / "lr_range.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="spec"):
        advice.row("rmsprop")


# --------------------------------------------------------------------------------------
# Validation

_MODEL, _LOSS, _BATCH, _ = regression_problem()

BAD_ARGUMENTS = [
    ("optimizers", {"optimizers": ["nope"]}),
    ("optimizers", {"optimizers": []}),
    ("optimizers", {"optimizers": ["adam(lrr=1)"]}),
    ("memory_budget", {"memory_budget": -1}),
    ("memory_budget", {"memory_budget": "10XB"}),
    ("time_budget", {"time_budget": 0}),
    ("time_budget", {"time_budget": "-2ms"}),
    ("lr_range", {"lr_range": (1.0, 0.1)}),
    ("lr_range", {"lr_range": (0.0, 1.0)}),
    ("lr_range", {"lr_range": "fast"}),
    ("range_steps", {"range_steps": 5}),
    ("range_steps", {"range_steps": -1}),
    ("range_steps", {"range_steps": 1.5}),
    ("smoothing", {"smoothing": 1.0}),
    ("divergence_factor", {"divergence_factor": 1.0}),
    ("timing_repeats", {"timing_repeats": 0}),
    ("warmup_steps", {"warmup_steps": -1}),
    ("model", {"model": "linear"}),
    ("model", {"model": nn.ReLU()}),
    ("loss_fn", {"loss_fn": None}),
    ("batch", {"batch": (torch.zeros(2, 8),)}),
]


@pytest.mark.parametrize("name, change", BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_naming_them(name, change):
    arguments = {"model": _MODEL, "loss_fn": _LOSS, "batch": _BATCH, **change}
    with pytest.raises(ValueError, match=name):
        advise(**arguments)


SIZES = [("4096", 4096), ("10MB", 10**7), ("10 mb", 10**7), ("1.5GiB", 3 * 2**29), ("512KiB", 2**19),
         ("2kB", 2000), ("0", 0), (1e6, 10**6)]
DURATIONS = [("5", 5.0), ("5ms", 5.0), ("0.2s", 200.0), ("300us", 0.3), (2, 2.0)]


@pytest.mark.parametrize("text, expected", SIZES)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, expected", DURATIONS)
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["-1MB", "10XB", "", "MB", "1e", True, float("nan")])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_split_specs_keeps_arguments_together():
    assert split_specs("adam(betas=(0.9, 0.99)), sgd ,momentum(lr=[1, 2])") == [
        "adam(betas=(0.9, 0.99))", "sgd", "momentum(lr=[1, 2])",
    ]


# --------------------------------------------------------------------------------------
# The command


def tiny_task():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 4, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    data = SimpleNamespace(train_inputs=inputs, train_targets=targets, num_train=200)
    return SimpleNamespace(
        name="tiny",
        data=data,
        make_model=lambda seed: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        loss_fn=nn.functional.cross_entropy,
    )


@pytest.fixture
def command(monkeypatch):
    from ravine.arena import tasks

    real_get_task = tasks.get_task
    monkeypatch.setattr(tasks, "get_task", lambda name: tiny_task() if name == "tiny" else real_get_task(name))
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command("advise")(advise_command)
    app.callback()(lambda: None)  # keep `advise` a sub-command, as in `ravine`
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["advise", *args])


def test_command_writes_the_plot_and_the_json(command, tmp_path):
    out = tmp_path / "advice"
    result = command("--task", "tiny", "--optimizers", "sgd, adam(betas=(0.9, 0.99))", "--memory-budget",
                     "1kB", "--range-steps", "20", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Recommendation" in result.output
    report = json.loads((out / "advice.json").read_text())
    assert report["task"] == "tiny" and report["memory_budget_bytes"] == 1000
    # 8 * 4 + 8 + 8 * 2 + 2 = 58 parameters in 4 tensors: Adam keeps 58 * 8 + 4 * 4 bytes.
    assert [o["state_bytes"] for o in report["optimizers"]] == [0, 480]
    assert report["recommended"] == "adam(betas=(0.9, 0.99))"
    assert (out / "lr_range.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args, option",
    [
        (["--task", "nope"], "--task"),
        (["--optimizers", "adam,nope"], "--optimizers"),
        (["--memory-budget", "-5MB"], "--memory-budget"),
        (["--memory-budget", "ten"], "--memory-budget"),
        (["--time-budget", "0"], "--time-budget"),
        (["--batch-size", "0"], "--batch-size"),
        (["--range-steps", "3"], "--range-steps"),
        (["--lr-min", "1", "--lr-max", "0.5"], "--lr-min"),
    ],
)
def test_command_rejects_bad_input_without_a_traceback(command, tmp_path, args, option):
    result = command("--task", "tiny", *args, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert option in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_command_unknown_task_lists_the_tasks_and_the_default_exists(command):
    from ravine.arena.tasks import available_tasks

    assert DEFAULT_TASK in available_tasks()
    result = command("--task", "nope")
    assert result.exit_code == 2 and DEFAULT_TASK in result.output


def test_advise_is_registered_in_the_ravine_command():
    from ravine.cli import app

    assert "advise" in [command.name for command in app.registered_commands]
