"""QLoRA of a Llama-3.1-8B-shaped model: ftclip against HF Trainer + peft + bitsandbytes, on one GPU.

    python bench/gpu/qlora_8b.py [--steps 20] [--cap-gib 23] [--budget-s 190] [--json FILE]
    python bench/gpu/qlora_8b.py --device cpu --shape tiny --sequence-len 256 --steps 4 --candidates 1,2  # smoke

The model has Llama 3.1 8B's dimensions (32 layers, hidden 4,096, MLP 14,336, 32 query / 8 key-value heads,
128,256-token vocabulary, untied lm_head) and random weights: its folder holds config.json, the quickstart's
tokenizer and a RANDOM_WEIGHTS marker, no weights. In each worker `AutoModelForCausalLM.from_pretrained` of
such a folder draws the weights on the device (bf16, N(0, 0.02), norms 1; one seed, so both sides get the
same model) and hands them to transformers' own loading as a state dict, with the caller's options: the
4-bit NF4 quantization (BitsAndBytesConfig, double quantization, bf16 compute) happens in transformers and
bitsandbytes exactly as for weights read from disk. Nothing of the 16 GB passes through host memory. Every
other part of loading is the side's own: ftclip's load_model (prepare_model_for_kbit_training, peft LoRA)
and the HF script's from_pretrained + prepare_model_for_kbit_training + get_peft_model.

Settings, both sides: LoRA r16/alpha 32 on all linear layers (no dropout), packed rows of 2,048 tokens (the
step bench's 600 records, 90-900 tokens, packed by ftclip's data stage: the same rows for both), gradient
checkpointing (non-reentrant), fused AdamW at a constant 2e-4, clipping at norm 1.0, sdpa attention
(ftclip's varlen sdpa for packed rows; HF gets [B, 2048] rows with restarting position_ids), bf16.

The micro-batch is the largest that fits a 24 GB card, found by trying: ftclip's run caps the CUDA caching
allocator at --cap-gib (23 GiB: a 24 GB card less its CUDA context) with torch.cuda.set_per_process_memory_fraction,
and at its first step runs forward + backward on 1, 2, 4, ... of the step's rows (the longest first) until one
runs out of memory or leaves less room than the optimizer's state will take; then one try between the last
that fit and the first that did not. The run then trains at that micro-batch under the same cap, so an
out-of-memory error in the timed steps would fail it. HF Trainer runs at the same micro-batch without a cap
(the H200 has 141 GB): its peak says whether it would fit.

Per side: tokens/s over the timed steps (the first step, with the search, is warm-up; the device is
synchronized at each step start), peak CUDA memory allocated and reserved after the model is built, and for
ftclip the clip() call's time per step (CUDA events around GradientClipper.clip) and its share of the step.
Each side stops starting steps at its time budget (the GPU run has eight minutes for everything); the table
says how many steps were timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import step_bench  # noqa: E402  (bench/step_bench.py: assets, recipes, the two sides, the clock)

MARKER = "RANDOM_WEIGHTS"
GiB = 2**30
SHAPES = {
    # Llama 3.1 8B (meta-llama/Llama-3.1-8B's config.json); rope scaling left at its default (same arithmetic).
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128_256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-5},
    # The CPU smoke run: every code path, in seconds.
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
}


# ---------------------------------------------------------------- the model: a config, weights drawn on the device


def write_model_folder(folder: Path, shape: str) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    model_dir = folder / f"llama-{shape}-random"
    step_bench.copy_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(model_dir)
    (model_dir / MARKER).write_text("weights are drawn on the device by bench/gpu/qlora_8b.py\n")
    return model_dir


def random_state_dict(model_class, config, dtype, device, seed: int = 0) -> dict:
    import torch

    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in model_class(config).state_dict().items()}
    generator = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        state[name] = tensor.fill_(1.0) if len(shape) == 1 else tensor.normal_(0.0, 0.02, generator=generator)
    return state


def draw_weights_on_the_device(cap_bytes: int | None = None) -> None:
    """Make AutoModelForCausalLM.from_pretrained of a RANDOM_WEIGHTS folder draw its weights on the device.
    With cap_bytes (CUDA), the caching allocator is capped there once the model is built, and the peak memory
    statistics start from that point."""
    import torch
    import transformers

    original = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(source, *args, **options):
        if not (isinstance(source, (str, Path)) and (Path(source) / MARKER).is_file()):
            return original(source, *args, **options)
        config = options.pop("config", None) or transformers.AutoConfig.from_pretrained(source)
        options.pop("trust_remote_code", None)
        options.pop("revision", None)
        device = torch.device((options.get("device_map") or {}).get("", "cpu"))
        model_class = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)  # the bf16 weights (16 GB) live only during the build
        state = random_state_dict(model_class, config, options.get("dtype", torch.float32), device)
        model = model_class.from_pretrained(None, *args, config=config, state_dict=state, **options)
        del state
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            if cap_bytes:
                torch.cuda.set_per_process_memory_fraction(cap_bytes / torch.cuda.get_device_properties(device).total_memory)
            torch.cuda.reset_peak_memory_stats()
        return model

    transformers.AutoModelForCausalLM.from_pretrained = from_pretrained


def describe_model(model) -> dict:
    """What the side really trains, for the report: the 4-bit layers, LoRA's trainable values, checkpointing."""
    import bitsandbytes as bnb

    quantized = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    quant_types = sorted({module.weight.quant_type for module in quantized if hasattr(module.weight, "quant_type")})
    config = getattr(model, "config", None)
    return {"linear4bit_layers": len(quantized), "quant_type": ",".join(quant_types),
            "trainable_values": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "attention": getattr(config, "_attn_implementation", None)}


