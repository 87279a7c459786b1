"""Batched runs against the same runs one after another, side by side.

Trains R runs of an arena task (default: 16 runs of mnist1d-mlp, the arena's batch size
32, 2 epochs each) twice: one after another with ``ravine.arena.train.train``, and all
at once with ``ravine.arena.batched.train_batched``. Two sets of runs are timed: an lr
grid (R log-spaced learning rates, seed 0, as the arena's search) and seeds (one lr,
seeds 1..R, as its re-runs). The two ways alternate ``--repeats`` times on one thread,
so load from other processes falls on both; the best time of each is compared, both wall
time and this process's CPU time (on a machine shared with other jobs the wall time
counts the time other processes held the core; the CPU time is what the runs took).
Prints the speed-ups and the largest difference between the two ways in final train
loss, test loss and test accuracy.

    python benchmarks/batched_runs.py
    python benchmarks/batched_runs.py --runs 16 --epochs 2 --optimizer adam --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from ravine.arena.batched import train_batched
from ravine.arena.tasks import get_task
from ravine.arena.train import TrainConfig, train
from ravine.arena.tune import lr_grid


def largest_differences(sequential, batched) -> dict[str, float]:
    differences = {}
    for name in ("final_train_loss", "final_test_loss", "final_test_metric"):
        pairs = [(getattr(a, name), getattr(b, name)) for a, b in zip(sequential, batched, strict=True)]
        differences[name] = max(
            0.0 if (math.isnan(x) and math.isnan(y)) else abs(x - y) for x, y in pairs
        )
    differences["status"] = sum(a.status != b.status for a, b in zip(sequential, batched))
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist1d-mlp")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    arguments = parser.parse_args()

    torch.set_num_threads(1)
    task = get_task(arguments.task)
    task.data  # generate or read the cached data before timing

    def configs(kind: str) -> list[TrainConfig]:
        common = dict(optimizer=arguments.optimizer, batch_size=arguments.batch_size, epochs=arguments.epochs)
        if kind == "lr grid":
            return [TrainConfig(lr=lr, seed=0, **common) for lr in lr_grid(arguments.optimizer, arguments.runs)]
        lr = lr_grid(arguments.optimizer, 1)[0]
        return [TrainConfig(lr=lr, seed=seed, **common) for seed in range(1, arguments.runs + 1)]

    print(
        f"{arguments.runs} runs of {task.name}, {arguments.optimizer}, batch {arguments.batch_size}, "
        f"{arguments.epochs} epochs each; torch {torch.__version__}, 1 thread, "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    for kind in ("lr grid", "seeds"):
        runs = configs(kind)
        times: dict[str, list[tuple[float, float]]] = {"sequential": [], "batched": []}
        for _ in range(arguments.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            sequential = [train(task, config) for config in runs]
            times["sequential"].append((time.perf_counter() - wall, time.process_time() - cpu))
            wall, cpu = time.perf_counter(), time.process_time()
            batched = train_batched(task, runs)
            times["batched"].append((time.perf_counter() - wall, time.process_time() - cpu))
        differences = largest_differences(sequential, batched)
        for clock, position in (("wall", 0), ("CPU", 1)):
            one = min(t[position] for t in times["sequential"])
            many = min(t[position] for t in times["batched"])
            print(
                f"{kind:8s} {clock:4s}: sequential {one:7.2f} s  batched {many:6.2f} s  "
                f"speed-up {one / many:5.1f}x  (all: sequential "
                f"{', '.join(f'{t[position]:.2f}' for t in times['sequential'])}; batched "
                f"{', '.join(f'{t[position]:.2f}' for t in times['batched'])})"
            )
        print(
            f"          largest difference: final train loss {differences['final_train_loss']:.2e}, "
            f"test loss {differences['final_test_loss']:.2e}, "
            f"test accuracy {differences['final_test_metric']:.2e}; "
            f"status differs in {differences['status']} runs; "
            f"test accuracy {min(r.final_test_metric for r in batched):.3f}..{max(r.final_test_metric for r in batched):.3f}"
        )


if __name__ == "__main__":
    main()
