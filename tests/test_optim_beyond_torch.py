"""Optimizers torch.optim does not ship: Lion, LAMB, Signum/signSGD, Schedule-Free AdamW/SGD.

Oracles: for Lion, LAMB and Signum, steps worked out by hand in plain Python floats and
a plain per-tensor torch loop written here from the papers' equations; for the
schedule-free ones, the reference ``schedulefree`` package, step by step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ravine
from ravine.optim.schedulefree import evaluation_mode

import schedulefree  # the reference for the schedule-free optimizers (the test extra installs it)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(dtype)


def train(model, optimizer, steps, start=0, seed=1):
    """``steps`` steps on a data stream that depends only on the step index."""
    dtype = next(model.parameters()).dtype
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(seed * 100_000 + step)
        x = torch.randn(16, 6, generator=generator).to(dtype)
        y = torch.randn(16, 2, generator=generator).to(dtype)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def snapshot(model, optimizer):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(optimizer.state_dict())


def assert_same_snapshot(a, b):
    params_a, state_a = a
    params_b, state_b = b
    for x, y in zip(params_a, params_b):
        assert torch.equal(x, y)
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index in state_a["state"]:
        assert state_a["state"][index].keys() == state_b["state"][index].keys()
        for key, value in state_a["state"][index].items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)


# Every class with option sets that exercise each hyperparameter.
OPTIONS = {
    ravine.Lion: [
        {"lr": 0.01},
        {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.5},
        {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    ],
    ravine.Lamb: [
        {"lr": 0.01},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-3, "bias_correction": False},
        {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    ],
    ravine.Signum: [
        {"lr": 0.01},
        {"lr": 0.01, "momentum": 0.0},
        {"lr": 0.01, "momentum": 0.5, "weight_decay": 0.2},
        {"lr": 0.01, "momentum": 0.0, "weight_decay": 0.2, "maximize": True},
    ],
    ravine.ScheduleFreeAdamW: [
        {"lr": 0.01},
        {"lr": 0.01, "warmup_steps": 5, "weight_decay": 0.1, "r": 0.5, "weight_lr_power": 1.0},
    ],
    ravine.ScheduleFreeSGD: [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.8, "warmup_steps": 5, "weight_decay": 0.1, "r": 1.0, "weight_lr_power": 0.0},
    ],
}
CLASSES = list(OPTIONS)
ALL_OPTIONS = [(cls, options) for cls, sets in OPTIONS.items() for options in sets]


def options_id(value):
    if isinstance(value, type):
        return value.__name__
    return ",".join(f"{k}={v}" for k, v in value.items())


# -- hand-computed steps --------------------------------------------------------------


def sign(value: float) -> float:
    return (value > 0) - (value < 0)


def run_steps(optimizer_cls, kwargs, start, grads):
    """Steps of ``optimizer_cls`` on a float64 parameter with the given gradients."""
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = optimizer_cls([p], **kwargs)
    values = []
    for grad in grads:
        p.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        values.append(p.detach().tolist())
    return values


def test_lion_steps_by_hand():
    lr, beta1, beta2, decay = 0.1, 0.9, 0.99, 0.1
    start, grads = [1.0, -2.0, 0.5], [[0.5, 0.3, -4.0], [-1.0, 0.3, 0.04], [0.2, -0.4, 0.0]]
    # Step 1 worked out on paper: m = 0, so c = 0.1 g and sign(c) = sign(g);
    # theta = 0.99 theta - 0.1 sign(g).
    first = [0.99 * 1.0 - 0.1, 0.99 * -2.0 - 0.1, 0.99 * 0.5 + 0.1]  # 0.89, -2.08, 0.595
    theta, m, expected = list(start), [0.0] * 3, []
    for g in grads:
        c = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g)]
        theta = [(1 - lr * decay) * t - lr * sign(ci) for t, ci in zip(theta, c)]
        m = [beta2 * mi + (1 - beta2) * gi for mi, gi in zip(m, g)]
        expected.append(theta)
    # Step 2, third coordinate: m = 0.01 * -4 = -0.04, c = 0.9 * -0.04 + 0.1 * 0.04 = -0.032 < 0.
    assert expected[1][2] == pytest.approx(0.99 * 0.595 + 0.1)
    got = run_steps(ravine.Lion, {"lr": lr, "betas": (beta1, beta2), "weight_decay": decay}, start, grads)
    assert got[0] == pytest.approx(first, rel=1e-15)
    for ours, theirs in zip(got, expected):
        assert ours == pytest.approx(theirs, rel=1e-15)
    # The third step's last gradient is 0 but c is not: Lion still moves that coordinate.
    assert got[2][2] != pytest.approx(0.99 * got[1][2])


def test_signum_and_signsgd_steps_by_hand():
    lr, beta, decay = 0.1, 0.5, 0.0
    start, grads = [1.0, -2.0], [[0.5, -0.3], [-1.5, 0.2], [0.4, 0.2]]
    # Signum: m1 = 0.5 g1 = (0.25, -0.15) -> theta = (0.9, -1.9);
    # m2 = 0.5 m1 + 0.5 g2 = (-0.625, 0.025) -> theta = (1.0, -2.0);
    # m3 = (-0.1125, 0.1125) -> theta = (1.1, -2.1).
    got = run_steps(ravine.Signum, {"lr": lr, "momentum": beta, "weight_decay": decay}, start, grads)
    assert got == [pytest.approx(v, rel=1e-15) for v in ([0.9, -1.9], [1.0, -2.0], [1.1, -2.1])]
    # signSGD follows the gradient's sign alone: (0.9, -1.9), (1.0, -2.0), (0.9, -2.1).
    got = run_steps(ravine.Signum, {"lr": lr, "momentum": 0.0}, start, grads)
    assert got == [pytest.approx(v, rel=1e-15) for v in ([0.9, -1.9], [1.0, -2.0], [0.9, -2.1])]
    # With decoupled decay 0.5: theta = 0.95 theta - 0.1 sign(g).
    got = run_steps(ravine.Signum, {"lr": lr, "momentum": 0.0, "weight_decay": 0.5}, start, grads[:1])
    assert got[0] == pytest.approx([0.95 - 0.1, -1.9 + 0.1], rel=1e-15)


def test_lamb_steps_by_hand():
    lr, beta1, beta2, eps, decay = 0.1, 0.9, 0.999, 1e-6, 0.01
    start, grads = [3.0, -4.0], [[1.0, 2.0], [-0.5, 1.0], [0.25, 0.25]]
    # Step 1 on paper: m_hat = g, v_hat = g^2, so r = g / (|g| + eps) ~ sign(g) = (1, 1);
    # u = r + 0.01 theta ~ (1.03, 0.96); ratio = |theta| / |u| = 5 / 1.40773...;
    # theta -= 0.1 * ratio * u.
    u = [1 / (1 + eps) + decay * 3.0, 2 / (2 + eps) + decay * -4.0]
    ratio = 5.0 / math.sqrt(u[0] ** 2 + u[1] ** 2)
    first = [3.0 - lr * ratio * u[0], -4.0 - lr * ratio * u[1]]
    theta, m, v, expected = list(start), [0.0, 0.0], [0.0, 0.0], []
    for t, g in enumerate(grads, start=1):
        m = [beta1 * a + (1 - beta1) * b for a, b in zip(m, g)]
        v = [beta2 * a + (1 - beta2) * b * b for a, b in zip(v, g)]
        r = [(a / (1 - beta1**t)) / (math.sqrt(b / (1 - beta2**t)) + eps) for a, b in zip(m, v)]
        u = [ri + decay * ti for ri, ti in zip(r, theta)]
        ratio = math.sqrt(sum(x * x for x in theta)) / math.sqrt(sum(x * x for x in u))
        theta = [ti - lr * ratio * ui for ti, ui in zip(theta, u)]
        expected.append(theta)
    got = run_steps(ravine.Lamb, {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": decay}, start, grads)
    assert got[0] == pytest.approx(first, rel=1e-13)
    for ours, theirs in zip(got, expected):
        assert ours == pytest.approx(theirs, rel=1e-13)
    # Without bias correction the first step is m / (sqrt(v) + eps) = 0.1 g / (sqrt(0.001) |g| + eps).
    r = [0.1 * g / (math.sqrt(0.001) * abs(g) + eps) for g in grads[0]]
    ratio = 5.0 / math.sqrt(sum(x * x for x in r))
    got = run_steps(ravine.Lamb, {"lr": lr, "eps": eps, "bias_correction": False}, start, grads[:1])
    assert got[0] == pytest.approx([s - lr * ratio * x for s, x in zip(start, r)], rel=1e-13)


def test_lamb_trust_ratio_is_one_when_a_norm_is_zero():
    # A zero parameter: ratio 1, so the step is lr * Adam's direction (about lr * sign(g)).
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = ravine.Lamb([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([2.0, -3.0], dtype=torch.float64)
    optimizer.step()
    assert p.detach().tolist() == pytest.approx([-0.1, 0.1], rel=1e-15)
    # A zero gradient (update 0): ratio 1 and nothing moves.
    q = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = ravine.Lamb([q], lr=0.1)
    q.grad = torch.zeros(2, dtype=torch.float64)
    optimizer.step()
    assert q.detach().tolist() == [1.0, 2.0]


# -- a plain per-tensor reference loop, 50 steps ------------------------------------------


class ReferenceLoop:
    """The papers' update rules written plainly, one tensor at a time."""

    def __init__(self, cls, params, options):
        self.cls, self.params, self.state = cls, params, [{} for _ in params]
        defaults = {
            ravine.Lion: {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
            ravine.Lamb: {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.0, "bias_correction": True},
            ravine.Signum: {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.0},
        }[cls]
        self.options = {"maximize": False, **defaults, **options}

    @torch.no_grad()
    def step(self):
        o = self.options
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = -p.grad if o["maximize"] else p.grad
            if self.cls is ravine.Lion:
                m = state.setdefault("m", torch.zeros_like(p))
                beta1, beta2 = o["betas"]
                c = m.mul(beta1).add(g, alpha=1 - beta1)
                p.mul_(1 - o["lr"] * o["weight_decay"]).sub_(o["lr"] * torch.sign(c))
                m.mul_(beta2).add_(g, alpha=1 - beta2)
            elif self.cls is ravine.Signum:
                if o["momentum"] != 0:
                    m = state.setdefault("m", torch.zeros_like(p))
                    m.mul_(o["momentum"]).add_(g, alpha=1 - o["momentum"])
                    direction = torch.sign(m)
                else:
                    direction = torch.sign(g)
                p.mul_(1 - o["lr"] * o["weight_decay"]).sub_(o["lr"] * direction)
            else:
                m = state.setdefault("m", torch.zeros_like(p))
                v = state.setdefault("v", torch.zeros_like(p))
                t = state["t"] = state.get("t", 0) + 1
                beta1, beta2 = o["betas"]
                m.mul_(beta1).add_((1 - beta1) * g)
                v.mul_(beta2).add_((1 - beta2) * g * g)
                if o["bias_correction"]:
                    r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + o["eps"])
                else:
                    r = m / (v.sqrt() + o["eps"])
                u = r + o["weight_decay"] * p
                weight_norm, update_norm = p.norm().item(), u.norm().item()
                ratio = weight_norm / update_norm if weight_norm > 0 and update_norm > 0 else 1.0
                p.sub_(o["lr"] * ratio * u)


