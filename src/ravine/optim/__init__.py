"""ravine's optimizers: torch.optim.Optimizer subclasses with torch.optim's signatures,
defaults and state_dict format, each a short composition of :mod:`ravine.transforms`."""

from ravine.optim.adagrad import Adagrad
from ravine.optim.adam import Adam, AdamW
from ravine.optim.base import RavineOptimizer
from ravine.optim.rmsprop import RMSprop
from ravine.optim.sgd import SGD

__all__ = ["RavineOptimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]
