"""Model and tokenizer: resolved from a local folder or a hub id, loaded through transformers'
`from_pretrained`, quantized through `BitsAndBytesConfig` and adapted with peft LoRA.

torch, transformers and peft are imported inside the loaders only: `validate` uses `check_model_source`
and must not pay seconds of imports for it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ftclip.errors import ModelError
from ftclip.recipe import Recipe, parse_unfrozen_pattern

if TYPE_CHECKING:
    import torch

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_source(value: str, recipe: Recipe) -> Path | str:
    """A local folder (a Path, relative to the recipe) when one exists or the value looks like a path;
    else a hub id (a str)."""
    local = recipe.input_path(value)
    if local.exists() or value.startswith((".", "/", "~")) or not HUB_ID.match(value):
        return local
    return value


def check_model_source(recipe: Recipe) -> list[tuple[str, str]]:
    """For `validate`: a local model folder has a config that fits the recipe; a hub id is well-formed.
    Nothing is downloaded and no weights are read."""
    problems = []
    for key in ("base_model", "tokenizer"):
        value = getattr(recipe, key)
        if value is None:
            continue
        folder = model_source(value, recipe)
        if isinstance(folder, str):
            continue  # a hub id: well-formed by HUB_ID, and not fetched at validate time
        if not folder.is_dir():
            problems.append((key, f"{value!r} is neither a local folder ({folder} does not exist) nor a hub id like org/name"))
        elif key == "base_model":
            problems += _check_config(folder, recipe)
            if recipe.revision_of_model:
                problems.append(("revision_of_model", f"a revision of a hub model, but base_model is the local folder "
                                                      f"{folder}, which has none; remove it or name the hub id"))
    return problems


def kernel_problems(recipe: Recipe, cuda_available: bool) -> list[tuple[str, str]]:
    """Attention and loss kernels, and QLoRA under FSDP, against what this machine has installed and the
    device the run gets. Only package metadata is read (importlib.util.find_spec): nothing heavy imports."""
    problems = []
    no_cuda = ("the recipe sets device: cpu" if recipe.device == "cpu"
               else None if cuda_available else "this machine has no CUDA device")
    if recipe.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            problems.append(("attn_implementation", "flash_attention_2 needs the flash-attn package, which is not installed "
                                                    "(pip install flash-attn --no-build-isolation); or use sdpa"))
        if no_cuda:
            problems.append(("attn_implementation", f"flash_attention_2 runs on CUDA only, and {no_cuda}; use sdpa"))
        if recipe.precision == "fp32":
            problems.append(("attn_implementation", "flash_attention_2 computes in bf16/fp16 only; set bf16: true "
                                                    "(or bf16: auto)"))
    if recipe.attn_implementation == "flex_attention" and _torch_version() < (2, 5):
        problems.append(("attn_implementation", f"flex_attention needs torch >= 2.5 (installed: {_torch_version()})"))
    if recipe.liger_fused_linear_cross_entropy:
        if importlib.util.find_spec("liger_kernel") is None:
            problems.append(("liger_fused_linear_cross_entropy", "needs the liger-kernel package, which is not installed "
                                                                 "(pip install liger-kernel); or set it to false "
                                                                 "(chunked_cross_entropy saves the logits' memory too)"))
        if no_cuda:
            problems.append(("liger_fused_linear_cross_entropy", f"Liger's kernels are Triton (CUDA) kernels, and {no_cuda}; "
                                                                 "set it to false (chunked_cross_entropy runs anywhere)"))
    if recipe.optimizer == "adamw_torch_4bit" and importlib.util.find_spec("torchao") is None:
        problems.append(("optimizer", "adamw_torch_4bit is torchao's AdamW4bit, and torchao is not installed "
                                      "(pip install 'ftclip[torchao]'); or use adamw_8bit"))
    if recipe.peft and recipe.peft.loftq_config and recipe.adapter and no_cuda:
        problems.append(("peft", f"peft's LoftQ initialization (loftq_config) runs on CUDA only, and {no_cuda}"))
    if recipe.quantized and recipe.distributed.strategy == "fsdp" and no_cuda:
        problems.append(("distributed", f"a quantized base (QLoRA) under FSDP needs CUDA (bitsandbytes' 4-bit weights "
                                        f"are sharded as CUDA storage), and {no_cuda}; use strategy: ddp or a GPU"))
    return problems


def _torch_version() -> tuple[int, int]:
    """The installed torch's version, read without importing torch (validate stays light)."""
    from ftclip.optim import _torch_build_accelerators

    build = _torch_build_accelerators() or {}
    major, minor = (build.get("__version__") or "0.0").split(".")[:2]
    return int(major), int(minor)