def reference_params(dtype):
    """A 0-d tensor, an empty one, a non-contiguous one, a matrix, and (float32) one
    large enough for ravine to cut into slices."""
    generator = torch.Generator().manual_seed(3)
    values = [
        torch.randn((), generator=generator),
        torch.randn(0, 3, generator=generator),
        torch.randn(5, 4, generator=generator).t(),
        torch.randn(7, 3, generator=generator),
        torch.randn(270_000 if dtype == torch.float32 else 1000, generator=generator),
    ]
    return [torch.nn.Parameter(v.to(dtype).clone() if v.is_contiguous() else v.to(dtype)) for v in values]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "cls,options",
    [(cls, options) for cls, options in ALL_OPTIONS if cls in (ravine.Lion, ravine.Lamb, ravine.Signum)],
    ids=lambda value: options_id(value),
)
def test_fifty_steps_equal_a_plain_per_tensor_loop(cls, options, dtype):
    ours, theirs = reference_params(dtype), reference_params(dtype)
    optimizer = cls(ours, **options)
    reference = ReferenceLoop(cls, theirs, options)
    generator = torch.Generator().manual_seed(5)
    for step in range(50):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in ours]
        for params in (ours, theirs):
            for index, (p, grad) in enumerate(zip(params, grads)):
                # The matrix skips every third step (no gradient).
                p.grad = None if index == 3 and step % 3 == 0 else grad.clone()
        optimizer.step()
        reference.step()
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=rtol * 0.1)
    # Every parameter with elements moved.
    start = reference_params(dtype)
    assert all(not torch.equal(p, s) for p, s in zip(ours, start) if p.numel())


