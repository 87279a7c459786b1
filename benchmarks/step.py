"""Optimizer step time: ravine against torch.optim's implementations, side by side.

    python benchmarks/step.py                       # 10M parameters in 100 tensors
    python benchmarks/step.py --params 1e6 --tensors 1000
    python benchmarks/step.py --optimizers adam,sgd-momentum --json out.json

For each algorithm, every implementation takes its steps in turn (round robin, so
machine noise hits all of them alike) and the median step time is reported, with
the effective bandwidth (bytes a step must move / time) and the ratio to torch's
fastest implementation measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from functools import partial

import torch

import ravine
from ravine.optim.quantized import AdamW8bit, SGD8bit

# name -> (torch class, ravine class, kwargs, bytes moved per float32 parameter, torch paths)
ALGORITHMS = {
    "sgd": (torch.optim.SGD, ravine.SGD, {"lr": 0.01}, 12, ("for-loop", "foreach", "fused")),
    "sgd-momentum": (torch.optim.SGD, ravine.SGD, {"lr": 0.01, "momentum": 0.9}, 20, ("for-loop", "foreach", "fused")),
    "sgd-nesterov": (
        torch.optim.SGD,
        ravine.SGD,
        {"lr": 0.01, "momentum": 0.9, "nesterov": True},
        20,
        ("for-loop", "foreach", "fused"),
    ),
    "adagrad": (torch.optim.Adagrad, ravine.Adagrad, {"lr": 0.01}, 20, ("for-loop", "foreach", "fused")),
    "rmsprop": (torch.optim.RMSprop, ravine.RMSprop, {"lr": 0.01}, 20, ("for-loop", "foreach")),
    "rmsprop-centered": (
        torch.optim.RMSprop,
        ravine.RMSprop,
        {"lr": 0.01, "centered": True, "momentum": 0.9},
        36,
        ("for-loop", "foreach"),
    ),
    "adam": (torch.optim.Adam, ravine.Adam, {"lr": 1e-3}, 28, ("for-loop", "foreach", "fused")),
    "adam-amsgrad": (torch.optim.Adam, ravine.Adam, {"lr": 1e-3, "amsgrad": True}, 36, ("for-loop", "foreach", "fused")),
    "adamw": (torch.optim.AdamW, ravine.AdamW, {"lr": 1e-3}, 28, ("for-loop", "foreach", "fused")),
    # Low-memory state (docs/memory.md) against torch's float32 state: bytes per parameter
    # are param r/w + grad + state r/w (bfloat16: 2 B, 8-bit: 1 B per buffer element).
    "adam-bf16": (
        torch.optim.Adam, partial(ravine.Adam, state_dtype=torch.bfloat16), {"lr": 1e-3}, 20, ("foreach", "fused")
    ),
    "adamw-8bit": (torch.optim.AdamW, AdamW8bit, {"lr": 1e-3}, 16, ("foreach", "fused")),
    "sgd-momentum-bf16": (
        torch.optim.SGD, partial(ravine.SGD, state_dtype=torch.bfloat16), {"lr": 0.01, "momentum": 0.9}, 16, ("foreach",)
    ),
    "sgd-momentum-8bit": (torch.optim.SGD, SGD8bit, {"lr": 0.01, "momentum": 0.9}, 14, ("foreach",)),
}

PATH_OPTIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_params(total: int, tensors: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    size = total // tensors
    params = []
    for _ in range(tensors):
        p = torch.randn(size, generator=generator).requires_grad_()
        p.grad = torch.randn(size, generator=generator) * 1e-3
        params.append(p)
    return params


def bench(name: str, total: int, tensors: int, steps: int, warmup: int) -> dict:
    torch_cls, ravine_cls, kwargs, bytes_per_param, paths = ALGORITHMS[name]
    contenders = {}
    for path in paths:
        contenders[f"torch {path}"] = torch_cls(make_params(total, tensors, 0), **kwargs, **PATH_OPTIONS[path])
    contenders["ravine"] = ravine_cls(make_params(total, tensors, 0), **kwargs)
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for iteration in range(warmup + steps):
        for key, optimizer in contenders.items():
            start = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if iteration >= warmup:
                times[key].append(elapsed)
    medians = {key: statistics.median(values) for key, values in times.items()}
    torch_best_key = min((key for key in medians if key.startswith("torch")), key=medians.get)
    bytes_moved = bytes_per_param * total
    rows = []
    for key, seconds in medians.items():
        rows.append(
            {
                "algorithm": name,
                "implementation": key,
                "ms_per_step": seconds * 1e3,
                "gb_per_s": bytes_moved / seconds / 1e9,
                "ratio_to_torch_best": seconds / medians[torch_best_key],
            }
        )
    return {"algorithm": name, "torch_best": torch_best_key, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e7, help="total parameters (default 1e7)")
    parser.add_argument("--tensors", type=int, default=100, help="number of tensors (default 100)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--optimizers", default=",".join(ALGORITHMS), help="comma-separated: " + ", ".join(ALGORITHMS))
    parser.add_argument("--json", default=None, help="write results to this file")
    args = parser.parse_args()
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown:
        parser.error(f"--optimizers: unknown {', '.join(unknown)}; valid: {', '.join(ALGORITHMS)}")
    if args.params < args.tensors or args.tensors < 1:
        parser.error("--params must be >= --tensors >= 1")
    total = int(args.params)
    print(
        f"# {total:,} float32 parameters in {args.tensors} tensors; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'algorithm':<18}{'implementation':<18}{'ms/step':>10}{'GB/s':>8}{'vs torch best':>15}")
    results = []
    for name in names:
        result = bench(name, total, args.tensors, args.steps, args.warmup)
        results.append(result)
        for row in result["rows"]:
            print(
                f"{row['algorithm']:<18}{row['implementation']:<18}{row['ms_per_step']:>10.2f}"
                f"{row['gb_per_s']:>8.2f}{row['ratio_to_torch_best']:>14.2f}x"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"params": total, "tensors": args.tensors, "torch": torch.__version__, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
