"""The table that drives the optimizer tests: each ravine optimizer, its torch.optim
twin, the option sets to check, and the invalid inputs it must reject.

Add an optimizer by adding a row; every generic test picks it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import ravine


@dataclass
class OptimizerCase:
    name: str
    ravine_cls: type
    torch_cls: type
    options: list[dict[str, Any]]
    # (kwargs, the argument name the error must mention)
    errors: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    sparse: bool = False
    # Parameter shapes for the parity test (None: the test's own mix). The last one is
    # made non-contiguous, so it must be 2-D.
    shapes: list[tuple[int, ...]] | None = None
    # Options that select torch's for-loop implementation (Muon has only that one).
    torch_loop_options: dict[str, Any] = field(default_factory=lambda: {"foreach": False})
    # False for optimizers that take matrices only (Muon): the tests then build models
    # without biases and give vectors a trailing dimension of 1.
    takes_vectors: bool = True
    # False for optimizers that refuse complex parameters (torch raises at the first step).
    takes_complex: bool = True


def shape_for(case: OptimizerCase, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape``, or for a matrices-only optimizer the matrix ``(n, 1)`` of a vector ``(n,)``."""
    if case.takes_vectors or len(shape) == 2:
        return shape
    return (shape[0] if shape else 1, 1)


def _tensor(value: float) -> torch.Tensor:
    return torch.tensor(value)


CASES = [
    OptimizerCase(
        "sgd",
        ravine.SGD,
        torch.optim.SGD,
        [
            {"lr": 0.1},
            {"lr": 0.05, "momentum": 0.9},
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.5},
            {"lr": 0.05, "momentum": 0.9, "nesterov": True},
            {"lr": 0.1, "weight_decay": 0.1},
            {"lr": 0.1, "maximize": True},
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
            {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True},
            {"lr": _tensor(0.05), "momentum": 0.9},
            {"lr": 0.0, "momentum": 0.9},
        ],
        [
            ({"lr": -0.1}, "lr"),
            ({"lr": float("nan")}, "lr"),
            ({"momentum": -0.5}, "momentum"),
            ({"momentum": float("nan")}, "momentum"),
            ({"dampening": -0.1}, "dampening"),
            ({"dampening": 1.5}, "dampening"),
            ({"weight_decay": -1e-3}, "weight_decay"),
            ({"weight_decay": float("nan")}, "weight_decay"),
            ({"nesterov": True}, "nesterov"),
            ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "nesterov"),
            ({"lr": torch.tensor([0.1, 0.2])}, "lr"),
            ({"lr": "fast"}, "lr"),
        ],
        sparse=True,
    ),
    OptimizerCase(
        "adagrad",
        ravine.Adagrad,
        torch.optim.Adagrad,
        [
            {},
            {"lr": 0.1},
            {"lr": 0.1, "lr_decay": 0.05},
            {"lr": 0.1, "weight_decay": 0.1},
            {"lr": 0.1, "initial_accumulator_value": 0.5},
            {"lr": 0.1, "eps": 1e-3},
            {"lr": 0.1, "maximize": True, "weight_decay": 0.05, "lr_decay": 0.01},
            {"lr": _tensor(0.1)},
        ],
        [
            ({"lr": -1.0}, "lr"),
            ({"lr_decay": -0.1}, "lr_decay"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"initial_accumulator_value": -1.0}, "initial_accumulator_value"),
            ({"eps": -1e-10}, "eps"),
            ({"eps": float("nan")}, "eps"),
        ],
        sparse=True,
    ),
    OptimizerCase(
        "rmsprop",
        ravine.RMSprop,
        torch.optim.RMSprop,
        [
            {},
            {"lr": 0.005, "alpha": 0.9},
            {"lr": 0.005, "centered": True},
            {"lr": 0.005, "momentum": 0.9},
            {"lr": 0.005, "momentum": 0.9, "centered": True},
            {"lr": 0.005, "weight_decay": 0.1},
            {"lr": 0.005, "eps": 1e-3, "maximize": True},
            {"lr": 0.005, "momentum": 0.5, "centered": True, "weight_decay": 0.1, "maximize": True},
            {"lr": _tensor(0.005), "momentum": 0.9},
        ],
        [
            ({"lr": -0.01}, "lr"),
            ({"alpha": -0.1}, "alpha"),
            ({"alpha": 1.1}, "alpha"),
            ({"eps": -1.0}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"momentum": -0.9}, "momentum"),
            ({"momentum": float("nan")}, "momentum"),
        ],
    ),
    OptimizerCase(
        "adam",
        ravine.Adam,
        torch.optim.Adam,
        [
            {},
            {"lr": 0.01},
            {"lr": 0.01, "betas": (0.8, 0.99)},
            {"lr": 0.01, "eps": 1e-3},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "amsgrad": True},
            {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": _tensor(0.01)},
            {"lr": 0.01, "betas": (_tensor(0.9), _tensor(0.99))},
            {"lr": 0.01, "betas": (0.0, 0.0)},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"lr": float("nan")}, "lr"),
            ({"betas": (1.0, 0.999)}, "betas[0]"),
            ({"betas": (-0.1, 0.999)}, "betas[0]"),
            ({"betas": (0.9, 1.0)}, "betas[1]"),
            ({"betas": (0.9, float("nan"))}, "betas[1]"),
            ({"betas": (0.9,)}, "betas"),
            ({"eps": -1e-8}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"amsgrad": "yes"}, "amsgrad"),
        ],
    ),
    OptimizerCase(
        "adamw",
        ravine.AdamW,
        torch.optim.AdamW,
        [
            {},
            {"lr": 0.01},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.0},
            {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
            {"lr": 0.01, "maximize": True},
            {"lr": _tensor(0.01), "weight_decay": 0.1},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"betas": (0.9, 1.5)}, "betas[1]"),
            ({"eps": float("nan")}, "eps"),
            ({"weight_decay": -0.01}, "weight_decay"),
        ],
    ),
]