# -- schedule-free: equal to the reference package ---------------------------------------

SCHEDULE_FREE = [
    (ravine.ScheduleFreeAdamW, schedulefree.AdamWScheduleFree, options) for options in (
        {},
        {"lr": 0.01, "warmup_steps": 7},
        {"lr": 0.01, "weight_decay": 0.1},
        {"lr": 0.01, "r": 0.5, "weight_lr_power": 1.0},
        {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "warmup_steps": 4, "weight_decay": 0.05, "r": 1.0,
         "weight_lr_power": 0.0},
    )
] + [
    (ravine.ScheduleFreeSGD, schedulefree.SGDScheduleFree, options) for options in (
        {"lr": 0.1},
        {"lr": 0.1, "warmup_steps": 7},
        {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.1},
        {"lr": 0.2, "warmup_steps": 3, "r": 2.0, "weight_lr_power": 3.0, "weight_decay": 0.01},
    )
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "ours_cls,reference_cls,options", SCHEDULE_FREE, ids=[f"{a.__name__}[{options_id(o)}]" for a, _, o in SCHEDULE_FREE]
)
def test_schedule_free_equals_reference_package_step_by_step(ours_cls, reference_cls, options, dtype):
    models = [make_model(dtype=dtype), make_model(dtype=dtype)]
    ours = ours_cls(models[0].parameters(), **options)
    theirs = reference_cls(models[1].parameters(), **options)
    ours.train()
    theirs.train()

    def same(where):
        for a, b in zip(*(m.parameters() for m in models)):
            assert torch.equal(a, b), where
        for a, b in zip(*(m.parameters() for m in models)):
            for key in theirs.state[b]:
                assert torch.equal(ours.state[a][key], theirs.state[b][key]), (where, key)
        for group, reference in zip(ours.param_groups, theirs.param_groups):
            for key in ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr"):
                assert group[key] == reference[key], (where, key)

    for step in range(12):
        train(models[0], ours, 1, start=step)
        train(models[1], theirs, 1, start=step)
        same(f"step {step + 1}")
    ours.eval()
    theirs.eval()
    same("after eval()")
    assert not torch.equal(next(models[0].parameters()), ours.state[next(models[0].parameters())]["z"])
    ours.train()
    theirs.train()
    same("after train()")
    train(models[0], ours, 3, start=12)
    train(models[1], theirs, 3, start=12)
    same("three steps after train()")


