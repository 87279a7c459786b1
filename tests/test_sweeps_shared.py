"""Shared sweeps: several arena worker processes on one Optuna storage run every trial
exactly once; a worker killed mid-trial (SIGKILL) leaves a consistent study whose
orphaned trial is failed by heartbeat and rerun, and a rerun finishes the sweep.
On SQLite always; on a real PostgreSQL server that the test starts itself when its
binaries (initdb, pg_ctl) and the psycopg2 driver are installed."""

from __future__ import annotations

import collections
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ravine.arena import tune
from ravine.arena.tune import SweepConfig, SweepProgress, run_sweep

QUADRATIC = "quadratic-deep"
FORK = multiprocessing.get_context("fork")


def config_for(storage: str, out: Path, **overrides) -> SweepConfig:
    """Two optimizers, 3 grid points, 2 seeds: per optimizer 3 search + 2 tuned + 2
    default runs, 14 in all."""
    values = dict(
        task=QUADRATIC, optimizers=("sgd", "adam"), budget="small", grid_points=3, seeds=2,
        steps=8, out=out, storage=storage,
    )
    values.update(overrides)
    return SweepConfig(**values)


PLANNED = 14


def study_trials(config: SweepConfig) -> dict[str, list]:
    storage = tune._open_storage(config.storage_url)
    return {
        summary.study_name: storage.get_all_trials(summary._study_id)
        for summary in optuna.get_all_study_summaries(storage)
    }


def assert_each_run_exactly_once(config: SweepConfig) -> None:
    """Every planned parameter set has exactly one COMPLETE trial, and no study holds a
    RUNNING or WAITING trial."""
    complete = 0
    for name, trials in study_trials(config).items():
        states = collections.Counter(trial.state for trial in trials)
        assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, (name, states)
        keys = collections.Counter(tune._key(trial.params) for trial in trials if trial.state == TrialState.COMPLETE)
        assert all(count == 1 for count in keys.values()), (name, keys)
        complete += sum(keys.values())
    assert complete == PLANNED


def _worker(config: SweepConfig, results) -> None:
    torch.set_num_threads(1)
    results.put(run_sweep(config).executed)


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    """Workers look for free trials every 0.1 s (2 s by default); the task's data and
    any compiled optimizer step are loaded here once, before workers are forked."""
    monkeypatch.setattr(tune, "_POLL_S", 0.1)
    from ravine.arena.train import TrainConfig, train

    train(QUADRATIC, TrainConfig(optimizer="adam", lr=1e-3, steps=2))


def check_workers_share_the_sweep(config: SweepConfig, workers: int = 3) -> None:
    results = FORK.Queue()
    processes = [FORK.Process(target=_worker, args=(config, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    assert all(process.exitcode == 0 for process in processes), [p.exitcode for p in processes]
    executed = [results.get(timeout=5) for _ in processes]
    assert sum(executed) == PLANNED, executed  # none run twice, none lost
    assert_each_run_exactly_once(config)
    again = run_sweep(config)
    assert again.executed == 0 and len(again.rows) == PLANNED


class _Announce(SweepProgress):
    """Once its first run is under way, writes a file and stalls inside the run, so the
    test can kill the worker mid-trial whatever the machine's speed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def run_advanced(self, key, step, loss):
        self.marker.write_text(f"run {key} at step {step}")
        time.sleep(3600)


def _doomed_worker(config: SweepConfig, marker: Path) -> None:
    torch.set_num_threads(1)
    run_sweep(config, _Announce(marker))


def check_killed_worker_is_recovered(config: SweepConfig, tmp_path: Path, monkeypatch) -> None:
    # A worker is stale after 3 s without a heartbeat; live workers beat every 0.3 s.
    monkeypatch.setattr(tune, "STALE_AFTER_S", 3.0)
    monkeypatch.setattr(tune, "HEARTBEAT_INTERVAL_S", 0.3)
    marker = tmp_path / "started"
    doomed = FORK.Process(target=_doomed_worker, args=(config, marker))
    results = FORK.Queue()
    survivor = FORK.Process(target=_worker, args=(config, results))
    doomed.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline and doomed.is_alive(), "the worker never started a run"
        time.sleep(0.05)
    # the doomed worker is stalled inside its run(s): every running trial is its own
    orphans = [
        (name, trial.number)
        for name, trials in study_trials(config).items()
        for trial in trials
        if trial.state == TrialState.RUNNING
    ]
    assert orphans, "the worker claimed no trial"
    survivor.start()
    time.sleep(0.5)
    os.kill(doomed.pid, signal.SIGKILL)  # mid-trial: no handler runs, nothing is cleaned up
    doomed.join(timeout=10)
    assert doomed.exitcode == -signal.SIGKILL

    survivor.join(timeout=180)
    assert survivor.exitcode == 0
    survivor_executed = results.get(timeout=5)
    assert survivor_executed >= 1
    # the orphan was failed (stale heartbeat), its parameters run again by the survivor
    trials = study_trials(config)
    for name, number in orphans:
        assert trials[name][number].state == TrialState.FAIL, (name, number, trials[name][number].state)
    assert_each_run_exactly_once(config)
    rerun = run_sweep(config)
    assert rerun.executed == 0 and len(rerun.rows) == PLANNED


# ----------------------------------------------------------------------------- SQLite


def test_three_workers_on_sqlite_run_every_trial_once(tmp_path):
    config = config_for(f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "out")
    check_workers_share_the_sweep(config)


def test_a_worker_killed_mid_trial_on_sqlite_is_recovered(tmp_path, monkeypatch):
    config = config_for(f"sqlite:///{tmp_path / 'shared.db'}", tmp_path / "out", steps=30)
    check_killed_worker_is_recovered(config, tmp_path, monkeypatch)


# ----------------------------------------------------------------------------- PostgreSQL


def _postgres_missing() -> str | None:
    binaries = [shutil.which(name) or shutil.which(name, path="/usr/lib/postgresql") for name in ("initdb", "pg_ctl")]
    if not all(binaries):
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed; Debian: apt-get install postgresql"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "the psycopg2 driver is not installed; pip install -e '.[test]' brings psycopg2-binary"
    return None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 and a free port, trust authentication,
    its socket and data in a temporary folder; stopped at the end."""
    missing = _postgres_missing()
    if missing:
        pytest.skip(missing)
    # not under pytest's tmp folder: that one is private to root, and the server may run
    # as another user
    folder = Path(tempfile.mkdtemp(prefix="ravine-postgres-"))
    data = folder / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: use an unprivileged user
        shutil.chown(folder, user="nobody")
        run_as = ["runuser", "-u", "nobody", "--"]
    subprocess.run(
        [*run_as, shutil.which("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, timeout=120,
    )
    options = f"-p {port} -k {folder} -h 127.0.0.1 -F -c max_connections=50"
    subprocess.run(
        [*run_as, shutil.which("pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options, "-w", "start"],
        check=True, capture_output=True, timeout=120,
    )
    created = 0

    def new_database() -> str:
        nonlocal created
        created += 1
        name = f"sweep{created}"
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {name}"],
            check=True, capture_output=True, timeout=60,
        )
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run(
            [*run_as, shutil.which("pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True, timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


def test_three_workers_on_postgres_run_every_trial_once(postgres, tmp_path):
    check_workers_share_the_sweep(config_for(postgres(), tmp_path / "out"))


def test_a_worker_killed_mid_trial_on_postgres_is_recovered(postgres, tmp_path, monkeypatch):
    config = config_for(postgres(), tmp_path / "out", steps=30)
    check_killed_worker_is_recovered(config, tmp_path, monkeypatch)
