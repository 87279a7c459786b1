"""`ravine bench step`: the table and JSON it writes are consistent with each other."""

from __future__ import annotations

import json

import pytest
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
