"""The arena: tasks, the training loop, the sweep (resume, divergence, TPE, workers),
statistics, files and the `ravine compare` command. Tiny budgets throughout."""

from __future__ import annotations

import csv
import json
import math

import optuna
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ravine.arena import tune
from ravine.arena.cli import split_specs
from ravine.arena.report import choose_target_loss, write_report
from ravine.arena.results import (
    confidence_interval,
    smoothed_losses,
    steps_to_target,
    t_critical_95,
)
from ravine.arena.tasks import (
    Task,
    TaskData,
    accuracy,
    available_tasks,
    get_task,
    quadratic_deep_hessian,
    register_task,
)
from ravine.arena.train import TrainConfig, optimizer_state_bytes, train
from ravine.arena.tune import SweepConfig, SweepProgress, default_spec, lr_grid, run_sweep
from ravine.cli import app

QUADRATIC = "quadratic-deep"
BUILTIN = [
    "mnist1d-logreg", "mnist1d-mlp", "mnist1d-cnn", "mnist1d-gru", "digits-mlp", "digits-cnn",
    "charlm-gru", "charlm-transformer", "quadratic-deep",
]


def tiny(tmp_path, **overrides) -> SweepConfig:
    """Two optimizers on the quadratic, 8 steps a run, 2 grid points, 2 seeds."""
    values = dict(
        task=QUADRATIC, optimizers=("sgd", "adam"), budget="small", grid_points=2, seeds=2,
        steps=8, out=tmp_path / "out",
    )
    values.update(overrides)
    return SweepConfig(**values)


# ---------------------------------------------------------------------------------- tasks


def test_builtin_tasks_are_registered():
    assert available_tasks()[: len(BUILTIN)] == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_task_forward_loss_and_metric(name):
    task = get_task(name)
    data = task.data
    batch_inputs, batch_targets = data.train_inputs[:4], data.train_targets[:4]
    model = task.make_model(0)
    outputs = model(batch_inputs)
    loss = task.loss_fn(outputs, batch_targets)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert math.isfinite(task.metric_fn(outputs, batch_targets))
    # same seed, same weights; another seed, other weights (the quadratic starts at ones)
    again = task.make_model(0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    if name != QUADRATIC:
        other = task.make_model(1)
        assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_mnist1d_matches_the_paper_split():
    data = get_task("mnist1d-mlp").data
    assert tuple(data.train_inputs.shape) == (4000, 40)
    assert tuple(data.test_inputs.shape) == (1000, 40)
    assert sorted(data.train_targets.unique().tolist()) == list(range(10))


def test_mnist1d_models_have_the_paper_sizes():
    counts = {name: sum(p.numel() for p in get_task(name).make_model(0).parameters())
              for name in ("mnist1d-logreg", "mnist1d-mlp", "mnist1d-cnn", "mnist1d-gru")}
    # Linear 40->10; MLP 40-100-100-10; CNN 3 conv (25 ch) + linear 125->10; biGRU(6) + 480->10
    assert counts == {"mnist1d-logreg": 410, "mnist1d-mlp": 15210, "mnist1d-cnn": 5210, "mnist1d-gru": 5134}


def test_quadratic_deep_spectrum():
    hessian = quadratic_deep_hessian().double()
    assert torch.allclose(hessian, hessian.T)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert ((eigenvalues > 0) & (eigenvalues < 1)).sum() == 90
    assert ((eigenvalues > 30) & (eigenvalues < 60)).sum() == 10


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: mnist1d-logreg, mnist1d-mlp"):
        get_task("nope")


def _blobs() -> TaskData:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 2, generator=generator)
    targets = (inputs[:, 0] * inputs[:, 1] > 0).long()
    return TaskData(inputs[:240], targets[:240], inputs[240:], targets[240:])


def blobs_task(name: str = "test-blobs") -> Task:
    return Task(
        name=name,
        description="XOR blobs",
        make_model=lambda seed: nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)),
        load_data=_blobs,
        loss_fn=nn.functional.cross_entropy,
        metric_name="accuracy",
        metric_fn=accuracy,
        higher_is_better=True,
    )


