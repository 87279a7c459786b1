"""`ravine bench step`: the table and JSON it writes are consistent with each other."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ravine.cli import app


def test_bench_step_writes_consistent_json(tmp_path):
    out = tmp_path / "step.json"
    result = CliRunner().invoke(
        app,
        ["bench", "step", "--params", "4000", "--tensors", "4", "--steps", "2", "--warmup", "0",
         "--optimizers", "sgd-momentum,rmsprop", "--threads", "1", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "ravine fast path:" in result.output
    data = json.loads(out.read_text())
    assert (data["params"], data["tensors"]) == (4000, 4)
    assert [r["algorithm"] for r in data["results"]] == ["sgd-momentum", "rmsprop"]
    for result_row in data["results"]:
        rows = {row["implementation"]: row for row in result_row["rows"]}
        torch_keys = [key for key in rows if key.startswith("torch")]
        expected_torch = {"sgd-momentum": 3, "rmsprop": 2}[result_row["algorithm"]]
        assert len(torch_keys) == expected_torch
        best = min(rows[key]["ms_per_step"] for key in torch_keys)
        assert rows[result_row["torch_best"]]["ms_per_step"] == best
        for row in rows.values():
            assert row["ratio_to_torch_best"] == pytest.approx(row["ms_per_step"] / best)
            bytes_moved = result_row["bytes_per_param"] * 4000
            assert row["gb_per_s"] == pytest.approx(bytes_moved / (row["ms_per_step"] / 1e3) / 1e9)
        fast = rows["ravine fast"]
        assert fast["target_met"] == (fast["ratio_to_torch_best"] <= result_row["target_ratio"])
        assert rows["ravine plain"]["target_met"] is None
    # RMSprop has no fused kernel in torch: the target is 1.5x faster than torch's best.
    assert data["results"][1]["target_ratio"] == pytest.approx(1 / 1.5)


def test_bench_step_rejects_unknown_optimizer():
    result = CliRunner().invoke(app, ["bench", "step", "--optimizers", "adam,nonesuch"])
    assert result.exit_code != 0
    assert "nonesuch" in result.output


NEW_ROWS = {
    # row: (implementations, baseline keys, matrices)
    "lion": ({"ravine plain (baseline)", "ravine"}, {"ravine plain (baseline)"}, False),
    "lamb": ({"ravine plain (baseline)", "ravine"}, {"ravine plain (baseline)"}, False),
    "signum": ({"ravine plain (baseline)", "ravine"}, {"ravine plain (baseline)"}, False),
    "signsgd": ({"ravine plain (baseline)", "ravine"}, {"ravine plain (baseline)"}, False),
    "sfadamw": ({"schedulefree for-loop", "schedulefree foreach", "ravine"}, {"schedulefree for-loop", "schedulefree foreach"}, False),
    "sfsgd": ({"schedulefree for-loop", "schedulefree foreach", "ravine"}, {"schedulefree for-loop", "schedulefree foreach"}, False),
    "adafactor": ({"torch for-loop", "torch foreach", "ravine plain", "ravine"}, {"torch for-loop", "torch foreach"}, True),
    "muon": ({"torch", "ravine"}, {"torch"}, True),
}


def test_bench_step_new_optimizer_rows_write_consistent_json(tmp_path):
    pytest.importorskip("schedulefree")
    out = tmp_path / "step.json"
    result = CliRunner().invoke(
        app,
        ["bench", "step", "--params", "2000", "--tensors", "2", "--steps", "2", "--warmup", "1",
         "--optimizers", ",".join(NEW_ROWS), "--threads", "1", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "ravine plain (baseline)" in result.output
    data = json.loads(out.read_text())
    assert [r["algorithm"] for r in data["results"]] == list(NEW_ROWS)
    for result_row in data["results"]:
        implementations, baselines, matrices = NEW_ROWS[result_row["algorithm"]]
        rows = {row["implementation"]: row for row in result_row["rows"]}
        assert set(rows) == implementations
        # Matrices of 31 x 32 for the 1000 elements of each tensor; vectors otherwise.
        assert result_row["shape"] == ([31, 32] if matrices else [1000])
        assert result_row["params"] == (2 * 31 * 32 if matrices else 2000)
        best = min(rows[key]["ms_per_step"] for key in baselines)
        assert rows[result_row["baseline_best"]]["ms_per_step"] == best
        is_torch = result_row["algorithm"] in ("adafactor", "muon")
        assert result_row["torch_best"] == (result_row["baseline_best"] if is_torch else None)
        for row in rows.values():
            assert row["ratio_to_baseline"] == pytest.approx(row["ms_per_step"] / best)
            assert row["ratio_to_torch_best"] == (row["ratio_to_baseline"] if is_torch else None)
            bytes_moved = result_row["bytes_per_param"] * result_row["params"]
            assert row["gb_per_s"] == pytest.approx(bytes_moved / (row["ms_per_step"] / 1e3) / 1e9)
            # No fused kernel anywhere: ravine's default path aims at 1.5x its baseline.
            if row["implementation"] == "ravine":
                assert row["target_met"] == (row["ratio_to_baseline"] <= 1 / 1.5)
            else:
                assert row["target_met"] is None
        assert result_row["target_ratio"] == pytest.approx(1 / 1.5)


@pytest.mark.parametrize("name", ["lion", "signum", "signsgd", "sfadamw", "sfsgd", "muon"])
def test_one_pass_rows_count_param_grad_and_each_state_buffer(name):
    """For rules that make one pass: param read and written, grad read, each buffer of
    the parameter's size read and written, 4 bytes each (LAMB and Adafactor make
    several passes; their counts are derived in ravine/bench.py)."""
    from ravine import bench

    algorithm = bench.ALGORITHMS[name]
    params = bench.make_params(64, 2, matrices=algorithm.matrices)
    optimizer = bench._train(algorithm.ravine_cls(params, **algorithm.kwargs))
    optimizer.step()
    buffers = [
        value for p in params for value in optimizer.state[p].values()
        if isinstance(value, torch.Tensor) and value.shape == p.shape
    ]
    assert algorithm.bytes_per_param == 4 * (2 + 1 + 2 * len(buffers) // len(params))


def test_schedule_free_rows_without_the_reference_package_have_no_baseline(monkeypatch):
    import sys
    from dataclasses import replace

    from ravine import bench

    monkeypatch.setitem(sys.modules, "schedulefree", None)  # import fails
    assert bench._schedulefree("SGDScheduleFree") is None
    monkeypatch.setitem(bench.ALGORITHMS, "sfsgd", replace(bench.ALGORITHMS["sfsgd"], torch_cls=None))
    result = bench.bench_algorithm("sfsgd", 200, 2, steps=1, warmup=0)
    assert [row["implementation"] for row in result["rows"]] == ["ravine"]
    assert result["baseline_best"] is None
    assert result["rows"][0]["ratio_to_baseline"] is None


def test_new_rows_are_in_the_default_selection_but_muon():
    from ravine import bench

    for name in ("lion", "lamb", "signum", "signsgd", "sfadamw", "sfsgd", "adafactor"):
        assert name in bench.DEFAULT_ALGORITHMS
    assert "muon" not in bench.DEFAULT_ALGORITHMS
