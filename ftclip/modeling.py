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
    return problems + _model_family_machine_problems(recipe, no_cuda)


# torchao's QAT dtypes whose fake quantization runs on recent NVIDIA GPUs only (measured on torchao 0.18: nvfp4's
# is a CUDA autograd function, mxfp4's swizzles scales the CPU cannot). int4/int8 and float8 fake quantization
# trains anywhere; quantizing the saved model to float8 or int4 weight-only needs CUDA kernels (train warns).
_QAT_CUDA_DTYPES = {"nvfp4": "nvfp4", "mxfp4": "mxfp4"}


def _model_family_machine_problems(recipe: Recipe, no_cuda: str | None) -> list[tuple[str, str]]:
    """What the model-family settings need from this machine (packages, CUDA), from package metadata only.
    quantize_moe_experts (bitsandbytes 4-bit, CUDA or bitsandbytes' CPU backend) and Mxfp4Config with dequantize
    (plain torch) run anywhere."""
    problems = []
    if recipe.tokenizer_use_mistral_common and importlib.util.find_spec("mistral_common") is None:
        problems.append(("tokenizer_use_mistral_common", "needs the mistral-common package, which is not installed "
                                                         "(pip install 'ftclip[mistral]')"))
    if recipe.qat is not None:
        if importlib.util.find_spec("torchao") is None:
            problems.append(("qat", "quantization-aware training is torchao's, and torchao is not installed "
                                    "(pip install 'ftclip[torchao]')"))
        for key in ("weight_dtype", "activation_dtype"):
            dtype = getattr(recipe.qat, key)
            if dtype in _QAT_CUDA_DTYPES and no_cuda:
                problems.append((f"qat.{key}", f"torchao's {_QAT_CUDA_DTYPES[dtype]} fake quantization runs on "
                                               f"recent NVIDIA GPUs only, and {no_cuda}; int4, int8 and float8 run "
                                               "here"))
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
    """The tokenizer with the recipe's chat settings. A vision-language run (processor_type) loads the processor
    and returns its tokenizer, the processor attached as `tokenizer.ftclip_processor` (for the data stage and
    for saving beside the adapter)."""
    from transformers import AutoTokenizer

    source = model_source(recipe.tokenizer or recipe.base_model, recipe)
    revision = {"revision": recipe.revision_of_model} if recipe.revision_of_model and not recipe.tokenizer else {}
    # tokenizer_use_mistral_common: transformers' MistralCommonBackend over the checkpoint's tekken.json (or
    # SentencePiece file), in mistral-common's finetuning mode (conversations may end with the assistant's
    # reply); otherwise the Hugging Face tokenizer even where a tekken.json is present.
    mistral = {"mistral_format": True, "mode": "finetuning"} if recipe.tokenizer_use_mistral_common else {
        "mistral_format": False}
    processor = None
    try:
        if recipe.processor_type:
            from ftclip.vlm import load_processor

            processor = load_processor(recipe, source, revision)
            tokenizer = processor.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.trust_remote_code, **mistral,
                                                      **revision)
    except (OSError, ValueError, ImportError) as error:
        raise ModelError(f"cannot load the tokenizer from {source}: {error}") from None
    if not recipe.tokenizer_use_mistral_common:  # mistral-common: its own chat encoding and a fixed vocabulary
        _apply_chat_settings(tokenizer, recipe)
    if tokenizer.pad_token_id is None:
        # Padding is masked out of attention and loss, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if processor is not None:
        from ftclip.vlm import attach_processor

        attach_processor(tokenizer, processor)
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


