"""Two-dimensional test functions: the landscapes optimizers are drawn on.

Each :class:`TestFunction` carries its formula, its known minima, a default start
point, a plotting window and a default step budget, so that one name is enough to
make a picture: ``get_function("ravine")``. Users can wrap their own function of two
tensors with :meth:`TestFunction.from_callable`.

References for the classic functions: Rosenbrock (1960), "An automatic method for
finding the greatest or least value of a function"; Beale (1958); Himmelblau (1972),
"Applied Nonlinear Programming"; Rastrigin (1974); collected in Jamil & Yang (2013),
"A literature survey of benchmark functions for global optimization problems".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "FUNCTIONS",
    "TestFunction",
    "available_functions",
    "get_function",
    "as_test_function",
]

Window = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass(frozen=True)
class TestFunction:
    """A 2-D function f(x, y) with what is needed to optimize and draw it.

    ``evaluate`` takes two tensors of the same shape and returns f elementwise, so a
    whole batch of points (or a plotting grid) is one call. ``window`` is
    ``(x_min, x_max, y_min, y_max)``; ``bound`` is the largest ``|x|`` or ``|y|`` a
    path may reach before it counts as diverged. ``gradient_noise`` is the standard
    deviation of Gaussian noise added to each gradient component, to show the
    stochastic case; the recorded loss is always the noise-free value.
    """

    __test__ = False  # the name starts with "Test"; this stops pytest collecting it

    name: str
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    start: Point
    window: Window
    minima: tuple[Point, ...] = ()
    formula: str = ""
    steps: int = 200
    bound: float | None = None
    gradient_noise: float = 0.0

    def __post_init__(self) -> None:
        x_min, x_max, y_min, y_max = (float(v) for v in self.window)
        if not (x_min < x_max and y_min < y_max):
            raise ValueError(
                f"window must be (x_min, x_max, y_min, y_max) with x_min < x_max and "
                f"y_min < y_max, got {self.window!r}"
            )
        object.__setattr__(self, "window", (x_min, x_max, y_min, y_max))
        object.__setattr__(self, "start", self.check_point(self.start, "start"))
        object.__setattr__(self, "minima", tuple((float(x), float(y)) for x, y in self.minima))
        if not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.bound is None:
            object.__setattr__(self, "bound", 10.0 * max(abs(v) for v in self.window))
        elif not self.bound > 0:
            raise ValueError(f"bound must be positive, got {self.bound!r}")
        if not (math.isfinite(self.gradient_noise) and self.gradient_noise >= 0):
            raise ValueError(f"gradient_noise must be a finite number >= 0, got {self.gradient_noise!r}")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.evaluate(x, y)

    @property
    def minimum_value(self) -> float | None:
        """f at its global minimum, or None when the function has no known minimum."""
        if not self.minima:
            return None
        xs = torch.tensor([p[0] for p in self.minima], dtype=torch.float64)
        ys = torch.tensor([p[1] for p in self.minima], dtype=torch.float64)
        return float(self.evaluate(xs, ys).min())

    def height_grid(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """A ``resolution`` x ``resolution`` grid over the window, for contour plots:
        ``(xs, ys, height)`` with ``height[i, j] = f(xs[j], ys[i]) - lowest``, where
        ``lowest`` is the smaller of the grid's minimum and :attr:`minimum_value`."""
        x_min, x_max, y_min, y_max = self.window
        xs = torch.linspace(x_min, x_max, resolution, dtype=torch.float64)
        ys = torch.linspace(y_min, y_max, resolution, dtype=torch.float64)
        grid_x, grid_y = torch.meshgrid(xs, ys, indexing="xy")
        with torch.no_grad():
            values = self.evaluate(grid_x, grid_y).numpy()
        lowest = float(np.nanmin(values))
        if self.minimum_value is not None:
            lowest = min(lowest, self.minimum_value)
        return xs, ys, values - lowest

    @property
    def title(self) -> str:
        """``name: formula``, with the noise level when there is one."""
        text = f"{self.name}: {self.formula}" if self.formula else self.name
        if self.gradient_noise:
            text += f" (gradient noise {self.gradient_noise:g})"
        return text

    def noisy(self, scale: float) -> TestFunction:
        """The same function whose gradients carry Gaussian noise of standard deviation ``scale``."""
        return dataclasses.replace(self, gradient_noise=float(scale))

    def check_point(self, point: Sequence[float], argument: str = "start") -> Point:
        """``point`` as a float pair, or a ``ValueError`` if it is malformed or outside the window."""
        try:
            x, y = (float(v) for v in point)
        except (TypeError, ValueError):
            raise ValueError(f"{argument} must be a pair of numbers (x, y), got {point!r}") from None
        x_min, x_max, y_min, y_max = self.window
        if not (x_min <= x <= x_max and y_min <= y <= y_max):
            raise ValueError(
                f"{argument} {(x, y)!r} is outside the window of {self.name!r}: "
                f"x in [{x_min:g}, {x_max:g}], y in [{y_min:g}, {y_max:g}]"
            )
        return (x, y)

    @classmethod
    def from_callable(
        cls,
        evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        start: Sequence[float],
        window: Sequence[float] | None = None,
        minima: Sequence[Sequence[float]] = (),
        name: str | None = None,
        formula: str = "",
        steps: int = 200,
    ) -> TestFunction:
        """Wrap a user's ``f(x, y)`` of two tensors.

        Without a ``window``, a square around the origin that holds ``start`` with room
        to spare. Without ``minima``, steps-to-tolerance are not defined.
        """
        if not callable(evaluate):
            raise ValueError(f"function must be callable as f(x, y), got {evaluate!r}")
        try:
            x, y = (float(v) for v in start)
        except (TypeError, ValueError):
            raise ValueError(f"start must be a pair of numbers (x, y), got {start!r}") from None
        if window is None:
            half = 1.5 * max(abs(x), abs(y), 1.0)
            window = (-half, half, -half, half)
        if name is None:
            name = getattr(evaluate, "__name__", "custom")
            name = "custom" if name == "<lambda>" else name
        return cls(
            name=name,
            evaluate=evaluate,
            start=(x, y),
            window=tuple(window),
            minima=tuple(tuple(m) for m in minima),
            formula=formula,
            steps=steps,
        )


