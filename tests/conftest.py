"""Shared fixtures: tiny Llama models built from a config and saved to a temp dir, so every test loads
them through the same `from_pretrained` path real users hit. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test workers share the machine's cores: one thread each (OpenMP threads spinning on cores another worker holds
    # slow both many times over); the processes the tests start inherit it.
    os.environ["OMP_NUM_THREADS"] = "1"
    # xdist gives its workers COLUMNS=80, which fixes the width of consoles made at import (ftclip.cli's): long
    # temporary paths then wrap mid-line. Without it a worker behaves as a plain pytest run does.
    os.environ.pop("COLUMNS", None)

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_MODEL = REPO / "recipes" / "quickstart" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session", autouse=True)
def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialized 2-layer Llama with the quickstart's tokenizer (and its chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    for name in TOKENIZER_FILES:
        shutil.copy(QUICKSTART_MODEL / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


ALPACA = [
    {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Count from 3 to 6.", "output": "3, 4, 5, 6"},
    {"instruction": "Write the plural of the word.", "input": "mouse", "output": "mice"},
    {"instruction": "Translate the color into French.", "input": "red", "output": "rouge"},
    {"instruction": "What is the capital of Japan?", "output": "The capital of Japan is Tokyo."},
    {"instruction": "Give the opposite of the word.", "input": "big", "output": "small"},
    {"instruction": "Count from 10 to 14.", "output": "10, 11, 12, 13, 14"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)


def write_recipe(folder: Path, model_dir: Path, data_file: Path, name: str = "recipe.yaml", **overrides) -> Path:
    """A recipe for the tiny model (overrides merged in), written to folder/name."""
    recipe = {
        "base_model": str(model_dir),
        "adapter": "lora",
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "datasets": [{"path": str(data_file), "type": "alpaca"}],
        "sequence_len": 128,
        "micro_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "output_dir": str(folder / "out"),
        "logging_steps": 1,
        "dataset_cache_dir": str(folder / "token-cache"),
    }
    recipe.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def make_recipe(tmp_path, tiny_model_dir, alpaca_file):
    """Write a recipe for the tiny model (overrides merged in) and return its path."""

    def make(name: str = "recipe.yaml", **overrides) -> Path:
        return write_recipe(tmp_path, tiny_model_dir, alpaca_file, name, **overrides)

    return make
