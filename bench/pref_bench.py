"""Preference-training benchmark: ftclip's DPO against TRL's DPOTrainer + peft on the same model, pairs and
settings, and ftclip's LoRA DPO against ftclip's LoRA SFT on the same model (the cost of the reference forward).

    python bench/pref_bench.py [--steps 30] [--device cpu|cuda] [--keep DIR]
    python bench/pref_bench.py --small --steps 4        # a smoke run in seconds (tiny shapes: no numbers to report)

The model is step_bench.py's: a 4-layer Llama built from LlamaConfig with Llama 3's 128,256-token vocabulary, saved
once and loaded by every side through from_pretrained, with the quickstart's tokenizer. Data: 400 preference pairs
in TRL's standard layout ({prompt, chosen, rejected} text), prompts of ~20 to ~200 tokens and answers of ~40 to ~400,
so prompt + answer stays within sequence 1024. Each side tokenizes the pairs its own way; TRL 1.16's rules are the ones
ftclip follows (tests/test_preference_trl.py checks the ids are equal), so both train on the same token ids.

Settings for every side: LoRA r16/alpha 32 on all linear layers (no dropout), β 0.1, sigmoid loss, sequence 1024
(TRL's max_length), 4 pairs per micro-batch (8 sequences per forward), no accumulation, fused AdamW at a constant 2e-4,
gradient clipping at norm 1.0, sdpa attention, fp32 on the CPU (bf16 on CUDA), no gradient checkpointing, no logging
or saving during the timed steps, references from the same weights with the adapter disabled (TRL's default with a
peft config, ftclip's with LoRA). Each side leaves everything else at its defaults (ftclip: chunked log-probs; TRL:
full logits). The SFT side trains ftclip's causal-LM loss on the same sequences (each pair's prompt + chosen and
prompt + rejected as two alpaca-style examples, prompt masked), 8 per micro-batch: the same forward shapes, without
the reference forward.

Every side runs in its own subprocess, one after the other. Reported: tokens/s over the timed steps (every token the
policy reads, prompt included, padding excluded; step 1 is warm-up, the last step is not timed), the process's peak
RSS (getrusage ru_maxrss) and peak CUDA memory on a GPU. Run it on a quiet machine: its numbers are ratios measured
side by side, and other jobs on the cores skew them.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_bench  # noqa: E402  (the model, the step clock and the worker plumbing)

REPO = step_bench.REPO
PAIRS = 400
MICRO_BATCH = 4  # pairs: 8 sequences per forward
BETA = 0.1
WORDS = step_bench.WORDS


def shapes(small: bool) -> dict:
    return {"vocab": 1024, "sequence_len": 128, "pairs": 40, "scale": 0.1} if small else \
        {"vocab": step_bench.VOCAB, "sequence_len": step_bench.SEQUENCE_LEN, "pairs": PAIRS, "scale": 1.0}


def build_assets(folder: Path, small: bool, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = shapes(small)
    model_dir = folder / "llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (step_bench.QUICKSTART_TOKENIZER / name).exists():
            shutil.copy(step_bench.QUICKSTART_TOKENIZER / name, model_dir / name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=shape["sequence_len"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        count = max(2, int(rng.randint(low, high) * shape["scale"]))
        return " ".join(rng.choice(WORDS) for _ in range(count))

    pairs, alpaca = [], []
    for index in range(shape["pairs"]):
        # ~1.3 tokens per word: prompts ~20-200 tokens, answers ~40-400; prompt + answer within the sequence.
        prompt = f"Passage {index}: {text(15, 150)}\nContinue it:"
        chosen, rejected = " " + text(30, 300), " " + text(30, 300)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        alpaca += [{"instruction": prompt, "output": answer} for answer in (chosen, rejected)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    (folder / "sft.jsonl").write_text("".join(json.dumps(record) + "\n" for record in alpaca))
    (folder / "shape.json").write_text(json.dumps(shape))


def write_recipe(folder: Path, side: str, steps: int, device: str) -> Path:
    import yaml

    shape = json.loads((folder / "shape.json").read_text())
    sft = side == "ftclip-sft"
    recipe = {
        "base_model": str(folder / "llama"), "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
        "datasets": [{"path": str(folder / ("sft.jsonl" if sft else "pairs.jsonl")), "type": "alpaca" if sft else "preference"}],
        "sequence_len": shape["sequence_len"], "micro_batch_size": 2 * MICRO_BATCH if sft else MICRO_BATCH,
        "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 2e-4, "optimizer": "adamw_torch_fused",
        "lr_scheduler": "constant", "gradient_clipping": 1.0, "attn_implementation": "sdpa", "logging_steps": steps,
        "device": device, "bf16": device == "cuda", "output_dir": str(folder / f"out-{side}"),
        "dataset_cache_dir": str(folder / "token-cache"),
    }
    if not sft:
        recipe.update(rl="dpo", rl_beta=BETA)
    path = folder / f"recipe-{side}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_ftclip(recipe_path: Path, clock: step_bench.StepClock) -> None:
    from rich.console import Console

    import ftclip.train as ftclip_train
    from ftclip.objectives import objective_for
    from ftclip.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    objective = objective_for(recipe)
    real = ftclip_train.forward_backward

    def timed(model, group, *args, **kwargs):
        clock.starts.append(time.perf_counter())
        clock.tokens.append(sum(objective.batch_tokens(batch) for batch in group))
        return real(model, group, *args, **kwargs)

    ftclip_train.forward_backward = timed
    ftclip_train.train(recipe, Console(quiet=True), resume=False)


def run_trl(recipe_path: Path, clock: step_bench.StepClock, device: str) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from ftclip.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = AutoTokenizer.from_pretrained(recipe.base_model)
    dataset = load_dataset("json", data_files=recipe.datasets[0].path, split="train")

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.starts.append(time.perf_counter())

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(recipe.base_model, dtype=dtype, attn_implementation="sdpa")
    arguments = DPOConfig(
        output_dir=str(Path(recipe.output_dir).with_name("out-trl-dpo")), per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=1, max_steps=recipe.max_steps, learning_rate=2e-4, lr_scheduler_type="constant",
        optim="adamw_torch_fused", max_grad_norm=1.0, logging_steps=recipe.max_steps, save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=device == "cpu", bf16=device == "cuda", seed=recipe.seed,
        disable_tqdm=True, beta=BETA, max_length=recipe.sequence_len,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[Clock()])
    collate = trainer.data_collator
    batch_tokens: list[int] = []

    def counting(examples):
        batch = collate(examples)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    trainer.train()
    clock.tokens.extend(batch_tokens[: len(clock.starts)])  # batch i is step i's


def worker(side: str, recipe_path: Path, device: str) -> None:
    started = time.perf_counter()
    clock = step_bench.StepClock()
    if side == "trl-dpo":
        run_trl(recipe_path, clock, device)
    else:
        run_ftclip(recipe_path, clock)
    result = {
        "side": side, "tokens_per_s": clock.tokens_per_s(), "timed_steps": len(clock.timed()),
        "timed_tokens": sum(clock.tokens[i] for i in clock.timed()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "process_s": time.perf_counter() - started,
    }
    if device == "cuda":
        import torch

        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["card"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(result), flush=True)


def run_one(side: str, recipe_path: Path, device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, __file__, "--worker", side, "--recipe", str(recipe_path), "--device", device],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{side} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def table(results: dict) -> str:
    ours, trl, sft = results["ftclip-dpo"], results["trl-dpo"], results["ftclip-sft"]
    memory = "peak_cuda_mb" if "peak_cuda_mb" in ours else "peak_rss_mb"
    names = {"ftclip-dpo": "ftclip DPO (LoRA)", "trl-dpo": "TRL DPOTrainer + peft", "ftclip-sft": "ftclip SFT (LoRA)"}
    rows = ["| side | tokens/s | peak RSS MB | peak CUDA MB | process s | timed steps |",
            "|---|---:|---:|---:|---:|---:|"]
    for side, result in results.items():
        rows.append(f"| {names[side]} | {result['tokens_per_s']:,.0f} | {result['peak_rss_mb']:,.0f} | "
                    f"{result.get('peak_cuda_mb', float('nan')):,.0f} | {result['process_s']:.1f} | {result['timed_steps']} |")
    rows += ["", "| ratio | value | target |", "|---|---:|---:|",
             f"| ftclip / TRL tokens/s | {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}× | ≥ 1.5× |",
             f"| ftclip / TRL peak memory ({memory}) | {ours[memory] / trl[memory]:.2f}× | ≤ 0.6× |",
             f"| ftclip DPO / ftclip SFT peak memory ({memory}) | {ours[memory] / sft[memory]:.2f}× | ≤ 1.15× |"]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (1,024 vocabulary, sequence 128): a smoke run")
    parser.add_argument("--keep", type=Path, help="build the assets here and keep them (default: a temp folder)")
    parser.add_argument("--worker", choices=["ftclip-dpo", "trl-dpo", "ftclip-sft"], help=argparse.SUPPRESS)
    parser.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.recipe, args.device)
        return
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a warm-up step, a timed one, and a last one, whose end holds the save)")
    import torch

    folder = args.keep or Path(tempfile.mkdtemp(prefix="ftclip-pref-bench-"))
    if not (folder / "llama" / "config.json").exists():
        build_assets(folder, args.small)
    shape = json.loads((folder / "shape.json").read_text())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {args.device}, vocabulary "
          f"{shape['vocab']:,}, sequence {shape['sequence_len']}, {MICRO_BATCH} pairs per micro-batch, {args.steps} "
          f"steps; assets in {folder}", flush=True)
    results = {}
    for side in ("ftclip-dpo", "trl-dpo", "ftclip-sft"):
        recipe_path = write_recipe(folder, side, args.steps, args.device)
        if side != "trl-dpo":  # fill ftclip's token cache first, so the timed run does not pay for tokenizing
            from ftclip.data import prepare
            from ftclip.modeling import load_tokenizer
            from ftclip.recipe import load_recipe

            recipe = load_recipe(recipe_path)
            prepare(recipe, load_tokenizer(recipe))
        results[side] = run_one(side, recipe_path, args.device)
        print(f"{side:10} {json.dumps(results[side])}", flush=True)
    print(table(results))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
