"""`ravine bench step`: optimizer step time, ravine against torch.optim, side by side.

For each algorithm every implementation (torch.optim's for-loop, foreach and fused
paths where torch has them; ravine's plain and fast paths) takes its steps in turn,
round robin, so machine noise hits all of them alike; the median step time is
reported with the effective bandwidth (the bytes a step must move divided by the
time) and the ratio to torch's fastest implementation measured in the same run.

The target for ravine's default path (the fast path where it is available) is a
ratio of at most 1.0 where torch has a fused kernel for the algorithm and options,
and at most 1/1.5 (1.5x faster) where it has not (RMSprop, for instance); the table
marks it "met" or "MISSED". Every step sets a new learning rate, as a schedule would.
``benchmarks/step.py`` runs the same code.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import torch
import typer

import ravine


@dataclass
class Algorithm:
    """One row of the benchmark: torch's class, ravine's, the options, the bytes a
    step must move per float32 parameter, and torch's implementations of it."""

    torch_cls: Callable[..., torch.optim.Optimizer] | None
    ravine_cls: Callable[..., torch.optim.Optimizer]
    kwargs: dict[str, Any]
    bytes_per_param: int
    torch_paths: tuple[str, ...] = ("for-loop", "foreach", "fused")
    #: ravine's implementations to time ("default": construct without ``impl``).
    ravine_impls: tuple[str, ...] = ("plain", "fast")
    #: Whether the speed targets apply (not to rows that trade speed for memory).
    has_target: bool = True


def _algorithms() -> dict[str, Algorithm]:
    from ravine.optim.quantized import AdamW8bit, SGD8bit

    sgd_m = {"lr": 0.01, "momentum": 0.9}
    return {
        "sgd": Algorithm(torch.optim.SGD, ravine.SGD, {"lr": 0.01}, 12),
        "sgd-momentum": Algorithm(torch.optim.SGD, ravine.SGD, sgd_m, 20),
        "sgd-nesterov": Algorithm(torch.optim.SGD, ravine.SGD, {**sgd_m, "nesterov": True}, 20),
        "sgd-wd-maximize": Algorithm(
            torch.optim.SGD, ravine.SGD, {**sgd_m, "weight_decay": 1e-4, "dampening": 0.1, "maximize": True}, 20
        ),
        "adagrad": Algorithm(torch.optim.Adagrad, ravine.Adagrad, {"lr": 0.01}, 20),
        "rmsprop": Algorithm(torch.optim.RMSprop, ravine.RMSprop, {"lr": 0.01}, 20, ("for-loop", "foreach")),
        "rmsprop-centered": Algorithm(
            torch.optim.RMSprop, ravine.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.9}, 36, ("for-loop", "foreach")
        ),
        "adam": Algorithm(torch.optim.Adam, ravine.Adam, {"lr": 1e-3}, 28),
        "adam-amsgrad": Algorithm(torch.optim.Adam, ravine.Adam, {"lr": 1e-3, "amsgrad": True}, 36),
        "adam-l2-maximize": Algorithm(
            torch.optim.Adam, ravine.Adam, {"lr": 1e-3, "weight_decay": 1e-2, "maximize": True}, 28
        ),
        "adamw": Algorithm(torch.optim.AdamW, ravine.AdamW, {"lr": 1e-3}, 28),
        "adamax": Algorithm(torch.optim.Adamax, ravine.Adamax, {"lr": 2e-3}, 28, ("for-loop", "foreach")),
        "nadam": Algorithm(torch.optim.NAdam, ravine.NAdam, {"lr": 2e-3}, 28, ("for-loop", "foreach")),
        "radam": Algorithm(torch.optim.RAdam, ravine.RAdam, {"lr": 1e-3}, 28, ("for-loop", "foreach")),
        # Low-memory state (docs/memory.md) against torch's float32 state: bytes per
        # parameter are param r/w + grad + state r/w (bfloat16: 2 B, 8-bit: 1 B per
        # buffer element). Not in the default set.
        "adam-bf16": Algorithm(
            torch.optim.Adam, partial(ravine.Adam, state_dtype=torch.bfloat16), {"lr": 1e-3}, 20,
            ("foreach", "fused"), ("default",), has_target=False,
        ),
        "adamw-8bit": Algorithm(
            torch.optim.AdamW, AdamW8bit, {"lr": 1e-3}, 16, ("foreach", "fused"), ("default",), has_target=False
        ),
        "sgd-momentum-bf16": Algorithm(
            torch.optim.SGD, partial(ravine.SGD, state_dtype=torch.bfloat16), sgd_m, 16, ("foreach",), ("default",),
            has_target=False,
        ),
        "sgd-momentum-8bit": Algorithm(
            torch.optim.SGD, SGD8bit, sgd_m, 14, ("foreach",), ("default",), has_target=False
        ),
    }


