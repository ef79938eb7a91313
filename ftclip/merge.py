"""`ftclip merge RUN_DIR`: fold the trained LoRA adapter into its base model (peft's `merge_and_unload`) and
save a plain transformers model that loads without peft or ftclip.

The base is loaded unquantized even for a QLoRA run: merging into 4-bit weights would round the adapter's
update away (and peft can only dequantize-then-merge lossy); the merged model is saved in the precision the
run trained in (`bf16: auto` as it resolved on the training device, recorded in the saved recipe), or in
`--dtype`. transformers writes that dtype into config.json, so the config and the safetensors agree."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from ftclip.checkpoint import RECIPE_FILE, atomic_directory
from ftclip.errors import ModelError, OutputError
from ftclip.modeling import config_with_overrides, grow_embeddings, stored_format_config
from ftclip.recipe import AUTO_PRECISION_NOTE

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

ADAPTER_CONFIG = "adapter_config.json"


def find_adapter(run_dir: Path) -> Path:
    """RUN_DIR/adapter, or RUN_DIR itself when it is an adapter folder (e.g. a checkpoint's)."""
    for candidate in (run_dir / "adapter", run_dir):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ModelError(f"{run_dir}: no LoRA adapter here (looked for adapter/{ADAPTER_CONFIG}); "
                     "a full fine-tune's model/ folder is already a plain model")


def merge_precision(adapter: Path, requested: str = "auto") -> tuple[str, str]:
    """(torch dtype name, why): `requested` (bf16/fp16/fp32) wins; `auto` takes the run's precision from the
    recipe saved with the adapter, `bf16: auto` as the training device resolved it."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ModelError(f"--dtype {requested}: choose auto, {', '.join(DTYPES)}")
        return DTYPES[requested], f"--dtype {requested}"
    recipe_file = adapter / RECIPE_FILE
    if not recipe_file.is_file():
        return "float32", f"no {RECIPE_FILE} beside the adapter to say how it trained"
    text = recipe_file.read_text(encoding="utf-8")
    saved = yaml.safe_load(text) or {}
    if saved.get("fp16"):
        return "float16", "the run trained with fp16: true"
    if saved.get("bf16") is True:
        return "bfloat16", "the run trained with bf16: true"
    if saved.get("bf16") == "auto":
        pattern = re.escape(AUTO_PRECISION_NOTE).replace(re.escape("{dtype}"), r"(\w+)")
        recorded = re.search(pattern, text)
        if recorded and recorded.group(1) in DTYPES.values():
            return recorded.group(1), f"the run's bf16: auto resolved to {recorded.group(1)} on its device"
        import torch  # a run saved before the resolution was recorded: resolve as training would here

        here = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
        return here, "bf16: auto resolved on this machine (the run did not record its own); --dtype to choose"
    return "float32", "the run trained in fp32"


def saved_recipe(folder: Path) -> dict:
    """The recipe the run saved beside its adapter or model ({} when there is none)."""
    recipe_file = folder / RECIPE_FILE
    return (yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}) if recipe_file.is_file() else {}


def base_model_options(base: str, adapter: Path, recipe: dict, base_given: bool = False,
                       trust_remote_code: bool = False) -> dict:
    """from_pretrained's revision and config for an adapter's base, as training loaded it (modeling.load_model):
    the revision adapter_config.json records (peft writes the one training passed; the recipe's
    revision_of_model otherwise), and the recipe's overrides_of_model_config (alias model_config) set on the
    base's config. A base given by hand (--base-model) is loaded as it is, with the overrides only."""
    config = json.loads((adapter / ADAPTER_CONFIG).read_text()) if (adapter / ADAPTER_CONFIG).is_file() else {}
    revision = None if base_given else (config.get("revision") or recipe.get("revision_of_model")
                                        or recipe.get("model_revision"))
    options: dict = {"revision": revision} if revision else {}
    overrides = recipe.get("overrides_of_model_config") or recipe.get("model_config") or {}
    if overrides:
        options["config"] = config_with_overrides(base, overrides, trust_remote_code, **options)
    # A checkpoint stored in a quantized format (gpt-oss's MXFP4) is dequantized as training dequantized it: the
    # adapter's expert LoRA needs the experts as plain weights.
    stored_format = stored_format_config(recipe.get("model_quantization_config"),
                                         recipe.get("model_quantization_config_kwargs"))
    if stored_format is not None:
        options["quantization_config"] = stored_format
    return options


def merge_adapter(run_dir: Path, output: Path | None = None, base_model: str | None = None, dtype: str = "auto",
                  report=lambda message: None) -> Path:
    """Merge and save; `report(message)` hears which precision was chosen and why."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter = find_adapter(Path(run_dir))
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base = base_model or config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter / ADAPTER_CONFIG} does not name its base model; pass --base-model")
    if not (Path(base) / "config.json").is_file() and Path(base).is_absolute():
        raise ModelError(f"the adapter's base model {base} is gone (no config.json); pass --base-model")
    output = Path(output) if output else Path(run_dir) / "merged"
    dtype_name, why = merge_precision(adapter, dtype)
    report(f"saving in {dtype_name} ({why})")
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    recipe = saved_recipe(adapter)
    processor, auto_class = None, AutoModelForCausalLM
    try:
        if recipe.get("processor_type"):  # a vision-language run: its processor and image-text-to-text class
            from ftclip.vlm import load_processor_from, vision_auto_class

            processor = load_processor_from(tokenizer_source, recipe["processor_type"])
            tokenizer, auto_class = processor.tokenizer, vision_auto_class()
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        options = base_model_options(base, adapter, recipe, base_given=base_model is not None)
        if config.get("task_type") == "SEQ_CLS":  # a reward model: the base with its one-output score head
            auto_class = AutoModelForSequenceClassification
            options.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)
        model = auto_class.from_pretrained(base, dtype=getattr(torch, dtype_name), **options)
        grow_embeddings(model, tokenizer)  # an adapter trained with added tokens saved the larger embeddings
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelError(f"cannot load {base} with the adapter {adapter}: {error}") from None
    try:
        with atomic_directory(output) as staging:
            merged.save_pretrained(staging)
            if processor is not None:
                from ftclip.vlm import save_processor

                save_processor(processor, staging)
            else:
                tokenizer.save_pretrained(staging)
            if (adapter / RECIPE_FILE).is_file():  # how the run trained: its precision, its prompt format (chat)
                shutil.copy(adapter / RECIPE_FILE, staging / RECIPE_FILE)
    except OSError as error:
        raise OutputError(f"cannot write {output}: {error.strerror or error}") from None
    return output
