"""How long `ftclip validate` takes, next to the floor it cannot beat: starting Python and importing yaml + pydantic.

    python bench/validate_bench.py [--reps 21] [--torch-reference] [RECIPE ...]     (default: recipes/*.yaml)

Each command runs as a fresh process (what a pre-commit hook or a CI step pays), all commands once per repetition
in rotating order so a busy spell hits them alike; the table shows medians and the difference to the floor.
The target (issue 17): validate within 0.5 s of `python3 -c "import yaml, pydantic"` on the same machine.
Run it on a quiet machine: the figures are wall-clock times of whole processes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 0.5


def commands(recipes: list[str], torch_reference: bool) -> dict[str, list[str]]:
    python = sys.executable
    runs = {
        'python -c "import yaml, pydantic"': [python, "-c", "import yaml, pydantic"],
        "ftclip validate RECIPES": [python, "-m", "ftclip", "validate", *recipes],
        "ftclip validate --json RECIPES": [python, "-m", "ftclip", "validate", "--json", *recipes],
        "ftclip schema": [python, "-m", "ftclip", "schema"],
        "ftclip --help": [python, "-m", "ftclip", "--help"],
    }
    if torch_reference:  # what validate paid before issue 17, for scale
        runs['python -c "import torch"'] = [python, "-c", "import torch"]
    return runs


def time_once(command: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - started
    if completed.returncode not in (0, 2):  # 2: a recipe is invalid, still a full validation
        sys.exit(f"{' '.join(command)} failed (exit {completed.returncode}):\n{completed.stderr.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipes to validate (default: recipes/*.yaml)")
    parser.add_argument("--reps", type=int, default=21, help="repetitions of every command (median reported)")
    parser.add_argument("--torch-reference", action="store_true", help='also time python -c "import torch"')
    arguments = parser.parse_args()
    recipes = arguments.recipes or sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*.yaml"))
    # This checkout's ftclip, whatever is installed; no colour or terminal handling to skew the runs.
    environment = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "TERM": "dumb"}
    environment.pop("GITHUB_ACTIONS", None)
    runs = commands(recipes, arguments.torch_reference)

    for command in runs.values():  # warm the file cache and the .pyc files before timing
        time_once(command, environment)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(arguments.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(time_once(runs[name], environment))

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, load average {load}")
    print(f"{len(recipes)} recipes: {' '.join(recipes)}; median of {arguments.reps} runs per command, interleaved\n")
    floor = statistics.median(times[names[0]])
    print("| command                               | median s |    min s | − floor s |")
    print("|---------------------------------------|----------|----------|-----------|")
    for name in names:
        median = statistics.median(times[name])
        print(f"| {name:<37} | {median:8.3f} | {min(times[name]):8.3f} | {median - floor:+9.3f} |")
    overhead = statistics.median(times["ftclip validate RECIPES"]) - floor
    verdict = "meets" if overhead <= TARGET_SECONDS else "misses"
    print(f"\nvalidate − floor = {overhead:.3f} s: {verdict} the target of {TARGET_SECONDS} s")


if __name__ == "__main__":
    main()