# ---------------------------------------------------------------- ftclip's side: micro-batch search, budget, clip time


class MicroBatchSearch:
    """step_bench.run_ftclip's before_step hook: at the first step, find the largest micro-batch that fits
    (see the module docstring); at every step, cut the step's rows to it; past the deadline, end the run."""

    def __init__(self, candidates: list[int], cap_bytes: int | None, deadline: float | None, clock):
        self.candidates, self.cap_bytes, self.deadline, self.clock = sorted(candidates), cap_bytes, deadline, clock
        self.micro_batch: int | None = None
        self.probe: dict[int, str] = {}
        self.model: dict = {}
        self.steps = 0

    def __call__(self, model, group, run_trial):
        if self.micro_batch is None:
            self.model = describe_model(model)
            self.micro_batch = self.search(model, group[0], run_trial)
        elif self.deadline is not None and time.time() > self.deadline and self.steps >= 3:
            self.clock.mark()  # the end of the last step run
            raise step_bench.StopEarly
        self.steps += 1
        return [batch[: self.micro_batch] for batch in group]

    def search(self, model, rows, run_trial) -> int:
        import torch

        rows = sorted(rows, key=lambda row: -sum(len(ids) for ids, _ in row))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        # Room the trials must leave: AdamW's two fp32 moments (made at the first optimizer step) and 512 MiB.
        headroom = trainable * 8 + 512 * 2**20
        fits, failed = 0, None
        for size in [c for c in self.candidates if c <= len(rows)]:
            if not self.trial(model, rows[:size], run_trial, headroom):
                failed = size
                break
            fits = size
        if failed and fits and failed - fits > 1:
            middle = (fits + failed) // 2
            if self.trial(model, rows[:middle], run_trial, headroom):
                fits = middle
        if not fits:
            raise RuntimeError(f"not even a micro-batch of 1 row fits under the cap: {self.probe}")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the timed run's peak, not the trials'
        return fits

    def trial(self, model, rows, run_trial, headroom: int) -> bool:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            run_trial([rows])
            ok = True
        except torch.cuda.OutOfMemoryError:
            ok = False
        finally:
            model.zero_grad(set_to_none=False)  # in place: the clipper's flat gradient views stay
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if not cuda:
            self.probe[len(rows)] = "ran"
            return ok
        if not ok:
            self.probe[len(rows)] = "out of memory"
            return False
        peak = torch.cuda.max_memory_reserved()
        ok = self.cap_bytes is None or peak + headroom <= self.cap_bytes
        self.probe[len(rows)] = f"{peak / GiB:.1f} GiB" + ("" if ok else " (too little room left)")
        return ok


