"""``ravine serve``: the lab as a local web page.

    >>> from ravine.serve import create_app
    >>> app = create_app("ravine-serve-runs")   # an ASGI app; ``ravine serve`` runs it with uvicorn

The page has a landscape playground (optimizer paths on a test function, redrawn as
sliders move) and live training (a built-in task, one or more optimizers, loss and
accuracy curves streamed while the run goes on, finished runs listed and compared, the
arena report for each finished run). See docs/serve.md.
"""

__all__ = ["create_app"]


def __getattr__(name: str):
    # The web stack loads on first use, so `ravine --help` stays quick.
    if name == "create_app":
        from ravine.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'ravine.serve' has no attribute {name!r}")