@pytest.mark.parametrize("direction", ["reference_to_ravine", "ravine_to_reference"])
@pytest.mark.parametrize("ours_cls,reference_cls", [(a, b) for a, b, _ in SCHEDULE_FREE[:1] + SCHEDULE_FREE[-1:]])
def test_schedule_free_checkpoints_load_both_ways(ours_cls, reference_cls, direction):
    options = {"lr": 0.01, "warmup_steps": 3, "weight_decay": 0.01}
    reference_model = make_model()
    reference = reference_cls(reference_model.parameters(), **options)
    reference.train()
    train(reference_model, reference, 20)

    first_cls, second_cls = (reference_cls, ours_cls) if direction == "reference_to_ravine" else (ours_cls, reference_cls)
    model = make_model()
    first = first_cls(model.parameters(), **options)
    first.train()
    train(model, first, 10)
    first.eval()  # checkpoints are saved at x, as the reference package asks
    saved = copy.deepcopy(first.state_dict())
    second = second_cls(model.parameters(), **options)
    second.load_state_dict(saved)
    second.train()
    train(model, second, 10, start=10)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_schedule_free_step_in_eval_mode_raises_and_changes_nothing():
    model = make_model()
    optimizer = ravine.ScheduleFreeAdamW(model.parameters(), lr=0.01)
    train(model, optimizer, 3)
    optimizer.eval()
    before = snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match="eval mode"):
        train(model, optimizer, 1, start=3)
    assert_same_snapshot(before, snapshot(model, optimizer))