def test_register_task_then_train_it():
    task = register_task(blobs_task(), replace=True)
    assert get_task("test-blobs") is task and "test-blobs" in available_tasks()
    with pytest.raises(ValueError, match="already registered"):
        register_task(blobs_task())
    result = train("test-blobs", TrainConfig("adam(lr=0.05)", epochs=5))
    assert result.status == "ok"
    assert result.final_test_metric > 0.8


def test_task_validation_names_the_problem():
    with pytest.raises(ValueError, match="must give a number for each budget"):
        Task("x", "", lambda s: nn.Linear(1, 1), _blobs, nn.functional.mse_loss, "m", accuracy, True,
             epochs={"small": 1})
    with pytest.raises(ValueError, match="train_inputs has 3 examples but train_targets has 2"):
        TaskData(torch.zeros(3, 1), torch.zeros(2), torch.zeros(1, 1), torch.zeros(1))


# ------------------------------------------------------------------------------- training


def test_training_lowers_the_noisy_quadratic_and_records_everything():
    result = train(QUADRATIC, TrainConfig("sgd", lr=0.01, steps=40, batch_size=32))
    assert result.status == "ok" and result.steps == 40 and len(result.train_loss) == 40
    assert result.initial_loss > 400  # 0.5 (1^T Q 1 + 0.36 tr Q) for theta = ones
    assert result.final_train_loss < 0.5 * result.initial_loss
    assert result.test_loss[-1] < 0.5 * result.test_loss[0]
    # evaluated at step 0, after each epoch (32 steps) and after the last step
    assert result.eval_steps == [0, 32, 40]
    assert result.eval_epochs == [0.0, 1.0, 40 / 32]
    assert result.time_per_step_s > 0 and result.optimizer_step_time_s > 0
    assert result.wall_time_s >= result.train_time_s > 0
    assert result.parameter_count == 100 and result.parameter_bytes == 400
    assert result.spec == "sgd(lr=0.01)"


@pytest.mark.parametrize(
    "spec, expected",
    [("sgd", 0), ("momentum", 400), ("adagrad", 404), ("rmsprop", 404), ("adam", 804), ("amsgrad", 1204)],
)
def test_optimizer_state_bytes(spec, expected):
    # 100 fp32 parameters: momentum buffer 400 B; Adam's two moments 800 B + a 4-byte step
    result = train(QUADRATIC, TrainConfig(spec, lr=1e-3, steps=2))
    assert result.state_bytes == expected


def test_state_bytes_counts_tensors_in_state_dict():
    parameter = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    optimizer = torch.optim.Adam([parameter])
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == 2 * 80 + 4


def test_huge_learning_rate_is_recorded_as_diverged():
    result = train(QUADRATIC, TrainConfig("sgd", lr=10.0, steps=50))
    assert result.status == "diverged"
    assert result.diverged_at_step is not None and result.diverged_at_step < 5
    assert math.isnan(result.final_train_loss) and math.isnan(result.final_test_metric)


def test_clipping_keeps_a_large_step_stable():
    free = train(QUADRATIC, TrainConfig("sgd", lr=0.1, steps=30))
    clipped = train(QUADRATIC, TrainConfig("sgd", lr=0.1, steps=30, clip_norm=1.0))
    assert free.status == "diverged"
    assert clipped.status == "ok" and clipped.final_train_loss < clipped.initial_loss


@pytest.mark.parametrize("schedule", ["cosine", "warmup-cosine", "one-cycle"])
def test_schedules_run(schedule):
    result = train(QUADRATIC, TrainConfig("momentum", lr=0.005, steps=20, schedule=schedule))
    assert result.status == "ok" and result.final_train_loss < result.initial_loss


def test_train_config_validates():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        TrainConfig("adamx")
    with pytest.raises(ValueError, match="schedule must be one of"):
        TrainConfig("sgd", schedule="linear")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TrainConfig("sgd", batch_size=0)


# ----------------------------------------------------------------------------- statistics


