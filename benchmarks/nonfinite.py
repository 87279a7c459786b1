"""What the non-finite gradient check costs: AdamW and SGD steps with
``optimizer.nonfinite = "ignore"`` (no check) against ``"skip"`` (one fused check over
all gradients before the update), measured side by side, interleaved, in one run.

    python benchmarks/nonfinite.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ravine
from ravine.transforms import all_finite

SHAPES = {
    "small (10 tensors, 10k elements)": [(1000,)] * 10,
    "mlp (8 tensors, 1.1M elements)": [(512, 784), (512,), (512, 512), (512,), (512, 512), (512,), (10, 512), (10,)],
    "many (200 tensors, 200k elements)": [(1000,)] * 200,
}


def timed_steps(optimizer, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        optimizer.step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    print(f"torch {torch.__version__}, {arguments.threads} thread(s); median of {arguments.rounds} interleaved rounds")
    print(f"{'parameters':36} {'optimizer':10} {'ignore (us)':>12} {'skip (us)':>10} {'ratio':>7} {'check alone (us)':>17}")
    for label, shapes in SHAPES.items():
        for name in ("adamw", "sgd"):
            params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            optimizers = {}
            for policy in ("ignore", "skip"):
                optimizer = ravine.create(name, params, lr=1e-6)
                optimizer.nonfinite = policy
                optimizer.step()  # state and any compiled step made before timing
                optimizers[policy] = optimizer
            repeats = max(5, int(2e6 // sum(p.numel() for p in params)))
            times: dict[str, list[float]] = {"ignore": [], "skip": [], "check": []}
            grads = [p.grad for p in params]
            for _ in range(arguments.rounds):
                for policy, optimizer in optimizers.items():
                    times[policy].append(timed_steps(optimizer, repeats))
                start = time.perf_counter()
                for _ in range(repeats):
                    all_finite(grads)
                times["check"].append((time.perf_counter() - start) / repeats)
            ignore, skip, check = (statistics.median(times[key]) * 1e6 for key in ("ignore", "skip", "check"))
            print(f"{label:36} {name:10} {ignore:12.1f} {skip:10.1f} {skip / ignore:7.3f} {check:17.1f}")


if __name__ == "__main__":
    main()
