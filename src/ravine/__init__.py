"""ravine: an optimizer lab for PyTorch."""

__version__ = "0.1.0"
