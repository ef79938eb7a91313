"""Clip-step benchmark: ftclip's clip paths against torch's, interleaved in one process.

    python bench/clip_bench.py [--device cpu|cuda] [--reps 21] [--sets lora8b,full125m,tiny2000,lora8b-bf16]
                               [--profile] [--json FILE]

Each method gets its own copy of the gradient set; every repetition runs all methods once, in rotating
order, and the table shows medians. Ratios are torch foreach time / method time (higher is faster);
"floor" is one read pass over the same values in one contiguous buffer (`dot`, or one `vector_norm`
reduction, whichever is faster): on a GPU, the HBM floor. On CUDA each call is timed with CUDA events from
an idle device (synchronized before), so a method's time includes its launch gaps.

--profile (always on with CUDA) adds two columns: the device kernels one call launches (CUDA; counted with
torch.profiler, copies and memsets included) or, on the CPU, the top-level aten ops it runs; and whether the
call synchronizes with the host (CUDA only: torch.cuda.set_sync_debug_mode("error") around one call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ftclip.clip import GradientClipper, clip_grad_norm_
from ftclip.recipe import GradientClipping

MAX_NORM = 1.0


def lora_8b_shapes() -> list[tuple[int, ...]]:
    """LoRA r=16 on all 7 linear projections of Llama-3.1-8B's 32 layers: 448 tensors, 41.9 M values."""
    projections = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]
    shapes = []
    for _ in range(32):
        for fan_in, fan_out in projections:
            shapes += [(16, fan_in), (fan_out, 16)]
    return shapes


def full_125m_shapes() -> list[tuple[int, ...]]:
    """A GPT-2/OPT-125M-sized full fine-tune: 12 layers of width 768, 50k vocabulary (~124 M values)."""
    shapes = [(50257, 768), (2048, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
                   (3072, 768), (3072,), (768, 3072), (768,)]
    return shapes + [(768,), (768,)]


def tiny_shapes(count: int = 2000) -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(1, 4097, (count,), generator=generator)]


SETS = {
    "lora8b": (lora_8b_shapes, torch.float32),
    "full125m": (full_125m_shapes, torch.float32),
    "tiny2000": (tiny_shapes, torch.float32),
    "lora8b-bf16": (lora_8b_shapes, torch.bfloat16),
    "tiny32": (lambda: tiny_shapes(32), torch.float32),  # the GPU script's CPU smoke run: every path, in a blink
}


