"""`ftclip merge RUN_DIR`: fold the trained LoRA adapter into its base model (peft's `merge_and_unload`) and
save a plain transformers model that loads without peft or ftclip.

The base is loaded unquantized even for a QLoRA run: merging into 4-bit weights would round the adapter's
update away (and peft can only dequantize-then-merge lossy); the merged model is saved in the run's
precision (bf16/fp16, else fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ftclip.checkpoint import RECIPE_FILE, atomic_directory
from ftclip.errors import ModelError, OutputError
from ftclip.modeling import grow_embeddings

ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(run_dir: Path) -> Path:
    """RUN_DIR/adapter, or RUN_DIR itself when it is an adapter folder (e.g. a checkpoint's)."""
    for candidate in (run_dir / "adapter", run_dir):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ModelError(f"{run_dir}: no LoRA adapter here (looked for adapter/{ADAPTER_CONFIG}); "
                     "a full fine-tune's model/ folder is already a plain model")


def _precision(adapter: Path):
    import torch

    recipe_file = adapter / RECIPE_FILE
    saved = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else {}
    if saved.get("bf16") is True:
        return torch.bfloat16
    if saved.get("fp16"):
        return torch.float16
    return torch.float32


def merge_adapter(run_dir: Path, output: Path | None = None, base_model: str | None = None) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = find_adapter(Path(run_dir))
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter / ADAPTER_CONFIG} does not name its base model; pass --base-model")
    if not (Path(base) / "config.json").is_file() and Path(base).is_absolute():
        raise ModelError(f"the adapter's base model {base} is gone (no config.json); pass --base-model")
    output = Path(output) if output else Path(run_dir) / "merged"
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=_precision(adapter))
        grow_embeddings(model, tokenizer)  # an adapter trained with added tokens saved the larger embeddings
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot load {base} with the adapter {adapter}: {error}") from None
    try:
        with atomic_directory(output) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    except OSError as error:
        raise OutputError(f"cannot write {output}: {error.strerror or error}") from None
    return output