def test_schedule_free_group_without_gradients_still_counts_the_step():
    """As in the reference: the averaging weights of every group follow the step count."""
    models = [make_model(), make_model()]
    ours = ravine.ScheduleFreeSGD([{"params": models[0][0].parameters()}, {"params": models[0][2].parameters()}], lr=0.1, warmup_steps=4)
    theirs = schedulefree.SGDScheduleFree([{"params": models[1][0].parameters()}, {"params": models[1][2].parameters()}], lr=0.1, warmup_steps=4)
    theirs.train()
    for step in range(6):
        for model, optimizer in zip(models, (ours, theirs)):
            train(model, optimizer, 1, start=step)
            if step in (1, 2):  # the first layer gets no gradient on these steps
                for p in model[0].parameters():
                    p.grad = None
                optimizer.step()
    assert [g["k"] for g in ours.param_groups] == [g["k"] for g in theirs.param_groups] == [8, 8]
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def test_evaluation_mode_switches_only_optimizers_that_have_it():
    model = make_model()
    optimizer = ravine.ScheduleFreeSGD(model.parameters(), lr=0.1)
    train(model, optimizer, 5)
    y = [p.detach().clone() for p in model.parameters()]
    z = [optimizer.state[p]["z"].clone() for p in model.parameters()]
    with evaluation_mode(optimizer) as switched:
        assert switched
        # x = (y - (1 - beta) z) / beta with beta = 0.9.
        for p, yi, zi in zip(model.parameters(), y, z):
            torch.testing.assert_close(p.detach(), (yi - 0.1 * zi) / 0.9, rtol=1e-5, atol=1e-6)
            assert not torch.equal(p.detach(), yi)
    for p, yi in zip(model.parameters(), y):
        torch.testing.assert_close(p.detach(), yi, rtol=1e-6, atol=1e-7)
    assert optimizer.param_groups[0]["train_mode"]
    # Back in train mode even when the block raises.
    with pytest.raises(KeyError), evaluation_mode(optimizer):
        raise KeyError("boom")
    assert optimizer.param_groups[0]["train_mode"]
    # Already in eval mode: left alone.
    optimizer.eval()
    with evaluation_mode(optimizer) as switched:
        assert not switched
    assert not optimizer.param_groups[0]["train_mode"]
    # Any other optimizer: nothing happens.
    plain = ravine.Adam(model.parameters())
    with evaluation_mode(plain) as switched:
        assert not switched


# -- interface: errors, atomic steps, state_dict, groups, closures, odd shapes ------------

ERRORS = [
    (ravine.Lion, {"lr": -1e-4}, "lr"),
    (ravine.Lion, {"lr": float("nan")}, "lr"),
    (ravine.Lion, {"betas": (1.5, 0.99)}, "betas[0]"),
    (ravine.Lion, {"betas": (0.9, -0.1)}, "betas[1]"),
    (ravine.Lion, {"betas": (0.9,)}, "betas"),
    (ravine.Lion, {"weight_decay": -0.1}, "weight_decay"),
    (ravine.Lion, {"maximize": "yes"}, "maximize"),
    (ravine.Lamb, {"lr": -1e-3}, "lr"),
    (ravine.Lamb, {"betas": (1.0, 0.999)}, "betas[0]"),
    (ravine.Lamb, {"betas": (0.9, 1.0)}, "betas[1]"),
    (ravine.Lamb, {"eps": -1e-6}, "eps"),
    (ravine.Lamb, {"weight_decay": float("nan")}, "weight_decay"),
    (ravine.Lamb, {"bias_correction": 1}, "bias_correction"),
    (ravine.Lamb, {"lr": torch.tensor([0.1, 0.2])}, "lr"),
    (ravine.Signum, {"lr": -0.1}, "lr"),
    (ravine.Signum, {"momentum": 1.0}, "momentum"),
    (ravine.Signum, {"momentum": -0.5}, "momentum"),
    (ravine.Signum, {"weight_decay": -1.0}, "weight_decay"),
    (ravine.Signum, {"lr": "fast"}, "lr"),
    (ravine.ScheduleFreeAdamW, {"lr": -0.1}, "lr"),
    (ravine.ScheduleFreeAdamW, {"betas": (0.0, 0.999)}, "betas[0]"),
    (ravine.ScheduleFreeAdamW, {"betas": (0.9, 1.0)}, "betas[1]"),
    (ravine.ScheduleFreeAdamW, {"eps": -1.0}, "eps"),
    (ravine.ScheduleFreeAdamW, {"weight_decay": -0.1}, "weight_decay"),
    (ravine.ScheduleFreeAdamW, {"warmup_steps": -1}, "warmup_steps"),
    (ravine.ScheduleFreeAdamW, {"warmup_steps": 2.5}, "warmup_steps"),
    (ravine.ScheduleFreeAdamW, {"r": -1.0}, "r"),
    (ravine.ScheduleFreeAdamW, {"weight_lr_power": float("nan")}, "weight_lr_power"),
    (ravine.ScheduleFreeSGD, {"lr": float("nan")}, "lr"),
    (ravine.ScheduleFreeSGD, {"momentum": 0.0}, "momentum"),
    (ravine.ScheduleFreeSGD, {"momentum": 1.0}, "momentum"),
    (ravine.ScheduleFreeSGD, {"weight_decay": -0.1}, "weight_decay"),
    (ravine.ScheduleFreeSGD, {"warmup_steps": True}, "warmup_steps"),
]


