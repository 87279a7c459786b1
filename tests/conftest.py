"""Shared test settings."""

import torch

# The tests train tiny models, for which one thread is fastest, and a shared 2-core
# machine would otherwise have torch's worker threads competing for the cores.
torch.set_num_threads(1)