# Sequence mixers that carry state along the flattened row regardless of position ids: packing would leak
# one example into the next. transformers 5 names them in config.layer_types (linear_attention for Mamba,
# gated-delta-net and lightning-attention layers); older configs are caught by model type.
_BOUNDARY_BLIND_LAYER_HINTS = ("linear", "mamba", "conv", "recurrent", "rwkv", "ssm")
_BOUNDARY_BLIND_MODEL_TYPES = {
    "mamba", "mamba2", "falcon_mamba", "jamba", "bamba", "zamba", "zamba2", "rwkv", "recurrent_gemma", "xlstm",
    "lfm2", "lfm2_moe", "nemotron_h", "granitemoehybrid", "falcon_h1", "qwen3_next", "minimax", "kimi_linear",
    "plamo2",
}


def packing_problem(config) -> str | None:
    """Why examples of this architecture cannot share a row, or None. config: a transformers config (or
    the dict of a config.json)."""
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    model_type = get("model_type")
    blind = sorted({str(kind) for kind in (get("layer_types") or [])
                    if any(hint in str(kind).lower() for hint in _BOUNDARY_BLIND_LAYER_HINTS)})
    if blind:
        return (f"model type {model_type} has {', '.join(blind)} layers, whose state runs along the whole row and "
                "ignores example boundaries: packed examples would read each other. Set sample_packing: false")
    if model_type in _BOUNDARY_BLIND_MODEL_TYPES:
        return (f"model type {model_type} mixes tokens with recurrent/state-space (linear-attention) layers that "
                "ignore example boundaries: packed examples would read each other. Set sample_packing: false")
    return None


def _check_config(folder: Path, recipe: Recipe) -> list[tuple[str, str]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [("base_model", f"{folder} has no config.json; is it a saved transformers model?")]
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return [("base_model", f"{config_path}: unreadable: {error}")]
    limit = (recipe.overrides_of_model_config or {}).get("max_position_embeddings", config.get("max_position_embeddings"))
    if isinstance(limit, int) and recipe.sequence_len > limit:
        return [("sequence_len", f"{recipe.sequence_len} is longer than the model's max_position_embeddings ({limit})")]
    if not recipe.sample_packing:
        return []
    problem = packing_problem(config)
    return [("sample_packing", problem)] if problem else []


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


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    source = model_source(recipe.tokenizer or recipe.base_model, recipe)
    revision = {"revision": recipe.revision_of_model} if recipe.revision_of_model and not recipe.tokenizer else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.trust_remote_code, **revision)
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
    import torch
    from transformers import BitsAndBytesConfig

    if recipe.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=recipe.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=recipe.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype,
        # FSDP2 shards parameters of one dtype per group: the packed 4-bit weights are stored as the compute
        # dtype (not uint8) so they shard beside the LoRA weights, as QLoRA-FSDP does.
        bnb_4bit_quant_storage=dtype if recipe.distributed.strategy == "fsdp" else torch.uint8,
    )


