"""How long the page's landscape playground waits for a redraw.

Times ``POST /api/landscape/paths`` through the ASGI app (no network, starlette's test
client) as a slider moves: every request changes one optimizer's learning rate, so one
path is computed and the others come from the cache. Also times the request with every
path new. Prints the median and the worst of each, side by side, for each function at
the playground's default step count.

    python benchmarks/serve_playground.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from starlette.testclient import TestClient

from ravine.serve import create_app
from ravine.serve.playground import functions

OPTIMIZERS = ("sgd", "momentum", "adam")
MOVES = 10


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder, TestClient(create_app(folder)) as client:
        client.post("/api/landscape/paths", json={"optimizers": ["sgd"], "steps": 5})  # warm-up
        print(f"{'function':<12}{'steps':>6}  {'one slider moved (median / worst)':>36}  {'all 3 paths new (median / worst)':>34}")
        for entry in functions():
            name, steps = entry["name"], entry["steps"]
            one, every = [], []
            for move in range(MOVES):
                lr = 1e-3 * 1.1 ** move
                base = [f"{optimizer}(lr={1e-3 * 0.77:.6g})" for optimizer in OPTIMIZERS[:2]]
                client.post("/api/landscape/paths", json={"function": name, "optimizers": base, "steps": steps})
                began = time.perf_counter()
                answer = client.post("/api/landscape/paths", json={
                    "function": name, "optimizers": [*base, f"adam(lr={lr:.6g})"], "steps": steps})
                one.append(time.perf_counter() - began)
                assert answer.status_code == 200, answer.text
                fresh = [f"{optimizer}(lr={lr * 1.03:.6g})" for optimizer in OPTIMIZERS]
                began = time.perf_counter()
                client.post("/api/landscape/paths", json={"function": name, "optimizers": fresh, "steps": steps})
                every.append(time.perf_counter() - began)
            print(f"{name:<12}{steps:>6}  {1e3 * statistics.median(one):>18.0f} / {1e3 * max(one):>6.0f} ms"
                  f"  {1e3 * statistics.median(every):>17.0f} / {1e3 * max(every):>6.0f} ms")


if __name__ == "__main__":
    main()
