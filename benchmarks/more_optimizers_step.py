"""Step time of NAdam, RAdam, Adamax, Adafactor and Muon: ravine against torch.optim,
side by side.

    python benchmarks/more_optimizers_step.py                  # 1M parameters in 100 matrices
    python benchmarks/more_optimizers_step.py --params 1e5 --tensors 10 --repeats 10

Every parameter is a square-ish matrix (Muon takes nothing else). For each algorithm,
every implementation takes its steps in turn (round robin, so machine noise hits all of
them alike); the median step time is reported with its ratio to torch's for-loop path
measured in the same run (and to torch's foreach path where torch has one).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import ravine

# name -> (torch class, ravine class, kwargs, torch has a foreach path)
ALGORITHMS = {
    "nadam": (torch.optim.NAdam, ravine.NAdam, {"lr": 1e-3}, True),
    "radam": (torch.optim.RAdam, ravine.RAdam, {"lr": 1e-3}, True),
    "adamax": (torch.optim.Adamax, ravine.Adamax, {"lr": 1e-3}, True),
    "adafactor": (torch.optim.Adafactor, ravine.Adafactor, {"lr": 1e-2}, True),
    "muon": (torch.optim.Muon, ravine.Muon, {"lr": 1e-3}, False),
}


def make_params(total: int, tensors: int, seed: int = 0) -> list[torch.Tensor]:
    side = max(1, int(math.sqrt(total / tensors)))
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(side, side + 3, generator=generator).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e6)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--optimizers", default=",".join(ALGORITHMS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {int(args.params):,} parameters in {args.tensors} matrices")
    print(f"{'algorithm':<10} {'implementation':<16} {'median ms':>10} {'vs torch for-loop':>18} {'vs torch foreach':>17}")
    for name in args.optimizers.split(","):
        torch_cls, ravine_cls, kwargs, has_foreach = ALGORITHMS[name.strip()]
        runs = {"torch for-loop": torch_cls(make_params(int(args.params), args.tensors), **kwargs, **({"foreach": False} if has_foreach else {}))}
        if has_foreach:
            runs["torch foreach"] = torch_cls(make_params(int(args.params), args.tensors), **kwargs, foreach=True)
        runs["ravine"] = ravine_cls(make_params(int(args.params), args.tensors), **kwargs)
        times: dict[str, list[float]] = {label: [] for label in runs}
        for optimizer in runs.values():
            optimizer.step()  # state is created on the first step
        for _ in range(args.repeats):
            for label, optimizer in runs.items():
                start = time.perf_counter()
                optimizer.step()
                times[label].append(time.perf_counter() - start)
        medians = {label: 1000 * statistics.median(values) for label, values in times.items()}
        for label, median in medians.items():
            loop_ratio = median / medians["torch for-loop"]
            foreach_ratio = f"{median / medians['torch foreach']:.2f}" if has_foreach else "-"
            print(f"{name:<10} {label:<16} {median:>10.3f} {loop_ratio:>18.2f} {foreach_ratio:>17}")


if __name__ == "__main__":
    main()