def _refuse_kernel_problems(recipe: Recipe, device: torch.device) -> None:
    problems = kernel_problems(recipe, device.type == "cuda")
    if problems:
        raise ModelError("; ".join(f"{key}: {message}" for key, message in problems))


def load_model(recipe: Recipe, device: torch.device, tokenizer=None, note=None,
               placement: str = "device"):
    """The model ready to train: on the device, quantized and LoRA-wrapped as the recipe says; its embeddings
    fit the tokenizer when one is given (tokens the recipe added). `note(text)` prints what was decided for
    the user. placement (FSDP2 loading from rank 0, see Distributed.wrap_from_rank0): "meta" builds the architecture on
    the meta device and reads no weights; "host" reads them but leaves them in host memory (rank 0's copy,
    broadcast shard by shard; the device never holds all of it)."""
    import torch
    from transformers import AutoModelForCausalLM

    _refuse_kernel_problems(recipe, device)
    source = model_source(recipe.base_model, recipe)
    use_tf32(recipe, device)
    dtype = weight_dtype(recipe, device)
    quantization = _quantization_config(recipe, dtype)
    options = {"dtype": dtype, "trust_remote_code": recipe.trust_remote_code,
               "attn_implementation": recipe.attn_implementation}
    if quantization is not None:
        options.update(quantization_config=quantization, device_map={"": device})
    revision = {"revision": recipe.revision_of_model} if recipe.revision_of_model else {}
    try:
        if placement == "meta":
            config = config_with_overrides(source, recipe.overrides_of_model_config, recipe.trust_remote_code, **revision)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, **options)
        else:
            if recipe.overrides_of_model_config:
                options["config"] = config_with_overrides(source, recipe.overrides_of_model_config,
                                                          recipe.trust_remote_code, **revision)
            model = AutoModelForCausalLM.from_pretrained(source, **options, **revision)
    except (OSError, ValueError, ImportError) as error:
        raise ModelError(f"cannot load the model from {source}: {error}") from None
    from ftclip.padding_free import use_varlen_sdpa

    problem = packing_problem(model.config) if recipe.sample_packing else None
    if problem:
        raise ModelError(f"sample_packing: {problem}")
    if recipe.sample_packing and recipe.attn_implementation == "sdpa":
        varlen = use_varlen_sdpa(model.config)  # sdpa per packed example: no dense T×T mask (padding_free.py)
        if varlen:
            model.set_attn_implementation(varlen)
    if quantization is None and placement == "device":
        model.to(device)
    model.config.use_cache = False  # the KV cache is for generation; training only wastes memory on it
    new_tokens = _fit_embeddings(model, tokenizer)
    checkpointing_options = recipe.gradient_checkpointing_kwargs or {"use_reentrant": False}
    if recipe.gradient_checkpointing and quantization is None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_options)
    if recipe.adapter is None:
        if recipe.unfrozen_parameters:
            freeze_parameters_except(model, recipe.unfrozen_parameters, note)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_options,
        )
    if recipe.lora_model_dir:
        return _continue_adapter(model, recipe)
    saved_in_full = modules_to_save(recipe, model, new_tokens, note)
    lora = LoraConfig(
        r=recipe.lora_r,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout,
        target_modules=recipe.target_modules,
        task_type="CAUSAL_LM",
        modules_to_save=saved_in_full,
        # Tied input/output embeddings stay tied when both are trained in full (only then: peft warns otherwise).
        ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False))
        and bool(set(saved_in_full or []) & set(_embedding_module_names(model))),
        **_peft_options(recipe),
    )
    try:
        # revision: recorded in adapter_config.json, so the adapter names the base revision it was trained on.
        return get_peft_model(model, lora, revision=recipe.revision_of_model)
    except ValueError as error:  # e.g. target modules that do not exist in this architecture
        raise ModelError(f"lora_target_modules: {error}") from None