#: name -> Algorithm; benchmarks may add rows before calling :func:`run`.
ALGORITHMS: dict[str, Algorithm] = _algorithms()
DEFAULT_ALGORITHMS = tuple(name for name, algorithm in ALGORITHMS.items() if algorithm.has_target)


def _low_memory_algorithms() -> dict[str, Algorithm]:
    """Optimizer state in bfloat16 or 8 bits (docs/memory.md) against torch's float32
    state; bytes per parameter: param r/w + grad + state r/w at 2 B (bfloat16) or 1 B
    (8-bit) per buffer element. Plain path only; timed on request, not by default."""
    from ravine.optim.quantized import AdamW8bit, SGD8bit

    def without_impl(cls: type) -> Callable[..., torch.optim.Optimizer]:
        return lambda params, impl, **kwargs: cls(params, **kwargs)

    sgd_m = {"lr": 0.01, "momentum": 0.9}
    bf16 = {"state_dtype": torch.bfloat16}
    return {
        "adam-bf16": Algorithm(
            torch.optim.Adam, lambda params, **kwargs: ravine.Adam(params, **kwargs, **bf16), {"lr": 1e-3}, 20,
            ("foreach", "fused"), ("plain",),
        ),
        "adamw-8bit": Algorithm(
            torch.optim.AdamW, without_impl(AdamW8bit), {"lr": 1e-3}, 16, ("foreach", "fused"), ("plain",)
        ),
        "sgd-momentum-bf16": Algorithm(
            torch.optim.SGD, lambda params, **kwargs: ravine.SGD(params, **kwargs, **bf16), sgd_m, 16, ("foreach",),
            ("plain",),
        ),
        "sgd-momentum-8bit": Algorithm(torch.optim.SGD, without_impl(SGD8bit), sgd_m, 14, ("foreach",), ("plain",)),
    }


ALGORITHMS.update(_low_memory_algorithms())

PATH_OPTIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_params(total: int, tensors: int, seed: int = 0) -> list[torch.Tensor]:
    """``tensors`` float32 tensors of ``total // tensors`` elements, with gradients."""
    generator = torch.Generator().manual_seed(seed)
    size = total // tensors
    params = []
    for _ in range(tensors):
        p = torch.randn(size, generator=generator).requires_grad_()
        p.grad = torch.randn(size, generator=generator) * 1e-3
        params.append(p)
    return params


def kernel_cost() -> dict[str, Any]:
    """Build (or load) the compiled step and say what that cost in this process."""
    from ravine.kernels import cpu

    reason = cpu.unavailable_reason()
    info = cpu.build_info()
    info["available"] = reason is None
    info["reason"] = reason
    return info


def torch_has_fused(algorithm: Algorithm) -> bool:
    return "fused" in algorithm.torch_paths


def bench_algorithm(name: str, total: int, tensors: int, steps: int, warmup: int, fast_available: bool = True) -> dict:
    algorithm = ALGORITHMS[name]
    contenders: dict[str, torch.optim.Optimizer] = {}
    if algorithm.torch_cls is not None:
        for path in algorithm.torch_paths:
            contenders[f"torch {path}"] = algorithm.torch_cls(
                make_params(total, tensors), **algorithm.kwargs, **PATH_OPTIONS[path]
            )
    for impl in algorithm.ravine_impls:
        if impl == "fast" and not fast_available:
            continue
        if impl == "default":
            contenders["ravine"] = algorithm.ravine_cls(make_params(total, tensors), **algorithm.kwargs)
        else:
            contenders[f"ravine {impl}"] = algorithm.ravine_cls(
                make_params(total, tensors), **algorithm.kwargs, impl=impl
            )
    times: dict[str, list[float]] = {key: [] for key in contenders}
    for iteration in range(warmup + steps):
        # A new learning rate every step, as a schedule would set it.
        lr = algorithm.kwargs.get("lr", 1e-3) * (1 - 0.5 * iteration / (warmup + steps))
        for key, optimizer in contenders.items():
            for group in optimizer.param_groups:
                group["lr"] = lr
            start = time.perf_counter()
            optimizer.step()
            elapsed = time.perf_counter() - start
            if iteration >= warmup:
                times[key].append(elapsed)
    medians = {key: statistics.median(values) for key, values in times.items()}
    torch_keys = [key for key in medians if key.startswith("torch")]
    torch_best_key = min(torch_keys, key=medians.get) if torch_keys else None
    target = 1.0 if torch_has_fused(algorithm) else 1 / 1.5
    bytes_moved = algorithm.bytes_per_param * total
    rows = []
    for key, seconds in medians.items():
        ratio = seconds / medians[torch_best_key] if torch_best_key else None
        rows.append(
            {
                "algorithm": name,
                "implementation": key,
                "ms_per_step": seconds * 1e3,
                "gb_per_s": bytes_moved / seconds / 1e9,
                "ratio_to_torch_best": ratio,
                "target_met": (
                    (ratio <= target)
                    if (ratio is not None and key in ("ravine fast", "ravine") and algorithm.has_target)
                    else None
                ),
            }
        )
    return {
        "algorithm": name,
        "torch_best": torch_best_key,
        "target_ratio": target,
        "bytes_per_param": algorithm.bytes_per_param,
        "rows": rows,
    }


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
    }


