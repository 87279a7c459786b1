"""ravine's optimizers: torch.optim.Optimizer subclasses with torch.optim's signatures,
defaults and state_dict format, each a short composition of :mod:`ravine.transforms`."""

from ravine.optim.adafactor import Adafactor
from ravine.optim.adagrad import Adagrad
from ravine.optim.adam import Adam, AdamW
from ravine.optim.adamax import Adamax
from ravine.optim.base import RavineOptimizer
from ravine.optim.lamb import Lamb
from ravine.optim.lion import Lion
from ravine.optim.lowmem import state_bytes, state_bytes_per_parameter
from ravine.optim.muon import Muon, MuonWithAdamW, muon_with_adamw
from ravine.optim.nadam import NAdam
from ravine.optim.quantized import Adam8bit, AdamW8bit, Lion8bit, SGD8bit
from ravine.optim.radam import RAdam
from ravine.optim.rmsprop import RMSprop
from ravine.optim.schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD, evaluation_mode
from ravine.optim.sgd import SGD
from ravine.optim.signum import Signum

__all__ = ["RavineOptimizer", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW",
           "Lion", "Lamb", "Signum", "ScheduleFreeAdamW", "ScheduleFreeSGD", "evaluation_mode",
           "NAdam", "RAdam", "Adamax", "Adafactor", "Muon", "MuonWithAdamW", "muon_with_adamw",
           "Adam8bit", "AdamW8bit", "SGD8bit", "Lion8bit", "state_bytes", "state_bytes_per_parameter"]