def _ravine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x**2 + 50 * y**2


def _rosenbrock(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _beale(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _himmelblau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def _rastrigin(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 20 + x**2 - 10 * torch.cos(2 * math.pi * x) + y**2 - 10 * torch.cos(2 * math.pi * y)


def _saddle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x**2 - y**2


FUNCTIONS: dict[str, TestFunction] = {
    f.name: f
    for f in [
        TestFunction(
            # y0 = 0.9, not 1: sign-like first steps of adaptive methods (size lr for
            # Adagrad, 10 lr for RMSprop) would land exactly on y = 0 for lr = 1 or 0.1.
            "ravine", _ravine, start=(-4.0, 0.9), window=(-5.0, 5.0, -1.5, 1.5),
            minima=[(0.0, 0.0)], formula="x² + 50y²", steps=200,
        ),
        TestFunction(
            "rosenbrock", _rosenbrock, start=(-2.0, 2.0), window=(-2.5, 2.0, -1.0, 4.0),
            minima=[(1.0, 1.0)], formula="(1 − x)² + 100(y − x²)²", steps=2000,
        ),
        TestFunction(
            "beale", _beale, start=(3.0, 4.0), window=(-4.5, 4.5, -4.5, 4.5),
            minima=[(3.0, 0.5)],
            formula="(1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²", steps=1000,
        ),
        TestFunction(
            "himmelblau", _himmelblau, start=(0.0, 0.0), window=(-5.0, 5.0, -5.0, 5.0),
            minima=[
                (3.0, 2.0),
                (-2.805118086952745, 3.131312518250573),
                (-3.779310253377747, -3.283185991286170),
                (3.584428340330492, -1.848126526964404),
            ],
            formula="(x² + y − 11)² + (x + y² − 7)²", steps=300,
        ),
        TestFunction(
            "rastrigin", _rastrigin, start=(-3.3, 2.6), window=(-5.12, 5.12, -5.12, 5.12),
            minima=[(0.0, 0.0)], formula="20 + x² + y² − 10cos(2πx) − 10cos(2πy)", steps=300,
        ),
        TestFunction(
            "saddle", _saddle, start=(-1.8, 0.001), window=(-2.0, 2.0, -2.0, 2.0),
            minima=[], formula="x² − y²", steps=200,
        ),
    ]
}


def available_functions() -> list[str]:
    """Names of the built-in test functions."""
    return list(FUNCTIONS)


def get_function(name: str, noise: float = 0.0) -> TestFunction:
    """The built-in function called ``name``, with gradient noise of scale ``noise`` if given."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in FUNCTIONS:
        raise ValueError(
            f"unknown function {name!r}; valid names: {', '.join(available_functions())}"
        )
    function = FUNCTIONS[key]
    return function.noisy(noise) if noise else function


def as_test_function(
    function: str | TestFunction | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start: Sequence[float] | None = None,
) -> TestFunction:
    """Accept a name, a :class:`TestFunction`, or a plain ``f(x, y)`` (which then needs ``start``)."""
    if isinstance(function, TestFunction):
        return function
    if isinstance(function, str):
        return get_function(function)
    if callable(function):
        if start is None:
            raise ValueError(
                "start is required for a plain function f(x, y); pass start=(x, y) or wrap it "
                "with TestFunction.from_callable(f, start, window)"
            )
        return TestFunction.from_callable(function, start)
    raise ValueError(
        f"function must be a name ({', '.join(available_functions())}), a TestFunction or "
        f"a callable f(x, y), got {function!r}"
    )
