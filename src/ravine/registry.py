"""Optimizer names and spec strings.

A spec names an optimizer and, optionally, its arguments, in Python call syntax::

    "adam"
    "adamw(lr=3e-4, weight_decay=0.1)"
    "momentum(lr=0.02)"            # SGD with momentum=0.9
    "sgd(lr=0.1, momentum=0.9, nesterov=True)"

Arguments must be literals (numbers, strings, booleans, None, tuples, lists); a
spec is parsed with :mod:`ast`, never evaluated, so a config file cannot run code.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "OptimizerEntry",
    "available",
    "check_spec",
    "create",
    "describe",
    "get",
    "parse_spec",
    "register",
    "split_specs",
]


@dataclass(frozen=True)
class OptimizerEntry:
    """One named optimizer: a class and the preset arguments that define the name."""

    name: str
    cls: Callable[..., torch.optim.Optimizer]
    presets: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def arguments(self) -> list[str]:
        """Constructor arguments a spec may set (everything but ``params``)."""
        signature = inspect.signature(self.cls)
        return [name for name in signature.parameters if name != "params"]

    def defaults(self) -> dict[str, Any]:
        """Constructor defaults with this entry's presets applied."""
        signature = inspect.signature(self.cls)
        values = {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if name != "params" and parameter.default is not inspect.Parameter.empty
        }
        values.update(self.presets)
        return values


_REGISTRY: dict[str, OptimizerEntry] = {}
_ALIASES: dict[str, str] = {}


def register(
    name: str,
    cls: Callable[..., torch.optim.Optimizer],
    presets: dict[str, Any] | None = None,
    summary: str = "",
    aliases: Iterable[str] = (),
) -> OptimizerEntry:
    """Add an optimizer under ``name`` (lower case); returns its entry.

    ``presets`` are constructor arguments fixed by the name, e.g. ``momentum=0.9``
    for ``"momentum"``; a spec may still override them.
    """
    key = _normalize(name)
    if not key:
        raise ValueError("name must be a non-empty string")
    entry = OptimizerEntry(key, cls, dict(presets or {}), summary)
    _REGISTRY[key] = entry
    for alias in aliases:
        _ALIASES[_normalize(alias)] = key
    return entry


def available() -> list[str]:
    """Names of all registered optimizers, in registration order."""
    _ensure_builtins()
    return list(_REGISTRY)


def get(name: str) -> OptimizerEntry:
    """The entry for ``name`` (or one of its aliases)."""
    _ensure_builtins()
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown optimizer {name!r}; valid names: {', '.join(available())}"
        )
    return _REGISTRY[key]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name(arg=value, ...)"`` into the canonical name and its arguments.

    Raises ``ValueError`` for malformed specs, unknown names and unknown arguments.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec must be a non-empty string such as 'adam(lr=1e-3)', got {spec!r}")
    head, bracket, rest = spec.strip().partition("(")
    entry = get(head)
    kwargs: dict[str, Any] = {}
    if bracket:
        # Names may contain dashes ("sgd-nesterov"), so only the argument list is parsed.
        try:
            call = ast.parse("f(" + rest, mode="eval").body
        except SyntaxError as error:
            raise ValueError(f"cannot parse optimizer spec {spec!r}: {error.msg}") from None
        if call.args:
            raise ValueError(
                f"optimizer spec {spec!r}: arguments must be given by name, e.g. 'adam(lr=1e-3)'"
            )
        for keyword in call.keywords:
            if keyword.arg is None:
                raise ValueError(f"optimizer spec {spec!r}: '**' is not allowed")
            try:
                kwargs[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                raise ValueError(
                    f"optimizer spec {spec!r}: the value of {keyword.arg!r} must be a literal "
                    "(number, string, boolean, None, tuple or list)"
                ) from None
    _check_arguments(entry, kwargs, spec)
    return entry.name, kwargs


def split_specs(text: str) -> list[str]:
    """Split a list such as ``"sgd(lr=0.02, momentum=0.9), adam"`` at the commas
    outside brackets; ``ValueError`` for unbalanced brackets or empty entries."""
    if not isinstance(text, str):
        raise ValueError(f"optimizers must be a string of comma-separated specs, got {text!r}")
    specs, depth, current = [], 0, []
    for character in text:
        if character in "([":
            depth += 1
        elif character in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"optimizers {text!r}: unbalanced ')'")
        if character == "," and depth == 0:
            specs.append("".join(current).strip())
            current = []
        else:
            current.append(character)
    if depth != 0:
        raise ValueError(f"optimizers {text!r}: unbalanced '('")
    specs.append("".join(current).strip())
    if any(not spec for spec in specs):
        raise ValueError(f"optimizers {text!r}: empty entry; separate specs with single commas")
    return specs