@pytest.mark.parametrize(
    "cls,kwargs,argument", ERRORS, ids=[f"{c.__name__}[{options_id(k)}]" for c, k, _ in ERRORS]
)
def test_invalid_hyperparameter_raises_value_error_naming_it(cls, kwargs, argument):
    with pytest.raises(ValueError) as error:
        cls(make_model().parameters(), **kwargs)
    message = str(error.value)
    assert argument in message
    assert any(word in message for word in ("must", "requires", "allowed"))


@pytest.mark.parametrize("cls", CLASSES, ids=options_id)
def test_step_that_raises_changes_nothing(cls):
    """A bad lr in the second group, set between steps, raises before the first group
    is written; so does a sparse gradient on the last parameter."""
    model = make_model()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    optimizer = cls(groups, **OPTIONS[cls][-1])
    train(model, optimizer, 3)
    before = snapshot(model, optimizer)
    good_lr = optimizer.param_groups[1]["lr"]
    for bad in (-1.0, float("nan")):
        optimizer.param_groups[1]["lr"] = bad
        with pytest.raises(ValueError, match="lr"):
            train(model, optimizer, 1, start=3)
        optimizer.param_groups[1]["lr"] = good_lr
        assert_same_snapshot(before, snapshot(model, optimizer))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    last = list(model.parameters())[-1]
    last.grad = torch.ones_like(last).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert_same_snapshot(before, snapshot(model, optimizer))
    train(model, optimizer, 1, start=3)
    assert not torch.equal(next(model.parameters()).detach(), before[0][0])


@pytest.mark.parametrize("cls,options", ALL_OPTIONS, ids=options_id)
def test_state_dict_round_trip_is_bit_equal(cls, options):
    """Save after 10 steps, load into a fresh optimizer, 10 more == 20 uninterrupted."""
    reference = make_model()
    train(reference, cls(reference.parameters(), **options), 20)
    model = make_model()
    first = cls(model.parameters(), **options)
    train(model, first, 10)
    saved = copy.deepcopy(first.state_dict())
    second = cls(model.parameters(), **options)
    second.load_state_dict(saved)
    assert second.state_dict()["param_groups"] == saved["param_groups"]
    train(model, second, 10, start=10)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)


STATE_KEYS = {
    ravine.Lion: {"exp_avg"},
    ravine.Lamb: {"step", "exp_avg", "exp_avg_sq"},
    ravine.Signum: {"momentum_buffer"},
    ravine.ScheduleFreeAdamW: {"z", "exp_avg_sq"},
    ravine.ScheduleFreeSGD: {"z"},
}


@pytest.mark.parametrize("cls", CLASSES, ids=options_id)
def test_state_keys(cls):
    model = make_model()
    optimizer = cls(model.parameters())
    train(model, optimizer, 2)
    state = optimizer.state_dict()["state"]
    assert sorted(state) == list(range(4))
    for entry in state.values():
        assert set(entry) == STATE_KEYS[cls]
    signsgd = ravine.Signum(model.parameters(), momentum=0.0)
    train(model, signsgd, 2)
    assert signsgd.state_dict()["state"] == {}


