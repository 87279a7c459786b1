"""`ravine bench step`: optimizer step time, ravine against torch.optim, side by side.

For each algorithm every implementation (torch.optim's for-loop, foreach and fused
paths where torch has them; ravine's plain and fast paths) takes its steps in turn,
round robin, so machine noise hits all of them alike; the median step time is
reported with the effective bandwidth (the bytes a step must move divided by the
time) and the ratio to torch's fastest implementation measured in the same run.

The target for ravine's default path (the fast path where it is available) is a
ratio of at most 1.0 where torch has a fused kernel for the algorithm and options,
and at most 1/1.5 (1.5x faster) where it has not (RMSprop, for instance, and the
optimizers torch lacks, against their baseline below); the table marks it "met" or
"MISSED". Rows that trade speed for memory (bfloat16 and 8-bit state) have no target. Every step sets a new learning rate, as a schedule would.
``benchmarks/step.py`` runs the same code.

The baseline of a row is torch.optim's class where torch has the algorithm; for the
schedule-free rows it is the reference ``schedulefree`` package (the row has no
baseline where that is not installed); for Lion, LAMB, Signum and signSGD, which
neither has, it is ravine's own plain path ("ravine plain (baseline)"), so the ratio
says what the compiled step gains. Adafactor and Muon step matrices (Muon's rule
needs them; Adafactor factors its second moment on them): each tensor is a matrix of
about ``params / tensors`` elements, as square as the count allows.
"""

from __future__ import annotations

import json
import math
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
    #: Name of the baseline library in the row labels ("torch", "schedulefree").
    baseline_name: str = "torch"
    #: A ravine implementation that serves as the baseline where ``torch_cls`` is None.
    ravine_baseline: str | None = None
    #: Step matrices instead of vectors.
    matrices: bool = False
    #: In the default selection (``--optimizers`` not given).
    default: bool | None = None

    def in_default_set(self) -> bool:
        return self.has_target if self.default is None else self.default


def _schedulefree(name: str) -> Callable[..., torch.optim.Optimizer] | None:
    """The reference package's class (a test-only dependency), or None."""
    try:
        import schedulefree
    except ImportError:
        return None
    return getattr(schedulefree, name)


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
        # Optimizers torch.optim lacks or has only recently. Bytes per parameter, float32:
        # Lion and Signum: param r/w + grad + momentum r/w = 20; signSGD: param r/w + grad
        # = 12; LAMB: two passes, since the trust ratio needs the whole tensor's update
        # norm first: (grad + param + m r/w + v r/w) + (m + v + param r/w) = 24 + 16 = 40;
        # schedule-free AdamW: y r/w + z r/w + v r/w + grad = 28, SGD: y r/w + z r/w +
        # grad = 20; Adafactor on matrices (factored state, O(rows + cols)): param and
        # grad read for param's RMS and the row/column means, grad read again for the
        # update's RMS, then param r/w + grad = 8 + 4 + 12 = 24; Muon: param r/w + grad +
        # momentum r/w = 20 (its Newton-Schulz iterations are matrix products on a
        # matrix-sized temporary, compute-bound, not counted).
        "lion": Algorithm(
            None, ravine.Lion, {"lr": 1e-4, "weight_decay": 0.1}, 20, (), ("plain", "default"),
            ravine_baseline="plain", default=True,
        ),
        "lamb": Algorithm(
            None, ravine.Lamb, {"lr": 1e-3, "weight_decay": 0.01}, 40, (), ("plain", "default"),
            ravine_baseline="plain", default=True,
        ),
        "signum": Algorithm(
            None, ravine.Signum, {"lr": 1e-3, "momentum": 0.9}, 20, (), ("plain", "default"),
            ravine_baseline="plain", default=True,
        ),
        "signsgd": Algorithm(
            None, ravine.Signum, {"lr": 1e-3, "momentum": 0.0}, 12, (), ("plain", "default"),
            ravine_baseline="plain", default=True,
        ),
        "sfadamw": Algorithm(
            _schedulefree("AdamWScheduleFree"), ravine.ScheduleFreeAdamW, {"lr": 2.5e-3}, 28,
            ("for-loop", "foreach"), ("default",), baseline_name="schedulefree", default=True,
        ),
        "sfsgd": Algorithm(
            _schedulefree("SGDScheduleFree"), ravine.ScheduleFreeSGD, {"lr": 0.1}, 20,
            ("for-loop", "foreach"), ("default",), baseline_name="schedulefree", default=True,
        ),
        "adafactor": Algorithm(
            torch.optim.Adafactor, ravine.Adafactor, {"lr": 1e-2}, 24, ("for-loop", "foreach"), ("plain", "default"),
            matrices=True, default=True,
        ),
        "muon": Algorithm(
            torch.optim.Muon, ravine.Muon, {"lr": 1e-3}, 20, ("default",), ("default",),
            matrices=True, default=False,
        ),
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
DEFAULT_ALGORITHMS = tuple(name for name, algorithm in ALGORITHMS.items() if algorithm.in_default_set())