CASES += [
    OptimizerCase(
        "nadam",
        ravine.NAdam,
        torch.optim.NAdam,
        [
            {},
            {"lr": 0.01},
            {"lr": 0.01, "betas": (0.8, 0.99)},
            {"lr": 0.01, "eps": 1e-3},
            {"lr": 0.01, "momentum_decay": 0.05},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": 0.01, "weight_decay": 0.1, "maximize": True, "momentum_decay": 0.0},
            {"lr": 0.01, "betas": (0.0, 0.0)},
            {"lr": _tensor(0.01), "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": _tensor(0.01)},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"lr": float("nan")}, "lr"),
            ({"betas": (1.0, 0.999)}, "betas[0]"),
            ({"betas": (0.9, float("nan"))}, "betas[1]"),
            ({"betas": (0.9,)}, "betas"),
            ({"betas": (_tensor(0.9), 0.999)}, "betas[0]"),
            ({"eps": -1e-8}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"momentum_decay": -4e-3}, "momentum_decay"),
            ({"decoupled_weight_decay": "yes"}, "decoupled_weight_decay"),
        ],
    ),
    OptimizerCase(
        "radam",
        ravine.RAdam,
        torch.optim.RAdam,
        [
            {},
            {"lr": 0.01},
            {"lr": 0.01, "betas": (0.8, 0.9)},
            {"lr": 0.01, "betas": (0.0, 0.0)},
            {"lr": 0.01, "eps": 1e-3},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1, "maximize": True},
            {"lr": _tensor(0.01), "betas": (0.9, 0.95), "weight_decay": 0.1, "decoupled_weight_decay": True},
            {"lr": _tensor(0.01), "betas": (0.9, 0.9)},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"betas": (-0.1, 0.999)}, "betas[0]"),
            ({"betas": (0.9, 1.0)}, "betas[1]"),
            ({"eps": float("nan")}, "eps"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"decoupled_weight_decay": 1}, "decoupled_weight_decay"),
        ],
    ),
    OptimizerCase(
        "adamax",
        ravine.Adamax,
        torch.optim.Adamax,
        [
            {},
            {"lr": 0.01},
            {"lr": 0.01, "betas": (0.8, 0.99)},
            {"lr": 0.01, "eps": 1e-3},
            {"lr": 0.01, "weight_decay": 0.1},
            {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
            {"lr": _tensor(0.01), "weight_decay": 0.1},
            {"lr": _tensor(0.01)},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"betas": (1.5, 0.999)}, "betas[0]"),
            ({"betas": (0.9, -0.5)}, "betas[1]"),
            ({"eps": -1.0}, "eps"),
            ({"weight_decay": float("nan")}, "weight_decay"),
        ],
    ),
    OptimizerCase(
        "adafactor",
        ravine.Adafactor,
        torch.optim.Adafactor,
        [
            {},
            {"lr": 0.05},
            {"lr": 0.001, "beta2_decay": -0.5},
            {"lr": 0.05, "eps": (1e-20, 1e-2)},
            {"lr": 0.05, "d": 2.0},
            {"lr": 0.05, "weight_decay": 0.1},
            {"lr": 0.05, "maximize": True, "beta2_decay": 0.0},
            {"lr": _tensor(0.05), "weight_decay": 0.1},
            {"lr": _tensor(0.001)},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"beta2_decay": 0.5}, "beta2_decay"),
            ({"eps": (-1e-30, 1e-3)}, "eps[0]"),
            ({"eps": (None, -1e-3)}, "eps[1]"),
            ({"eps": 1e-3}, "eps"),
            ({"d": 0.5}, "d"),
            ({"weight_decay": -0.1}, "weight_decay"),
        ],
        shapes=[(), (7,), (3, 4), (2, 3, 5), (301,), (5, 6)],
        takes_complex=False,
    ),
    OptimizerCase(
        "muon",
        ravine.Muon,
        torch.optim.Muon,
        [
            {},
            {"lr": 0.02},
            {"lr": 0.02, "momentum": 0.9, "nesterov": False},
            {"lr": 0.02, "weight_decay": 0.0},
            {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"},
            {"lr": 0.02, "adjust_lr_fn": "original", "eps": 1e-3},
            {"lr": 0.02, "ns_steps": 2, "ns_coefficients": (2.0, -1.5, 0.5)},
            {"lr": _tensor(0.02), "weight_decay": 0.05},
            {"lr": _tensor(0.02)},
        ],
        [
            ({"lr": -1e-3}, "lr"),
            ({"weight_decay": -0.1}, "weight_decay"),
            ({"momentum": -0.5}, "momentum"),
            ({"nesterov": "yes"}, "nesterov"),
            ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
            ({"ns_coefficients": (1.0, 2.0, float("nan"))}, "ns_coefficients[2]"),
            ({"eps": -1e-7}, "eps"),
            ({"ns_steps": 100}, "ns_steps"),
            ({"ns_steps": 2.5}, "ns_steps"),
            ({"adjust_lr_fn": "fancy"}, "adjust_lr_fn"),
        ],
        shapes=[(1, 1), (7, 3), (3, 4), (20, 33), (5, 6)],
        torch_loop_options={},
        takes_vectors=False,
        takes_complex=False,
    ),
]

