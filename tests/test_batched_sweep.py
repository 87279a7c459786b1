"""The arena's sweep and `ravine compare` with batched runs: the same table as one run
at a time, batches where they apply, one run at a time where they do not, --no-batch."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ravine import registry
from ravine.arena.results import summarize
from ravine.arena.tune import SweepConfig, run_sweep
from ravine.cli import app
from test_batched import RESIDUAL, RTOL, UNBATCHED


def _sweep(tmp_path, name: str, task: str, batch: bool, optimizers):
    config = SweepConfig(
        task=task, optimizers=optimizers, budget="small", grid_points=2, seeds=2,
        epochs=1, out=tmp_path / name, batch=batch,
    )
    return run_sweep(config)


def _by_run(rows):
    return {(row["label"], row["phase"], row["lr"], row["seed"]): row for row in rows}


def test_sweep_batched_gives_the_sequential_table(tmp_path):
    registry.register("test-torch-sgd", torch.optim.SGD)
    optimizers = ("adam", "test-torch-sgd(lr=0.1)")
    batched = _sweep(tmp_path, "batched", RESIDUAL.name, True, optimizers)
    sequential = _sweep(tmp_path, "sequential", RESIDUAL.name, False, optimizers)
    assert batched.best_lr == sequential.best_lr
    rows, reference = _by_run(batched.rows), _by_run(sequential.rows)
    assert rows.keys() == reference.keys() and len(rows) == (2 + 2 + 2) + (2 + 2)
    for key, row in rows.items():
        expected = reference[key]
        assert row["status"] == expected["status"]
        for name in ("final_train_loss", "final_test_loss", "final_test_metric"):
            assert row[name] == pytest.approx(expected[name], rel=RTOL, nan_ok=True)
        # the grid (2 lrs) and each set of seeds (2) trained together; the torch optimizer alone
        assert row["extra"] == ({} if key[0].startswith("test-torch") else {"batched_runs": 2})
        assert expected["extra"] == {}
    target = 1.0
    for mine, theirs in zip(summarize(batched.rows, target), summarize(sequential.rows, target), strict=True):
        assert (mine.optimizer, mine.mode, mine.spec, mine.lr, mine.runs, mine.diverged) == (
            theirs.optimizer, theirs.mode, theirs.spec, theirs.lr, theirs.runs, theirs.diverged)
        for name in ("final_train_loss", "test_loss", "test_metric"):
            assert getattr(mine, name).mean == pytest.approx(getattr(theirs, name).mean, rel=RTOL)


def test_sweep_trains_a_task_that_cannot_batch_one_run_at_a_time(tmp_path):
    result = run_sweep(SweepConfig(
        task=UNBATCHED.name, optimizers=("adam",), budget="small", grid_points=2, seeds=2,
        steps=3, mode="tuned", out=tmp_path / "fallback",
    ))
    assert len(result.rows) == 4 and all(row["extra"] == {} for row in result.rows)


def test_cli_batch_flag(tmp_path, monkeypatch):
    from ravine.arena import cli

    seen = []

    def stop(config, progress):
        seen.append(config.batch)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_sweep", stop)
    runner = CliRunner()
    for flag in ([], ["--no-batch"], ["--batch"]):
        result = runner.invoke(app, ["compare", "--task", RESIDUAL.name, "-o", "adam", *flag, "--out", str(tmp_path)])
        assert result.exit_code == 130, result.output
    assert seen == [True, False, True]
