"""The landscape lab: test functions, paths against plain torch loops, known optimizer
behaviour on x² + 50y² and Rosenbrock, errors, pictures and the command."""

from __future__ import annotations

import csv
import functools
import math

import numpy as np
import pytest
import torch
import typer
from matplotlib.figure import Figure
from typer.testing import CliRunner

from ravine import registry
from ravine.landscape import (
    CSV_COLUMNS,
    FUNCTIONS,
    SEED_OPTIMIZERS,
    TestFunction,
    animate_paths,
    available_functions,
    compare,
    get_function,
    learning_rate_grid,
    plot_contour,
    plot_loss,
    rank_key,
    resolve_optimizer,
    run,
    run_many,
    split_specs,
    summarize,
    tune_learning_rate,
)
from ravine.landscape.cli import landscape_command
from ravine.landscape.plots import marker_steps

# ---------------------------------------------------------------- functions

KNOWN_VALUES = [  # (function, point, value) worked by hand
    ("ravine", (-4.0, 1.0), 66.0),
    ("rosenbrock", (-2.0, 2.0), 409.0),
    ("beale", (3.0, 0.5), 0.0),
    ("himmelblau", (3.0, 2.0), 0.0),
    ("rastrigin", (0.5, 0.0), 20.25),
    ("saddle", (1.0, 2.0), -3.0),
]


@pytest.mark.parametrize("name, point, value", KNOWN_VALUES)
def test_function_values(name, point, value):
    f = get_function(name)
    x, y = (torch.tensor(v, dtype=torch.float64) for v in point)
    assert float(f(x, y)) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if FUNCTIONS[n].minima])
def test_minima_are_stationary_with_value_zero(name):
    f = get_function(name)
    assert f.minimum_value == pytest.approx(0.0, abs=1e-12)
    for x0, y0 in f.minima:
        point = torch.tensor([x0, y0], dtype=torch.float64, requires_grad=True)
        f(point[0], point[1]).backward()
        assert float(point.grad.norm()) < 1e-6


def test_function_table():
    assert available_functions() == ["ravine", "rosenbrock", "beale", "himmelblau", "rastrigin", "saddle"]
    assert get_function("rosenbrock").start == (-2.0, 2.0)
    assert get_function("beale").start == (3.0, 4.0)
    assert get_function("saddle").minimum_value is None
    for f in FUNCTIONS.values():
        assert f.formula and f.steps > 0 and f.bound > max(abs(v) for v in f.window)
        f.check_point(f.start)  # inside its window


def test_custom_function_from_callable():
    def bowl(x, y):
        return (x - 1) ** 2 + (y + 2) ** 2

    path = run(bowl, "sgd(lr=0.1)", start=(3.0, 0.0), steps=100)
    assert path.function == "bowl" and path.minimum_value is None
    np.testing.assert_allclose(path.final_position, (1.0, -2.0), atol=1e-6)
    f = TestFunction.from_callable(bowl, start=(3.0, 0.0), minima=[(1.0, -2.0)])
    assert run(f, "sgd(lr=0.1)", steps=100).steps_to_tolerance(1e-6) is not None


# ---------------------------------------------------------------- paths equal a plain torch loop


def plain_loop(f, cls, kwargs, start, steps, noise=None):
    """The loop every user writes; returns positions, losses, gradient norms."""
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = cls([p], **kwargs)
    positions, losses, norms = [], [], []
    for step in range(steps + 1):
        optimizer.zero_grad()
        loss = f(p[0], p[1])
        loss.backward()
        positions.append(p.detach().clone())
        losses.append(loss.detach().clone())
        norms.append(p.grad.norm())
        if step == steps:
            break
        if noise is not None:
            p.grad.add_(noise[step])
        optimizer.step()
    return torch.stack(positions).numpy(), torch.stack(losses).numpy(), torch.stack(norms).numpy()


def registry_class(spec):
    name, kwargs = registry.parse_spec(spec)
    entry = registry.get(name)
    return entry.cls, {**entry.presets, **kwargs}


