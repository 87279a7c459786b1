"""Shared test settings."""

import os

import torch

# ravine's compiled CPU step takes square roots with torch's own function here, so
# every parity test can ask for bit-equal results; tests/test_fast_path.py checks the
# default (hardware square root) separately.
os.environ.setdefault("RAVINE_EXACT_SQRT", "1")

# The tests train tiny models, for which one thread is fastest, and a shared 2-core
# machine would otherwise have torch's worker threads competing for the cores.
torch.set_num_threads(1)