def time_the_clip(cuda: bool):
    """Time every GradientClipper.clip() call (CUDA events: no sync added); returns a function giving the
    milliseconds of each call."""
    import torch

    from ftclip.clip import GradientClipper

    real = GradientClipper.clip
    spans = []

    def clip(self):
        if not cuda:
            started = time.perf_counter()
            outcome = real(self)
            spans.append((time.perf_counter() - started) * 1e3)
            return outcome
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        outcome = real(self)
        end.record()
        spans.append((start, end))
        return outcome

    GradientClipper.clip = clip

    def milliseconds() -> list[float]:
        if cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in spans]
        return list(spans)

    return milliseconds


def hf_budget(deadline: float | None, facts: dict):
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            facts.update(describe_model(model))

        def on_step_end(self, args, state, control, **kwargs):
            if deadline is not None and time.time() > deadline and state.global_step >= 3:
                control.should_training_stop = True

    return Budget()


def worker(side: str, recipe_path: Path, device: str, cap_gib: float | None, deadline: float | None,
           candidates: list[int]) -> dict:
    import torch

    cuda = device == "cuda"
    cap_bytes = int(cap_gib * GiB) if cap_gib and cuda and side == "ftclip" else None
    draw_weights_on_the_device(cap_bytes)
    clock = step_bench.StepClock(torch.cuda.synchronize if cuda else None)
    if side == "hf":
        from ftclip.recipe import load_recipe

        facts = {}
        result = step_bench.measure("hf", recipe_path, device, clock, callbacks=[hf_budget(deadline, facts)])
        result.update(micro_batch=load_recipe(recipe_path).micro_batch_size, model=facts)
        return result
    search = MicroBatchSearch(candidates, cap_bytes, deadline, clock)
    clip_milliseconds = time_the_clip(cuda)
    result = step_bench.measure("ftclip", recipe_path, device, clock, before_step=search)
    timed = list(clock.timed())
    clip = clip_milliseconds()
    clip_ms = sum(clip[i] for i in timed) / len(timed)
    step_ms = clock.timed_seconds() * 1e3 / len(timed)
    result.update(micro_batch=search.micro_batch, probe=search.probe, model=search.model, cap_gib=cap_gib if cap_bytes else None,
                  clip_ms_per_step=clip_ms, step_ms=step_ms, clip_share=clip_ms / step_ms)
    return result


# ---------------------------------------------------------------- driver


