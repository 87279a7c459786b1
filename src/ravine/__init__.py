"""ravine: an optimizer lab for PyTorch.

Optimizers that drop into any torch training loop (``ravine.AdamW`` for
``torch.optim.AdamW``), gradient clipping, learning-rate schedules, and named
optimizer specs such as ``"adamw(lr=3e-4, weight_decay=0.1)"``.
"""

from ravine import schedules
from ravine.advise import advise, lr_range_test
from ravine.clip import ClipByGlobalNorm, ClipByValue, clip_grad_norm_, clip_grad_value_
from ravine.optim import SGD, Adagrad, Adam, AdamW, RavineOptimizer, RMSprop
from ravine.optim import Lamb, Lion, ScheduleFreeAdamW, ScheduleFreeSGD, Signum
from ravine.optim import NAdam, RAdam, Adamax, Adafactor, Muon, MuonWithAdamW, muon_with_adamw
from ravine.registry import available, create, describe, parse_spec, register
from ravine.schedules import ReduceOnPlateau, ScheduledLR

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adagrad",
    "RMSprop",
    "Adam",
    "AdamW",
    "Lion",
    "Lamb",
    "Signum",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "NAdam",
    "RAdam",
    "Adamax",
    "Adafactor",
    "Muon",
    "MuonWithAdamW",
    "muon_with_adamw",
    "RavineOptimizer",
    "clip_grad_value_",
    "clip_grad_norm_",
    "ClipByValue",
    "ClipByGlobalNorm",
    "schedules",
    "ScheduledLR",
    "ReduceOnPlateau",
    "available",
    "create",
    "describe",
    "parse_spec",
    "register",
    "advise",
    "lr_range_test",
]
