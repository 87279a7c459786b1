"""Muon for a whole model: MuonWithAdamW and muon_with_adamw against torch.optim.Muon on
the matrices and torch.optim.AdamW on the rest, and the registry's "muon"."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import ravine
from ravine.optim.muon import MuonWithAdamW, muon_with_adamw


class Net(nn.Module):
    """Embedding, two linear layers with biases, a LayerNorm and an output head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(tokens)))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 10, (16,), generator=generator)
    return tokens, tokens % 3  # a rule the model can learn


def train(model: nn.Module, optimizers: list[torch.optim.Optimizer], steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        tokens, labels = batch(step)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
    return losses


def torch_pair(model: nn.Module, muon_names: set[str], muon_kwargs: dict, adamw_kwargs: dict):
    named = dict(model.named_parameters())
    return [
        torch.optim.Muon([named[n] for n in named if n in muon_names], **muon_kwargs),
        torch.optim.AdamW([named[n] for n in named if n not in muon_names], foreach=False, **adamw_kwargs),
    ]


@pytest.mark.parametrize(
    "adamw, muon_names",
    [((), {"hidden.weight", "head.weight"}), (["head"], {"hidden.weight"})],
    ids=["default split", "head to adamw"],
)
def test_matrices_equal_torch_muon_and_the_rest_torch_adamw(adamw, muon_names):
    ours, theirs = Net(), Net()
    optimizer = muon_with_adamw(
        ours, lr=0.02, adamw_lr=3e-3, weight_decay=0.1, adamw_weight_decay=0.01, adamw=adamw, momentum=0.9
    )
    reference = torch_pair(theirs, muon_names, {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9}, {"lr": 3e-3, "weight_decay": 0.01})
    losses = train(ours, [optimizer], 25)
    train(theirs, reference, 25)
    assert losses[-1] < losses[0]
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    # The embedding table is a matrix but goes to AdamW: it has AdamW's state.
    state = optimizer.state[ours.embed.weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(optimizer.state[ours.hidden.weight]) == {"momentum_buffer"}
    assert [group["use_muon"] for group in optimizer.param_groups] == [True, False]


def test_registry_muon_trains_any_model_with_one_learning_rate():
    """ravine.create("muon", ...) splits a model's parameters by shape; its AdamW groups
    share lr and weight decay, and Muon's step is scaled to AdamW's RMS."""
    ours, theirs = Net(), Net()
    optimizer = ravine.create("muon(lr=0.01)", ours.parameters())
    assert isinstance(optimizer, MuonWithAdamW)
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.01]
    # Given plain parameters, every matrix (the embedding too) goes to Muon.
    reference = torch_pair(
        theirs,
        {"embed.weight", "hidden.weight", "head.weight"},
        {"lr": 0.01, "adjust_lr_fn": "match_rms_adamw"},
        {"lr": 0.01, "weight_decay": 0.1},
    )
    train(ours, [optimizer], 10)
    train(theirs, reference, 10)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    ravine.registry.check_spec("muon(lr=0.01, adamw_betas=(0.8, 0.9))")


def test_state_dict_round_trip_pickle_and_schedulers():
    model = Net()
    optimizer = muon_with_adamw(model, lr=0.02, adamw_lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, [optimizer], 3)
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 5e-4]

    twin = copy.deepcopy(model)
    saved = copy.deepcopy(optimizer.state_dict())
    # AdamW groups carry AdamW's keys, not Muon's.
    adamw_group = saved["param_groups"][1]
    assert "betas" in adamw_group and "ns_steps" not in adamw_group
    restored = muon_with_adamw(twin, lr=0.02, adamw_lr=1e-3)
    restored.load_state_dict(saved)
    train(model, [optimizer], 5, start=3)
    train(twin, [restored], 5, start=3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    unpickled = pickle.loads(pickle.dumps(optimizer))
    unpickled.add_param_group({"params": [nn.Parameter(torch.ones(3))]})  # split needs the AdamW defaults
    assert unpickled.param_groups[-1]["use_muon"] is False
    assert unpickled.param_groups[-1]["lr"] == 1e-3


def test_groups_without_use_muon_are_split_by_shape():
    matrix, vector = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))
    optimizer = MuonWithAdamW([{"params": [matrix, vector], "lr": 0.05}], adamw_betas=(0.8, 0.9))
    muon_group, adamw_group = optimizer.param_groups
    assert (muon_group["use_muon"], muon_group["params"], muon_group["lr"]) == (True, [matrix], 0.05)
    assert (adamw_group["use_muon"], adamw_group["params"], adamw_group["lr"]) == (False, [vector], 0.05)
    assert adamw_group["betas"] == (0.8, 0.9) and adamw_group["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "call, fragment",
    [
        (lambda: ravine.Muon([nn.Parameter(torch.ones(3))]), "muon_with_adamw"),
        (lambda: MuonWithAdamW([{"params": [nn.Parameter(torch.ones(3))], "use_muon": True}]), "2-D"),
        (lambda: MuonWithAdamW([nn.Parameter(torch.ones(3, 3))], adamw_betas=(0.9, 1.0)), "betas[1]"),
        (lambda: MuonWithAdamW([nn.Parameter(torch.ones(3, 3))], adamw_lr=-1.0), "lr"),
        (lambda: muon_with_adamw(Net(), adamw=["tail"]), "adamw names 'tail'"),
        (lambda: muon_with_adamw(Net(), adamw=[3]), "adamw must hold"),
    ],
)
def test_clear_errors(call, fragment):
    with pytest.raises(ValueError) as error:
        call()
    assert fragment in str(error.value)
