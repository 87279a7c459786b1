"""`ravine advise`: which optimizer fits an arena task's model, memory and time budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_TASK = "mnist1d-mlp"


def advise_command(
    task: Annotated[
        str, typer.Option("--task", help="Arena task whose model and data to measure, e.g. mnist1d-mlp, digits-cnn, charlm-gru; an unknown name lists them all.")
    ] = DEFAULT_TASK,
    optimizers: Annotated[
        str | None,
        typer.Option(
            "--optimizers",
            help='Comma-separated optimizer specs, e.g. "adam,sgd(momentum=0.9)"; default: every registered optimizer.',
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per training step.")] = 32,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help='Most optimizer-state memory allowed, e.g. "10MB", "512KiB".'),
    ] = None,
    time_budget: Annotated[
        str | None,
        typer.Option("--time-budget", help='Most time a whole training step may take, e.g. "5ms", "0.2s".'),
    ] = None,
    range_steps: Annotated[
        int, typer.Option("--range-steps", help="Steps of the learning-rate range test (10 to 100000; 0 skips it).")
    ] = 200,
    lr_min: Annotated[float, typer.Option("--lr-min", help="First learning rate of the sweep.")] = 1e-7,
    lr_max: Annotated[float, typer.Option("--lr-max", help="Last learning rate of the sweep.")] = 10.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the model's weights and of the batches.")] = 0,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="CPU threads torch may use while measuring; default: torch's own choice."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Directory for lr_range.png and advice.json (created if missing).")
    ] = Path("."),
) -> None:
    """Measure optimizer state memory, step time and a learning-rate range test on a task's
    model, then recommend an optimizer within the budgets."""
    # Heavy imports wait until the command runs, so `ravine --help` stays quick.
    import torch
    from rich.console import Console

    from ravine.advise import advise, parse_duration, parse_size
    from ravine.registry import split_specs
    from ravine import registry
    from ravine.arena.tasks import get_task

    chosen_task = _checked("--task", get_task, task)
    specs = None
    if optimizers is not None:
        specs = _checked("--optimizers", split_specs, optimizers)
        for spec in specs:
            _checked("--optimizers", registry.check_spec, spec)
    if batch_size < 1:
        raise typer.BadParameter(f"must be an integer >= 1, got {batch_size}", param_hint="'--batch-size'")
    memory_bytes = None if memory_budget is None else _checked("--memory-budget", parse_size, memory_budget)
    time_ms = None if time_budget is None else _checked("--time-budget", parse_duration, time_budget)
    if time_ms is not None and time_ms <= 0:
        raise typer.BadParameter(f"must be > 0, got {time_budget!r}", param_hint="'--time-budget'")
    if range_steps != 0 and not 10 <= range_steps <= 100_000:
        raise typer.BadParameter(
            f"must be 0 (skip the range test) or in [10, 100000], got {range_steps}", param_hint="'--range-steps'"
        )
    if not 0 < lr_min < lr_max:
        raise typer.BadParameter(
            f"need 0 < --lr-min < --lr-max, got {lr_min:g} and {lr_max:g}", param_hint="'--lr-min' / '--lr-max'"
        )
    if threads is not None and threads < 1:
        raise typer.BadParameter(f"must be an integer >= 1, got {threads}", param_hint="'--threads'")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{str(out)!r} exists and is not a directory", param_hint="'--out'")

    console = Console()
    if threads is not None:
        torch.set_num_threads(threads)
    data = chosen_task.data
    generator = torch.Generator().manual_seed(seed)

    def next_batch() -> tuple[Any, Any]:
        indices = torch.randint(0, data.num_train, (batch_size,), generator=generator)
        return data.train_inputs[indices], data.train_targets[indices]

    with console.status(f"Measuring optimizers on {chosen_task.name} ..."):
        advice = advise(
            chosen_task.make_model(seed),
            chosen_task.loss_fn,
            next_batch,
            optimizers=specs,
            memory_budget=memory_bytes,
            time_budget=time_ms,
            lr_range=(lr_min, lr_max),
            range_steps=range_steps,
        )

    console.print(advice.to_table())
    for row in advice.rows:
        test = row.range_test
        if test is None:
            continue
        if test.suggested_lr is None:
            suggestion = "no suggestion (the loss never clearly fell)"
        else:
            low, high = test.valley
            suggestion = f"suggested lr {test.suggested_lr:.2e} (valley {low:.1e} to {high:.1e})"
        console.print(
            f"{row.spec}: {suggestion}; {test.steps_run}/{test.steps_planned} steps, {test.stop_reason}",
            highlight=False,
        )
    console.print()
    console.print(f"[bold]Recommendation:[/] {advice.recommendation}", highlight=False)

    out.mkdir(parents=True, exist_ok=True)
    written = []
    if range_steps:
        written.append(advice.plot(out / "lr_range.png"))
    report = {
        "task": chosen_task.name,
        "batch_size": batch_size,
        "seed": seed,
        "threads": torch.get_num_threads(),
        **advice.to_dict(),
    }
    json_path = out / "advice.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    written.append(json_path)
    console.print("Wrote " + ", ".join(str(path) for path in written), highlight=False)


def _checked(option: str, function: Any, value: Any) -> Any:
    """``function(value)``, turning its ValueError into a usage error naming ``option``."""
    try:
        return function(value)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint=f"'{option}'") from None
