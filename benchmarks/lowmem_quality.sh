#!/usr/bin/env bash
# Low-memory optimizer state against float32 state on MNIST-1D (docs/memory.md):
# AdamW with float32, bfloat16 and 8-bit moments at one fixed learning rate, the same
# seeds, the task's medium epoch budget (20). One run at a time (--jobs 1), each run on
# its own (--no-batch), so every run builds the optimizer the spec names.
# Results land under ${OUT:-ravine-out/lowmem}/<name>/ (report.html, results.csv/json).
set -euo pipefail
OUT=${OUT:-ravine-out/lowmem}
SEEDS=${SEEDS:-5}
run() { name=$1; shift; echo "== $name: ravine compare $*"; /usr/bin/time -f "$name: %e s wall, %U s user" \
        ravine compare --jobs 1 --no-batch --mode tuned --seeds "$SEEDS" --out "$OUT/$name" "$@" | tail -n 12; }

run adamw-mlp --task mnist1d-mlp --epochs 20 -o "adamw(lr=0.003),adamw-bf16(lr=0.003),adamw-8bit(lr=0.003)"
