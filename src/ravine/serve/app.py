"""The web app behind ``ravine serve``: one page, a JSON API and a server-sent event stream.

========================================  =================================================
endpoint                                  what it does
========================================  =================================================
``GET /``                                 the page
``GET /static/{file}``                    the page's script and style; ``plotly.min.js``
                                          comes from the installed plotly package
``GET /api/options``                      tasks, optimizers, schedules, test functions and
                                          the page's defaults
``GET /api/landscape/{function}``         the function's contour grid
``POST /api/landscape/paths``             optimizer paths on a test function
``POST /api/runs``                        start a training run (202, returns its id)
``GET /api/runs``                         every run, newest first (read from disk too)
``GET /api/runs/{id}``                    one run with all its curves
``GET /api/runs/{id}/events``             the run's progress as server-sent events
``POST /api/runs/{id}/stop``              stop a run after its current step
``GET /api/runs/{id}/files/{name}``       report.html, results.csv, results.json, run.json
========================================  =================================================

Invalid settings answer 422 with ``{"error": "<what is wrong and what is allowed>"}``;
an unknown run 404, an unexpected failure 500, both with an ``error`` message and never
a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from ravine import registry
from ravine.arena.tasks import available_tasks, get_task
from ravine.arena.train import SCHEDULES
from ravine.arena.tune import DEFAULT_SETTINGS
from ravine.serve import playground
from ravine.serve.runs import MAX_EPOCHS, RunManager, RunNotFound, TrainingSettings

__all__ = ["EVENT_INTERVAL_S", "create_app"]

EVENT_INTERVAL_S = 0.25
FILES = {
    "report.html": "text/html; charset=utf-8",
    "results.csv": "text/csv; charset=utf-8",
    "results.json": "application/json",
    "run.json": "application/json",
}
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
logger = logging.getLogger("ravine.serve")


class RunRequest(BaseModel):
    """The body of ``POST /api/runs``; values are checked, and defaults taken, by
    :class:`TrainingSettings`."""

    model_config = ConfigDict(extra="forbid")

    task: str = TrainingSettings.task
    optimizers: list[str] = list(TrainingSettings.optimizers)
    batch_size: int = TrainingSettings.batch_size
    lr: float | None = TrainingSettings.lr
    schedule: str = TrainingSettings.schedule
    clip_norm: float | None = TrainingSettings.clip_norm
    epochs: int = TrainingSettings.epochs
    seed: int = TrainingSettings.seed


class PathsRequest(BaseModel):
    """The body of ``POST /api/landscape/paths``."""

    model_config = ConfigDict(extra="forbid")

    function: str = "ravine"
    optimizers: list[str]
    steps: int | None = None
    start: list[float] | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request"


def create_app(out: str | Path = "ravine-serve-runs") -> FastAPI:
    """The ASGI app; runs go to folders under ``out``."""
    manager = RunManager(out)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The first path pays for torch's warm-up; pay it before the page asks.
        warm_up = asyncio.create_task(asyncio.to_thread(playground.paths, "ravine", ["sgd"], 5))
        yield
        await warm_up
        # A server that stops asks running runs to stop and lets them write their files.
        await asyncio.to_thread(manager.shutdown)

    app = FastAPI(title="ravine", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.manager = manager

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed: %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(error).__name__}); the server log has the details")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(_static_text("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name == "plotly.min.js":
            return FileResponse(_plotly_js(), media_type="text/javascript; charset=utf-8")
        if name not in STATIC:
            return _error(404, f"no static file {name!r}")
        return Response(_static_text(name), media_type=STATIC[name])

    @app.get("/api/options")
    async def options() -> dict[str, Any]:
        tasks = []
        for name in available_tasks():
            task = get_task(name)
            tasks.append({"name": name, "description": task.description, "metric": task.metric_name,
                          "higher_is_better": task.higher_is_better})
        optimizers = []
        for name in registry.available():
            defaults = registry.describe(name)
            lr = DEFAULT_SETTINGS.get(name, {}).get("lr", defaults.get("lr"))
            optimizers.append({"name": name, "lr": lr})
        return {
            "tasks": tasks,
            "optimizers": optimizers,
            "schedules": list(SCHEDULES),
            "functions": playground.functions(),
            "defaults": {**RunRequest().model_dump(), "max_epochs": MAX_EPOCHS,
                         "max_steps": playground.MAX_STEPS},
        }

    @app.get("/api/landscape/{function}")
    async def landscape_grid(function: str) -> Any:
        if function not in playground.available_functions():
            return _error(404, f"unknown function {function!r}; valid functions: "
                               f"{', '.join(playground.available_functions())}")
        return await asyncio.to_thread(playground.contour, function)

    @app.post("/api/landscape/paths")
    async def landscape_paths(request: PathsRequest) -> Any:
        try:
            drawn = await asyncio.to_thread(
                playground.paths, request.function, request.optimizers, request.steps, request.start
            )
        except ValueError as error:
            return _error(422, str(error))
        return {"function": request.function, "paths": drawn}

    @app.post("/api/runs", status_code=202)
    async def start_run(request: RunRequest) -> Any:
        values = request.model_dump()
        values["optimizers"] = tuple(values["optimizers"])
        try:
            settings = TrainingSettings(**values)
        except ValueError as error:
            return _error(422, str(error))
        try:
            run = manager.start(settings)
        except OSError as error:
            return _error(500, f"cannot write the run's folder under {manager.out}: {error.strerror or error}")
        return JSONResponse(run.snapshot(), status_code=202)

    @app.get("/api/runs")
    async def list_runs() -> Any:
        return {"runs": await asyncio.to_thread(manager.list)}

    @app.get("/api/runs/{run_id}")
    async def get_run(run_id: str) -> Any:
        try:
            return manager.get(run_id)
        except RunNotFound:
            return _error(404, f"no run {run_id!r}")

    @app.post("/api/runs/{run_id}/stop")
    async def stop_run(run_id: str) -> Any:
        try:
            return manager.stop(run_id)
        except RunNotFound:
            return _error(404, f"no run {run_id!r}")

    @app.get("/api/runs/{run_id}/events")
    async def run_events(run_id: str) -> Any:
        try:
            manager.folder(run_id)
        except RunNotFound:
            return _error(404, f"no run {run_id!r}")
        return StreamingResponse(
            _events(manager, run_id), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/runs/{run_id}/files/{name}")
    async def run_file(run_id: str, name: str) -> Any:
        try:
            folder = manager.folder(run_id)
        except RunNotFound:
            return _error(404, f"no run {run_id!r}")
        if name not in FILES:
            return _error(404, f"no file {name!r}; run files: {', '.join(FILES)}")
        path = folder / name
        if not path.is_file():
            hint = " (the report is written when every optimizer of the run has finished)" if name == "report.html" else ""
            return _error(404, f"run {run_id} has no {name} yet{hint}")
        return FileResponse(path, media_type=FILES[name])

    return app


async def _events(manager: RunManager, run_id: str):
    """Server-sent events: an ``update`` with the new points every EVENT_INTERVAL_S while
    the run changes, then one ``end`` event with the run's final snapshot."""
    run = manager.live(run_id)
    if run is None:  # finished in an earlier server: everything at once
        yield _sse("end", manager.get(run_id))
        return
    cursor: dict[str, int] = {}
    seen = -1
    while True:
        finished = run.finished_flag
        if run.version != seen:
            seen = run.version
            message, cursor = run.progress_since(cursor)
            yield _sse("update", message)
        if finished:
            yield _sse("end", run.snapshot())
            return
        await asyncio.sleep(EVENT_INTERVAL_S)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


def _static_text(name: str) -> str:
    return resources.files("ravine.serve").joinpath("static", name).read_text(encoding="utf-8")


def _plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
