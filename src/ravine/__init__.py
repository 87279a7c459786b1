"""ravine: an optimizer lab for PyTorch."""

from ravine.optim import SGD, Adagrad, Adam, AdamW, RMSprop
from ravine.registry import available, create, parse_spec

__version__ = "0.1.0"

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "available", "create", "parse_spec"]
