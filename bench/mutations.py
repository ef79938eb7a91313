"""Mutation check for the tests that compare floats across process layouts (issue 21): break the clip or the
gradient all-reduce on purpose, run the tests that guard it, and confirm they fail. Each mutation is applied to the
source file in place (the editable install and torchrun's workers import this checkout) and always undone.

    python bench/mutations.py            # every mutation; prints one table row each, exit 1 if a mutation survives
    python bench/mutations.py --list     # the mutations and the tests that must catch them
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]


DISTRIBUTED = "tests/test_distributed.py"
MUTATIONS = [
    Mutation("clip coefficient not capped at 1 (scales small gradients up)", "ftclip/clip.py",
             "return torch.clamp(max_norm / (norm + EPS), max=1.0)", "return max_norm / (norm + EPS)",
             ("tests/test_clip.py", f"{DISTRIBUTED}::test_two_ranks_equal_one_process_on_the_same_global_batch")),
    Mutation("clip threshold off by 10 %", "ftclip/clip.py",
             "return torch.clamp(max_norm / (norm + EPS), max=1.0)", "return torch.clamp(0.9 * max_norm / (norm + EPS), max=1.0)",
             ("tests/test_clip.py", f"{DISTRIBUTED}::test_two_ranks_equal_one_process_on_the_same_global_batch")),
    Mutation("FSDP: the sharded norm is not all-reduced (each rank clips by its own shard's norm)", "ftclip/clip.py",
             "dist.all_reduce(powered, op=dist.ReduceOp.SUM)", "pass",
             (f"{DISTRIBUTED}::test_two_ranks_equal_one_process_on_the_same_global_batch",)),
    Mutation("DDP: gradients never synchronized (every micro-batch under no_sync)", "ftclip/distributed.py",
             "return contextlib.nullcontext() if sync else model.no_sync()", "return model.no_sync()",
             (f"{DISTRIBUTED}::test_two_ranks_equal_one_process_on_the_same_global_batch",
              f"{DISTRIBUTED}::test_flat_gradient_buffer_survives_ddp_and_no_sync")),
    Mutation("the loss/metric all-reduce sums without dividing by the world size", "ftclip/distributed.py",
             "            tensor /= self.world_size\n", "",
             (f"{DISTRIBUTED}::test_two_ranks_equal_one_process_on_the_same_global_batch",)),
]


def run_tests(tests: tuple[str, ...]) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, capture_output=True, text=True)
    return done.returncode, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}: {mutation.file}; caught by {', '.join(mutation.tests)}")
        return 0
    print("| mutation | file | tests | outcome | seconds |\n| --- | --- | --- | --- | --- |")
    survived = 0
    for mutation in MUTATIONS:
        path = ROOT / mutation.file
        source = path.read_text()
        if source.count(mutation.original) != 1:
            print(f"| {mutation.name} | {mutation.file} | - | the line to mutate is gone: update bench/mutations.py | - |")
            survived += 1
            continue
        try:
            path.write_text(source.replace(mutation.original, mutation.mutated))
            code, seconds = run_tests(mutation.tests)
        finally:
            path.write_text(source)
        outcome = "caught (tests fail)" if code == 1 else f"SURVIVED (pytest exit {code})"
        survived += code != 1
        print(f"| {mutation.name} | {mutation.file} | {len(mutation.tests)} | {outcome} | {seconds:.0f} |", flush=True)
    code, seconds = run_tests(tuple(sorted({test for m in MUTATIONS for test in m.tests})))
    print(f"| (none: the source as committed) | - | all | {'pass' if code == 0 else f'FAIL (exit {code})'} | {seconds:.0f} |")
    return 1 if survived or code else 0


if __name__ == "__main__":
    sys.exit(main())
