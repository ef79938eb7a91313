"""Where ftclip's training step spends its time on a GPU: step_bench's model and data (4 layers, 128k vocabulary),
a few steps of ftclip's own `train` under torch.profiler, per variant (padded, padded without the chunked loss,
packed, packed with the dense sdpa path). Prints each variant's step time and the top operators by device time and
by host time, and the count of host-device synchronizations (the reason the GPU run of 2026-12-04 measured ftclip's
step at 0.32× (padded) and 0.04× (packed) HF Trainer's tokens/s).

    python bench/gpu/profile_step.py --device cuda [--steps 6] [--variants padded,packed]
    python bench/gpu/profile_step.py --device cpu --sequence-len 256 --vocab 2048 --steps 3   # a smoke run here
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import step_bench  # noqa: E402

VARIANTS = {
    "padded": ("padded", {}),
    "padded-plain-loss": ("padded", {"chunked_cross_entropy": False}),
    "packed": ("packed", {}),
    "packed-no-flatten": ("packed", {"attn_implementation": "eager"}),
}


def profile(recipe: Path, device: str, rows: int) -> None:
    import torch
    from rich.console import Console

    from ftclip.recipe import load_recipe
    from ftclip.train import train

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        train(load_recipe(recipe), Console(quiet=True), resume=False)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    events = prof.key_averages()
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                      "cudaEventSynchronize", "aten::item", "aten::_local_scalar_dense"))
    print(f"  wall {seconds:.1f} s for the whole train() (loading included); host syncs/item(): {syncs}")
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=rows, max_name_column_width=60))
    if device == "cuda":
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows // 2, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=step_bench.VOCAB)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        step_bench.build_assets(folder, vocab=args.vocab, sequence_len=args.sequence_len, records=120)
        for name in args.variants.split(","):
            mode, settings = VARIANTS[name]
            recipe = step_bench.write_recipe(folder, mode, args.steps, args.device, args.sequence_len, args.micro_batch,
                                             name=f"{name}.yaml", output_dir=str(folder / f"out-{name}"), **settings)
            print(f"\n=== {name}: {settings or 'as step_bench runs it'}", flush=True)
            try:
                profile(recipe, args.device, args.rows)
            except Exception as error:  # one variant's failure must not hide the others
                print(f"  failed: {type(error).__name__}: {error}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