def stored_format_config(name: str | None, kwargs: dict | None):
    """model_quantization_config: transformers' config for a checkpoint stored in a quantized format
    (Mxfp4Config: gpt-oss's MXFP4 experts, dequantized while loading with {dequantize: true}), or None. Used by
    training, merge and chat alike, so the base loads the same way in each."""
    if not name:
        return None
    import transformers

    return getattr(transformers, name)(**(kwargs or {}))


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
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_class = AutoModelForCausalLM
    if recipe.processor_type:  # a vision-language model: its image-text-to-text class
        from ftclip.vlm import vision_auto_class

        auto_class = vision_auto_class()
    _refuse_kernel_problems(recipe, device)
    source = model_source(recipe.base_model, recipe)
    use_tf32(recipe, device)
    dtype = weight_dtype(recipe, device)
    quantization = _quantization_config(recipe, dtype)
    revision = {"revision": recipe.revision_of_model} if recipe.revision_of_model else {}
    options = {"dtype": dtype, "trust_remote_code": recipe.trust_remote_code,
               "attn_implementation": _attention_for(recipe, source, revision, note)}
    if recipe.reward_model:  # a sequence-classification head with one output: the reward (its score head is new)
        auto_class = AutoModelForSequenceClassification
        options["num_labels"] = 1
        if tokenizer is not None:  # the head reads the last token that is not padding
            options["pad_token_id"] = tokenizer.pad_token_id
    if quantization is not None:
        options.update(quantization_config=quantization, device_map={"": device})
    checkpoint_format = stored_format_config(recipe.model_quantization_config, recipe.model_quantization_config_kwargs)
    if checkpoint_format is not None:  # dequantized while loading: the model trains like an unquantized one
        options["quantization_config"] = checkpoint_format
    experts = _expert_quantization(recipe)
    try:
        if placement == "meta":
            config = config_with_overrides(source, recipe.overrides_of_model_config, recipe.trust_remote_code, **revision)
            with torch.device("meta"):
                model = auto_class.from_config(config, **options)
        else:
            if recipe.overrides_of_model_config:
                options["config"] = config_with_overrides(source, recipe.overrides_of_model_config,
                                                          recipe.trust_remote_code, **revision)
            with _loading_experts(experts):
                model = auto_class.from_pretrained(source, **options, **revision)
    except (OSError, ValueError, ImportError) as error:
        raise ModelError(f"cannot load the model from {source}: {error}") from None
    _note_expert_precision(model, recipe, experts, note)
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
    if recipe.freeze_mm_modules:
        from ftclip.vlm import freeze_mm_modules

        freeze_mm_modules(model, note)
    if recipe.adapter is None:
        if recipe.unfrozen_parameters:
            freeze_parameters_except(model, recipe.unfrozen_parameters, note)
        if recipe.qat is not None:  # fake-quantized forward (torchao); train.py turns it on at its step
            from ftclip.qat import prepare

            prepare(model, recipe.qat, note)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantization is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=recipe.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_options,
        )
    from ftclip.expert_quant import lora_ready
    from ftclip.moe import expert_parameters, lora_targets

    if recipe.lora_model_dir:
        with lora_ready(model, experts):
            return _continue_adapter(model, recipe)
    saved_in_full = modules_to_save(recipe, model, new_tokens, note)
    try:
        with lora_ready(model, experts):  # 4-bit experts look like plain parameters to peft (expert_quant.py)
            targets = lora_targets(model, recipe_target_modules(recipe, model, note), recipe.lora_target_parameters)
            # peft's LoRA on a parameter (ParamWrapper: the MoE experts) has no dropout (x is not its input), and
            # peft may target an MoE model's experts by itself (its transformers-4 name conversion): the linear
            # targets get the recipe's dropout after wrapping (_dropout_on_linear_layers).
            parameter_lora = bool(targets.parameters) or bool(expert_parameters(model))
            lora = LoraConfig(
                r=recipe.lora_r,
                lora_alpha=recipe.lora_alpha,
                lora_dropout=0.0 if parameter_lora else recipe.lora_dropout,
                target_modules=targets.modules,
                target_parameters=targets.parameters or None,
                task_type="SEQ_CLS" if recipe.reward_model else "CAUSAL_LM",  # SEQ_CLS trains and saves the score head
                modules_to_save=saved_in_full,
                # Tied input/output embeddings stay tied when both are trained in full (only then: peft warns
                # otherwise).
                ensure_weight_tying=bool(getattr(model.config, "tie_word_embeddings", False))
                and bool(set(saved_in_full or []) & set(_embedding_module_names(model))),
                **_peft_options(recipe),
            )
            # revision: recorded in adapter_config.json, so the adapter names the base revision it was trained on.
            model = get_peft_model(model, lora, revision=recipe.revision_of_model)
    except ValueError as error:  # e.g. target modules that do not exist in this architecture
        raise ModelError(f"lora_target_modules: {error}") from None
    if parameter_lora:
        _describe_expert_lora(model, recipe, targets.meant_modules, note)
    return model


def _attention_for(recipe: Recipe, source, revision: dict, note) -> str:
    """The recipe's attention, except sdpa (the default) on an architecture transformers has no sdpa attention
    for (gpt-oss: its attention sinks), which gets eager, with a note."""
    if recipe.attn_implementation != "sdpa":
        return recipe.attn_implementation
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.trust_remote_code, **revision)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (OSError, ValueError, KeyError):
        return "sdpa"  # from_pretrained reports what is wrong
    if getattr(model_class, "_supports_sdpa", True):
        return "sdpa"
    if note:
        note(f"note: transformers has no sdpa attention for {config.model_type}; using eager (flex_attention, or "
             "flash_attention_2 on CUDA, are faster where this architecture has them)")
    return "eager"


def _expert_quantization(recipe: Recipe):
    """quantize_moe_experts: the record of the 4-bit expert weights (ftclip.expert_quant), or None."""
    if not recipe.quantize_moe_experts:
        return None
    from ftclip.expert_quant import ExpertQuantization

    return ExpertQuantization(quant_type=recipe.bnb_4bit_quant_type, double_quant=recipe.bnb_4bit_use_double_quant)


def _loading_experts(experts):
    from contextlib import nullcontext

    if experts is None:
        return nullcontext()
    from ftclip.expert_quant import quantizing_experts_on_load

    return quantizing_experts_on_load(experts)