@pytest.mark.parametrize("cls,options", ALL_OPTIONS, ids=options_id)
def test_param_groups_equal_separate_optimizers(cls, options):
    """Two groups with their own settings give what two optimizers, one per group, give."""
    other = {"lr": options.get("lr", 0.01) * 0.5}
    together, apart = make_model(), make_model()
    grouped = cls([{"params": together[0].parameters()}, {"params": together[2].parameters(), **other}], **options)
    first = cls(apart[0].parameters(), **options)
    second = cls(apart[2].parameters(), **{**options, **other})

    class Both:
        def zero_grad(self):
            first.zero_grad()
            second.zero_grad()

        def step(self):
            first.step()
            second.step()

    train(together, grouped, 6)
    train(apart, Both(), 6)
    for a, b in zip(together.parameters(), apart.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES, ids=options_id)
def test_closure_returns_the_loss_and_steps_as_without_it(cls):
    models = [make_model(), make_model()]
    optimizers = [cls(m.parameters(), **OPTIONS[cls][0]) for m in models]
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for _ in range(3):
        def closure():
            optimizers[0].zero_grad()
            loss = torch.nn.functional.mse_loss(models[0](x), y)
            loss.backward()
            return loss

        loss = optimizers[0].step(closure)
        optimizers[1].zero_grad()
        expected = torch.nn.functional.mse_loss(models[1](x), y)
        expected.backward()
        optimizers[1].step()
        assert torch.equal(loss, expected)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,options", ALL_OPTIONS, ids=options_id)
def test_zero_size_and_zero_dim_params(cls, options):
    scalar_param = torch.nn.Parameter(torch.tensor(2.0))
    empty = torch.nn.Parameter(torch.ones(0, 5))
    unused = torch.nn.Parameter(torch.ones(4))
    optimizer = cls([scalar_param, empty, unused], **options)
    for _ in range(3):
        scalar_param.grad = torch.tensor(0.5)
        empty.grad = torch.ones(0, 5)
        optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(4))
    assert torch.isfinite(scalar_param).all() and float(scalar_param.detach()) != 2.0
    assert empty.shape == (0, 5)
    # The 0-d parameter moves as in a one-element tensor.
    single = torch.nn.Parameter(torch.tensor([2.0]))
    reference = cls([single], **options)
    for _ in range(3):
        single.grad = torch.tensor([0.5])
        reference.step()
    assert torch.equal(scalar_param.detach().reshape(1), single.detach())


def test_registry_names():
    for name, cls, presets in [
        ("lion", ravine.Lion, {}),
        ("lamb", ravine.Lamb, {}),
        ("signum", ravine.Signum, {}),
        ("signsgd", ravine.Signum, {"momentum": 0.0}),
        ("sfadamw", ravine.ScheduleFreeAdamW, {}),
        ("schedulefree-adamw", ravine.ScheduleFreeAdamW, {}),
        ("sfsgd", ravine.ScheduleFreeSGD, {}),
    ]:
        optimizer = ravine.create(name, make_model().parameters())
        assert type(optimizer) is cls
        for key, value in presets.items():
            assert optimizer.param_groups[0][key] == value
    assert ravine.describe("signsgd(lr=0.01)")["momentum"] == 0.0


# -- landscape, arena and advisor ---------------------------------------------------------

NEW_NAMES = ["lion", "lamb", "signum", "signsgd", "sfadamw", "sfsgd"]


def test_landscape_runs_them_and_batching_matches_path_by_path():
    from ravine.landscape import paths

    for name in NEW_NAMES:
        assert paths.resolve_optimizer(name).elementwise is (name != "lamb")
    specs = ["lion(lr=0.05)", "signum(lr=0.05)", "sfadamw(lr=0.1, warmup_steps=3)", "sfsgd(lr=0.01)"]
    starts = [(-4.0, 0.9), (1.0, -0.5), (2.0, 1.0)]
    batched = paths.run_many("ravine", specs, starts=starts, lrs=[0.01, 0.05], steps=30, batched=True)
    single = paths.run_many("ravine", specs, starts=starts, lrs=[0.01, 0.05], steps=30, batched=False)
    for a, b in zip(batched, single):
        assert a.optimizer == b.optimizer and a.lr == b.lr and a.start == b.start
        assert a.positions == pytest.approx(b.positions, rel=1e-12, abs=1e-12)
        assert a.final_loss < a.losses[0]
    (lamb,) = paths.run_many("ravine", ["lamb(lr=0.05)"], steps=30)
    assert lamb.final_loss < lamb.losses[0]