def config_with_overrides(source, overrides: dict | None, trust_remote_code: bool = False, **revision):
    """The checkpoint's config with overrides_of_model_config set on it, as Axolotl sets them (setattr); used by
    training, merge and chat alike."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **revision)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return config


def _peft_options(recipe: Recipe) -> dict:
    """LoraConfig fields for the peft options the recipe sets (peft's defaults otherwise)."""
    from peft import LoftQConfig

    options = {"use_rslora": recipe.peft_use_rslora, "use_dora": recipe.peft_use_dora,
               "fan_in_fan_out": recipe.lora_fan_in_fan_out}
    if recipe.lora_target_parameters:
        options["target_parameters"] = ([recipe.lora_target_parameters] if isinstance(recipe.lora_target_parameters, str)
                                        else recipe.lora_target_parameters)
    if recipe.peft and recipe.peft.loftq_config:
        options.update(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=recipe.peft.loftq_config.loftq_bits))
    return options


def freeze_parameters_except(model, patterns: list[str], note=None) -> None:
    """unfrozen_parameters: only parameters whose names match one of the patterns train (Axolotl's rules, see
    recipe.parse_unfrozen_pattern). A pattern with a row range keeps only those rows trainable: the other rows'
    gradients are zeroed by a hook, as Axolotl does (so weight decay still reaches them)."""
    parsed = [parse_unfrozen_pattern(pattern) for pattern in patterns]
    unused = set(patterns)
    for name, parameter in model.named_parameters():
        matched = [rows for regex, rows in parsed if regex.match(name)]
        unused -= {pattern for pattern, (regex, _) in zip(patterns, parsed) if regex.match(name)}
        parameter.requires_grad = bool(matched)
        ranges = [(start, len(parameter) if end is None else end) for start, end in (r for r in matched if r)]
        for start, end in ranges:
            if start < 0 or end > len(parameter) or start >= end:
                raise ModelError(f"unfrozen_parameters: rows [{start}:{end}] do not fit {name} ({len(parameter)} rows)")
        if ranges:
            frozen_rows = _rows_outside(ranges, len(parameter))
            parameter.register_hook(lambda gradient, rows=frozen_rows: _zero_rows(gradient, rows))
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ModelError(f"unfrozen_parameters: no parameter name matches {patterns}; names look like "
                         f"{next(name for name, _ in model.named_parameters())}")
    if note:
        count = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        note(f"unfrozen_parameters: {count:,} of {sum(p.numel() for p in model.parameters()):,} parameters train")
        for pattern in sorted(unused):  # names differ between architectures: a pattern may miss silently
            note(f"warning: unfrozen_parameters: {pattern!r} matches no parameter of this model")


def _rows_outside(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    outside, start = [], 0
    for first, end in sorted(ranges):
        if first > start:
            outside.append((start, first))
        start = max(start, end)
    return outside + ([(start, size)] if start < size else [])


def _zero_rows(gradient, rows: list[tuple[int, int]]):
    gradient = gradient.clone()
    for start, end in rows:
        gradient[start:end] = 0
    return gradient


def use_tf32(recipe: Recipe, device: torch.device) -> None:
    """tf32: true lets CUDA float32 matmuls and convolutions use TF32 (as Axolotl's tf32 does); auto does so
    when the GPU has TF32 (Ampere and newer). No effect on the CPU."""
    import torch

    wanted = recipe.tf32 is True or (recipe.tf32 == "auto" and device.type == "cuda"
                                     and torch.cuda.get_device_capability(device)[0] >= 8)
    if wanted and device.type == "cuda":
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9 spells it this way
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def _continue_adapter(model, recipe: Recipe):
    """lora_model_dir: load a saved LoRA adapter onto the base, trainable, to continue training it."""
    from peft import PeftModel

    folder = recipe.input_path(recipe.lora_model_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(f"lora_model_dir: {folder} has no adapter_config.json; is it a saved LoRA adapter?")
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"lora_model_dir: cannot load the adapter from {folder}: {error}") from None
