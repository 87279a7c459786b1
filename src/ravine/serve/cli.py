"""``ravine serve``: the lab's page on a local web server."""

from __future__ import annotations

import ipaddress
import socket
import webbrowser
from pathlib import Path

import typer
from rich.console import Console

__all__ = ["bind_socket", "is_loopback", "serve_command"]


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free port the OS picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    return sock


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but localhost needs --allow-remote."),
    port: int = typer.Option(0, "--port", "-p", help="Port to listen on (0: a free port, printed at start)."),
    out: Path = typer.Option(Path("ravine-serve-runs"), "--out", help="Folder for the runs' results and reports."),
    allow_remote: bool = typer.Option(
        False, "--allow-remote",
        help="Allow --host to be an address other computers can reach. The page has no login: "
        "anyone who reaches it can start runs on this machine.",
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
    threads: int = typer.Option(1, "--threads", help="torch threads for training (runs share them)."),
) -> None:
    """Serve the lab's page: landscape playground and live training, no network needed.

    Listens on 127.0.0.1 at a free port by default and prints the address. Ctrl-C stops
    the server; runs still going are stopped and every run's results stay under --out.
    """
    console = Console()
    error = Console(stderr=True)
    if not is_loopback(host) and not allow_remote:
        error.print(
            f"[red]Error:[/] --host {host} can be reached from other computers; the page has no login. "
            "Pass --allow-remote as well if that is what you want."
        )
        raise typer.Exit(code=2)
    if threads < 1:
        error.print(f"[red]Error:[/] --threads must be >= 1, got {threads}")
        raise typer.Exit(code=2)
    if not 0 <= port <= 65535:
        error.print(f"[red]Error:[/] --port must be from 0 to 65535, got {port}")
        raise typer.Exit(code=2)
    try:
        sock = bind_socket(host, port)
    except OSError as problem:
        error.print(f"[red]Error:[/] cannot listen on {host}:{port}: {problem.strerror or problem}")
        raise typer.Exit(code=2) from None

    import torch
    import uvicorn

    from ravine.serve.app import create_app

    # Small models train fastest on one thread, and extra threads would fight the server's.
    torch.set_num_threads(threads)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{bound_port}/"
    console.print(f"[bold]ravine serve[/]: {url}  (results in {out.resolve()}; Ctrl-C stops)", soft_wrap=True)
    if open_browser:
        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(create_app(out), log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
