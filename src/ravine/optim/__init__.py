"""ravine's optimizers: torch.optim.Optimizer subclasses with torch.optim's signatures."""

# Until ravine's own implementations land, the names resolve to torch.optim's classes.
from torch.optim import SGD, Adagrad, Adam, AdamW, RMSprop

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW"]