SPECS = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "rmsprop-centered", "adam",
         "amsgrad", "adamw(weight_decay=0.1)", "sgd(momentum=0.5, dampening=0.1, weight_decay=0.01)"]
CASES = [  # (function, learning rates): rates that move but do not diverge in 40 steps
    ("ravine", [0.003, 0.01]),
    ("rosenbrock", [1e-4, 3e-4]),
    ("himmelblau", [0.001, 0.005]),
]


@pytest.mark.parametrize("function", [c[0] for c in CASES])
@pytest.mark.parametrize("spec", SPECS)
def test_batched_paths_equal_plain_loops(function, spec):
    f = get_function(function)
    lrs = dict(CASES)[function]
    starts = [f.start, (0.5, -0.25)]
    paths = run_many(f, spec, lrs=lrs, starts=starts, steps=40)
    assert [(p.lr, p.start) for p in paths] == [(lr, s) for lr in lrs for s in starts]
    cls, kwargs = registry_class(spec)
    for path in paths:
        assert not path.diverged
        positions, losses, norms = plain_loop(f, cls, {**kwargs, "lr": path.lr}, path.start, 40)
        np.testing.assert_array_equal(path.positions, positions)
        np.testing.assert_array_equal(path.losses, losses)
        np.testing.assert_allclose(path.grad_norms, norms, rtol=1e-14)


@pytest.mark.parametrize(
    "optimizer, kwargs",
    [(torch.optim.Adam, {"lr": 0.05}), (torch.optim.NAdam, {"lr": 0.05}),
     (torch.optim.Adamax, {"lr": 0.05, "weight_decay": 0.01})],
)
def test_torch_classes_equal_plain_loops(optimizer, kwargs):
    f = get_function("rosenbrock")
    path = run(f, (optimizer, kwargs), steps=60)
    positions, losses, _ = plain_loop(f, optimizer, kwargs, f.start, 60)
    np.testing.assert_array_equal(path.positions, positions)
    np.testing.assert_array_equal(path.losses, losses)
    assert path.optimizer.split("(")[0] == optimizer.__name__


