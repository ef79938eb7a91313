"""Model and tokenizer: resolved from a local folder or a hub id, loaded through transformers'
`from_pretrained`, quantized through `BitsAndBytesConfig` and adapted with peft LoRA.

torch, transformers and peft are imported inside the loaders only: `validate` uses `check_model_source`
and must not pay seconds of imports for it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ftclip.errors import ModelError
from ftclip.recipe import Recipe, resolve_input_path

if TYPE_CHECKING:
    import torch

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_source(value: str, recipe_path: str | Path | None) -> Path | str:
    """A local folder (a Path, relative to the recipe) when one exists or the value looks like a path;
    else a hub id (a str)."""
    local = resolve_input_path(value, recipe_path)
    if local.exists() or value.startswith((".", "/", "~")) or not HUB_ID.match(value):
        return local
    return value


def check_model_source(recipe: Recipe, recipe_path: str | Path) -> list[tuple[str, str]]:
    """For `validate`: a local model folder has a config that fits the recipe; a hub id is well-formed.
    Nothing is downloaded and no weights are read."""
    problems = []
    for key in ("base_model", "tokenizer"):
        value = getattr(recipe, key)
        if value is None:
            continue
        folder = model_source(value, recipe_path)
        if isinstance(folder, str):
            continue  # a hub id: well-formed by HUB_ID, and not fetched at validate time
        if not folder.is_dir():
            problems.append((key, f"{value!r} is neither a local folder ({folder} does not exist) nor a hub id like org/name"))
        elif key == "base_model":
            problems += _check_config(folder, recipe)
    return problems


def _check_config(folder: Path, recipe: Recipe) -> list[tuple[str, str]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [("base_model", f"{folder} has no config.json; is it a saved transformers model?")]
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [("base_model", f"{config_path}: unreadable: {error}")]
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and recipe.sequence_len > limit:
        return [("sequence_len", f"{recipe.sequence_len} is longer than the model's max_position_embeddings ({limit})")]
    return []


def pick_device(recipe: Recipe) -> torch.device:
    import torch

    if recipe.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda, but no CUDA device is available")
    if recipe.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(recipe.device)


def weight_dtype(recipe: Recipe, device: torch.device) -> torch.dtype:
    import torch

    precision = recipe.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_tokenizer(recipe: Recipe, recipe_path: str | Path | None):
    from transformers import AutoTokenizer

    source = model_source(recipe.tokenizer or recipe.base_model, recipe_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer from {source}: {error}") from None
    _apply_chat_settings(tokenizer, recipe)
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ---------------------------------------------------------------- chat template, special tokens, added tokens


def _apply_chat_settings(tokenizer, recipe: Recipe) -> None:
    """The recipe's chat template, special tokens and added tokens, set on the tokenizer (so they are saved
    with the adapter). The tokens that enlarged the vocabulary are kept in `tokenizer.ftclip_added_tokens`
    for load_model, which then resizes the embeddings and trains the new rows."""
    from tokenizers import AddedToken

    from ftclip.chat_templates import resolve_chat_template

    # tokenizer_default_fallback_<name> needs to know whether the tokenizer brought a template of its own.
    template = resolve_chat_template(recipe.chat_template, recipe.chat_template_jinja,
                                     getattr(tokenizer, "chat_template", None))
    if template is not None:
        tokenizer.chat_template = template
    size = len(tokenizer)
    vocabulary = tokenizer.get_vocab()
    added = []
    special = {key: value for key, value in (recipe.special_tokens.model_dump() if recipe.special_tokens else {}).items()
               if value is not None}
    if special:
        added += [value for value in special.values() if value not in vocabulary]
        tokenizer.add_special_tokens(special)
    if recipe.tokens:
        new = [token for token in recipe.tokens if token not in vocabulary]
        # Not normalized or stripped: the token matches exactly the text written in the data.
        tokenizer.add_tokens([AddedToken(token, normalized=False, lstrip=False, rstrip=False) for token in new])
        added += new
    if len(tokenizer) < size + len(set(added)):
        raise ModelError(f"tokens/special_tokens: the tokenizer did not take all of {sorted(set(added))}")
    tokenizer.ftclip_added_tokens = sorted(set(added))


def _embedding_module_names(model) -> list[str]:
    """The names (last path part, as peft's modules_to_save matches them) of the input and output embeddings."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = []
    for name, module in model.named_modules():
        if any(module is target for target in wanted if target is not None):
            names.append(name.rsplit(".", 1)[-1])
    return list(dict.fromkeys(names))


def grow_embeddings(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer's size (new rows start at the mean of the old ones). Also what a
    base model needs before an adapter trained with added tokens loads onto it (merge)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))


