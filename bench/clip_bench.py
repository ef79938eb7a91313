"""Clip-step benchmark: ftclip's clip paths against torch's, interleaved in one process.

    python bench/clip_bench.py [--device cpu|cuda] [--reps 21] [--sets lora8b,full125m,tiny2000,lora8b-bf16]

Each method gets its own copy of the gradient set; every repetition runs all methods once, in rotating
order, and the table shows medians. Ratios are torch foreach time / method time (higher is faster);
"floor" is one `dot` read pass over the same values in one contiguous buffer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

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


def tiny_2000_shapes() -> list[tuple[int, ...]]:
    generator = torch.Generator().manual_seed(0)
    return [(int(n),) for n in torch.randint(1, 4097, (2000,), generator=generator)]


SETS = {
    "lora8b": (lora_8b_shapes, torch.float32),
    "full125m": (full_125m_shapes, torch.float32),
    "tiny2000": (tiny_2000_shapes, torch.float32),
    "lora8b-bf16": (lora_8b_shapes, torch.bfloat16),
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
            start = time.perf_counter()
            methods[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def run_set(name: str, reps: int, device: str) -> list[str]:
    shape_fn, dtype = SETS[name]
    shapes = shape_fn()
    values = sum(torch.Size(s).numel() for s in shapes)
    medians = measure(methods_for(shapes, dtype, device), reps, device)
    medians["ftclip flat+folded"] = max(medians.pop("_step+fold") - medians.pop("_step alone"), 0.0)
    reference = medians["torch foreach"]
    floor = medians["floor (dot)"]
    gigabytes = values * torch.tensor([], dtype=dtype).element_size() / 1e9
    rows = [f"\n{name}: {len(shapes)} tensors, {values / 1e6:.1f} M values, {dtype}, {device}, median of {reps}"]
    rows.append(f"| {'method':<26} | {'ms':>8} | {'× torch':>8} | {'× floor':>8} | {'GB/s read':>9} |")
    rows.append(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    order = ["torch foreach", "torch foreach=False", "ftclip compat", "ftclip flat", "ftclip flat+folded",
             "ftclip clip() call, folded", "floor (dot)"]
    for method in order:
        ms = medians[method]
        speedup = f"{reference / ms:8.2f}" if ms > 0 else "       -"
        rows.append(f"| {method:<26} | {ms:8.2f} | {speedup} | {ms / floor:8.2f} | {gigabytes / (ms / 1e3):9.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print("× torch: torch foreach time / method time (higher is faster); × floor: method time / one dot pass")
    for name in args.sets.split(","):
        print("\n".join(run_set(name, args.reps, args.device)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