def make_params(shapes, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        param.grad = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
        params.append(param)
    return params


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def methods_for(shapes, dtype, device) -> dict[str, Callable[[], None]]:
    """Each method owns its own parameter copy so none reads another's (cache-warm) data."""
    methods = {}
    torch_foreach = make_params(shapes, dtype, device)
    methods["torch foreach"] = lambda: torch.nn.utils.clip_grad_norm_(torch_foreach, MAX_NORM, foreach=True)
    torch_loop = make_params(shapes, dtype, device)
    methods["torch foreach=False"] = lambda: torch.nn.utils.clip_grad_norm_(torch_loop, MAX_NORM, foreach=False)
    compat = make_params(shapes, dtype, device)
    methods["ftclip compat"] = lambda: clip_grad_norm_(compat, MAX_NORM)

    config = GradientClipping(mode="norm", max_norm=MAX_NORM)
    flat_params = make_params(shapes, dtype, device)
    grads = [p.grad.clone() for p in flat_params]
    flat = GradientClipper(config, flat_params)  # no optimizer: the scale is one multiply per buffer
    for param, grad in zip(flat_params, grads):
        param.grad.copy_(grad)
    methods["ftclip flat"] = lambda: flat.clip()

    # Folded: the fused AdamW applies the scale; its cost is (clip + step) - (step alone).
    fold_params = make_params(shapes, dtype, device)
    fold_grads = [p.grad.clone() for p in fold_params]
    fold_optimizer = torch.optim.AdamW(fold_params, lr=1e-6, fused=True)
    folded = GradientClipper(config, fold_params, fold_optimizer)
    for param, grad in zip(fold_params, fold_grads):
        param.grad.copy_(grad)
    fold_optimizer.step()  # create the optimizer state outside the timing
    methods["_step+fold"] = lambda: (folded.clip(), fold_optimizer.step())
    methods["ftclip clip() call, folded"] = lambda: folded.clip()  # norm + coefficient; the scale is left to the step

    plain_params = make_params(shapes, dtype, device)
    plain_optimizer = torch.optim.AdamW(plain_params, lr=1e-6, fused=True)
    plain_optimizer.step()
    methods["_step alone"] = lambda: plain_optimizer.step()

    buffers = flat.flat_grads.buffers
    methods["floor (dot)"] = lambda: [torch.dot(b, b) for b in buffers]
    methods["floor (norm)"] = lambda: [torch.linalg.vector_norm(b) for b in buffers]
    return methods


def measure(methods: dict[str, Callable[[], None]], reps: int, device: str) -> dict[str, float]:
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        methods[name]()
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            synchronize(device)
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                methods[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def launches(method: Callable[[], None], device: str) -> int:
    """Device kernels (and copies/memsets) one call launches on CUDA; top-level aten ops on the CPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as profiler:
        method()
        synchronize(device)
    events = profiler.events()
    if device == "cuda":
        return sum(1 for event in events if event.device_type == DeviceType.CUDA)
    return sum(1 for event in events if event.cpu_parent is None and event.name.startswith("aten::"))


def syncs_with_host(method: Callable[[], None], device: str) -> bool | None:
    """True if one call makes the host wait for the device (CUDA); None where that cannot be checked."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        method()
    except RuntimeError as error:
        if "synchroniz" not in str(error):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return False


ORDER = ["torch foreach", "torch foreach=False", "ftclip compat", "ftclip flat", "ftclip flat+folded",
         "ftclip clip() call, folded", "floor (dot)", "floor (norm)"]
# The derived row's cost is measured as (clip + fused step) - (step alone); its launches and syncs are those
# of the whole clip + step call.
PROFILED_AS = {"ftclip flat+folded": "_step+fold"}


def run_set(name: str, reps: int, device: str, profile: bool = False) -> tuple[list[str], dict]:
    """The set's table rows, and the same numbers as a dict (for --json)."""
    shape_fn, dtype = SETS[name]
    shapes = shape_fn()
    values = sum(torch.Size(s).numel() for s in shapes)
    methods = methods_for(shapes, dtype, device)
    medians = measure(methods, reps, device)
    counts = {method: launches(methods[PROFILED_AS.get(method, method)], device) for method in ORDER} if profile else {}
    syncs = {method: syncs_with_host(methods[PROFILED_AS.get(method, method)], device) for method in ORDER} if profile else {}
    medians["ftclip flat+folded"] = max(medians.pop("_step+fold") - medians.pop("_step alone"), 0.0)
    reference = medians["torch foreach"]
    floor = min(medians["floor (dot)"], medians["floor (norm)"])
    gigabytes = values * torch.tensor([], dtype=dtype).element_size() / 1e9
    result = {"tensors": len(shapes), "values": values, "dtype": str(dtype).removeprefix("torch."), "device": device,
              "reps": reps, "floor_ms": floor, "profiled": profile, "methods": {}}
    for method in ORDER:
        ms = medians[method]
        result["methods"][method] = {"ms": ms, "x_torch": reference / ms if ms > 0 else None, "x_floor": ms / floor,
                                     "gb_per_s": gigabytes / (ms / 1e3) if ms > 0 else None,
                                     "launches": counts.get(method), "host_sync": syncs.get(method)}
    return format_set(name, result), result


def format_set(name: str, result: dict) -> list[str]:
    """The table of one set, from run_set's dict (also how the GPU run renders its saved JSON)."""
    device = result["device"]
    rows = [f"\n{name}: {result['tensors']} tensors, {result['values'] / 1e6:.1f} M values, torch.{result['dtype']}, "
            f"{device}, median of {result['reps']}"]
    header = f"| {'method':<26} | {'ms':>8} | {'× torch':>8} | {'× floor':>8} | {'GB/s read':>9} |"
    rule = f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 11}|"
    if result["profiled"]:
        header += f" {'kernels' if device == 'cuda' else 'aten ops':>8} | {'host sync':>9} |"
        rule += f"{'-' * 10}|{'-' * 11}|"
    rows += [header, rule]
    for method, entry in result["methods"].items():
        speedup = f"{entry['x_torch']:8.2f}" if entry["x_torch"] else "       -"
        read = f"{entry['gb_per_s']:9.1f}" if entry["gb_per_s"] else "        -"
        row = f"| {method:<26} | {entry['ms']:8.3f} | {speedup} | {entry['x_floor']:8.2f} | {read} |"
        if result["profiled"]:
            sync = {True: "SYNC", False: "none", None: "n/a"}[entry["host_sync"]]
            row += f" {entry['launches']:>8} | {sync:>9} |"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--sets", default="lora8b,full125m,tiny2000,lora8b-bf16")
    parser.add_argument("--profile", action="store_true", help="count launches and check host syncs (on with CUDA)")
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    args = parser.parse_args()
    card = torch.cuda.get_device_name() if args.device == "cuda" else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}"
          + (f" ({card})" if card else ""))
    print("× torch: torch foreach time / method time (higher is faster); × floor: method time / one read pass")
    results = {"device": args.device, "card": card, "torch": torch.__version__, "sets": {}}
    for name in args.sets.split(","):
        rows, results["sets"][name] = run_set(name, args.reps, args.device, args.profile or args.device == "cuda")
        print("\n".join(rows), flush=True)
        if args.json:  # written after each set, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
