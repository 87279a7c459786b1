"""Exact optimizer state memory per parameter, for every optimizer and option set.

    python benchmarks/state_memory.py              # the ~10M-parameter model below
    python benchmarks/state_memory.py --small      # a 1,000x smaller model, for a quick look

Builds a small language-model-shaped stack of float32 parameters (an embedding, three
MLP blocks with layer norms, an output layer: large matrices and small vectors, as real
models have), gives every parameter a gradient, takes one step with each optimizer
(state is created by the first step) and prints a markdown table of
``ravine.optim.state_bytes`` (every state tensor's numel x element_size: moment
buffers, quantization scales, step counters) and bytes per parameter. Memory is
counted, not timed, so the figures are exact and the same on every machine.
"""

from __future__ import annotations

import argparse

import torch

import ravine
from ravine.optim.lowmem import state_bytes

SPECS = [
    "sgd",
    "momentum",
    "nesterov",
    "adagrad",
    "rmsprop",
    "rmsprop-centered",
    "adam",
    "amsgrad",
    "adamw",
    "lion",
    "momentum-bf16",
    "adam-bf16",
    "adam(amsgrad=True, state_dtype='bfloat16')",
    "adamw-bf16",
    "momentum-8bit",
    "adam-8bit",
    "adam-8bit(amsgrad=True)",
    "adamw-8bit",
    "lion-8bit",
]


def make_params(vocabulary: int, width: int, hidden: int, blocks: int) -> list[torch.nn.Parameter]:
    shapes = [(vocabulary, width)]
    for _ in range(blocks):
        shapes += [(width,), (width,), (hidden, width), (hidden,), (width, hidden), (width,)]
    shapes += [(width,), (width,), (vocabulary, width), (vocabulary,)]
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a ~10k-parameter model instead of ~10M")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (160, 16, 64, 3) if args.small else (16000, 256, 1024, 3)
    params = make_params(*sizes)
    count = sum(p.numel() for p in params)
    large = sum(p.numel() for p in params if p.numel() >= 4096)
    print(
        f"{count:,} float32 parameters in {len(params)} tensors; {large:,} ({100 * large / count:.2f}%) "
        "in tensors of >= 4096 elements (quantized by the 8-bit optimizers)\n"
    )
    totals = {}
    for spec in SPECS:
        optimizer = ravine.create(spec, params)
        optimizer.step()
        totals[spec] = state_bytes(optimizer)
        del optimizer
    print("| optimizer | state bytes | bytes / parameter | vs adam |")
    print("|---|---:|---:|---:|")
    for spec, total in totals.items():
        print(f"| `{spec}` | {total:,} | {total / count:.4f} | {total / totals['adam']:.3f} |")

if __name__ == "__main__":
    main()
