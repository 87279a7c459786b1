"""Optimizer step time: ravine against torch.optim's implementations, side by side.

    python benchmarks/step.py                       # 10M parameters in 100 tensors
    python benchmarks/step.py --params 1e6 --tensors 1000
    python benchmarks/step.py --optimizers adam,sgd-momentum --json out.json
    python benchmarks/step.py --optimizers adam-bf16,adamw-8bit   # low-memory state
    python benchmarks/step.py --optimizers lion,lamb,signum,signsgd,sfadamw,sfsgd,adafactor,muon

The same as ``ravine bench step`` (see :mod:`ravine.bench`): every implementation
(torch.optim's for-loop, foreach and fused paths; ravine's plain and fast paths) takes
its steps in turn, round robin, and the median step time is reported with the
effective bandwidth (bytes a step must move / time) and the ratio to torch's fastest
implementation measured in the same run (for optimizers torch lacks: the reference
``schedulefree`` package, or ravine's own plain path, named in the row).
"""

from __future__ import annotations

import sys

from ravine.bench import bench_app

if __name__ == "__main__":
    bench_app(["step", *sys.argv[1:]], prog_name="benchmarks/step.py")
