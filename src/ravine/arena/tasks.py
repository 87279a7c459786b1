"""Tasks for the arena: a data set, a model factory, a loss and a metric under one name.

Every built-in task is made or shipped locally, so nothing is downloaded:

==================  =====================================================================
name                what it is
==================  =====================================================================
mnist1d-logreg      MNIST-1D (4,000 train / 1,000 test series of length 40, 10 classes),
mnist1d-mlp         generated with ``mnist1d.data.make_dataset(get_dataset_args())``,
mnist1d-cnn         with the four models of its paper (Greydanus, 2020): logistic
mnist1d-gru         regression, MLP, CNN and a bidirectional GRU.
digits-mlp          scikit-learn's bundled 8x8 handwritten digits (1,797 images; a fixed
digits-cnn          80/20 split) with an MLP and a small CNN.
charlm-gru          next-character prediction on Python standard-library source files
charlm-transformer  already on the machine; metric: bits per character.
quadratic-deep      DeepOBS-style noisy quadratic: 100 dimensions, 90 Hessian eigenvalues
                    from U(0, 1) and 10 from U(30, 60), fixed seed (Schneider et al., 2019).
==================  =====================================================================

A task of your own is one :class:`Task` handed to :func:`register_task`::

    import torch
    from torch import nn
    from ravine.arena.tasks import Task, TaskData, accuracy, register_task

    def load_blobs() -> TaskData:
        generator = torch.Generator().manual_seed(0)
        inputs = torch.randn(1200, 2, generator=generator)
        targets = (inputs[:, 0] * inputs[:, 1] > 0).long()
        return TaskData(inputs[:1000], targets[:1000], inputs[1000:], targets[1000:])

    register_task(Task(
        name="blobs-mlp",
        description="two-class XOR blobs with a 2-32-2 MLP",
        make_model=lambda seed: nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2)),
        load_data=load_blobs,
        loss_fn=nn.functional.cross_entropy,
        metric_name="accuracy",
        metric_fn=accuracy,
        higher_is_better=True,
    ))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Task",
    "TaskData",
    "accuracy",
    "available_tasks",
    "bits_per_character",
    "cache_dir",
    "get_task",
    "mean_output",
    "register_task",
]

BUDGET_NAMES = ("small", "medium", "full")


@dataclass(frozen=True)
class TaskData:
    """Train and held-out tensors; the first dimension indexes examples."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            inputs = getattr(self, f"{split}_inputs")
            targets = getattr(self, f"{split}_targets")
            if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
                raise ValueError(f"{split}_inputs and {split}_targets must be torch tensors")
            if len(inputs) != len(targets):
                raise ValueError(
                    f"{split}_inputs has {len(inputs)} examples but {split}_targets has "
                    f"{len(targets)}; they must match"
                )
            if len(inputs) == 0:
                raise ValueError(f"{split}_inputs must hold at least one example")

    @property
    def num_train(self) -> int:
        return len(self.train_inputs)

    @property
    def num_test(self) -> int:
        return len(self.test_inputs)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of examples whose largest output is the target class."""
    return (outputs.argmax(dim=-1) == targets).float().mean().item()


def bits_per_character(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy in bits, averaged over every predicted character."""
    return _sequence_cross_entropy(outputs, targets).item() / math.log(2.0)


