"""How `ftclip import-axolotl` fares on a folder of Axolotl configs: written / refused / invalid / failed (a
traceback or an exit code other than 0 and 2), and which keys are refused most often.

Each config is imported by its own `ftclip import-axolotl` process, as a user would run it, so one config that
crashes the importer cannot hide the others. The ftclip measured is the one of the checkout this script is in
(copy the script into an older checkout to measure that one).

    python bench/import_corpus.py tests/fixtures/axolotl_wild            # a markdown table on stdout
    python bench/import_corpus.py tests/fixtures/axolotl_wild --top 20
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The ftclip of the checkout this script is in, even where another one is installed in editable mode (its finder
# would otherwise win over sys.path): so the same script measures an older checkout too.
RUN_THIS_CHECKOUT = """
import sys
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
sys.path.insert(0, sys.argv.pop(1))
from ftclip.cli import app
sys.argv[0] = "ftclip"
app()
"""


def import_one(config: Path, output_dir: Path) -> tuple[str, list[tuple[str, str]], str]:
    """(outcome, refused (key, why) pairs, the output's last line when it failed)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    done = subprocess.run([sys.executable, "-c", RUN_THIS_CHECKOUT, str(REPO), "import-axolotl", str(config),
                           "--output-dir", str(output_dir)], capture_output=True, text=True, env=environment, timeout=300)
    output = done.stdout + done.stderr
    if "Traceback" in output or done.returncode not in (0, 2):
        return "failed", [], output.strip().splitlines()[-1] if output.strip() else f"exit {done.returncode}"
    refused = [(match.group(1), match.group(2)) for match in re.finditer(r"^  refused  (\S+): (.*)$", done.stdout, re.M)]
    first = done.stdout.split(maxsplit=1)[0] if done.stdout.strip() else ""
    outcome = {"written": "written", "refused": "refused", "invalid": "invalid"}.get(first, "failed")
    return outcome, refused, "" if outcome != "failed" else output.strip()[-200:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--top", type=int, default=15, help="How many refused keys to list.")
    arguments = parser.parse_args()
    configs = sorted(p for p in arguments.folder.iterdir() if p.suffix in (".yml", ".yaml"))
    outcomes: Counter[str] = Counter()
    refused_keys: Counter[str] = Counter()
    example_reason: dict[str, str] = {}
    failures = []
    with tempfile.TemporaryDirectory() as output_dir:
        for config in configs:
            outcome, refused, failure = import_one(config, Path(output_dir))
            outcomes[outcome] += 1
            if failure:
                failures.append((config.name, failure))
            for key in {re.sub(r"\[\d+\]", "[]", key) for key, _ in refused}:
                refused_keys[key] += 1
            for key, why in refused:
                example_reason.setdefault(re.sub(r"\[\d+\]", "[]", key), why)
    total = len(configs)
    print(f"{total} configs in {arguments.folder}\n")
    print("| outcome | configs | share |\n| --- | --- | --- |")
    for outcome in ("written", "refused", "invalid", "failed"):
        print(f"| {outcome} | {outcomes[outcome]} | {outcomes[outcome] / total:.0%} |")
    print("\nMost refused keys (configs refusing each; a config can refuse several):\n")
    print("| key | configs | reason (first seen) |\n| --- | --- | --- |")
    for key, count in refused_keys.most_common(arguments.top):
        why = example_reason[key].replace("|", "\\|")
        print(f"| `{key}` | {count} | {why[:150]}{'...' if len(why) > 150 else ''} |")
    for name, failure in failures:
        print(f"\nfailed: {name}: {failure}")


if __name__ == "__main__":
    main()