def _low_memory_algorithms() -> dict[str, Algorithm]:
    """Optimizer state in bfloat16 or 8 bits (docs/memory.md) against torch's float32
    state; bytes per parameter: param r/w + grad + state r/w at 2 B (bfloat16) or 1 B
    (8-bit) per buffer element. Timed on request, not by default; the 8-bit rows
    show the plain path ("ravine plain") beside the default, compiled one ("ravine")."""
    from ravine.optim.quantized import AdamW8bit, SGD8bit

    sgd_m = {"lr": 0.01, "momentum": 0.9}
    bf16 = {"state_dtype": torch.bfloat16}
    return {
        "adam-bf16": Algorithm(
            torch.optim.Adam, lambda params, **kwargs: ravine.Adam(params, **kwargs, **bf16), {"lr": 1e-3}, 20,
            ("foreach", "fused"), ("plain",),
        ),
        # The 8-bit rows time the compiled step ("ravine") beside the plain path.
        "adamw-8bit": Algorithm(
            torch.optim.AdamW, AdamW8bit, {"lr": 1e-3}, 16, ("foreach", "fused"), ("plain", "default"),
            has_target=False,
        ),
        "sgd-momentum-bf16": Algorithm(
            torch.optim.SGD, lambda params, **kwargs: ravine.SGD(params, **kwargs, **bf16), sgd_m, 16, ("foreach",),
            ("plain",),
        ),
        "sgd-momentum-8bit": Algorithm(
            torch.optim.SGD, SGD8bit, sgd_m, 14, ("foreach",), ("plain", "default"), has_target=False
        ),
    }


ALGORITHMS.update(_low_memory_algorithms())

PATH_OPTIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}, "default": {}}


def tensor_shape(total: int, tensors: int, matrices: bool = False) -> tuple[int, ...]:
    """The shape of each of ``tensors`` tensors: ``total // tensors`` elements, or with
    ``matrices`` the most nearly square matrix of at most that many."""
    size = total // tensors
    if not matrices:
        return (size,)
    rows = max(1, int(size**0.5))
    return (rows, size // rows)


def make_params(total: int, tensors: int, seed: int = 0, matrices: bool = False) -> list[torch.Tensor]:
    """``tensors`` float32 tensors of :func:`tensor_shape`, with gradients."""
    generator = torch.Generator().manual_seed(seed)
    shape = tensor_shape(total, tensors, matrices)
    params = []
    for _ in range(tensors):
        p = torch.randn(shape, generator=generator).requires_grad_()
        p.grad = torch.randn(shape, generator=generator) * 1e-3
        params.append(p)
    return params


def _train(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Schedule-free optimizers step only in training mode."""
    if hasattr(optimizer, "train"):
        optimizer.train()
    return optimizer


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
    params = partial(make_params, total, tensors, matrices=algorithm.matrices)
    shape = tensor_shape(total, tensors, algorithm.matrices)
    numel = tensors * math.prod(shape)
    contenders: dict[str, torch.optim.Optimizer] = {}
    baseline_keys = []
    if algorithm.torch_cls is not None:
        for path in algorithm.torch_paths:
            key = algorithm.baseline_name if path == "default" else f"{algorithm.baseline_name} {path}"
            contenders[key] = _train(algorithm.torch_cls(params(), **algorithm.kwargs, **PATH_OPTIONS[path]))
            baseline_keys.append(key)
    for impl in algorithm.ravine_impls:
        if impl == "fast" and not fast_available:
            continue
        key = "ravine" if impl == "default" else f"ravine {impl}"
        if algorithm.ravine_baseline == impl:
            # A class without a compiled step runs its plain path by default.
            key = "ravine (plain, baseline)" if impl == "default" else f"{key} (baseline)"
            baseline_keys.append(key)
        options = {} if impl == "default" else {"impl": impl}
        contenders[key] = _train(algorithm.ravine_cls(params(), **algorithm.kwargs, **options))
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
    baseline_best = min(baseline_keys, key=medians.get) if baseline_keys else None
    torch_best = baseline_best if algorithm.torch_cls is not None and algorithm.baseline_name == "torch" else None
    target = 1.0 if torch_has_fused(algorithm) else 1 / 1.5
    bytes_moved = algorithm.bytes_per_param * numel
    rows = []
    for key, seconds in medians.items():
        ratio = seconds / medians[baseline_best] if baseline_best else None
        rows.append(
            {
                "algorithm": name,
                "implementation": key,
                "ms_per_step": seconds * 1e3,
                "gb_per_s": bytes_moved / seconds / 1e9,
                "ratio_to_baseline": ratio,
                "ratio_to_torch_best": ratio if torch_best else None,
                "target_met": (
                    (ratio <= target)
                    if (ratio is not None and key in ("ravine fast", "ravine") and algorithm.has_target)
                    else None
                ),
            }
        )
    return {
        "algorithm": name,
        "params": numel,
        "shape": list(shape),
        "baseline_best": baseline_best,
        "torch_best": torch_best,
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
    echo(f"{'algorithm':<18}{'implementation':<26}{'ms/step':>10}{'GB/s':>8}{'vs baseline':>13}{'target':>9}")
    results = []
    for name in names:
        result = bench_algorithm(name, total, tensors, steps, warmup, cost["available"])
        results.append(result)
        for row in result["rows"]:
            ratio = row["ratio_to_baseline"]
            met = row["target_met"]
            target = "" if met is None else (f"<={result['target_ratio']:.2f} " + ("met" if met else "MISSED"))
            echo(
                f"{row['algorithm']:<18}{row['implementation']:<26}{row['ms_per_step']:>10.2f}"
                f"{row['gb_per_s']:>8.2f}{(f'{ratio:.2f}x' if ratio is not None else '-'):>13}  {target}"
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
