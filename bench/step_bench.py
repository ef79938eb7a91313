"""Training-step benchmark: ftclip against HF Trainer + peft on the same model, data and settings.

    python bench/step_bench.py [--steps 30] [--device cpu|cuda] [--modes padded,packed] [--keep DIR]
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
micro-batch; HF gets them as rows with restarting position_ids (its documented packing input), ftclip as
its own collate gives them.

Every (side, mode) runs in its own subprocess, one after the other. Reported per run: tokens/s over the
timed steps (real tokens, padding excluded; step 1 is warm-up and not timed), the process's peak RSS
(getrusage ru_maxrss: weights, data, activations, everything), peak CUDA memory on a GPU, and the whole
process's wall time. The shuffling differs (each side's own sampler), so padded batches differ in
composition; over the run the token totals match closely and tokens/s accounts for them.
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


def build_assets(folder: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = folder / "llama-128k"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (QUICKSTART_TOKENIZER / name).exists():
            shutil.copy(QUICKSTART_TOKENIZER / name, model_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQUENCE_LEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)
    with (folder / "data.jsonl").open("w") as data:
        for index in range(RECORDS):
            # Output lengths spread 10×: 35 to 350 words, ~90 to ~900 tokens with the prompt.
            words = rng.randint(35, 350)
            output = " ".join(rng.choice(WORDS) for _ in range(words))
            data.write(json.dumps({"instruction": f"Write passage number {index}.", "output": output}) + "\n")


def write_recipe(folder: Path, mode: str, steps: int, device: str) -> Path:
    import yaml

    recipe = {
        "base_model": str(folder / "llama-128k"), "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "lora_target_modules": "all-linear",
        "datasets": [{"path": str(folder / "data.jsonl"), "type": "alpaca"}],
        "sequence_len": SEQUENCE_LEN, "sample_packing": mode == "packed", "micro_batch_size": MICRO_BATCH,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": LEARNING_RATE,
        "optimizer": "adamw_torch_fused", "lr_scheduler": "constant", "gradient_clipping": 1.0,
        "attn_implementation": "sdpa", "logging_steps": steps, "device": device,
        "bf16": device == "cuda", "output_dir": str(folder / f"out-ftclip-{mode}"),
        "dataset_cache_dir": str(folder / "token-cache"),
    }
    path = folder / f"recipe-{mode}.yaml"
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
    """Start time and real-token count of each optimizer step."""

    def __init__(self):
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def timed(self) -> range:
        # Step i runs from starts[i] to starts[i + 1]: step 0 is warm-up, and the last step is not timed
        # either, as its end would include the run's final save.
        return range(1, len(self.starts) - 1)

    def tokens_per_s(self) -> float:
        return sum(self.tokens[i] for i in self.timed()) / (self.starts[-1] - self.starts[1])


def run_ftclip(recipe_path: Path, clock: StepClock) -> None:
    from rich.console import Console

    import ftclip.train as ftclip_train
    from ftclip.data.batches import row_tokens
    from ftclip.recipe import load_recipe

    real = ftclip_train.forward_backward

    def timed(model, group, *args, **kwargs):
        clock.starts.append(time.perf_counter())
        clock.tokens.append(sum(row_tokens(batch) for batch in group))
        return real(model, group, *args, **kwargs)

    ftclip_train.forward_backward = timed
    ftclip_train.train(load_recipe(recipe_path), Console(quiet=True), resume=False)


def run_hf(recipe_path: Path, clock: StepClock, device: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

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
            clock.starts.append(time.perf_counter())

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    arguments = TrainingArguments(
        output_dir=str(Path(recipe.output_dir).with_name(Path(recipe.output_dir).name.replace("ftclip", "hf"))),
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=1, max_steps=recipe.max_steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", optim="adamw_torch_fused", max_grad_norm=1.0,
        logging_steps=recipe.max_steps, save_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=device == "cpu", bf16=device == "cuda", seed=recipe.seed,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=examples, data_collator=collator,
                      callbacks=[Clock()])
    trainer.train()
    # The dataloader runs at most one batch ahead of the step; batch i is step i's.
    clock.tokens.extend(batch_tokens[: len(clock.starts)])


def worker(side: str, recipe_path: Path, device: str) -> None:
    started = time.perf_counter()
    clock = StepClock()
    if side == "ftclip":
        run_ftclip(recipe_path, clock)
    else:
        run_hf(recipe_path, clock, device)
    result = {
        "side": side,
        "tokens_per_s": clock.tokens_per_s(),
        "timed_steps": len(clock.timed()),
        "timed_tokens": sum(clock.tokens[i] for i in clock.timed()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_s": time.perf_counter() - started,
    }
    if device == "cuda":
        import torch

        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["card"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- driver


def run_one(side: str, recipe_path: Path, device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__, "--worker", side, "--recipe", str(recipe_path), "--device", device],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} on {recipe_path.name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def table(results: dict) -> str:
    rows = ["| mode | side | tokens/s | peak RSS MB | peak CUDA MB | process s | timed steps | ftclip/HF tokens/s | "
            "ftclip/HF memory |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, pair in results.items():
        ours, theirs = pair["ftclip"], pair["hf"]
        memory_key = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
        for side, result in pair.items():
            speed = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}×" if side == "ftclip" else ""
            memory = f"{ours[memory_key] / theirs[memory_key]:.2f}×" if side == "ftclip" else ""
            rows.append(f"| {mode} | {'ftclip' if side == 'ftclip' else 'HF Trainer + peft'} | "
                        f"{result['tokens_per_s']:,.0f} | {result['peak_rss_mb']:,.0f} | "
                        f"{result.get('peak_cuda_mb', float('nan')):,.0f} | {result['process_s']:.1f} | "
                        f"{result['timed_steps']} | {speed} | {memory} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--modes", default="padded,packed")
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
        build_assets(folder)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}, "
          f"vocabulary {VOCAB:,}, sequence {SEQUENCE_LEN}, micro-batch {MICRO_BATCH}, {args.steps} steps; assets in {folder}",
          flush=True)
    results = {}
    for mode in args.modes.split(","):
        recipe_path = write_recipe(folder, mode, args.steps, args.device)
        tokenized_examples(recipe_path)  # fill ftclip's token cache first, so neither side pays for tokenizing
        results[mode] = {side: run_one(side, recipe_path, args.device) for side in ("ftclip", "hf")}
        for side, result in results[mode].items():
            print(f"{mode:7} {side:6} {json.dumps(result)}", flush=True)
    print(table(results))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