def _fit_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings to the tokenizer; True when it has tokens the recipe added, whose rows must train."""
    if tokenizer is None:
        return False
    grow_embeddings(model, tokenizer)
    return bool(getattr(tokenizer, "ftclip_added_tokens", None))


def modules_to_save(recipe: Recipe, model, new_tokens: bool, note=None) -> list[str] | None:
    """lora_modules_to_save, filled in with the embeddings when the recipe added tokens: LoRA leaves the
    embeddings frozen, so the new tokens' rows would stay at their initial values."""
    if not new_tokens:
        return recipe.lora_modules_to_save
    embeddings = _embedding_module_names(model)
    chosen = list(recipe.lora_modules_to_save or [])
    missing = [name for name in embeddings if name not in chosen]
    if missing and recipe.lora_modules_to_save is not None:
        raise ModelError(
            f"tokens/special_tokens add tokens to the vocabulary, but lora_modules_to_save ({chosen}) leaves "
            f"{missing} frozen, so the new tokens' embeddings would never train; add {missing} to it"
        )
    if missing:
        chosen += missing
        if note:
            note(f"note: the recipe adds tokens, so lora_modules_to_save is set to {chosen} "
                 "(the new tokens' embedding rows train in full and are saved with the adapter)")
    return chosen


def _quantization_config(recipe: Recipe, dtype: torch.dtype):
    if not recipe.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if recipe.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(recipe: Recipe, recipe_path: str | Path | None, device: torch.device, tokenizer=None, note=None):
    """The model ready to train: on the device, quantized and LoRA-wrapped as the recipe says; its embeddings
    fit the tokenizer when one is given (tokens the recipe added). `note(text)` prints what was decided for
    the user."""
    from transformers import AutoModelForCausalLM

    source = model_source(recipe.base_model, recipe_path)
    use_tf32(recipe, device)
    dtype = weight_dtype(recipe, device)
    quantization = _quantization_config(recipe, dtype)
    options = {"dtype": dtype, "trust_remote_code": recipe.trust_remote_code}
    if quantization is not None:
        options.update(quantization_config=quantization, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except (OSError, ValueError, ImportError) as error:
        raise ModelError(f"cannot load the model from {source}: {error}") from None
    if quantization is None:
        model.to(device)
    model.config.use_cache = False  # the KV cache is for generation; training only wastes memory on it
    new_tokens = _fit_embeddings(model, tokenizer)
    checkpointing_options = recipe.gradient_checkpointing_kwargs or {"use_reentrant": False}
    if recipe.gradient_checkpointing and quantization is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_options)
    if recipe.adapter is None:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_options,
        )
    if recipe.lora_model_dir:
        return _continue_adapter(model, recipe, recipe_path)
    lora = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.target_modules,
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save(recipe, model, new_tokens, note),
        # Tied input/output embeddings stay tied when both are trained in full.
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # e.g. target modules that do not exist in this architecture
        raise ModelError(f"lora_target_modules: {error}") from None


def use_tf32(recipe: Recipe, device: torch.device) -> None:
    """tf32: true lets CUDA float32 matmuls and convolutions use TF32 (as Axolotl's tf32 does); auto does so
    when the GPU has TF32 (Ampere and newer). No effect on the CPU."""
    wanted = recipe.tf32 is True or (recipe.tf32 == "auto" and device.type == "cuda"
                                     and torch.cuda.get_device_capability(device)[0] >= 8)
    if wanted and device.type == "cuda":
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 spells it this way
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def _continue_adapter(model, recipe: Recipe, recipe_path: str | Path | None):
    """lora_model_dir: load a saved LoRA adapter onto the base, trainable, to continue training it."""
    from peft import PeftModel

    folder = resolve_input_path(recipe.lora_model_dir, recipe_path)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"lora_model_dir: {folder} has no adapter_config.json; is it a saved LoRA adapter?")
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"lora_model_dir: cannot load the adapter from {folder}: {error}") from None