def _note_expert_precision(model, recipe: Recipe, experts, note) -> None:
    """After loading an MoE model: how many of its values are 4-bit (quantize_moe_experts), or a warning that
    load_in_4bit left its experts in 16 bits."""
    from ftclip.moe import expert_parameters

    if experts is not None:
        experts.quantize_remaining(model)
        if not experts.quantized:
            raise ModelError("quantize_moe_experts: this model has no fused expert weights (3-D parameters of "
                             "an experts module) to quantize; is it an MoE model? Remove quantize_moe_experts")
        from ftclip.checkpoint import human_bytes
        from ftclip.expert_quant import count_4bit_values

        tensors, values, stored, original = experts.summary()
        four_bit, total = count_4bit_values(model)
        if note:
            note(f"quantize_moe_experts: {tensors} expert weights ({values:,} values) in 4-bit "
                 f"{recipe.bnb_4bit_quant_type}: {human_bytes(stored)} instead of {human_bytes(original)}; "
                 f"{four_bit:,} of the model's {total:,} parameters ({four_bit / max(total, 1):.0%}) are 4-bit")
        return
    found = expert_parameters(model)
    if recipe.load_in_4bit and found and note:
        values = sum(model.get_submodule(module).get_parameter(name).numel() for module, name in found)
        note(f"warning: load_in_4bit quantizes linear layers only: this MoE model's {len(found)} fused expert weights "
             f"({values:,} values) stay unquantized (and peft's k-bit preparation keeps them in fp32). Set "
             "quantize_moe_experts: true to store them in 4 bits")


def _describe_expert_lora(model, recipe: Recipe, requested_modules: list[str] | str, note) -> None:
    """After wrapping an MoE model: the recipe's dropout on the linear LoRA layers, what LoRA adapts, and the
    linear layers peft left out."""
    from peft.tuners.lora import ParamWrapper

    from ftclip.moe import describe_targets, unadapted_linear_layers

    _dropout_on_linear_layers(model, recipe.lora_dropout)
    if not note:
        return
    wrapped = any(isinstance(module, ParamWrapper) for module in model.modules())
    if wrapped:
        note(describe_targets(model))
    missed = unadapted_linear_layers(model, requested_modules)
    if missed:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in missed})
        note(f"warning: peft 0.21 takes {', '.join(leaves)} in the LoRA target modules of a {model.config.model_type} "
             f"model for its experts' transformers-4 names: {len(missed)} linear layers of those names (e.g. "
             f"{missed[0]}: shared experts, dense MLP layers) get no LoRA")
    if recipe.lora_dropout and wrapped:
        note(f"note: lora_dropout {recipe.lora_dropout} applies to the linear LoRA layers only: peft's LoRA on the "
             "fused expert weights has no dropout (saved as lora_dropout: 0 in adapter_config.json)")


def _dropout_on_linear_layers(model, probability: float) -> None:
    """The recipe's lora_dropout on every linear LoRA layer (peft built them without, for its ParamWrappers)."""
    if not probability:
        return
    import torch
    from peft.tuners.lora import LoraLayer, ParamWrapper

    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = torch.nn.Dropout(p=probability)


def recipe_target_modules(recipe: Recipe, model, note=None) -> list[str] | str:
    """The recipe's lora_target_modules; for a vision-language model left at the default, the language model's
    linear layers only (vlm.py)."""
    if recipe.processor_type and "lora_target_modules" not in recipe.model_fields_set and not recipe.lora_target_linear:
        from ftclip.vlm import language_model_targets

        return language_model_targets(model, note)
    return recipe.target_modules


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


def model_identity(recipe: Recipe) -> str:
    """What decides a model's outputs before training, for caches of them (precomputed reference
    log-probabilities): the weights' files (SHA-256 of a local folder's files, remembered by size and mtime; a
    hub id with its revision and the cached snapshot it resolves to), a continued adapter's files, and the
    settings that change the numbers (precision, quantization, config overrides, attention kernel)."""
    import hashlib

    from ftclip.data.cache import FileDigests, cache_dir

    digests = FileDigests(cache_dir(recipe))

    def identity(value: str, revision: str | None) -> str:
        source = model_source(value, recipe)
        if isinstance(source, Path):
            return digests.of_folder(source) if source.is_dir() else str(source)
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "config.json", revision=revision)
            snapshot = Path(found).parent.name if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - any failure only makes the key less specific
            snapshot = None
        return f"{source}@{revision or 'main'}:{snapshot}"

    parts = [identity(recipe.base_model, recipe.revision_of_model),
             identity(recipe.lora_model_dir, None) if recipe.lora_model_dir else "",
             recipe.precision, recipe._trained_dtype or "", str(recipe.quantized), str(recipe.load_in_8bit),
             recipe.bnb_4bit_quant_type, str(recipe.bnb_4bit_use_double_quant),
             json.dumps(recipe.overrides_of_model_config or {}, sort_keys=True, default=str), recipe.attn_implementation,
             json.dumps(sorted(recipe.tokens or [])), str(recipe.special_tokens)]
    digests.save()
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()
