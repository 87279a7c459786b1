"""End-to-end benchmark of `ravine compare` (by default: the no-argument main job).

Runs the command in a subprocess and prints its wall time, the CPU time it used, the
ratio to the 10-minute target, and the tuned test metric per optimizer. On a shared
machine the wall time is inflated by other load; CPU time / jobs is what the same
run takes on idle cores, so both are printed.

    python benchmarks/compare_default.py                      # ravine compare
    python benchmarks/compare_default.py --budget small       # any compare options
    python benchmarks/compare_default.py --task mnist1d-cnn -o adam,momentum
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 600.0


def main(arguments: list[str]) -> None:
    if "--out" not in arguments:
        arguments = [*arguments, "--out", tempfile.mkdtemp(prefix="ravine-compare-")]
    out = Path(arguments[arguments.index("--out") + 1])
    jobs = int(arguments[arguments.index("--jobs") + 1]) if "--jobs" in arguments else min(2, os.cpu_count() or 1)
    command = [sys.executable, "-m", "ravine.cli", "compare", *arguments]
    print("$", " ".join(command), flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = subprocess.run(command, check=False)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    if completed.returncode != 0:
        raise SystemExit(completed.returncode)
    document = json.loads((out / "results.json").read_text())
    meta, runs = document["meta"], document["runs"]
    print()
    print(f"task {meta['task']}, budget {meta['budget']}, {len(runs)} runs "
          f"({meta['executed_runs']} executed), jobs {jobs}")
    print(f"wall time        {wall:7.1f} s   ({wall / TARGET_S:.2f} x the 10-minute target; "
          f"load average before: {load_before:.1f} on {os.cpu_count()} cores)")
    print(f"CPU time         {cpu:7.1f} s   (idle-machine estimate: CPU / jobs = {cpu / jobs:.1f} s, "
          f"{cpu / jobs / TARGET_S:.2f} x the target)")
    metric = meta["metric"]
    percent = metric == "accuracy"
    print(f"tuned held-out {metric} (mean over seeds):")
    by_label: dict[str, list[float]] = {}
    lrs: dict[str, float] = {}
    for run in runs:
        if run["phase"] == "seed" and run["final_test_metric"] is not None:
            by_label.setdefault(run["label"], []).append(run["final_test_metric"])
            lrs[run["label"]] = run["lr"]
    for label, values in by_label.items():
        mean = sum(values) / len(values)
        shown = f"{100 * mean:.1f}%" if percent else f"{mean:.4g}"
        print(f"  {label:<12} {shown:>8}   lr {lrs[label]:.3g}   ({len(values)} seeds)")
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main(sys.argv[1:])