def test_confidence_interval_on_known_numbers():
    interval = confidence_interval([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    assert interval.mean == 2.0 and interval.n == 3
    assert interval.half_width == pytest.approx(4.303 / math.sqrt(3), rel=1e-9)
    assert interval.format(digits=3) == "2 ± 2.5"
    single = confidence_interval([5.0, math.nan])
    assert single.n == 1 and math.isnan(single.half_width)
    assert t_critical_95(1) == 12.706 and t_critical_95(29) == 2.045 and t_critical_95(10_000) == 1.96


def test_steps_to_target_uses_the_trailing_mean():
    assert smoothed_losses([4.0, 2.0, 0.0, 0.0], 2) == [4.0, 3.0, 1.0, 0.0]
    row = {"train_loss": [4.0, 2.0, 0.0, 0.0] * 5, "steps_planned": 20, "steps_per_epoch": 10}
    # window = min(10 steps per epoch, 10% of 20 steps) = 2: mean(2, 0) = 1 <= 1 at step 3
    assert steps_to_target(row, 1.0) == 3
    assert steps_to_target(row, -1.0) is None


def test_lr_grid_and_defaults():
    assert lr_grid("adam", 4) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert lr_grid("adam", 7)[:3] == [1e-4, 0.000316228, 1e-3]
    assert lr_grid("sgd", 4) == [0.01, 0.1, 1.0, 10.0]
    assert default_spec("adam") == "adam(lr=0.001, betas=(0.9, 0.999), weight_decay=0.01)"
    assert default_spec("adamw(weight_decay=0.1)") == "adamw(lr=0.001, betas=(0.9, 0.999), weight_decay=0.1)"
    assert default_spec("momentum") == "momentum(lr=0.01)"


def test_split_specs_respects_brackets():
    assert split_specs("sgd, adamw(lr=3e-4, betas=(0.9, 0.95)),adam") == [
        "sgd", "adamw(lr=3e-4, betas=(0.9, 0.95))", "adam",
    ]


# ---------------------------------------------------------------------------------- sweep


def test_sweep_runs_search_seeds_and_defaults_then_resumes_with_zero_new_trials(tmp_path):
    config = tiny(tmp_path)
    first = run_sweep(config)
    # per optimizer: 2 grid points + 2 seeds at the best lr + 2 default seeds
    assert first.executed == 12 and first.reused == 0 and len(first.rows) == 12
    phases = sorted((row["label"], row["phase"]) for row in first.rows)
    assert phases.count(("adam", "search")) == 2 and phases.count(("adam", "seed")) == 2
    assert phases.count(("sgd", "default")) == 2
    for row in first.rows:
        if row["phase"] == "seed":
            assert row["lr"] == first.best_lr[row["label"]] and row["seed"] in (1, 2)
    defaults = [row for row in first.rows if row["phase"] == "default" and row["label"] == "adam"]
    assert {row["lr"] for row in defaults} == {1e-3}
    assert defaults[0]["hyperparameters"]["weight_decay"] == 0.01  # the seed texts' advice
    tuned = [row for row in first.rows if row["phase"] == "seed" and row["label"] == "adam"]
    assert tuned[0]["hyperparameters"]["weight_decay"] == 0  # torch's default; only lr is tuned
    assert (tmp_path / "out" / "study.db").exists()

    second = run_sweep(config)
    assert second.executed == 0 and second.reused == 12
    assert sorted((r["study"], r["trial"]) for r in second.rows) == sorted((r["study"], r["trial"]) for r in first.rows)


def test_diverged_runs_are_recorded_and_the_sweep_continues(tmp_path):
    # sgd's grid 0.01 .. 10 on the quadratic: lr > 2/60 blows up (largest curvature ~60)
    result = run_sweep(tiny(tmp_path, optimizers=("sgd",), grid_points=3, mode="tuned"))
    search = {row["lr"]: row["status"] for row in result.rows if row["phase"] == "search"}
    assert search == {0.01: "ok", 0.316228: "diverged", 10.0: "diverged"}
    assert result.best_lr == {"sgd": 0.01}
    assert all(row["status"] == "ok" for row in result.rows if row["phase"] == "seed")
    study = optuna.load_study(study_name=result.studies[0], storage=result.config.storage_url)
    assert sorted(t.value for t in study.trials)[-1] == math.inf


class _Interrupt(SweepProgress):
    def __init__(self, after_runs: int) -> None:
        self.after_runs, self.finished = after_runs, 0

    def run_finished(self, key, row):
        self.finished += 1

    def run_advanced(self, key, step, loss):
        if self.finished >= self.after_runs:  # Ctrl-C in the middle of the next run
            raise KeyboardInterrupt


def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    config = tiny(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, _Interrupt(after_runs=3))
    resumed = run_sweep(config)
    assert resumed.executed == 12 - 3 and len(resumed.rows) == 12
    keys = [(row["label"], row["phase"], row["lr"], row["seed"]) for row in resumed.rows]
    assert len(set(keys)) == 12


def test_a_trial_left_running_by_a_dead_worker_is_rerun(tmp_path, monkeypatch):
    config = tiny(tmp_path, optimizers=("sgd",), mode="tuned")
    # a worker claimed the first grid point and died without a word
    sweep = tune._Sweep(config)
    plan = tune._OptimizerPlan(sweep, "sgd")
    orphan = plan.search.next_trial()
    assert orphan is not None
    monkeypatch.setattr(tune, "STALE_AFTER_S", 1e9)
    with pytest.raises(AssertionError):  # fresh: other workers wait for it (here: forever)
        monkeypatch.setattr(tune, "_POLL_S", 0.0)
        monkeypatch.setattr(tune.SweepProgress, "waiting", _raise_assertion)
        run_sweep(config)
    monkeypatch.setattr(tune, "STALE_AFTER_S", -1.0)
    result = run_sweep(config)
    assert {row["lr"] for row in result.rows if row["phase"] == "search"} == {0.01, 10.0}
    assert len(result.rows) == 4


def _raise_assertion(self, message):
    raise AssertionError(message)


def test_tpe_search_runs_the_requested_trials_and_resumes(tmp_path):
    config = tiny(tmp_path, optimizers=("adam",), trials=3, mode="tuned")
    first = run_sweep(config)
    search = [row for row in first.rows if row["phase"] == "search"]
    assert len(search) == 3 and first.executed == 5
    assert all(1e-4 / 2 <= row["lr"] <= 1e-1 * 2 for row in search)
    assert run_sweep(config).executed == 0


def test_fixed_lr_spec_skips_the_search(tmp_path):
    result = run_sweep(tiny(tmp_path, optimizers=("sgd(lr=0.005)",), mode="tuned"))
    assert [row["phase"] for row in result.rows] == ["seed", "seed"]
    assert result.best_lr == {"sgd(lr=0.005)": 0.005}


def test_two_worker_processes_share_the_sweep(tmp_path):
    result = run_sweep(tiny(tmp_path, jobs=2))
    assert result.executed == 12 and len(result.rows) == 12
    assert run_sweep(tiny(tmp_path)).executed == 0  # the same studies, read back


def test_sweep_config_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="valid tasks"):
        tiny(tmp_path, task="nope")
    with pytest.raises(ValueError, match="unknown optimizer 'eve'; valid names: sgd"):
        tiny(tmp_path, optimizers=("eve",))
    with pytest.raises(ValueError, match="budget must be one of small, medium, full"):
        tiny(tmp_path, budget="huge")


# --------------------------------------------------------------------------------- report


REQUIRED_FIELDS = {
    "task", "label", "phase", "optimizer", "lr", "seed", "status", "train_loss", "eval_epochs",
    "test_loss", "test_metric", "wall_time_s", "time_per_step_s", "optimizer_step_time_s",
    "state_bytes", "peak_memory_bytes", "final_train_loss", "final_test_metric",
    "steps_to_target", "seconds_to_target", "target_loss",
}


def test_report_files_hold_one_row_per_run(tmp_path):
    result = run_sweep(tiny(tmp_path, optimizers=("sgd", "adam"), grid_points=3))
    report = write_report(result)
    document = json.loads(report.json_path.read_text())
    assert len(document["runs"]) == len(result.rows) == 2 * (3 + 2 + 2)
    for row in document["runs"]:
        assert REQUIRED_FIELDS <= set(row)
        # a diverged run also keeps the loss of the step that stopped it
        assert len(row["train_loss"]) - row["steps"] in ((0,) if row["status"] == "ok" else (0, 1))
    diverged = [row for row in document["runs"] if row["status"] == "diverged"]
    assert diverged and all(row["final_train_loss"] is None for row in diverged)  # NaN -> null
    with report.csv_path.open() as handle:
        assert len(list(csv.DictReader(handle))) == len(result.rows)
    assert document["meta"]["target_loss"] == pytest.approx(report.target_loss)
    page = report.html_path.read_text()
    assert page.count("data:image/png;base64,") == len(report.figures) == 5
    assert "src=\"http" not in page and "<script" not in page  # opens offline
    assert "Verdict" in page and report.verdict
    assert any("sgd" in line or "adam" in line for line in report.verdict)
    tuned = [s for s in report.summaries if s.mode == "tuned"]
    assert [s.optimizer for s in tuned] == ["sgd", "adam"]
    assert all(s.test_metric.n == 2 for s in tuned)


def test_target_loss_is_the_median_optimizer_final_loss():
    rows = [
        {"phase": "seed", "status": "ok", "label": label, "final_train_loss": value}
        for label, value in (("a", 1.0), ("a", 3.0), ("b", 5.0), ("c", 9.0))
    ]
    assert choose_target_loss(rows) == (5.0, "median final train loss over tuned optimizers")
    assert choose_target_loss(rows, 0.5) == (0.5, "given")


# ------------------------------------------------------------------------------------ CLI


runner = CliRunner()


def test_cli_unknown_task_lists_valid_tasks():
    result = runner.invoke(app, ["compare", "--task", "nope"])
    assert result.exit_code == 2
    assert "unknown task 'nope'; valid tasks:" in result.output and "mnist1d-mlp" in result.output
    assert "Traceback" not in result.output


def test_cli_unknown_optimizer_lists_valid_names():
    result = runner.invoke(app, ["compare", "--optimizers", "sgd,eve"])
    assert result.exit_code == 2
    assert "unknown optimizer 'eve'" in result.output and "adamw" in result.output


@pytest.mark.parametrize(
    "optimizers,fragment",
    [("adam(lr=-1)", "lr must be in [0.0, inf], got -1"), ("adam(lr=0.1", "unbalanced '('")],
)
def test_cli_bad_optimizer_values_are_refused_before_any_run(tmp_path, optimizers, fragment):
    result = runner.invoke(app, ["compare", "--optimizers", optimizers, "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "study.db").exists()


def test_cli_runs_a_tiny_comparison_with_a_user_task(tmp_path):
    plugin = tmp_path / "my_tasks.py"
    plugin.write_text(
        "import torch\n"
        "from torch import nn\n"
        "from ravine.arena.tasks import Task, TaskData, accuracy, register_task\n"
        "def load():\n"
        "    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))\n"
        "    y = (x.sum(1) > 0).long()\n"
        "    return TaskData(x[:160], y[:160], x[160:], y[160:])\n"
        "register_task(Task('cli-sum-sign', 'sign of a sum', lambda seed: nn.Linear(3, 2), load,\n"
        "    nn.functional.cross_entropy, 'accuracy', accuracy, True), replace=True)\n"
    )
    out = tmp_path / "cli"
    arguments = ["compare", "--tasks-from", str(plugin), "--task", "cli-sum-sign", "-o", "sgd,adam",
                 "--budget", "small", "--grid-points", "2", "--seeds", "2", "--steps", "10",
                 "--mode", "tuned", "--jobs", "1", "--out", str(out)]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "Report:" in result.output and (out / "report.html").exists()
    assert "8 runs executed, 0 read back" in result.output
    again = runner.invoke(app, arguments)
    assert "0 runs executed, 8 read back" in again.output


def test_cli_bad_storage_url_is_an_error_not_a_traceback(tmp_path):
    result = runner.invoke(app, ["compare", "-t", QUADRATIC, "--storage", "nosuchdb://x/y", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "cannot open storage 'nosuchdb://x/y'" in result.output and "Traceback" not in result.output


def _sweep_in_process(config, results):
    torch.set_num_threads(1)
    results.put(run_sweep(config).executed)


def test_two_processes_on_one_storage_split_the_work(tmp_path):
    import multiprocessing

    config = tiny(tmp_path)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_sweep_in_process, args=(config, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    executed = [results.get(timeout=5) for _ in workers]
    assert all(worker.exitcode == 0 for worker in workers)
    # together they ran every run; a trial both claim at the same instant may run twice
    # (SQLite cannot hand out queued trials atomically), and its first copy counts
    assert 12 <= sum(executed) < 24
    final = run_sweep(config)
    assert final.executed == 0 and len(final.rows) == 12
    assert len({(r["label"], r["phase"], r["lr"], r["seed"]) for r in final.rows}) == 12
