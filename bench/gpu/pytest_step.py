"""Step a of the GPU run: the `gpu`-marked tests and the tests of the CUDA-relevant stages, with CUDA visible.

    python bench/gpu/pytest_step.py [--smoke] [--json FILE]

On a GPU machine the suites below pick CUDA by themselves: recipes say `device: auto`, so test_train's runs
(QLoRA with bitsandbytes' 4-bit layers and 8-bit AdamW among them) train on the card, and the tests that are
skipped without CUDA (the clip's no-host-sync check, the loss on CUDA, Liger, flash-attention) run. Each
invocation's outcome is read from pytest's JUnit XML: counts, and each failure with the first line of its
message. --smoke runs three quick ones in one invocation (the CPU smoke run of the script).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INVOCATIONS = {
    "gpu-marked": ["-m", "gpu", "tests"],
    # clip (incl. the no-host-sync check on CUDA), loss, padding-free packing, training and QLoRA.
    "clip, loss, padding-free, training, QLoRA": ["-m", "not slow", "tests/test_clip.py", "tests/test_loss.py",
                                                  "tests/test_padding_free.py", "tests/test_train.py"],
    # the optimizers: non-finite steps skipped by each, and the paged (CUDA-only) ones at validate and train.
    "optimizers": ["-m", "not slow", "tests/test_checkpoint.py", "tests/test_cli.py", "-k", "nan_step or nonfinite or paged"],
}
SMOKE = {  # one process: a gpu-marked test and the no-host-sync check (both skipped on the CPU), one that runs
    "smoke": ["tests/test_clip.py", "tests/test_loss.py", "-k", "only_fused or no_host_sync or on_cuda_the_loss"],
}


def outcomes(junit: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures, skips = [], []
    for case in ElementTree.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            failures.append(f"{name}: {message[0][:300] if message else ''}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skips.append(f"{name}: {(case.find('skipped').get('message') or '')[:200]}")
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skips": skips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, selection) in enumerate((SMOKE if args.smoke else INVOCATIONS).items()):
            junit = Path(folder) / f"{index}.xml"
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                       f"--junitxml={junit}", *selection]
            print("$ " + " ".join(command[1:]), flush=True)
            done = subprocess.run(command, cwd=REPO)
            result = outcomes(junit) if junit.exists() else {"passed": 0, "failed": 0, "skipped": 0, "failures": [],
                                                              "skips": []}
            # 5: nothing selected; anything but 0 and 5 without a failing test is pytest itself failing.
            if done.returncode not in (0, 5) and not result["failed"]:
                result["failed"] += 1
                result["failures"].append(f"pytest exited {done.returncode} ({' '.join(selection)})")
            results[name] = {"selection": " ".join(selection), "exit_code": done.returncode, **result}
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    for name, result in results.items():
        print(f"{name}: {result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped")
    if any(result["failed"] for result in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
