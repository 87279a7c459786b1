"""The README's example runs as written and trains."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_learns():
    code = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    optimizer, scheduler = namespace["optimizer"], namespace["scheduler"]
    assert type(optimizer).__module__.startswith("ravine")
    # After 1000 steps the warmup + cosine schedule has come down to zero.
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert scheduler.step_count == 1000


def test_readme_commands_match_ci():
    lines = README.read_text().splitlines()
    test_command = next(line for line in lines if "pytest" in line).split("#")[0].strip()
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_command in ci
