"""The `ravine` command line: one sub-command per part of the lab."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="ravine: an optimizer lab for PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _ravine() -> None:
    """ravine: an optimizer lab for PyTorch."""
    # A callback keeps every command a sub-command, however many are registered.


# Sub-commands register themselves below, one line each.
from ravine.arena.cli import compare_command  # noqa: E402
app.command("compare")(compare_command)
from ravine.advise_cli import advise_command  # noqa: E402
app.command("advise")(advise_command)
from ravine.landscape.cli import landscape_command  # noqa: E402
app.command("landscape")(landscape_command)
from ravine.bench import bench_app  # noqa: E402
app.add_typer(bench_app, name="bench")
from ravine.serve.cli import serve_command  # noqa: E402
app.command("serve")(serve_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
