"""Optimizer names and spec strings."""

from __future__ import annotations

import pytest
import torch

import ravine
from ravine import registry


def params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_available_lists_the_seed_optimizers():
    names = ravine.available()
    for name in ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw",
                 "nadam", "radam", "adamax", "adafactor", "muon"]:
        assert name in names


@pytest.mark.parametrize(
    "spec,cls,expected",
    [
        ("sgd", ravine.SGD, {"lr": 1e-3, "momentum": 0}),
        ("momentum(lr=0.02)", ravine.SGD, {"lr": 0.02, "momentum": 0.9, "nesterov": False}),
        ("sgd-nesterov(lr=0.1)", ravine.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        ("Nesterov", ravine.SGD, {"momentum": 0.9, "nesterov": True}),
        ("adamw(lr=3e-4, weight_decay=0.1)", ravine.AdamW, {"lr": 3e-4, "weight_decay": 0.1}),
        ("adam(betas=(0.8, 0.99), amsgrad=True)", ravine.Adam, {"betas": (0.8, 0.99), "amsgrad": True}),
        ("amsgrad", ravine.Adam, {"amsgrad": True}),
        ("rmsprop-centered(momentum=0.5)", ravine.RMSprop, {"centered": True, "momentum": 0.5}),
        (" adagrad ( lr = 0.5 ) ", ravine.Adagrad, {"lr": 0.5}),
        ("nadam(momentum_decay=0.01)", ravine.NAdam, {"lr": 2e-3, "momentum_decay": 0.01}),
        ("radam(decoupled_weight_decay=True)", ravine.RAdam, {"decoupled_weight_decay": True}),
        ("adamax(betas=(0.8, 0.99))", ravine.Adamax, {"lr": 2e-3, "betas": (0.8, 0.99)}),
        ("adafactor(eps=(None, 0.01))", ravine.Adafactor, {"lr": 1e-2, "eps": (None, 0.01)}),
    ],
)
def test_create_builds_the_named_optimizer(spec, cls, expected):
    optimizer = ravine.create(spec, params())
    assert type(optimizer) is cls
    for key, value in expected.items():
        assert optimizer.param_groups[0][key] == value


def test_overrides_win_over_spec_and_presets():
    optimizer = ravine.create("momentum(lr=0.1)", params(), lr=0.5, momentum=0.8)
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert optimizer.param_groups[0]["momentum"] == 0.8


def test_describe_resolves_defaults():
    description = registry.describe("nesterov(lr=0.05)")
    assert description["name"] == "nesterov"
    assert description["lr"] == 0.05
    assert description["momentum"] == 0.9
    assert description["dampening"] == 0


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("adamx", "valid names: sgd, momentum"),
        ("adam(lr=1, foo=2)", "valid arguments: lr, betas"),
        ("adam(lr=__import__('os').getcwd())", "must be a literal"),
        ("adam(1e-3)", "given by name"),
        ("adam(lr=", "cannot parse"),
        ("adam(**{'lr': 1})", "'**' is not allowed"),
        ("", "non-empty"),
        ("momentum(lr=-1)", "lr must be in [0.0, inf]"),
    ],
)
def test_bad_specs_raise_clear_errors(spec, fragment):
    with pytest.raises(ValueError) as error:
        ravine.create(spec, params())
    assert fragment in str(error.value)


def test_register_a_custom_optimizer():
    registry.register("my-sgd", torch.optim.SGD, {"momentum": 0.5}, "a test entry")
    try:
        optimizer = ravine.create("my-sgd(lr=0.3)", params())
        assert optimizer.param_groups[0]["momentum"] == 0.5
        assert "my-sgd" in ravine.available()
    finally:
        registry._REGISTRY.pop("my-sgd")


@pytest.mark.parametrize(
    "spec,fragment",
    [("adam(lr=-1)", "lr must be in"), ("sgd(nesterov=True)", "nesterov"), ("adamw(betas=(0.9, 2.0))", "betas[1]")],
)
def test_check_spec_checks_values_too(spec, fragment):
    registry.parse_spec(spec)  # the names are fine ...
    with pytest.raises(ValueError) as error:  # ... the values are not
        registry.check_spec(spec)
    assert fragment in str(error.value)


def test_muon_by_name_splits_any_model():
    """"muon" is Muon for matrices with an AdamW fallback for the rest, one lr for both."""
    matrix, bias = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(3))
    optimizer = ravine.create("muon(lr=0.02)", [matrix, bias])
    assert type(optimizer) is ravine.MuonWithAdamW
    muon_group, adamw_group = optimizer.param_groups
    assert (muon_group["params"], muon_group["adjust_lr_fn"], muon_group["lr"]) == ([matrix], "match_rms_adamw", 0.02)
    assert (adamw_group["params"], adamw_group["lr"], adamw_group["betas"]) == ([bias], 0.02, (0.9, 0.999))
    assert registry.describe("muon")["adjust_lr_fn"] == "match_rms_adamw"
    with pytest.raises(ValueError, match="ns_steps"):
        registry.check_spec("muon(ns_steps=200)")