def create(
    spec: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], **overrides: Any
) -> torch.optim.Optimizer:
    """Build the optimizer described by ``spec`` over ``params``.

    ``overrides`` win over the spec's arguments, which win over the name's presets.
    """
    name, kwargs = parse_spec(spec)
    entry = get(name)
    _check_arguments(entry, overrides, spec)
    arguments = {**entry.presets, **kwargs, **overrides}
    return entry.cls(params, **arguments)


def check_spec(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` builds an optimizer: its name, its argument
    names and its argument values are all checked (on a throwaway parameter)."""
    create(spec, [torch.nn.Parameter(torch.zeros(1))])


def describe(spec: str) -> dict[str, Any]:
    """All hyperparameters ``spec`` resolves to (defaults, presets and its arguments)."""
    name, kwargs = parse_spec(spec)
    entry = get(name)
    return {"name": name, **entry.defaults(), **kwargs}


def _check_arguments(entry: OptimizerEntry, kwargs: dict[str, Any], spec: str) -> None:
    valid = entry.arguments()
    unknown = [key for key in kwargs if key not in valid]
    if unknown:
        raise ValueError(
            f"optimizer spec {spec!r}: unknown argument(s) {', '.join(unknown)} for "
            f"{entry.name!r}; valid arguments: {', '.join(valid)}"
        )


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-") if isinstance(name, str) else ""


_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from ravine import optim

    register("sgd", optim.SGD, summary="plain stochastic gradient descent")
    register(
        "momentum",
        optim.SGD,
        {"momentum": 0.9},
        "SGD with heavy-ball momentum 0.9",
        aliases=["sgd-momentum"],
    )
    register(
        "nesterov",
        optim.SGD,
        {"momentum": 0.9, "nesterov": True},
        "SGD with Nesterov momentum 0.9",
        aliases=["sgd-nesterov"],
    )
    register("adagrad", optim.Adagrad, summary="per-parameter steps from the sum of squared gradients")
    register("rmsprop", optim.RMSprop, summary="per-parameter steps from a moving RMS of gradients")
    register(
        "rmsprop-centered",
        optim.RMSprop,
        {"centered": True},
        "RMSprop normalised by the gradient's moving variance",
    )
    register("adam", optim.Adam, summary="momentum + RMS scaling + bias correction")
    register("amsgrad", optim.Adam, {"amsgrad": True}, "Adam with the running maximum of the second moment")
    register("adamw", optim.AdamW, summary="Adam with decoupled weight decay")
    _register_low_memory()
    register("lion", optim.Lion, summary="sign of an interpolated momentum, decoupled weight decay")
    register("lamb", optim.Lamb, summary="Adam's direction scaled per tensor by the trust ratio |w| / |update|")
    register("signum", optim.Signum, summary="sign of the momentum")
    register("signsgd", optim.Signum, {"momentum": 0.0}, "sign of the gradient (Signum with momentum 0)")
    register(
        "sfadamw",
        optim.ScheduleFreeAdamW,
        summary="schedule-free AdamW: no lr schedule, evaluates a running average",
        aliases=["schedulefree-adamw"],
    )
    register(
        "sfsgd",
        optim.ScheduleFreeSGD,
        summary="schedule-free SGD: no lr schedule, evaluates a running average",
        aliases=["schedulefree-sgd"],
    )
    register("nadam", optim.NAdam, summary="Adam with Nesterov momentum")
    register("radam", optim.RAdam, summary="Adam that switches on its adaptive step once the variance estimate is reliable")
    register("adamax", optim.Adamax, summary="Adam with an infinity-norm second moment")
    register("adafactor", optim.Adafactor, summary="factored second moment, relative step sizes, no momentum")
    register(
        "muon",
        optim.MuonWithAdamW,
        {"adjust_lr_fn": "match_rms_adamw"},
        "orthogonalised momentum for matrices, AdamW for the other parameters, one lr for both",
    )


def _register_low_memory() -> None:
    """Variants that keep their state in less memory (docs/memory.md)."""
    from ravine import optim
    from ravine.optim import quantized

    bf16 = {"state_dtype": "bfloat16"}
    register("adam-bf16", optim.Adam, bf16, "Adam with moments stored in bfloat16")
    register("adamw-bf16", optim.AdamW, bf16, "AdamW with moments stored in bfloat16")
    register("momentum-bf16", optim.SGD, {"momentum": 0.9, **bf16}, "SGD momentum 0.9, buffer stored in bfloat16")
    register("adam-8bit", quantized.Adam8bit, summary="Adam with block-wise 8-bit quantized moments")
    register("adamw-8bit", quantized.AdamW8bit, summary="AdamW with block-wise 8-bit quantized moments")
    register(
        "momentum-8bit",
        quantized.SGD8bit,
        {"momentum": 0.9},
        "SGD momentum 0.9, buffer block-wise quantized to 8 bits",
        aliases=["sgd-momentum-8bit"],
    )
    register("lion-8bit", quantized.Lion8bit, summary="Lion with a block-wise 8-bit quantized momentum")