def run(
    names: list[str], total: int, tensors: int, steps: int, warmup: int, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Benchmark ``names``; print a table through ``echo``; return everything measured."""
    start = time.perf_counter()
    cost = kernel_cost()
    first_use = time.perf_counter() - start
    info = machine()
    echo(
        f"# {total:,} float32 parameters in {tensors} tensors; torch {info['torch']}, {info['threads']} threads, "
        f"{info['cpu']} ({info['cores']} cores, {info['capability']})"
    )
    if cost["available"]:
        how = (
            f"compiled in {cost['compile_seconds']:.1f} s" if cost["compiles"] else "loaded from the cache"
        ) + f", {first_use * 1e3:.0f} ms to first use; VML square root: {'yes' if cost['vml_sqrt'] else 'no'}"
        echo(f"# ravine fast path: {how} ({cost['path']})")
    else:
        echo(f"# ravine fast path unavailable: {cost['reason']}")
    echo(f"{'algorithm':<18}{'implementation':<16}{'ms/step':>10}{'GB/s':>8}{'vs torch best':>15}{'target':>9}")
    results = []
    for name in names:
        result = bench_algorithm(name, total, tensors, steps, warmup, cost["available"])
        results.append(result)
        for row in result["rows"]:
            ratio = row["ratio_to_torch_best"]
            met = row["target_met"]
            target = "" if met is None else (f"<={result['target_ratio']:.2f} " + ("met" if met else "MISSED"))
            echo(
                f"{row['algorithm']:<18}{row['implementation']:<16}{row['ms_per_step']:>10.2f}"
                f"{row['gb_per_s']:>8.2f}{(f'{ratio:.2f}x' if ratio is not None else '-'):>15}  {target}"
            )
    return {"params": total, "tensors": tensors, "steps": steps, "machine": info, "fast_path": cost, "results": results}


def parse_names(optimizers: str | None) -> list[str]:
    if not optimizers:
        return list(DEFAULT_ALGORITHMS)
    names = [name.strip() for name in optimizers.split(",") if name.strip()]
    unknown = [name for name in names if name not in ALGORITHMS]
    if unknown:
        raise ValueError(f"--optimizers: unknown {', '.join(unknown)}; valid: {', '.join(ALGORITHMS)}")
    return names


bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True, add_completion=False)


@bench_app.callback()
def _bench() -> None:
    """Benchmarks of ravine against torch."""
    # A callback keeps `step` a sub-command, so `ravine bench step` stays the name.


@bench_app.command("step")
def step_command(
    params: Annotated[float, typer.Option("--params", help="Total parameters, e.g. 1e7.")] = 1e7,
    tensors: Annotated[int, typer.Option("--tensors", help="Number of tensors they are split into.")] = 100,
    optimizers: Annotated[
        str | None, typer.Option("--optimizers", help="Comma-separated (default: all with targets): " + ", ".join(ALGORITHMS))
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per implementation.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first.")] = 3,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default: torch's).")] = None,
    json_file: Annotated[str | None, typer.Option("--json", help="Write the results to this file.")] = None,
) -> None:
    """Optimizer step time: torch.optim's implementations against ravine's, side by side."""
    try:
        names = parse_names(optimizers)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if tensors < 1 or params < tensors:
        raise typer.BadParameter(f"--params must be >= --tensors >= 1, got --params {params:g} --tensors {tensors}")
    if steps < 1 or warmup < 0:
        raise typer.BadParameter(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    result = run(names, int(params), tensors, steps, warmup, echo=typer.echo)
    if json_file:
        with open(json_file, "w") as handle:
            json.dump(result, handle, indent=2)
