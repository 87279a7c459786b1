"""The landscape lab: optimizers drawn on 2-D test functions.

    >>> from ravine import landscape
    >>> paths = landscape.compare("ravine", ["sgd", "momentum", "adam"], tune=True)
    >>> landscape.plot_contour("ravine", paths).savefig("contour.png")

Functions (:mod:`.functions`): ``ravine`` (x² + 50y²), ``rosenbrock``, ``beale``,
``himmelblau``, ``rastrigin``, ``saddle``, or any ``f(x, y)`` of two tensors.
Runs (:mod:`.paths`): :func:`run`, :func:`run_many` record position, loss and gradient
norm per step. Fair comparison (:mod:`.tuning`): :func:`tune_learning_rate`,
:func:`compare`, :func:`summarize`. Pictures (:mod:`.plots`): :func:`plot_contour`,
:func:`plot_loss`, :func:`animate_paths`. Command: ``ravine landscape``.
"""

from ravine.landscape.functions import (
    FUNCTIONS,
    TestFunction,
    as_test_function,
    available_functions,
    get_function,
)
from ravine.landscape.paths import (
    CSV_COLUMNS,
    OptimizerChoice,
    Path,
    resolve_optimizer,
    run,
    run_many,
    split_specs,
    write_csv,
)
from ravine.landscape.tuning import (
    SEED_OPTIMIZERS,
    Summary,
    TuningResult,
    compare,
    learning_rate_grid,
    rank_key,
    summarize,
    tune_learning_rate,
)

# Plotting pulls in matplotlib; load it on first use so `ravine --help` stays quick.
_PLOTS = ("animate_paths", "plot_contour", "plot_loss")


def __getattr__(name: str):
    if name in _PLOTS:
        from ravine.landscape import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'ravine.landscape' has no attribute {name!r}")


__all__ = [
    "CSV_COLUMNS",
    "FUNCTIONS",
    "SEED_OPTIMIZERS",
    "OptimizerChoice",
    "Path",
    "Summary",
    "TestFunction",
    "TuningResult",
    "animate_paths",
    "as_test_function",
    "available_functions",
    "compare",
    "get_function",
    "learning_rate_grid",
    "plot_contour",
    "plot_loss",
    "rank_key",
    "resolve_optimizer",
    "run",
    "run_many",
    "split_specs",
    "summarize",
    "tune_learning_rate",
    "write_csv",
]