def table(results: dict, cap_gib: float) -> str:
    rows = ["| side | micro-batch | tokens/s | peak CUDA GiB | peak reserved GiB | fits 24 GB | timed steps | "
            "clip() ms/step | clip share | ftclip/HF tokens/s | ftclip/HF memory |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    ours, theirs = results.get("ftclip", {}), results.get("hf", {})
    both = ours and theirs and "error" not in ours and "error" not in theirs
    for side, result in results.items():
        name = "ftclip" if side == "ftclip" else "HF Trainer + peft + bitsandbytes"
        if "error" in result:
            rows.append(f"| {name} | failed: {result['error'].splitlines()[0]} | | | | | | | | | |")
            continue
        peak = result.get("peak_cuda_mb", float("nan")) / 1024
        reserved = result.get("peak_cuda_reserved_mb", float("nan")) / 1024
        fits = ("yes" if reserved <= cap_gib else "no") if reserved == reserved else "n/a"
        clip = (f"{result['clip_ms_per_step']:.3f} | {result['clip_share']:.3%}" if "clip_share" in result else " | ")
        ratios = " | "
        if side == "ftclip" and both:
            memory_key = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
            ratios = (f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× | "
                      f"{ours[memory_key] / theirs[memory_key]:.2f}×")
        rows.append(f"| {name} | {result['micro_batch']} | {result['tokens_per_s']:,.0f} | {peak:.1f} | {reserved:.1f} | "
                    f"{fits} | {result['timed_steps']} | {clip} | {ratios} |")
    for side, result in results.items():
        model = result.get("model")
        if model:
            rows.append(f"\n{side}: {model['linear4bit_layers']} 4-bit linear layers ({model['quant_type']}), "
                        f"{model['trainable_values']:,} trainable values, gradient checkpointing "
                        f"{'on' if model['gradient_checkpointing'] else 'off'}, attention {model['attention']}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--shape", choices=list(SHAPES), default="8b")
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--candidates", default="1,2,4,8,16,32", help="micro-batches to try, ascending")
    parser.add_argument("--cap-gib", type=float, default=23.0, help="CUDA allocator cap for ftclip's run (a 24 GB card)")
    parser.add_argument("--records", type=int, default=step_bench.RECORDS, help="alpaca records to pack into rows")
    parser.add_argument("--budget-s", type=float, default=0, help="wall-clock budget for both sides (0: none)")
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    parser.add_argument("--keep", type=Path, help="build the assets here and keep them (default: a temp folder)")
    parser.add_argument("--worker", choices=["ftclip", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    candidates = [int(size) for size in args.candidates.split(",")]
    if args.worker:
        result = worker(args.worker, args.recipe, args.device, args.cap_gib, args.deadline, candidates)
        print("RESULT " + json.dumps(result), flush=True)
        return
    started = time.time()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="ftclip-qlora-8b-"))
    model_dir = write_model_folder(folder, args.shape)
    step_bench.write_records(folder / "data.jsonl", args.records)
    settings = {"base_model": str(model_dir), "adapter": "qlora", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True, "gradient_checkpointing": True}
    recipe = step_bench.write_recipe(folder, "packed", args.steps, args.device, args.sequence_len, max(candidates),
                                     name="recipe-ftclip.yaml", **settings)
    step_bench.tokenized_examples(recipe)  # fill the token cache: neither side pays for tokenizing
    print(f"QLoRA {args.shape}: sequence {args.sequence_len}, {args.steps} steps, device {args.device}, "
          f"assets in {folder}", flush=True)

    def left() -> float | None:
        return args.budget_s - (time.time() - started) if args.budget_s else None

    results = {}
    # ftclip first (it finds the micro-batch); just over half of what is left, as it also runs the search.
    share = left() * 0.55 if args.budget_s else None
    extra = ["--cap-gib", str(args.cap_gib), "--candidates", args.candidates]
    if share:
        extra += ["--deadline", str(time.time() + share - 20)]  # 20 s for the last step, the save and the exit
    results["ftclip"] = step_bench.run_one("ftclip", recipe, args.device, Path(__file__), tuple(extra), share)
    print(f"ftclip {json.dumps(results['ftclip'])}", flush=True)
    micro_batch = results["ftclip"].get("micro_batch") or max(1, max(candidates) // 8)
    recipe_hf = step_bench.write_recipe(folder, "packed", args.steps, args.device, args.sequence_len, micro_batch,
                                        name="recipe-hf.yaml", **settings)
    share = left() - 5 if args.budget_s else None
    extra = ["--candidates", args.candidates] + (["--deadline", str(time.time() + share - 20)] if share else [])
    if share is not None and share < 30:
        results["hf"] = {"side": "hf", "error": f"skipped: {share:.0f} s of the budget left"}
    else:
        results["hf"] = step_bench.run_one("hf", recipe_hf, args.device, Path(__file__), tuple(extra), share)
    print(f"hf     {json.dumps(results['hf'])}", flush=True)
    print(table(results, args.cap_gib))
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "config": SHAPES[args.shape], "device": args.device,
                                         "sequence_len": args.sequence_len, "steps": args.steps,
                                         "cap_gib": args.cap_gib, "results": results}, indent=1))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    failed = [side for side, result in results.items() if "error" in result]
    if failed:
        sys.exit("failed: " + ", ".join(failed) + "\n" + "\n".join(results[side]["error"] for side in failed))


if __name__ == "__main__":
    main()