class NormalizedGradientDescent(torch.optim.Optimizer):
    """p <- p - lr g / ||g||: mixes coordinates, so it must not be batched."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad / p.grad.norm(), alpha=-group["lr"])


def test_unknown_optimizer_runs_path_by_path():
    f = get_function("ravine")
    choice = resolve_optimizer(NormalizedGradientDescent)
    assert not choice.elementwise
    starts = [f.start, (1.0, 1.0)]
    paths = run_many(f, NormalizedGradientDescent, starts=starts, lrs=[0.1], steps=30)
    for path in paths:
        positions, _, _ = plain_loop(f, NormalizedGradientDescent, {"lr": 0.1}, path.start, 30)
        np.testing.assert_array_equal(path.positions, positions)
    # Forcing a batch would normalise by the norm over both rows: a different path.
    forced = run_many(f, NormalizedGradientDescent, starts=starts, lrs=[0.1], steps=30, batched=True)
    assert not np.allclose(forced[0].positions, paths[0].positions)


def test_factory_optimizer_and_its_learning_rate():
    factory = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    path = run("ravine", factory, steps=30)
    assert path.lr == 0.01 and path.optimizer == "SGD(momentum=0.9)"
    positions, _, _ = plain_loop(get_function("ravine"), torch.optim.SGD,
                                 {"lr": 0.01, "momentum": 0.9}, (-4.0, 0.9), 30)
    np.testing.assert_array_equal(path.positions, positions)
    assert run("ravine", factory, steps=5, lr=0.003).lr == 0.003


def test_noisy_paths_batched_equal_per_path_and_record_true_loss():
    f = get_function("ravine", noise=0.5)
    starts = [(-4.0, 0.9), (2.0, -0.5)]
    batched = run_many(f, "adam(lr=0.05)", starts=starts, steps=50, seed=3)
    single = run_many(f, "adam(lr=0.05)", starts=starts, steps=50, seed=3, batched=False)
    for a, b in zip(batched, single):
        np.testing.assert_array_equal(a.positions, b.positions)
    clean = run(get_function("ravine"), "adam(lr=0.05)", steps=50)
    assert not np.allclose(batched[0].positions, clean.positions)
    x, y = torch.from_numpy(batched[0].positions).T
    np.testing.assert_allclose(batched[0].losses, get_function("ravine")(x, y).numpy())
    generator = torch.Generator().manual_seed(3)
    noise = 0.5 * torch.randn(2, 50, 2, generator=generator, dtype=torch.float64)
    positions, _, _ = plain_loop(get_function("ravine"), torch.optim.Adam, {"lr": 0.05},
                                 starts[1], 50, noise=noise[1])
    np.testing.assert_array_equal(single[1].positions, positions)


# ---------------------------------------------------------------- divergence


def test_sgd_on_the_ravine_diverges_along_y_above_two_over_curvature():
    # f = x² + 50y² has curvatures 2 (x) and 100 (y): SGD is stable iff lr < 2/100.
    lrs = [0.018, 0.0198, 0.0202, 0.025, 2 / 50]
    paths = run_many("ravine", "sgd", lrs=lrs, steps=400)
    by_lr = {p.lr: p for p in paths}
    for lr in (0.018, 0.0198):
        assert not by_lr[lr].diverged and by_lr[lr].final_loss < 1e-3
    for lr in (0.0202, 0.025, 2 / 50):
        path = by_lr[lr]
        assert path.diverged and path.divergence == "bound" and path.final_loss == math.inf
        x, y = path.positions[-1]
        assert abs(y) > get_function("ravine").bound and abs(x) < 4.0  # blew up along y only
        assert path.steps_to_tolerance(1e-6) is None
    # A diverging path stops; the others still finish their budget.
    assert len(by_lr[0.018].positions) == 401 and len(by_lr[2 / 50].positions) < 100


def test_nan_and_inf_stop_a_path():
    nan_function = TestFunction.from_callable(lambda x, y: torch.sqrt(x) + y**2, start=(1.0, 1.0))
    path = run(nan_function, "sgd(lr=2.0)", steps=20)
    assert path.diverged and path.divergence == "nan"
    huge = TestFunction("bowl", lambda x, y: x**2 + y**2, start=(1.0, 1.0),
                        window=(-2, 2, -2, 2), bound=1e308)
    path = run(huge, "sgd(lr=1000.0)", steps=200)
    assert path.diverged and path.divergence == "inf" and path.diverged_at < 200


# ---------------------------------------------------------------- fair comparison


def test_learning_rate_grid():
    grid = learning_rate_grid()
    assert len(grid) == 21 and grid[0] == 1e-5 and grid[-1] == 1.0
    assert grid[4] == pytest.approx(1e-4) and all(b > a for a, b in zip(grid, grid[1:]))
    assert learning_rate_grid(0.01, 1.0, per_decade=1) == [0.01, 0.1, 1.0]


def test_rank_key_orders_solved_by_steps_then_loss_then_diverged():
    paths = run_many("ravine", "sgd", lrs=[0.001, 0.01, 0.0178, 0.03], steps=300)
    slow, medium, fast, diverged = paths
    assert medium.solved(1e-6) is False and fast.solved(1e-6) is True
    ranked = sorted(paths, key=lambda p: rank_key(p, 1e-6))
    assert ranked == [fast, medium, slow, diverged]
    assert rank_key(diverged)[0] == 2


def test_tuned_adam_and_momentum_beat_tuned_sgd_on_the_ravine():
    results = {
        name: tune_learning_rate("ravine", name, steps=300, tolerance=1e-6)
        for name in ("sgd", "momentum", "adam")
    }
    steps = {name: r.best.steps_to_tolerance(1e-6) for name, r in results.items()}
    assert all(value is not None for value in steps.values()), steps
    assert steps["adam"] < steps["sgd"] and steps["momentum"] < steps["sgd"], steps
    # SGD's best rate sits just under the stability limit 2/100.
    assert 0.01 < results["sgd"].best_lr < 0.02
    assert len(results["sgd"].paths) == len(learning_rate_grid())


@pytest.mark.parametrize("name, low, high", [("adam", 0.1, 1.0), ("momentum", 1e-4, 1e-2)])
def test_tuned_optimizer_reaches_the_rosenbrock_minimum_in_the_default_budget(name, low, high):
    # Slices of the default grid that hold the rate the full grid picks (0.562, 0.001),
    # so the test stays short.
    f = get_function("rosenbrock")
    result = tune_learning_rate(f, name, grid=learning_rate_grid(low, high))
    best = result.best
    assert best.steps == f.steps == 2000 and not best.diverged
    assert math.dist(best.final_position, (1.0, 1.0)) < 1e-3, (best.lr, best.final_position)


def test_compare_and_summarize():
    paths = compare("ravine", ["sgd(lr=0.0178)", "adam(lr=0.1)"], steps=50)
    rows = summarize(paths, tolerance=1e-2)
    assert [row.optimizer for row in rows] == ["sgd", "adam"]
    assert [row.lr for row in rows] == [0.0178, 0.1]
    assert rows[0].final_loss == pytest.approx(paths[0].losses[-1])
    tuned = compare("ravine", ["sgd", "adam"], steps=50, tune=True,
                    grid=learning_rate_grid(1e-3, 1.0, per_decade=2))
    assert [p.lr for p in tuned] != [0.001, 0.001]


# ---------------------------------------------------------------- errors

ERRORS = [
    (lambda: get_function("valley"), "valid names: ravine, rosenbrock"),
    (lambda: run("ravine", "adamm"), "unknown optimizer 'adamm'"),
    (lambda: run("ravine", "sgd", start=(9.0, 0.0)), "outside the window"),
    (lambda: run("ravine", "sgd", start=(1.0,)), "start must be a pair"),
    (lambda: run("ravine", "sgd", steps=0), "steps must be an integer > 0, got 0"),
    (lambda: run("ravine", "sgd", steps=-3), "got -3"),
    (lambda: run("ravine", "sgd", steps=2.5), "got 2.5"),
    (lambda: run("ravine", "sgd", lr=-0.1), "lr must be a finite number > 0"),
    (lambda: run("ravine", 42), "optimizer must be a spec string"),
    (lambda: run(lambda x, y: x + y, "sgd"), "start is required"),
    (lambda: run(TestFunction.from_callable(lambda x, y: torch.stack([x, y]).sum(), (1.0, 1.0)),
                 "sgd", steps=2), "must act elementwise"),
    (lambda: TestFunction("f", lambda x, y: x, (0, 0), (1, -1, 0, 1)), "window must be"),
    (lambda: tune_learning_rate("ravine", "sgd", tolerance=0), "tolerance must be"),
    (lambda: learning_rate_grid(1.0, 0.1), "0 < low < high"),
    (lambda: split_specs("sgd(lr=0.1,adam"), "unbalanced"),
    (lambda: split_specs("sgd,,adam"), "empty entry"),
]


@pytest.mark.parametrize("call, message", ERRORS)
def test_clear_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_split_specs_only_on_top_level_commas():
    text = "sgd(lr=0.02, momentum=0.9),momentum, adam(lr=0.1, betas=(0.9, 0.99))"
    assert split_specs(text) == ["sgd(lr=0.02, momentum=0.9)", "momentum",
                                 "adam(lr=0.1, betas=(0.9, 0.99))"]
    assert resolve_optimizer("sgd(lr=0.02, momentum=0.9)").label == "sgd(momentum=0.9)"
    assert resolve_optimizer("sgd(lr=0.02, momentum=0.9)").lr == 0.02


# ---------------------------------------------------------------- pictures


@pytest.fixture(scope="module")
def ravine_paths():
    return compare("ravine", ["sgd(lr=0.0178)", "momentum(lr=0.003)", "adam(lr=0.1)",
                              "sgd(lr=0.05)"], steps=60)


def test_marker_steps_thin_out():
    marks = marker_steps(201)
    gaps = np.diff(marks)
    assert marks[0] == 0 and marks[-1] == 200 and (np.diff(gaps) >= -1).all() and gaps[-1] > 10


def test_contour_plot(ravine_paths, tmp_path):
    figure = plot_contour("ravine", ravine_paths)
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    title = ax.get_title()
    assert "x² + 50y²" in title and "sgd, momentum, adam" in title and "60 steps" in title
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "sgd (lr=0.0178)" in labels and "adam (lr=0.1)" in labels
    assert "start" in labels and "minimum" in labels
    assert any("diverged at step" in label for label in labels)
    assert ax.get_xlim() == (-5.0, 5.0)
    figure.savefig(tmp_path / "contour.png", dpi=60)
    assert (tmp_path / "contour.png").stat().st_size > 10_000


def test_loss_plot(ravine_paths, tmp_path):
    figure = plot_loss("ravine", ravine_paths, tolerance=1e-6)
    ax = figure.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "step"
    assert len([line for line in ax.get_lines() if line.get_label().endswith(")")]) >= 3
    figure.savefig(tmp_path / "loss.png", dpi=60)


def test_animation(ravine_paths, tmp_path):
    from PIL import Image

    file = animate_paths("ravine", ravine_paths[:2], tmp_path / "paths.gif", frames=4, dpi=40)
    with Image.open(file) as image:
        assert image.n_frames == 4


# ---------------------------------------------------------------- command


def command_app():
    app = typer.Typer()
    app.callback()(lambda: None)  # keep "landscape" a sub-command, as in `ravine landscape`
    app.command("landscape")(landscape_command)
    return app


def test_command_is_registered():
    from ravine.cli import app

    assert "landscape" in [command.name for command in app.registered_commands]


def test_command_writes_pictures_csv_and_table(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(command_app(), [
        "landscape", "--function", "ravine", "--optimizers",
        "sgd(lr=0.0178),momentum(lr=0.003, dampening=0.1),adam(lr=0.1)", "--steps", "20",
        "--out", str(out), "--animate", "--frames", "3",
    ])
    assert result.exit_code == 0, result.output
    for name in ("contour.png", "loss.png", "trajectories.csv", "paths.gif"):
        assert (out / name).is_file()
    assert "final loss" in result.output and "momentum(dampening=0.1)" in result.output
    with open(out / "trajectories.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS == ("optimizer", "lr", "step", "x", "y", "loss")
    assert len(rows) == 3 * 21
    assert [rows[0][k] for k in ("optimizer", "lr", "step", "x", "y")] == \
        ["sgd", "0.0178", "0", "-4.0", "0.9"]
    assert float(rows[0]["loss"]) == pytest.approx(16 + 50 * 0.81)
    adam = run("ravine", "adam(lr=0.1)", steps=20)
    last = [row for row in rows if row["optimizer"] == "adam"][-1]
    assert int(last["step"]) == 20
    assert (float(last["x"]), float(last["y"])) == adam.final_position
    assert float(last["loss"]) == adam.losses[-1]


def test_command_tunes_by_default_without_optimizers(tmp_path):
    result = CliRunner().invoke(command_app(), [
        "landscape", "--function", "himmelblau", "--steps", "15", "--lr-min", "0.01",
        "--lr-max", "0.1", "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    assert "tuned" in result.output
    with open(tmp_path / "trajectories.csv", newline="") as handle:
        names = list(dict.fromkeys(row["optimizer"] for row in csv.DictReader(handle)))
    assert names == list(SEED_OPTIMIZERS)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--function", "valley"], "valid names: ravine"),
        (["--steps", "0"], "steps must be an integer > 0"),
        (["--optimizers", "sgd,adamm"], "unknown optimizer 'adamm'"),
        (["--start", "9,0", "--optimizers", "sgd"], "outside the window"),
    ],
)
def test_command_errors(arguments, message, tmp_path):
    result = CliRunner().invoke(command_app(), ["landscape", "--out", str(tmp_path), *arguments])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
