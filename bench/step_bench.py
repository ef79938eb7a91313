"""Training-step benchmark: ftclip against HF Trainer + peft on the same model, data and settings.

    python bench/step_bench.py [--steps 30] [--device cpu|cuda] [--modes padded,packed] [--keep DIR]
                               [--sequence-len 1024] [--micro-batch 4] [--json FILE]
    make bench-step

The model is a small Llama built from LlamaConfig with Llama 3's 128,256-token vocabulary (hidden size
128, 4 layers: the embedding and lm_head dominate, as the logits do in real runs), saved once and loaded by
both sides through from_pretrained. Tokenizer: the quickstart's 1,024-token BPE, its ids used unchanged as
the first 1,024 ids of the big vocabulary (the softmax still spans all 128,256 entries, which is what the
logits cost). Data: 600 alpaca records whose token lengths spread 10× (about 90 to 900 tokens), tokenized
once by ftclip's data layer so both sides train on the very same token ids and labels.

Settings for both: LoRA r16/alpha 32 on all linear layers (no dropout), sequence_len 1024, micro-batch 4,
no accumulation, fused AdamW at a constant 2e-4, gradient clipping at norm 1.0, sdpa attention, fp32 on the
CPU (bf16 on CUDA), no gradient checkpointing, no logging or saving during the timed steps. Each side
leaves everything else at its defaults (ftclip: chunked cross-entropy; HF: the full-logits loss).
(a) padded: micro-batches of 4 examples padded to their longest. (b) packed: the examples packed
best-fit-decreasing into rows of 1,024 tokens (ftclip's data stage, the same rows for both), 4 rows per
micro-batch (--sequence-len and --micro-batch change both); HF gets them as rows with restarting
position_ids (its documented packing input), ftclip as its own collate gives them.

Every (side, mode) runs in its own subprocess, one after the other. Reported per run: tokens/s over the
timed steps (real tokens, padding excluded; step 1 is warm-up and not timed), the process's peak RSS
(getrusage ru_maxrss: weights, data, activations, everything), peak CUDA memory on a GPU, and the whole
process's wall time. On CUDA each step's start is taken after a device synchronize (on both sides), so
the step times are the device's, not how far ahead the host has queued work. The shuffling differs (each
side's own sampler), so padded batches differ in composition; over the run the token totals match closely
and tokens/s accounts for them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_TOKENIZER = REPO / "recipes" / "quickstart" / "tiny-llama"
VOCAB = 128_256
SEQUENCE_LEN = 1024
MICRO_BATCH = 4
LEARNING_RATE = 2e-4
RECORDS = 600
WORDS = ("the model reads each token once and learns to predict the next one from all that came before it "
         "while the optimizer moves every adapter weight a small step against its gradient").split()


# ---------------------------------------------------------------- assets (model, tokenizer, data, recipe)


def copy_tokenizer(model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (QUICKSTART_TOKENIZER / name).exists():
            shutil.copy(QUICKSTART_TOKENIZER / name, model_dir / name)


def write_records(path: Path, records: int = RECORDS, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as data:
        for index in range(records):
            # Output lengths spread 10×: 35 to 350 words, ~90 to ~900 tokens with the prompt.
            words = rng.randint(35, 350)
            output = " ".join(rng.choice(WORDS) for _ in range(words))
            data.write(json.dumps({"instruction": f"Write passage number {index}.", "output": output}) + "\n")


def build_assets(folder: Path, seed: int = 0, vocab: int = VOCAB, sequence_len: int = SEQUENCE_LEN,
                 records: int = RECORDS) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = folder / "llama-128k"
    copy_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=sequence_len, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    write_records(folder / "data.jsonl", records, seed)


def write_recipe(folder: Path, mode: str, steps: int, device: str, sequence_len: int = SEQUENCE_LEN,
                 micro_batch: int = MICRO_BATCH, name: str | None = None, **settings) -> Path:
    """The recipe both sides read; `settings` adds or replaces keys (e.g. a quantized base for the GPU run)."""
    import yaml

    recipe = {
        "base_model": str(folder / "llama-128k"), "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "datasets": [{"path": str(folder / "data.jsonl"), "type": "alpaca"}],
        "sequence_len": sequence_len, "sample_packing": mode == "packed", "micro_batch_size": micro_batch,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": LEARNING_RATE,
        "optimizer": "adamw_torch_fused", "lr_scheduler": "constant", "gradient_clipping": 1.0,
        "attn_implementation": "sdpa", "logging_steps": steps, "device": device,
        "bf16": device == "cuda", "output_dir": str(folder / f"out-ftclip-{mode}"),
        "dataset_cache_dir": str(folder / "token-cache"),
    }
    recipe.update(settings)
    path = folder / (name or f"recipe-{mode}.yaml")
    path.write_text(yaml.safe_dump(recipe))
    return path


def tokenized_examples(recipe_path: Path):
    """The training rows as ftclip's data stage makes them (one example each, or packed best-fit decreasing
    when the recipe says so): a list of rows, each a list of (input_ids, labels) arrays."""
    from ftclip.data import prepare
    from ftclip.modeling import load_tokenizer
    from ftclip.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    data = prepare(recipe, load_tokenizer(recipe))
    return recipe, data.train.rows(range(len(data.train)))


# ---------------------------------------------------------------- the two workers (one subprocess each)


class StepClock:
    """Start time and real-token count of each optimizer step. `sync` (torch.cuda.synchronize on a GPU) runs
    before each start is taken, so a step's time is the device's and not how far ahead the host has queued."""

    def __init__(self, sync=None):
        self.starts: list[float] = []
        self.tokens: list[int] = []
        self.sync = sync

    def mark(self) -> None:
        if self.sync is not None:
            self.sync()
        self.starts.append(time.perf_counter())

    def timed(self) -> range:
        # Step i runs from starts[i] to starts[i + 1]: step 0 is warm-up, and the last step is not timed
        # either, as its end would include the run's final save.
        return range(1, len(self.starts) - 1)

    def timed_seconds(self) -> float:
        return self.starts[-1] - self.starts[1]

    def tokens_per_s(self) -> float:
        return sum(self.tokens[i] for i in self.timed()) / self.timed_seconds()


def run_ftclip(recipe_path: Path, clock: StepClock, before_step=None) -> None:
    """ftclip's own `train`, with the clock around each optimizer step. before_step(model, group) -> group, if
    given, runs first at every step (the GPU run's micro-batch search and time budget, bench/gpu/qlora_8b.py)."""
    from rich.console import Console

    import ftclip.train as ftclip_train
    from ftclip.data.batches import row_tokens
    from ftclip.recipe import load_recipe

    real = ftclip_train.forward_backward

    def timed(model, group, *args, **kwargs):
        if before_step is not None:
            group = before_step(model, group, lambda trial: real(model, trial, *args, **kwargs))
        clock.mark()
        clock.tokens.append(sum(row_tokens(batch) for batch in group))
        return real(model, group, *args, **kwargs)

    ftclip_train.forward_backward = timed
    ftclip_train.train(load_recipe(recipe_path), Console(quiet=True), resume=False)


# Hugging Face's names for ftclip's optimizers (TrainingArguments.optim).
HF_OPTIMIZERS = {"adamw_torch_fused": "adamw_torch_fused", "adamw_torch": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit",
                 "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit", "sgd": "sgd"}


def run_hf(recipe_path: Path, clock: StepClock, device: str, callbacks=()) -> None:
    """HF Trainer + peft on the recipe's settings, as a user of those libraries writes it: a 4-bit base through
    BitsAndBytesConfig and prepare_model_for_kbit_training (QLoRA), Trainer's gradient checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments

    from ftclip.data.batches import collate, row_tokens
    from ftclip.modeling import load_tokenizer

    recipe, examples = tokenized_examples(recipe_path)
    pad_id = load_tokenizer(recipe).pad_token_id
    batch_tokens: list[int] = []

    def collator(batch):
        batch_tokens.append(row_tokens(batch))
        return collate(batch, pad_id)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.mark()

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    options = {"dtype": dtype, "attn_implementation": recipe.attn_implementation}
    if recipe.load_in_4bit:
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype)
        options["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model, **options)
    model.config.use_cache = False
    checkpointing = {"use_reentrant": False}
    if recipe.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                                             lora_dropout=recipe.lora_dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    arguments = TrainingArguments(
        output_dir=str(Path(recipe.output_dir).with_name(Path(recipe.output_dir).name.replace("ftclip", "hf"))),
        per_device_train_batch_size=recipe.micro_batch_size, gradient_accumulation_steps=1, max_steps=recipe.max_steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", optim=HF_OPTIMIZERS[recipe.optimizer],
        max_grad_norm=1.0, logging_steps=recipe.max_steps, save_strategy="no", report_to=[],
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=device == "cpu", bf16=device == "cuda",
        seed=recipe.seed, disable_tqdm=True, gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs=checkpointing,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=examples, data_collator=collator,
                      callbacks=[Clock(), *callbacks])
    trainer.train()
    # The dataloader runs at most one batch ahead of the step; batch i is step i's.
    clock.tokens.extend(batch_tokens[: len(clock.starts)])


class StopEarly(Exception):
    """Raised by a before_step hook to end ftclip's run after the steps so far (the GPU run's time budget)."""


def cuda_peaks() -> dict:
    import torch

    return {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_cuda_reserved_mb": torch.cuda.max_memory_reserved() / 2**20, "card": torch.cuda.get_device_name()}


def measure(side: str, recipe_path: Path, device: str, clock: StepClock | None = None, before_step=None,
            callbacks=()) -> dict:
    """Run one side to the end and return what the tables show."""
    started = time.perf_counter()
    if clock is None:
        import torch

        clock = StepClock(torch.cuda.synchronize if device == "cuda" else None)
    if side == "ftclip":
        try:
            run_ftclip(recipe_path, clock, before_step)
        except StopEarly:
            pass
    else:
        run_hf(recipe_path, clock, device, callbacks)
    result = {
        "side": side,
        "tokens_per_s": clock.tokens_per_s(),
        "timed_steps": len(clock.timed()),
        "timed_tokens": sum(clock.tokens[i] for i in clock.timed()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_s": time.perf_counter() - started,
    }
    if device == "cuda":
        result.update(cuda_peaks())
    return result


def worker(side: str, recipe_path: Path, device: str) -> None:
    print("RESULT " + json.dumps(measure(side, recipe_path, device)), flush=True)


# ---------------------------------------------------------------- driver


def run_one(side: str, recipe_path: Path, device: str, script: Path = Path(__file__), extra: tuple = (),
            timeout: float | None = None) -> dict:
    """One side in its own process; on failure {"side", "error": the end of its stderr} instead of numbers."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, str(script), "--worker", side, "--recipe", str(recipe_path), "--device", device, *extra]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr or ""
        return {"side": side, "error": f"timed out after {timeout:.0f} s\n{stderr[-3000:]}"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"side": side, "error": f"exit {done.returncode}\n{done.stderr[-3000:]}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def table(results: dict) -> str:
    rows = ["| mode | side | tokens/s | peak RSS MB | peak CUDA MB | process s | timed steps | ftclip/HF tokens/s | "
            "ftclip/HF memory |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, pair in results.items():
        ours, theirs = pair.get("ftclip", {}), pair.get("hf", {})
        both = "error" not in ours and "error" not in theirs and ours and theirs
        memory_key = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
        for side, result in pair.items():
            name = "ftclip" if side == "ftclip" else "HF Trainer + peft"
            if "error" in result:
                rows.append(f"| {mode} | {name} | failed: {result['error'].splitlines()[0]} | | | | | | |")
                continue
            speed = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}×" if side == "ftclip" and both else ""
            memory = f"{ours[memory_key] / theirs[memory_key]:.2f}×" if side == "ftclip" and both else ""
            rows.append(f"| {mode} | {name} | "
                        f"{result['tokens_per_s']:,.0f} | {result['peak_rss_mb']:,.0f} | "
                        f"{result.get('peak_cuda_mb', float('nan')):,.0f} | {result['process_s']:.1f} | "
                        f"{result['timed_steps']} | {speed} | {memory} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--modes", default="padded,packed")
    parser.add_argument("--sequence-len", type=int, default=SEQUENCE_LEN, help="rows are packed up to this many tokens")
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH, help="examples (padded) or rows (packed) per step")
    parser.add_argument("--vocab", type=int, default=VOCAB, help="the model's vocabulary (the CPU smoke run makes it small)")
    parser.add_argument("--records", type=int, default=RECORDS, help="alpaca records to train on")
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    parser.add_argument("--keep", type=Path, help="build the assets here and keep them (default: a temp folder)")
    parser.add_argument("--worker", choices=["ftclip", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.recipe, args.device)
        return
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a warm-up step, a timed one, and a last one, whose end holds the save)")
    import torch

    folder = args.keep or Path(tempfile.mkdtemp(prefix="ftclip-step-bench-"))
    if not (folder / "llama-128k" / "config.json").exists():
        build_assets(folder, vocab=args.vocab, sequence_len=args.sequence_len, records=args.records)
    settings = (f"vocabulary {args.vocab:,}, sequence {args.sequence_len}, micro-batch {args.micro_batch}, "
                f"{args.steps} steps")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}, {settings}; "
          f"assets in {folder}", flush=True)
    results = {}
    for mode in args.modes.split(","):
        recipe_path = write_recipe(folder, mode, args.steps, args.device, args.sequence_len, args.micro_batch)
        tokenized_examples(recipe_path)  # fill ftclip's token cache first, so neither side pays for tokenizing
        results[mode] = {side: run_one(side, recipe_path, args.device) for side in ("ftclip", "hf")}
        for side, result in results[mode].items():
            print(f"{mode:7} {side:6} {json.dumps(result)}", flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "torch": torch.__version__, "vocab": args.vocab,
                                         "sequence_len": args.sequence_len, "micro_batch": args.micro_batch,
                                         "steps": args.steps, "results": results}, indent=1))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    failed = [f"{mode} {side}" for mode, pair in results.items() for side, result in pair.items() if "error" in result]
    if failed:
        sys.exit("failed: " + ", ".join(failed) + "\n" + "\n".join(
            result["error"] for pair in results.values() for result in pair.values() if "error" in result))


if __name__ == "__main__":
    main()
