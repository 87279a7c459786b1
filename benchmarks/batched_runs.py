"""Batched runs against the same runs one after another, side by side.

Trains R runs of an arena task (default: 16 runs of mnist1d-mlp, the arena's batch size
32, 2 epochs each) twice: one after another with ``ravine.arena.train.train``, and all
at once with ``ravine.arena.batched.train_batched``. Two sets of runs are timed: an lr
grid (R log-spaced learning rates, seed 0, as the arena's search) and seeds (one lr,
seeds 1..R, as its re-runs). Each way runs with every torch thread count of
``--threads`` (default 1 and 2: ``torch.set_num_threads``); the ways and thread counts
alternate ``--repeats`` times, so load from other processes falls on all of them. The
best wall time of each is printed with its CPU time (this process's, all threads; on a
machine shared with other jobs the wall time counts the time other processes held the
cores), then the speed-ups: at equal thread counts, and each way's best thread count
against the other's. Last, the largest difference between the two ways in final train
loss, test loss and test accuracy.

    python benchmarks/batched_runs.py
    python benchmarks/batched_runs.py --runs 16 --epochs 2 --optimizer adam --repeats 3 --threads 1,2
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import replace

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
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    arguments = parser.parse_args()
    thread_counts = [int(value) for value in arguments.threads.split(",")]

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
        f"{arguments.epochs} epochs each; torch {torch.__version__}, torch threads "
        f"{', '.join(map(str, thread_counts))} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    ways = {"sequential": lambda runs: [train(task, config) for config in runs],
            "batched": lambda runs: train_batched(task, runs)}
    for kind in ("lr grid", "seeds"):
        runs = configs(kind)
        times: dict[tuple[str, int], list[tuple[float, float]]] = {
            (way, threads): [] for way in ways for threads in thread_counts
        }
        results = {}
        for threads in thread_counts:  # first calls (kernel loading, allocator) are not timed
            torch.set_num_threads(threads)
            warm_up = [replace(config, epochs=None, steps=2) for config in runs[:2]]
            train(task, warm_up[0])
            train_batched(task, warm_up)
        for _ in range(arguments.repeats):
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for way, function in ways.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    results[way, threads] = function(runs)
                    times[way, threads].append((time.perf_counter() - wall, time.process_time() - cpu))
        torch.set_num_threads(thread_counts[0])
        best = {key: min(values) for key, values in times.items()}  # the fastest wall time, with its CPU time
        print(f"{kind}:")
        for (way, threads), (wall, cpu) in best.items():
            print(
                f"  {way:10s} {threads} thread{'s' if threads > 1 else ' '}: wall {wall:6.2f} s  CPU {cpu:6.2f} s"
                f"  (all wall: {', '.join(f'{t[0]:.2f}' for t in times[way, threads])})"
            )
        for threads in thread_counts:
            print(f"  speed-up at {threads} thread{'s' if threads > 1 else ''}: "
                  f"{best['sequential', threads][0] / best['batched', threads][0]:5.2f}x wall, "
                  f"{best['sequential', threads][1] / best['batched', threads][1]:5.2f}x CPU")
        one = min(thread_counts, key=lambda t: best["sequential", t][0])
        many = min(thread_counts, key=lambda t: best["batched", t][0])
        print(
            f"  speed-up, each way at its best: {best['sequential', one][0] / best['batched', many][0]:5.2f}x wall "
            f"(sequential with {one}, batched with {many} thread{'s' if many > 1 else ''})"
        )
        for threads in thread_counts:
            differences = largest_differences(results["sequential", threads], results["batched", threads])
            batched = results["batched", threads]
            print(
                f"  largest difference at {threads} thread{'s' if threads > 1 else ''}: final train loss {differences['final_train_loss']:.2e}, "
                f"test loss {differences['final_test_loss']:.2e}, "
                f"test accuracy {differences['final_test_metric']:.2e}; "
                f"status differs in {differences['status']} runs; "
                f"test accuracy {min(r.final_test_metric for r in batched):.3f}..{max(r.final_test_metric for r in batched):.3f}"
            )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
