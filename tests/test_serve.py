"""API tests for `ravine serve`: every endpoint, errors, live events, stop, two runs at once,
results on disk. The oracle for the numbers is the library itself: the arena's
``train`` and the landscape's ``run_many``, called directly with the same settings."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import plotly
import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from ravine import registry
from ravine.arena.tasks import available_tasks
from ravine.arena.train import SCHEDULES, TrainConfig, train
from ravine.landscape import available_functions, get_function, run_many
from ravine.serve import create_app
from ravine.serve.cli import is_loopback

TASK = "digits-mlp"  # ships with scikit-learn; one epoch is 45 steps at batch 32


@pytest.fixture()
def client(tmp_path):
    with TestClient(create_app(tmp_path / "runs")) as test_client:
        yield test_client


def read_events(client: TestClient, run_id: str) -> list[tuple[str, dict]]:
    """Every server-sent event of a run, in order (the stream ends when the run does)."""
    events, name = [], None
    with client.stream("GET", f"/api/runs/{run_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    return events


def wait_until_done(client: TestClient, run_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] != "running":
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish in {timeout} s")


def assert_clean_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert "Traceback" not in message and 'File "' not in message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------------------------------
# page and static files


def test_page_and_static_files_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in ("/static/plotly.min.js", "/static/app.js", "/static/style.css"):
        assert src in page.text
    plotly_js = client.get("/static/plotly.min.js")
    assert plotly_js.status_code == 200
    assert plotly_js.content == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    assert "EventSource" in client.get("/static/app.js").text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert_clean_error(client.get("/static/secrets.txt"), 404, "secrets.txt")
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network


def test_options_list_what_the_library_has(client):
    options = client.get("/api/options").json()
    assert [task["name"] for task in options["tasks"]] == available_tasks()
    assert [optimizer["name"] for optimizer in options["optimizers"]] == registry.available()
    assert options["schedules"] == list(SCHEDULES)
    assert [function["name"] for function in options["functions"]] == available_functions()
    assert options["defaults"]["batch_size"] == 32
    adam = next(o for o in options["optimizers"] if o["name"] == "adam")
    assert adam["lr"] == 1e-3


# ---------------------------------------------------------------------------------------
# landscape playground


def test_contour_grid_matches_the_function(client):
    grid = client.get("/api/landscape/ravine").json()
    function = get_function("ravine")
    assert grid["window"] == list(function.window)
    x, y, z = np.array(grid["x"]), np.array(grid["y"]), np.array(grid["z"])
    assert x[0] == function.window[0] and x[-1] == function.window[1]
    assert z.shape == (len(y), len(x))
    # z is log10 of the height above the minimum (0 for x² + 50y²): check one grid point.
    row, column = 10, 37
    height = x[column] ** 2 + 50 * y[row] ** 2
    assert z[row, column] == pytest.approx(math.log10(height), abs=1e-4)
    assert_clean_error(client.get("/api/landscape/nowhere"), 404, "nowhere", "rosenbrock")


def test_paths_equal_the_landscape_library(client):
    specs = ["sgd(lr=0.001)", "adam(lr=0.3)"]
    answer = client.post("/api/landscape/paths", json={"function": "rosenbrock", "optimizers": specs, "steps": 500})
    assert answer.status_code == 200
    drawn = answer.json()["paths"]
    for spec, path in zip(specs, drawn):
        expected = run_many("rosenbrock", [spec], steps=500)[0]
        assert path["spec"] == spec and path["lr"] == expected.lr
        assert len(path["x"]) <= 400 and path["step"][0] == 0 and path["step"][-1] == 500
        assert path["x"] == [float(v) for v in expected.positions[path["step"], 0]]
        assert path["y"] == [float(v) for v in expected.positions[path["step"], 1]]
        assert path["final_loss"] == float(expected.losses[-1])
    start = client.post("/api/landscape/paths", json={"optimizers": ["adam(lr=0.1)"], "steps": 20, "start": [2.0, -1.0]})
    first = start.json()["paths"][0]
    assert (first["x"][0], first["y"][0]) == (2.0, -1.0) and first["steps"] == 20


def test_a_diverging_path_is_reported_not_raised(client):
    path = client.post("/api/landscape/paths", json={"function": "ravine", "optimizers": ["sgd(lr=0.5)"]}).json()["paths"][0]
    expected = run_many("ravine", ["sgd(lr=0.5)"], steps=200)[0]
    assert expected.diverged
    assert path["diverged_at"] == expected.diverged_at and path["final_loss"] is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"function": "nowhere", "optimizers": ["sgd"]}, ["function", "nowhere", "ravine"]),
        ({"optimizers": ["warp-drive"]}, ["optimizers", "warp-drive", "adam"]),
        ({"optimizers": ["sgd(lr=0)"]}, ["optimizers", "> 0"]),
        ({"optimizers": ["sgd(lr=-1)"]}, ["optimizers"]),
        ({"optimizers": []}, ["optimizers", "at least one"]),
        ({"optimizers": ["sgd"], "steps": 0}, ["steps", "5000"]),
        ({"optimizers": ["sgd"], "steps": 10**6}, ["steps", "5000"]),
        ({"optimizers": ["sgd"], "start": [1.0]}, ["start"]),
        ({"optimizers": ["sgd"], "steps": "many"}, ["steps"]),
        ({}, ["optimizers"]),
        ({"optimizers": ["sgd"], "colour": "red"}, ["colour"]),
    ],
)
def test_bad_landscape_settings_get_a_clear_422(client, body, words):
    assert_clean_error(client.post("/api/landscape/paths", json=body), 422, *words)


# ---------------------------------------------------------------------------------------
# training runs


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"task": "imagenet"}, ["task", "imagenet", TASK]),
        ({"optimizers": ["warp-drive"]}, ["optimizers", "warp-drive", "adam"]),
        ({"optimizers": ["adam(lr=0)"]}, ["optimizers", "> 0"]),
        ({"optimizers": ["adam(betas=3)"]}, ["optimizers"]),
        ({"optimizers": []}, ["optimizers", "at least one"]),
        ({"optimizers": ["adam", "adam"]}, ["optimizers", "once"]),
        ({"lr": 0}, ["lr", "> 0"]),
        ({"lr": -0.1}, ["lr", "> 0"]),
        ({"batch_size": 0}, ["batch_size", ">= 1"]),
        ({"batch_size": "big"}, ["batch_size", "integer"]),
        ({"epochs": 0}, ["epochs", "1 to 100"]),
        ({"epochs": 101}, ["epochs", "1 to 100"]),
        ({"schedule": "sawtooth"}, ["schedule", "one-cycle"]),
        ({"clip_norm": -1}, ["clip_norm", "> 0"]),
        ({"seed": -1}, ["seed"]),
        ({"momentum": 0.9}, ["momentum"]),
    ],
)
def test_bad_run_settings_get_a_clear_422_and_start_nothing(client, body, words):
    assert_clean_error(client.post("/api/runs", json=body), 422, *words)
    assert client.get("/api/runs").json()["runs"] == []


def test_a_run_streams_its_curves_and_leaves_its_results_on_disk(client, tmp_path):
    settings = {"task": TASK, "optimizers": ["sgd(lr=0.1)", "adam(lr=0.003)"], "batch_size": 64,
                "epochs": 1, "schedule": "cosine", "clip_norm": 1.0, "seed": 3}
    started = client.post("/api/runs", json=settings)
    assert started.status_code == 202
    run_id = started.json()["id"]
    events = read_events(client, run_id)
    assert [name for name, _ in events][-1] == "end"
    assert all(name == "update" for name, _ in events[:-1]) and len(events) >= 2

    # The curves put together from the updates are the ones train() gives for the same settings.
    streamed = {}
    for name, message in events[:-1]:
        for update in message["optimizers"]:
            curve = streamed.setdefault(update["label"], {"train_loss": [], "eval_steps": [], "test_metric": []})
            assert update["train_start"] == len(curve["train_loss"])
            for key in curve:
                curve[key] += update[key]
    final = events[-1][1]
    assert final["status"] == "done" and final["report"] is True
    for spec in settings["optimizers"]:
        expected = train(TASK, TrainConfig(spec, batch_size=64, epochs=1, schedule="cosine", clip_norm=1.0, seed=3))
        assert streamed[spec]["train_loss"] == pytest.approx(expected.train_loss, rel=1e-6)
        assert streamed[spec]["eval_steps"] == expected.eval_steps == [0, 23]
        assert streamed[spec]["test_metric"] == pytest.approx(expected.test_metric, rel=1e-6)

    folder = tmp_path / "runs" / run_id
    on_disk = json.loads((folder / "run.json").read_text())
    assert on_disk["status"] == "done" and on_disk["settings"]["optimizers"] == settings["optimizers"]
    rows = json.loads((folder / "results.json").read_text())["runs"]
    assert [row["label"] for row in rows] == settings["optimizers"]
    assert rows[0]["train_loss"] == on_disk["optimizers"][0]["train_loss"]
    report = client.get(f"/api/runs/{run_id}/files/report.html")
    assert report.status_code == 200 and "ravine compare" in report.text and "ravine serve" in report.text
    assert report.text == (folder / "report.html").read_text(encoding="utf-8")
    csv_lines = client.get(f"/api/runs/{run_id}/files/results.csv").text.strip().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("task,label")
    assert client.get(f"/api/runs/{run_id}/files/run.json").json()["id"] == run_id
    assert_clean_error(client.get(f"/api/runs/{run_id}/files/study.db"), 404, "report.html")

    listing = client.get("/api/runs").json()["runs"]
    assert [run["id"] for run in listing] == [run_id]
    assert [o["final_test_metric"] for o in listing[0]["optimizers"]] == [
        rows[0]["final_test_metric"], rows[1]["final_test_metric"]]

    # A new server on the same folder lists the finished run and serves it from disk.
    with TestClient(create_app(tmp_path / "runs")) as second:
        assert [run["id"] for run in second.get("/api/runs").json()["runs"]] == [run_id]
        again = second.get(f"/api/runs/{run_id}").json()
        assert again["optimizers"] == on_disk["optimizers"] and again["status"] == "done"
        replay = read_events(second, run_id)
        assert [name for name, _ in replay] == ["end"] and replay[0][1]["id"] == run_id
        assert second.get(f"/api/runs/{run_id}/files/report.html").status_code == 200


def test_global_lr_overrides_every_spec(client):
    run_id = client.post("/api/runs", json={"task": TASK, "optimizers": ["sgd(lr=0.5)", "adam"],
                                            "lr": 0.02, "epochs": 1}).json()["id"]
    run = wait_until_done(client, run_id)
    assert [curve["lr"] for curve in run["optimizers"]] == [0.02, 0.02]
    expected = train(TASK, TrainConfig("adam", lr=0.02, epochs=1))
    assert run["optimizers"][1]["train_loss"] == pytest.approx(expected.train_loss, rel=1e-6)


def test_two_runs_at_once_do_not_mix(client):
    first = {"task": TASK, "optimizers": ["momentum(lr=0.05)"], "batch_size": 16, "epochs": 1, "seed": 1}
    second = {"task": TASK, "optimizers": ["rmsprop(lr=0.001)"], "batch_size": 48, "epochs": 1, "seed": 2}
    ids = [client.post("/api/runs", json=body).json()["id"] for body in (first, second)]
    assert ids[0] != ids[1]
    runs = [wait_until_done(client, run_id) for run_id in ids]
    for body, run in zip((first, second), runs):
        spec = body["optimizers"][0]
        expected = train(TASK, TrainConfig(spec, batch_size=body["batch_size"], epochs=1, seed=body["seed"]))
        curve = run["optimizers"][0]
        assert run["status"] == "done" and curve["label"] == spec
        assert curve["train_loss"] == pytest.approx(expected.train_loss, rel=1e-6)
        assert curve["test_metric"] == pytest.approx(expected.test_metric, rel=1e-6)


def test_stop_ends_a_run_early_and_keeps_what_it_did(client, tmp_path):
    run_id = client.post("/api/runs", json={"task": TASK, "optimizers": ["sgd(lr=0.1)", "adam"],
                                            "batch_size": 1, "epochs": 100}).json()["id"]
    deadline = time.monotonic() + 20
    while not client.get(f"/api/runs/{run_id}").json()["optimizers"][0]["train_loss"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stopped = client.post(f"/api/runs/{run_id}/stop")
    assert stopped.status_code == 200
    run = wait_until_done(client, run_id)
    assert run["status"] == "stopped" and run["report"] is False
    planned = 100 * 1437
    assert 0 < len(run["optimizers"][0]["train_loss"]) < planned
    assert [curve["status"] for curve in run["optimizers"]] == ["stopped", "stopped"]
    on_disk = json.loads((tmp_path / "runs" / run_id / "run.json").read_text())
    assert on_disk["status"] == "stopped"
    assert on_disk["optimizers"][0]["train_loss"] == run["optimizers"][0]["train_loss"]
    assert_clean_error(client.get(f"/api/runs/{run_id}/files/report.html"), 404, "no report.html")
    # Stopping a finished run changes nothing.
    assert client.post(f"/api/runs/{run_id}/stop").json()["status"] == "stopped"


def test_stopping_the_server_stops_runs_and_writes_their_files(tmp_path):
    with TestClient(create_app(tmp_path / "runs")) as client:
        run_id = client.post("/api/runs", json={"task": TASK, "optimizers": ["sgd"], "batch_size": 1,
                                                "epochs": 100}).json()["id"]
        while not client.get(f"/api/runs/{run_id}").json()["optimizers"][0]["train_loss"]:
            time.sleep(0.02)
    on_disk = json.loads((tmp_path / "runs" / run_id / "run.json").read_text())
    assert on_disk["status"] == "stopped" and on_disk["optimizers"][0]["train_loss"]


def test_a_run_the_server_never_finished_reads_as_interrupted(tmp_path):
    folder = tmp_path / "runs" / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"id": folder.name, "status": "running", "settings": {},
                                                 "optimizers": [], "report": False}))
    with TestClient(create_app(tmp_path / "runs")) as client:
        assert client.get("/api/runs").json()["runs"][0]["status"] == "interrupted"
        assert client.get(f"/api/runs/{folder.name}").json()["status"] == "interrupted"


def test_unknown_runs_are_404_with_a_message(client):
    for method, url in [("GET", "/api/runs/nope"), ("POST", "/api/runs/nope/stop"),
                        ("GET", "/api/runs/nope/events"), ("GET", "/api/runs/nope/files/report.html"),
                        ("GET", "/api/runs/..%2F..%2Fetc/files/run.json")]:
        assert_clean_error(client.request(method, url), 404)
    assert_clean_error(client.get("/api/nothing-here"), 404)


def test_a_failing_endpoint_answers_json_without_a_traceback(client, monkeypatch):
    from ravine.serve import playground

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(playground, "paths", broken)
    client_no_raise = TestClient(client.app, raise_server_exceptions=False)
    message = assert_clean_error(
        client_no_raise.post("/api/landscape/paths", json={"optimizers": ["sgd"]}), 500, "internal error")
    assert "secret internals" not in message


# ---------------------------------------------------------------------------------------
# the command


def test_serve_refuses_a_public_address_without_the_flag(tmp_path):
    from ravine.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