def mean_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss for models whose output already is the per-example loss (the quadratic)."""
    del targets
    return outputs.mean()


@dataclass
class Task:
    """One benchmark problem.

    ``make_model(seed)`` returns a fresh model (the same weights for the same seed);
    ``load_data()`` returns a :class:`TaskData` and is called once per process (see
    :attr:`data`); ``loss_fn(outputs, targets)`` returns the scalar training loss;
    ``metric_fn(outputs, targets)`` returns the mean metric over the given examples
    as a float. ``target_loss`` is the train loss that "steps to target" counts to
    (``None``: the report picks one from the runs). ``epochs`` maps each budget
    name (small, medium, full) to the epochs a run trains for. ``batched`` says that
    several runs of the model (other seeds, other learning rates) may be trained at
    once with stacked parameters (:mod:`ravine.arena.batched`): true only for models
    without randomness (dropout) or running statistics (batch norm).
    """

    name: str
    description: str
    make_model: Callable[[int], nn.Module]
    load_data: Callable[[], TaskData]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float]
    higher_is_better: bool
    target_loss: float | None = None
    epochs: Mapping[str, int] = field(
        default_factory=lambda: {"small": 3, "medium": 10, "full": 30}
    )
    eval_batch_size: int = 1000
    batched: bool = False
    _data: TaskData | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        self.name = _normalize(self.name)
        for attribute in ("make_model", "load_data", "loss_fn", "metric_fn"):
            if not callable(getattr(self, attribute)):
                raise ValueError(f"{attribute} of task {self.name!r} must be callable")
        if not isinstance(self.metric_name, str) or not self.metric_name:
            raise ValueError(f"metric_name must be a non-empty string, got {self.metric_name!r}")
        missing = [budget for budget in BUDGET_NAMES if budget not in self.epochs]
        if missing:
            raise ValueError(
                f"epochs of task {self.name!r} must give a number for each budget "
                f"{', '.join(BUDGET_NAMES)}; missing {', '.join(missing)}"
            )
        for budget, count in self.epochs.items():
            if not isinstance(count, int) or count < 1:
                raise ValueError(
                    f"epochs[{budget!r}] of task {self.name!r} must be an integer >= 1, got {count!r}"
                )
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")

    @property
    def data(self) -> TaskData:
        """The task's tensors, loaded on first use and kept for the life of the process."""
        if self._data is None:
            data = self.load_data()
            if not isinstance(data, TaskData):
                raise ValueError(
                    f"load_data of task {self.name!r} must return a TaskData, got {type(data).__name__}"
                )
            self._data = data
        return self._data


_TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` to the registry under ``task.name``; returns it.

    Registering a name twice raises ``ValueError`` unless ``replace=True``.
    """
    if not isinstance(task, Task):
        raise ValueError(f"register_task expects a Task, got {type(task).__name__}")
    _ensure_builtins()
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered; pass replace=True to replace it")
    _TASKS[task.name] = task
    return task


def available_tasks() -> list[str]:
    """Names of all registered tasks, built-in ones first."""
    _ensure_builtins()
    return list(_TASKS)


def get_task(name: str) -> Task:
    """The task registered under ``name``; ``ValueError`` listing valid names otherwise."""
    _ensure_builtins()
    key = _normalize(name) if isinstance(name, str) else ""
    if key not in _TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(available_tasks())}")
    return _TASKS[key]


def cache_dir() -> Path:
    """Where generated data is cached: ``$RAVINE_CACHE_DIR``, else ``~/.cache/ravine``."""
    root = os.environ.get("RAVINE_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ravine"


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _seeded(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    """Wrap a model constructor so that the seed alone fixes the initial weights."""

    def make_model(seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()

    return make_model


# ---------------------------------------------------------------------------------------
# MNIST-1D


def _load_mnist1d() -> TaskData:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # where the canonical pickle lives online: not part of the data
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    if path.exists():
        try:
            with np.load(path) as arrays:
                arrays = {name: arrays[name] for name in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            arrays = None
    else:
        arrays = None
    if arrays is None:
        # make_dataset reseeds numpy's and random's global generators; give them back.
        import random

        numpy_state, python_state = np.random.get_state(), random.getstate()
        try:
            dataset = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        arrays = {name: dataset[name] for name in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(temporary, **arrays)
        os.replace(temporary, path)  # atomic: a concurrent reader never sees half a file
    return TaskData(
        torch.tensor(arrays["x"], dtype=torch.float32),
        torch.tensor(arrays["y"], dtype=torch.long),
        torch.tensor(arrays["x_test"], dtype=torch.float32),
        torch.tensor(arrays["y_test"], dtype=torch.long),
    )


class ResidualMLP(nn.Module):
    """MNIST-1D paper MLP: ``h1 = relu(W1 x)``, ``h2 = h1 + relu(W2 h1)``, ``y = W3 h2``."""

    def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(inputs, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear1(x).relu()
        hidden = hidden + self.linear2(hidden).relu()
        return self.linear3(hidden)


class ConvNet1d(nn.Module):
    """MNIST-1D paper CNN: three stride-2 convolutions (25 channels) and a linear head."""

    def __init__(self, length: int = 40, channels: int = 25, outputs: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        self.linear = nn.Linear(channels * length, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.unsqueeze(1)
        hidden = self.conv1(hidden).relu()
        hidden = self.conv2(hidden).relu()
        hidden = self.conv3(hidden).relu()
        return self.linear(hidden.flatten(1))


class SequenceGRU(nn.Module):
    """MNIST-1D paper GRU: a bidirectional GRU (hidden 6) read out by a linear layer over
    all time steps."""

    def __init__(self, length: int = 40, hidden: int = 6, outputs: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden * length, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(x.unsqueeze(-1))
        return self.linear(states.flatten(1))


def _mnist1d_task(name: str, description: str, build: Callable[[], nn.Module], **kwargs: Any) -> Task:
    return Task(
        name=name,
        description=description,
        make_model=_seeded(build),
        load_data=_load_mnist1d,
        loss_fn=F.cross_entropy,
        metric_name="accuracy",
        metric_fn=accuracy,
        higher_is_better=True,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------
# scikit-learn digits


def _load_digits() -> TaskData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(inputs))
    train, test = order[:split], order[split:]
    return TaskData(inputs[train], targets[train], inputs[test], targets[test])


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (16, 32 channels), 2x2 max-pooling and a linear head, on 8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.linear = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.view(-1, 1, 8, 8)
        hidden = self.conv1(hidden).relu()
        hidden = F.max_pool2d(self.conv2(hidden).relu(), 2)
        return self.linear(hidden.flatten(1))


# ---------------------------------------------------------------------------------------
# Character-level language model on standard-library source

# Modules present in every CPython 3.10+ install; their text differs a little between
# versions, so bits per character compares optimizers on one machine, not across machines.
_TEXT_SOURCES = ("argparse.py", "textwrap.py", "functools.py", "heapq.py", "fractions.py",
                 "statistics.py", "difflib.py", "string.py", "shutil.py")
_TEXT_CHARACTERS = 240_000
_SEQUENCE_LENGTH = 64
# Tab, newline and printable ASCII; everything else maps to one "unknown" symbol.
_VOCABULARY = "\t\n" + "".join(chr(code) for code in range(32, 127))
VOCABULARY_SIZE = len(_VOCABULARY) + 1


def _load_text() -> TaskData:
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces = [(root / name).read_text(encoding="utf-8") for name in _TEXT_SOURCES if (root / name).exists()]
    text = "\n".join(pieces)[:_TEXT_CHARACTERS]
    if len(text) < 10 * (_SEQUENCE_LENGTH + 1):
        raise ValueError(f"found only {len(text)} characters of standard-library source under {root}")
    lookup = np.full(128, len(_VOCABULARY), dtype=np.int64)
    lookup[[ord(character) for character in _VOCABULARY]] = np.arange(len(_VOCABULARY))
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
    tokens = torch.from_numpy(lookup[np.minimum(codes, 127)])
    window = _SEQUENCE_LENGTH + 1
    count = len(tokens) // window
    windows = tokens[: count * window].view(count, window)
    # The last tenth of the text (other modules than most of the training text) is held out.
    split = int(0.9 * count)
    return TaskData(
        windows[:split, :-1].clone(),
        windows[:split, 1:].clone(),
        windows[split:, :-1].clone(),
        windows[split:, 1:].clone(),
    )


def _sequence_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


class CharGRU(nn.Module):
    """Embedding (32), one-layer GRU (128) and a linear read-out over the vocabulary."""

    def __init__(self, vocabulary: int = VOCABULARY_SIZE, embedding: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, vocabulary)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embedding(tokens))
        return self.readout(states)


class CharTransformer(nn.Module):
    """A two-layer causal pre-norm transformer (width 64, 4 heads) with learned positions."""

    def __init__(
        self,
        vocabulary: int = VOCABULARY_SIZE,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        length: int = _SEQUENCE_LENGTH,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocabulary)
        self.register_buffer(
            "causal_mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        hidden = self.embedding(tokens) + self.position[:length]
        hidden = self.blocks(hidden, mask=self.causal_mask[:length, :length], is_causal=True)
        return self.readout(self.norm(hidden))


# ---------------------------------------------------------------------------------------
# Noisy quadratic (DeepOBS quadratic_deep)

_QUADRATIC_DIMENSION = 100


def quadratic_deep_hessian(seed: int = 42) -> torch.Tensor:
    """``Q = R^T diag(lambda) R``: 90 eigenvalues from U(0, 1), 10 from U(30, 60), and a
    rotation ``R`` drawn from the Haar measure (QR of a Gaussian matrix, signs fixed)."""
    rng = np.random.RandomState(seed)
    eigenvalues = np.concatenate([rng.uniform(0.0, 1.0, 90), rng.uniform(30.0, 60.0, 10)])
    q, r = np.linalg.qr(rng.normal(size=(_QUADRATIC_DIMENSION, _QUADRATIC_DIMENSION)))
    rotation = q * np.sign(np.diag(r))
    hessian = rotation.T @ np.diag(eigenvalues) @ rotation
    return torch.tensor((hessian + hessian.T) / 2, dtype=torch.float32)


class NoisyQuadratic(nn.Module):
    """Per-example loss ``0.5 (theta - x)^T Q (theta - x)`` with ``theta`` starting at ones;
    the data ``x`` are zero-mean Gaussian draws (DeepOBS ``quadratic_deep``)."""

    def __init__(self, hessian: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(hessian.shape[0]))
        self.register_buffer("hessian", hessian)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        difference = self.theta - x
        return 0.5 * ((difference @ self.hessian) * difference).sum(dim=-1)


def _load_quadratic() -> TaskData:
    # DeepOBS draws 1,000 training and 1,000 test points with noise level 0.6.
    train = np.random.RandomState(42).normal(0.0, 0.6, (1000, _QUADRATIC_DIMENSION))
    test = np.random.RandomState(43).normal(0.0, 0.6, (1000, _QUADRATIC_DIMENSION))
    return TaskData(
        torch.tensor(train, dtype=torch.float32),
        torch.zeros(1000),
        torch.tensor(test, dtype=torch.float32),
        torch.zeros(1000),
    )


def _quadratic_loss(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return mean_output(outputs, targets).item()


# ---------------------------------------------------------------------------------------

_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    builtins = [
        _mnist1d_task(
            "mnist1d-logreg",
            "MNIST-1D, logistic regression (40 -> 10); paper: ~32% test accuracy",
            lambda: nn.Linear(40, 10),
            epochs={"small": 10, "medium": 20, "full": 60},
            batched=True,
        ),
        _mnist1d_task(
            "mnist1d-mlp",
            "MNIST-1D, residual MLP 40-100-100-10; paper: ~68% test accuracy",
            lambda: ResidualMLP(40, 100, 10),
            epochs={"small": 10, "medium": 20, "full": 60},
            batched=True,
        ),
        _mnist1d_task(
            "mnist1d-cnn",
            "MNIST-1D, three-layer 1-D CNN (25 channels); paper: ~94% test accuracy",
            lambda: ConvNet1d(),
            epochs={"small": 5, "medium": 15, "full": 50},
        ),
        _mnist1d_task(
            "mnist1d-gru",
            "MNIST-1D, bidirectional GRU (hidden 6); paper: ~91% test accuracy",
            lambda: SequenceGRU(),
            epochs={"small": 3, "medium": 10, "full": 40},
        ),
        Task(
            name="digits-mlp",
            description="scikit-learn digits (8x8), MLP 64-128-10",
            make_model=_seeded(lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))),
            load_data=_load_digits,
            loss_fn=F.cross_entropy,
            metric_name="accuracy",
            metric_fn=accuracy,
            higher_is_better=True,
            epochs={"small": 5, "medium": 15, "full": 40},
            batched=True,
        ),
        Task(
            name="digits-cnn",
            description="scikit-learn digits (8x8), CNN with two 3x3 convolutions",
            make_model=_seeded(DigitsCNN),
            load_data=_load_digits,
            loss_fn=F.cross_entropy,
            metric_name="accuracy",
            metric_fn=accuracy,
            higher_is_better=True,
            epochs={"small": 3, "medium": 10, "full": 30},
        ),
        Task(
            name="charlm-gru",
            description="next character of Python standard-library source, GRU (128); bits per character",
            make_model=_seeded(CharGRU),
            load_data=_load_text,
            loss_fn=_sequence_cross_entropy,
            metric_name="bits per character",
            metric_fn=bits_per_character,
            higher_is_better=False,
            epochs={"small": 1, "medium": 3, "full": 10},
            eval_batch_size=256,
        ),
        Task(
            name="charlm-transformer",
            description="next character of Python standard-library source, 2-layer causal transformer; bits per character",
            make_model=_seeded(CharTransformer),
            load_data=_load_text,
            loss_fn=_sequence_cross_entropy,
            metric_name="bits per character",
            metric_fn=bits_per_character,
            higher_is_better=False,
            epochs={"small": 1, "medium": 3, "full": 10},
            eval_batch_size=256,
        ),
        Task(
            name="quadratic-deep",
            description="DeepOBS-style noisy quadratic, 100-d, eigenvalues U(0,1) x90 and U(30,60) x10",
            make_model=lambda seed: NoisyQuadratic(quadratic_deep_hessian()),
            load_data=_load_quadratic,
            loss_fn=mean_output,
            metric_name="loss",
            metric_fn=_quadratic_loss,
            higher_is_better=False,
            epochs={"small": 3, "medium": 10, "full": 30},
        ),
    ]
    for task in builtins:
        _TASKS[task.name] = task
