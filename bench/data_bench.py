"""Data-stage benchmark: ftclip's `prepare` against plain `datasets` on the same records, in one run.

    python bench/data_bench.py [--records 200000] [--processes 2] [--sequence-len 2048] [--first-step]

Generates N alpaca records and a 32k-vocabulary BPE tokenizer (both cached under bench/.cache), then runs each
measurement in its own fresh process (so peak RSS is that measurement's alone):
- reference: `datasets.load_dataset("json")` + `map(batched=True, num_proc)` tokenizing prompt+output text;
- ftclip cold: `ftclip.data.prepare` with an empty cache (load, tokenize with masks, write the Arrow cache);
- ftclip warm: a new process with the cache in place, timed in-process from `prepare` (tokenizer already
  loaded) to the first collated micro-batch; imports and the tokenizer load are printed beside it;
- packing: best-fit decreasing over the training examples' real lengths at --sequence-len, and over those
  lengths repeated 4× (the scaling check);
- with --first-step: `ftclip train --max-steps 1` on a tiny 32k-vocabulary Llama over the same data.
Peak RSS is the process's own maximum resident set; "workers" is the largest child process (the map workers).
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
WORDS = 6000


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(rng.randint(1, 4)))


def make_records(count: int) -> Path:
    """Alpaca-shaped records with a Zipf-like word distribution and lengths that vary ~10×."""
    path = CACHE / f"alpaca-{count}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(0)
    vocabulary = sorted({_word(rng) for _ in range(WORDS * 2)})[:WORDS]
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]

    def sentence(low: int, high: int) -> str:
        words = rng.choices(vocabulary, weights, k=rng.randint(low, high))
        return " ".join(words).capitalize() + "."

    CACHE.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    with open(staging, "w") as handle:
        for _ in range(count):
            record = {"instruction": sentence(6, 30), "input": sentence(5, 40) if rng.random() < 0.4 else "",
                      "output": " ".join(sentence(5, 25) for _ in range(rng.randint(1, 12)))}
            handle.write(json.dumps(record) + "\n")
    os.replace(staging, path)
    return path


def make_tokenizer(records: Path) -> Path:
    folder = CACHE / "bpe-32k"
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        with open(records) as handle:
            for number, line in enumerate(handle):
                if number >= 50000:
                    break
                record = json.loads(line)
                yield record["instruction"] + " " + record["input"] + " " + record["output"]

    tokenizer.train_from_iterator(texts(), trainer)
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    return folder


def make_model(tokenizer_folder: Path) -> Path:
    folder = CACHE / "llama-32k"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def peak_rss() -> dict:
    return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# ---------------------------------------------------------------- measurements, each run in a fresh process


def run_reference(args) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = datasets.load_dataset("json", data_files=str(args.data), split="train", cache_dir=str(args.work / "hf"))

    def tokenize(batch):
        texts = [i + "\n" + x + "\n" + o for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]
        return tokenizer(texts, truncation=True, max_length=args.sequence_len)

    mapped = dataset.map(tokenize, batched=True, num_proc=args.processes, remove_columns=dataset.column_names,
                         cache_file_name=str(args.work / "reference.arrow"))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "records": len(mapped), **peak_rss()}


def _recipe(args):
    from ftclip.recipe import Recipe

    return Recipe(base_model=str(args.tokenizer), datasets=[{"path": str(args.data), "type": "alpaca"}],
                  sequence_len=args.sequence_len, dataset_processes=args.processes, micro_batch_size=4,
                  dataset_cache_dir=str(args.work / "ftclip-cache"), val_set_size=0.01)


def run_cold(args) -> dict:
    import datasets

    from ftclip.data import prepare
    from ftclip.modeling import load_tokenizer

    datasets.disable_progress_bars()
    recipe = _recipe(args)
    started = time.perf_counter()
    data = prepare(recipe, load_tokenizer(recipe))
    seconds = time.perf_counter() - started
    assert not data.hit
    return {"seconds": seconds, "records": len(data.examples), "tokens": data.examples.tokens, **peak_rss()}


def run_warm(args) -> dict:
    imported = time.perf_counter()
    from ftclip.data import prepare
    from ftclip.data.batches import collate, micro_batches
    from ftclip.modeling import load_tokenizer

    recipe = _recipe(args)
    loading = time.perf_counter()
    tokenizer = load_tokenizer(recipe)  # not the data stage's cost: training loads it anyway
    started = time.perf_counter()
    data = prepare(recipe, tokenizer)
    batch = collate(next(micro_batches(data.train, recipe.micro_batch_size, recipe.seed, 0)), tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    assert data.hit and batch["input_ids"].shape[0] == recipe.micro_batch_size
    return {"seconds": seconds, "imports_seconds": loading - imported, "tokenizer_seconds": started - loading,
            **peak_rss()}


def run_packing(args) -> dict:
    import numpy as np

    from ftclip.data import prepare
    from ftclip.data.pack import pack_best_fit
    from ftclip.modeling import load_tokenizer

    recipe = _recipe(args)
    data = prepare(recipe, load_tokenizer(recipe))
    lengths = data.examples.lengths[data.train.members]
    results = {}
    for label, values in (("1x", lengths), ("4x", np.tile(lengths, 4))):
        started = time.perf_counter()
        offsets, _ = pack_best_fit(values, args.sequence_len)
        seconds = time.perf_counter() - started
        rows = len(offsets) - 1
        results[label] = {"examples": len(values), "rows": rows, "seconds": seconds,
                          "efficiency": float(values.sum()) / (rows * args.sequence_len)}
    return results


def run_first_step(args) -> dict:
    model = make_model(args.tokenizer)
    recipe = args.work / "first-step.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({
        "base_model": str(model), "adapter": "lora", "datasets": [{"path": str(args.data), "type": "alpaca"}],
        "sequence_len": args.sequence_len, "sample_packing": True, "micro_batch_size": 1, "max_steps": 1,
        "dataset_processes": args.processes, "dataset_cache_dir": str(args.work / "ftclip-cache"),
        "output_dir": str(args.work / "first-step-run"), "optimizer": "adamw_torch"}))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ftclip", "train", str(recipe)], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "returncode": done.returncode, "rss_mb": rss,
            "tail": (done.stdout + done.stderr)[-1500:]}


MEASUREMENTS = {"reference": run_reference, "cold": run_cold, "warm": run_warm, "packing": run_packing,
                "first-step": run_first_step}


def measure(name: str, args) -> dict:
    """Run one measurement in a new interpreter and read its JSON result."""
    command = [sys.executable, __file__, "--only", name, "--records", str(args.records), "--processes",
               str(args.processes), "--sequence-len", str(args.sequence_len), "--work", str(args.work)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--first-step", action="store_true", help="also time `ftclip train --max-steps 1`")
    parser.add_argument("--only", choices=sorted(MEASUREMENTS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = make_records(args.records)
    args.tokenizer = make_tokenizer(make_records(min(args.records, 200_000)))
    if args.only:
        print(json.dumps(MEASUREMENTS[args.only](args)))
        return
    args.work = CACHE / f"work-{args.records}"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    reference = measure("reference", args)
    cold = measure("cold", args)
    warm = measure("warm", args)
    packing = measure("packing", args)
    first = measure("first-step", args) if args.first_step else None
    import torch

    print(f"ftclip data bench: {args.records:,} alpaca records, 32k BPE, sequence_len {args.sequence_len}, "
          f"num_proc {args.processes}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"tokens: {cold['tokens']:,} in {cold['records']:,} examples")
    print("| measurement | seconds | peak RSS MB (workers) | vs reference | target |")
    print("|---|---|---|---|---|")
    print(f"| reference: datasets load_dataset + map(batched, num_proc={args.processes}) | {reference['seconds']:.1f} | "
          f"{reference['rss_mb']:.0f} ({reference['workers_mb']:.0f}) | 1.00× | |")
    print(f"| ftclip cold preprocess | {cold['seconds']:.1f} | {cold['rss_mb']:.0f} ({cold['workers_mb']:.0f}) | "
          f"time {cold['seconds'] / reference['seconds']:.2f}×, RSS {cold['rss_mb'] / reference['rss_mb']:.2f}× | "
          "≤ 1.2× time, ≤ 1.5× RSS |")
    print(f"| ftclip warm start: cache hit to first micro-batch | {warm['seconds']:.2f} | {warm['rss_mb']:.0f} | | "
          "≤ 2 s, ≤ 600 MB |")
    print(f"(warm process before that: imports {warm['imports_seconds']:.1f} s, tokenizer load "
          f"{warm['tokenizer_seconds']:.1f} s)")
    for label, result in packing.items():
        print(f"| packing best-fit {label}: {result['examples']:,} examples → {result['rows']:,} rows | "
              f"{result['seconds']:.2f} | | efficiency {result['efficiency']:.2%} | ≤ 10 s (1x), ≥ 95 % |")
    print(f"packing 4x / 1x time: {packing['4x']['seconds'] / packing['1x']['seconds']:.2f}× (target ≤ 4.5×)")
    if first:
        print(f"| ftclip train --max-steps 1 (cache warm from the runs above) | {first['seconds']:.1f} | "
              f"{first['rss_mb']:.0f} | exit {first['returncode']} | reaches the first step |")


if __name__ == "__main__":
    main()