CASES_BY_NAME = {case.name: case for case in CASES}


def option_id(options: dict[str, Any]) -> str:
    if not options:
        return "defaults"
    parts = []
    for key, value in options.items():
        if isinstance(value, torch.Tensor):
            value = f"tensor({','.join(f'{v:g}' for v in value.flatten().tolist())})"
        elif isinstance(value, tuple):
            value = "(" + ",".join(_value_id(v) for v in value) + ")"
        parts.append(f"{key}={value}")
    return ",".join(parts)


def _value_id(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor({value.item():g})"
    return f"{value:g}" if isinstance(value, (int, float)) else repr(value)


def all_option_sets() -> list[tuple[OptimizerCase, dict[str, Any]]]:
    return [(case, options) for case in CASES for options in case.options]


def all_error_sets() -> list[tuple[OptimizerCase, dict[str, Any], str]]:
    return [(case, kwargs, argument) for case in CASES for kwargs, argument in case.errors]


def clone_options(options: dict[str, Any]) -> dict[str, Any]:
    """Copies of tensor hyperparameters, so two optimizers never share one."""
    copied = {}
    for key, value in options.items():
        if isinstance(value, torch.Tensor):
            value = value.clone()
        elif isinstance(value, tuple):
            value = tuple(v.clone() if isinstance(v, torch.Tensor) else v for v in value)
        copied[key] = value
    return copied