def test_arena_trains_the_new_names_and_evaluates_schedule_free_at_x(monkeypatch):
    import importlib

    from ravine import registry

    arena_train = importlib.import_module("ravine.arena.train")

    made, evaluated = [], []
    create = registry.create
    evaluate = arena_train.evaluate

    def recording_create(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    def recording_evaluate(task, model, *args, **kwargs):
        evaluated.append(([p.detach().clone() for p in model.parameters()], made[-1].param_groups[0].get("train_mode")))
        return evaluate(task, model, *args, **kwargs)

    monkeypatch.setattr(registry, "create", recording_create)
    monkeypatch.setattr(arena_train, "evaluate", recording_evaluate)
    for name in NEW_NAMES:
        result = arena_train.train("mnist1d-logreg", arena_train.TrainConfig(optimizer=name, steps=20, batch_size=64))
        assert result.status == "ok", name
        assert math.isfinite(result.final_test_loss)
        assert result.test_loss[-1] < result.test_loss[0], name

    # The last run is sfsgd: its evaluations saw x, in eval mode, and training went on at y.
    optimizer = made[-1]
    final_params, train_mode = evaluated[-1]
    assert train_mode is False
    assert optimizer.param_groups[0]["train_mode"] is True
    y = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    optimizer.eval()
    x = [p.detach().clone() for group in optimizer.param_groups for p in group["params"]]
    # (eval() after train() lands on x again up to rounding: the switch is a lerp.)
    for seen, xi, yi in zip(final_params, x, y):
        torch.testing.assert_close(seen, xi, rtol=1e-5, atol=1e-7)
        assert (seen - yi).abs().max() > 1e-4


def test_advisor_range_test_records_the_loss_at_x(monkeypatch):
    import importlib

    from ravine import registry

    advise_module = importlib.import_module("ravine.advise")

    made, calls = [], []
    create = registry.create

    def recording_create(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    def loss_fn(outputs, targets):
        loss = torch.nn.functional.cross_entropy(outputs, targets)
        calls.append((made[-1].param_groups[0].get("train_mode"), float(loss)))
        return loss

    monkeypatch.setattr(registry, "create", recording_create)
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 3)
    batch = (torch.randn(32, 10), torch.randint(0, 3, (32,)))
    test = advise_module.lr_range_test(model, loss_fn, batch, spec="sfadamw", lr_range=(1e-4, 1.0), steps=12)
    assert test.steps_run > 1
    # Each step: the loss at x (eval mode) is recorded, then the gradient is taken at y.
    modes = [mode for mode, _ in calls]
    assert modes[: 2 * test.steps_run : 2] == [False] * test.steps_run
    assert modes[1 : 2 * test.steps_run : 2] == [True] * test.steps_run
    assert test.losses == [value for mode, value in calls if mode is False][: test.steps_run]
    # Later steps: x and y differ, so do their losses.
    assert calls[-2][1] != calls[-1][1]
    for name in ("lion", "lamb", "signum", "sfsgd"):
        result = advise_module.lr_range_test(model, torch.nn.functional.cross_entropy, batch, spec=name,
                                             lr_range=(1e-4, 1.0), steps=12)
        assert all(math.isfinite(value) for value in result.losses)


def test_extreme_values_are_refused_by_name_or_step_finitely():
    huge = 3.402823466385289e38  # just above float32's largest value
    for cls, kwargs, argument in [
        (ravine.ScheduleFreeAdamW, {"lr": huge}, "lr"),
        (ravine.ScheduleFreeSGD, {"weight_decay": huge}, "weight_decay"),
        (ravine.Lamb, {"weight_decay": huge}, "weight_decay"),
    ]:
        with pytest.raises(ValueError, match=argument):
            cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    # Sign steps take any lr: every coordinate moves by exactly lr.
    for cls in (ravine.Lion, ravine.Signum):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        optimizer = cls([p], lr=huge)
        p.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
        optimizer.step()
        assert p.detach().tolist() == [-huge, huge]
    # Averaging weights t^r that overflow: the newest point takes the whole weight (x = z).
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = ravine.ScheduleFreeSGD([p], lr=0.1, r=1024.0)
    for _ in range(3):
        p.grad = torch.ones(3)
        optimizer.step()
    z = optimizer.state[p]["z"].clone()
    assert torch.isfinite(p).all()
    optimizer.eval()
    torch.testing.assert_close(p.detach(), z)
