"""Axolotl's keys and what each becomes in ftclip: the outcomes (mapped, dropped, refused), the converters that
read a value in the context of the whole config, and the one table (AXOLOTL_KEYS, DATASET_KEYS) that the
importer, validate's messages for Axolotl keys and the README's table are all made from."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- outcomes of one key


@dataclass(frozen=True)
class Mapped:
    """old → new: the values written under ftclip keys, and a note when the meaning shifts a little."""

    updates: dict[str, Any]
    note: str = ""


@dataclass(frozen=True)
class Dropped:
    why: str


@dataclass(frozen=True)
class Refused:
    why: str


Outcome = Mapped | Dropped | Refused
Converter = Callable[[Any, dict], Outcome]


@dataclass(frozen=True)
class Rule:
    """What one Axolotl key becomes. kind: same (the same key and meaning), map (another ftclip key or a
    converted value), drop, refuse. A refused key set to false/empty/0 means the feature is off: dropped."""

    kind: str
    ftclip: str = ""
    why: str = ""
    convert: Converter | None = None


def _same(note: str = "") -> Rule:
    return Rule("same", why=note)


def _to(key: str, note: str = "", convert: Converter | None = None) -> Rule:
    return Rule("map", ftclip=key, why=note, convert=convert)


def _drop(why: str) -> Rule:
    return Rule("drop", why=why)


def _refuse(why: str) -> Rule:
    return Rule("refuse", why=why)


# ---------------------------------------------------------------- converters (value, whole config) → outcome

def is_off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", [], {})


def show_value(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."



ATTENTION = {"flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager", "flex_attention": "flex_attention"}
KERNEL_ONLY = "a faster kernel for the same math; ftclip uses transformers' own implementation"


def _attention(value: Any, config: dict) -> Outcome:
    if isinstance(value, str) and value in ATTENTION:
        return Mapped({"attn_implementation": ATTENTION[value]})
    if isinstance(value, str) and (value == "xformers" or "flash" in value or "/" in value):
        return Mapped({"attn_implementation": "sdpa"}, f"{value} is an attention kernel ftclip lacks; sdpa computes "
                      "the same attention")
    return Refused(f"attention implementation {value!r} is not one ftclip has (sdpa, eager, flash_attention_2, "
                   "flex_attention)")


def _attention_flag(implementation: str) -> Converter:
    def convert(value: Any, config: dict) -> Outcome:
        if is_off(value):
            return Dropped(f"{show_value(value)}: this attention is off (the model's default attention applies)")
        if config.get("attn_implementation"):
            return Dropped("attn_implementation is given and takes precedence")
        return Mapped({"attn_implementation": implementation}, "the same attention, by transformers' name")
    return convert


def _optimizer(value: Any, config: dict) -> Outcome:
    if value in ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"):
        return Mapped({"optimizer": value})
    if value == "adamw_torch_4bit":
        return Mapped({"optimizer": value}, "torchao's AdamW4bit, as Hugging Face builds it (pip install 'ftclip[torchao]')")
    if value == "adamw_bnb_8bit":
        return Mapped({"optimizer": "adamw_8bit"}, "Hugging Face's name for bitsandbytes' AdamW8bit")
    if value == "adamw_torch_8bit":
        return Mapped({"optimizer": "adamw_8bit"}, "torchao's 8-bit AdamW there; bitsandbytes' 8-bit AdamW here "
                      "(the same algorithm with block-wise 8-bit state)")
    return Refused(f"optimizer {value!r}: ftclip has adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit, "
                   "paged_adamw_32bit, sgd and adamw_torch_4bit")


def _scheduler(value: Any, config: dict) -> Outcome:
    ratio = config.get("cosine_min_lr_ratio")
    if value in ("cosine", None) and ratio:
        return Mapped({"lr_scheduler": "cosine", "min_lr_ratio": ratio}, "cosine decaying to cosine_min_lr_ratio")
    if value in ("constant", "linear", "cosine"):
        return Mapped({"lr_scheduler": value})
    if value == "constant_with_warmup":
        return Mapped({"lr_scheduler": "constant"}, "ftclip's constant warms up too")
    if value == "cosine_with_min_lr":
        kwargs = config.get("lr_scheduler_kwargs") or {}
        return Mapped({"lr_scheduler": "cosine", "min_lr_ratio": kwargs.get("min_lr_rate", 0.0)})
    return Refused(f"lr_scheduler {value!r}: ftclip has constant, linear and cosine (with min_lr_ratio)")


def _min_lr_ratio(value: Any, config: dict) -> Outcome:
    if config.get("lr_scheduler", "cosine") in ("cosine", None):
        if config.get("cosine_constant_lr_ratio"):
            return Refused("with cosine_constant_lr_ratio it holds the LR flat for the last part of the run; ftclip "
                           "has no such schedule")
        return Mapped({"min_lr_ratio": value})
    return Dropped(f"applies to lr_scheduler: cosine only; this config uses {config.get('lr_scheduler')}")


def _scheduler_kwargs(value: Any, config: dict) -> Outcome:
    if config.get("lr_scheduler") == "cosine_with_min_lr" and set(value) <= {"min_lr_rate"}:
        return Dropped("its min_lr_rate is carried by lr_scheduler → min_lr_ratio")
    return Refused("scheduler arguments ftclip's schedules do not take")


def _warmup_steps(value: Any, config: dict) -> Outcome:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return Refused(f"{show_value(value)} is not a step count (a whole number, or a fraction below 1 for a ratio)")
    if isinstance(value, float) and 0 < value < 1:  # transformers 5 reads a fraction as a ratio
        return Mapped({"warmup_ratio": value}, "a fraction below 1 is a share of the steps (transformers 5)")
    return Mapped({"warmup_steps": int(value)})


def _warmup_ratio(value: Any, config: dict) -> Outcome:
    if config.get("warmup_steps") is not None:
        return Dropped("warmup_steps is given and takes precedence in Axolotl")
    return Mapped({"warmup_ratio": value})


def _batch_size(value: Any, config: dict) -> Outcome:
    if config.get("gradient_accumulation_steps"):
        return Dropped("gradient_accumulation_steps is given and takes precedence in Axolotl")
    micro = as_number(config.get("micro_batch_size")) or 1
    if not _is_count(value) or not _is_count(micro):
        return Refused(f"batch_size {show_value(value)} with micro_batch_size {show_value(micro)}: both must be whole numbers")
    if value % micro:
        return Refused(f"batch_size {value} is not a multiple of micro_batch_size {micro}")
    return Mapped({"gradient_accumulation_steps": value // micro}, "batch_size = micro_batch_size × accumulation")


def _precision_flag(key: str) -> Converter:
    def convert(value: Any, config: dict) -> Outcome:
        if key == "bf16" and value == "auto" and config.get("fp16"):
            return Mapped({key: False}, "Axolotl turns bf16: auto off when fp16 is set")
        if value == "full":
            return Mapped({key: True}, "bf16: full also evaluates in bf16; ftclip evaluates in the weights' dtype")
        return Mapped({key: value})
    return convert


def _legacy_dtype(key: str) -> Converter:
    def convert(value: Any, config: dict) -> Outcome:
        if value and config.get(key) is None:
            return Mapped({key: True}, "loads the weights in this dtype, as ftclip's precision flag does")
        return Dropped(f"{key} is given and decides")
    return convert


def _gradient_checkpointing(value: Any, config: dict) -> Outcome:
    if value in ("offload", "offload_disk"):
        return Mapped({"gradient_checkpointing": True}, f"{value} also moves activations off the GPU (memory only; "
                      "same gradients)")
    return Mapped({"gradient_checkpointing": bool(value)})


def _adapter(value: Any, config: dict) -> Outcome:
    if value in ("lora", "qlora"):
        return Mapped({"adapter": value})
    return Refused(f"adapter {value!r}: ftclip trains lora, qlora or the full model")


def _target_modules(value: Any, config: dict) -> Outcome:
    if isinstance(value, str) and value != "all-linear":
        return Mapped({"lora_target_modules": value}, "a regex, matched in full by peft as in Axolotl")
    return Mapped({"lora_target_modules": value})


def _model_type(value: Any, config: dict) -> Outcome:
    if value == "AutoModelForSequenceClassification" and config.get("reward_model"):
        return Dropped("reward_model: ftclip loads AutoModelForSequenceClassification with one output")
    if isinstance(value, str) and (value == "AutoModelForCausalLM" or value.endswith("ForCausalLM")):
        return Dropped("ftclip loads AutoModelForCausalLM, which picks this class from the checkpoint")
    if config.get("processor_type") and isinstance(value, str) and (
            value in ("AutoModelForImageTextToText", "AutoModelForVision2Seq") or value.endswith("ForConditionalGeneration")):
        return Dropped("processor_type: ftclip loads vision-language models through AutoModelForImageTextToText, which "
                       "picks this class from the checkpoint")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(value, str) and value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return Dropped(f"{value!r} is the checkpoint's architecture name (config.model_type), a causal LM that "
                       "AutoModelForCausalLM loads; Axolotl wants a class name here (such as "
                       f"{MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[value]})")
    return Refused(f"{value}: ftclip trains causal language models (AutoModelForCausalLM) only")


def strategy_from_deepspeed(value: Any, config: dict, source: Path | None = None) -> Outcome:
    if isinstance(value, dict):  # Axolotl takes the DeepSpeed settings inline too
        stage = (value.get("zero_optimization") or {}).get("stage") if isinstance(value.get("zero_optimization"), dict) else None
        return _strategy_from_zero_stage(stage, "the inline DeepSpeed settings")
    if not isinstance(value, str):
        return Refused(f"{show_value(value)}: deepspeed takes a DeepSpeed JSON file's path or its settings as a mapping")
    stage = None
    for candidate in (Path(value), (source.parent / value) if source else None):
        if candidate is not None and candidate.is_file():
            try:
                stage = json.loads(candidate.read_text()).get("zero_optimization", {}).get("stage")
            except (OSError, ValueError, AttributeError):
                stage = None
            break
    if stage is None:
        match = re.search(r"zero[_-]?(\d)", str(value))
        stage = int(match.group(1)) if match else None
    return _strategy_from_zero_stage(stage, repr(value))


def _strategy_from_zero_stage(stage: Any, what: str) -> Outcome:
    if stage == 3:
        return Mapped({"distributed": {"strategy": "fsdp"}}, "ZeRO-3 shards parameters, gradients and optimizer "
                      "state, as FSDP does (run with torchrun or --nproc; offload settings are dropped)")
    if stage in (0, 1, 2):
        return Mapped({"distributed": {"strategy": "ddp"}}, f"ZeRO-{stage} keeps full parameters on each GPU; ftclip "
                      "runs plain DDP (same math, more optimizer memory per GPU)")
    return Refused(f"cannot tell the ZeRO stage of {what} (no readable file with zero_optimization.stage, no "
                   "zero1/2/3 in its name)")


def _strategy_from_fsdp(value: Any, config: dict) -> Outcome:
    settings = value if isinstance(value, dict) else {}
    sharding = str(settings.get("sharding_strategy") or settings.get("fsdp_sharding_strategy") or "")
    if "NO_SHARD" in sharding.upper() or sharding == "5":
        return Mapped({"distributed": {"strategy": "ddp"}}, "NO_SHARD replicates the model: DDP")
    updates: dict[str, Any] = {"distributed": {"strategy": "fsdp"}}
    if settings.get("activation_checkpointing") or settings.get("fsdp_activation_checkpointing"):
        updates["gradient_checkpointing"] = True
    return Mapped(updates, "FULL_SHARD: ftclip's FSDP2 (fully_shard per decoder layer, run with torchrun or --nproc); "
                  "wrap, offload and state-dict settings are ftclip's own")


def _liger_loss(value: Any, config: dict) -> Outcome:
    if config.get("rl") or config.get("reward_model"):  # Liger's patch fuses the loss only when labels are passed
        return Dropped("TRL's preference and reward trainers call the model without labels, so Liger's fused loss "
                       "is not used there; ftclip computes their log-probabilities through its chunked path")
    return Mapped({"liger_fused_linear_cross_entropy": value})


def _plugins(value: Any, config: dict) -> Outcome:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return Refused(f"{show_value(value)}: plugins is a list of plugin class paths")
    refused, updates, notes = [], {}, []
    for plugin in value:
        name = str(plugin).rsplit(".", 1)[-1]
        if name == "CutCrossEntropyPlugin":
            updates["chunked_cross_entropy"] = True
            notes.append("CutCrossEntropy → chunked_cross_entropy (the same loss without full logits)")
        elif name == "LigerPlugin":
            notes.append("Liger kernels: liger_fused_linear_cross_entropy carries over; the rest are kernels")
        elif name in ("KernelsPlugin", "SwanLabPlugin"):
            notes.append(f"{name}: no effect on what is trained")
        else:
            refused.append(name)
    if refused:
        return Refused(f"plugin(s) {', '.join(refused)} change training and ftclip has no equivalent")
    return Mapped(updates, "; ".join(notes))


def _eot_tokens(value: Any, config: dict) -> Outcome:
    if isinstance(value, list) and len(value) == 1:
        return Dropped(f"ftclip's chat masking trains the end-of-turn marker the chat template writes after each "
                       f"turn, found from its render; for this template that should be {value[0]} (check with "
                       "`ftclip preprocess`)")
    return Refused("several end-of-turn markers: ftclip's chat masking knows the one the chat template writes")


def _tokens(value: Any, config: dict) -> Outcome:
    if isinstance(value, list) and all(isinstance(token, str) for token in value):
        return Mapped({"tokens": value})
    return Refused("tokens must be a list of token strings, in Axolotl's schema too (list[str]: Axolotl rejects "
                   "this mapping); special tokens go in special_tokens")


def _neftune(value: Any, config: dict) -> Outcome:
    if value in (0, 0.0):
        return Dropped("0: noise of magnitude 0, none")
    return Mapped({"neftune_noise_alpha": value})


def _zero_is_unset(key: str) -> Converter:
    def convert(value: Any, config: dict) -> Outcome:
        if value == 0:
            return Dropped(f"0: Axolotl reads it as unset (its check is `if cfg.{key}`)")
        return Mapped({key: value})
    return convert


def _resume_from(value: Any, config: dict) -> Outcome:
    if isinstance(value, bool):
        return Refused(f"{show_value(value)}: Axolotl itself rejects it (its schema takes a checkpoint folder); ftclip "
                       "resumes from output_dir's newest checkpoint by itself: remove the key, or name the folder")
    return Mapped({"resume_from_checkpoint": value})


def _axolotl_evaluates(config: dict) -> bool:
    """Axolotl's condition for a held-out set it can pick a best checkpoint on: val_set_size or test_datasets,
    not both (src/axolotl/core/builders/causal.py)."""
    held_out, tests = bool(as_number(config.get("val_set_size"))), bool(config.get("test_datasets"))
    return held_out != tests


def _save_eval_steps(config: dict) -> tuple[Any, Any]:
    return as_number(config.get("save_steps")), as_number(config.get("eval_steps"))


def _best_model_on(config: dict) -> bool:
    """Whether Axolotl turns load_best_model_at_end on: asked for (or early stopping), with a held-out set and
    save_steps a multiple of eval_steps; otherwise it is silently off."""
    save, evals = _save_eval_steps(config)
    asked = config.get("load_best_model_at_end") not in (None, False) or bool(config.get("early_stopping_patience"))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (save, evals))
    return bool(asked and _axolotl_evaluates(config) and numbers and save % evals == 0)


def _early_stopping(value: Any, config: dict) -> Outcome:
    if not _is_count(value):
        return Refused(f"{show_value(value)}: a number of evaluations")
    save, evals = _save_eval_steps(config)
    if not save or not evals:
        return Refused("Axolotl itself rejects this config: early_stopping_patience needs save_steps and eval_steps "
                       "set (saves_per_epoch/evals_per_epoch do not count in its check)")
    if not _best_model_on(config):
        return Refused("Axolotl itself rejects or cannot run this config: early stopping needs a held-out set "
                       "(val_set_size or test_datasets, not both) and eval_steps dividing save_steps")
    return Mapped({"early_stopping_patience": value, "load_best_model_at_end": True},
                  "Hugging Face's early stopping on the eval loss (or metric_for_best_model); Axolotl then also saves "
                  "the best checkpoint as the result (load_best_model_at_end)")


def _load_best_model(value: Any, config: dict) -> Outcome:
    if is_off(value):
        return Dropped(f"{show_value(value)}: off")
    if not _best_model_on(config):
        return Dropped("Axolotl turns it on only with a held-out set (val_set_size or test_datasets, not both) and "
                       "save_steps a multiple of eval_steps; without them its result is the last step's weights, as here")
    return Mapped({"load_best_model_at_end": True}, "the best checkpoint (by metric_for_best_model) is saved as the result")


def _best_model_option(key: str) -> Converter:
    def convert(value: Any, config: dict) -> Outcome:
        if not _best_model_on(config):
            return Dropped("read by early stopping and load_best_model_at_end, neither of which this config turns on")
        return Mapped({key: value})
    return convert


def _unfrozen_parameters(value: Any, config: dict) -> Outcome:
    if config.get("adapter"):
        return Refused("with an adapter, Axolotl matches these patterns against the LoRA-wrapped names "
                       "(base_model.model.…) after peft has added LoRA, so '^model…' patterns freeze everything, "
                       "the LoRA weights too; ftclip does not reproduce that")
    return Mapped({"unfrozen_parameters": value}, "the same regex rules ('.' literal, matched from the name's start)")


def _peft_block(value: Any, config: dict) -> Outcome:
    if isinstance(value, dict) and set(value) <= {"loftq_config"}:
        return Mapped({"peft": value}, "LoftQ initialization, through peft as in Axolotl")
    return Refused(f"peft options {sorted(value) if isinstance(value, dict) else value!r}: ftclip's peft block "
                   "takes loftq_config only")


# Axolotl's BitsAndBytesConfig for QLoRA before bnb_config_kwargs update it: the values ftclip also uses.
_BNB_SAME_AS_FTCLIP = {"load_in_4bit": True, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}


def _bnb_config_kwargs(value: Any, config: dict) -> Outcome:
    if not isinstance(value, dict):
        return Refused("bnb_config_kwargs must be a mapping of BitsAndBytesConfig arguments")
    updates, notes, refused = {}, [], []
    for key, setting in value.items():
        if key in ("bnb_4bit_use_double_quant", "bnb_4bit_quant_type"):
            updates[key] = setting
        elif key == "bnb_4bit_quant_storage":
            notes.append("bnb_4bit_quant_storage: how the packed 4-bit bytes are stored; the same weights")
        elif key in _BNB_SAME_AS_FTCLIP and setting == _BNB_SAME_AS_FTCLIP[key]:
            notes.append(f"{key}: {setting} is ftclip's too")
        else:
            refused.append(f"{key}: {setting!r}")
    if refused:
        return Refused(f"BitsAndBytesConfig settings ftclip does not take: {', '.join(refused)}")
    return Mapped(updates, "; ".join(notes))


def _device_map(value: Any, config: dict) -> Outcome:
    devices = set(value.values()) if isinstance(value, dict) else {value}
    if len(devices) == 1 and not isinstance(next(iter(devices)), (str, dict, list)) or devices <= {"cuda", "cuda:0"}:
        return Dropped(f"{show_value(value)}: the whole model on one device, as ftclip places it for training")
    return Refused(f"{show_value(value)} can spread one model over several GPUs (model parallel); ftclip keeps a whole copy "
                   "per GPU (DDP) or shards it (FSDP)")


# optim_args entries that are the Adam settings ftclip takes by name, with Hugging Face's defaults.
_ADAM_ARGS = {"eps": ("adam_epsilon", 1e-8), "beta1": ("adam_beta1", 0.9), "beta2": ("adam_beta2", 0.999)}


def _optim_args(value: Any, config: dict) -> Outcome:
    if not isinstance(value, dict):
        return Refused(f"optimizer arguments {show_value(value)}: ftclip's optimizers take adam_beta1, adam_beta2 and "
                       "adam_epsilon by name")
    differing = []
    for name, setting in value.items():
        key, default = _ADAM_ARGS.get(name, (None, None))
        given = as_number(config.get(key)) if key and config.get(key) is not None else default
        if key is None or as_number(setting) != given:
            differing.append(f"{name}: {show_value(setting)}")
    if differing:
        return Refused(f"optimizer arguments {', '.join(differing)}: ftclip's optimizers take adam_beta1, adam_beta2 "
                       "and adam_epsilon by name (set those instead where they mean the same)")
    return Dropped(f"{show_value(value)}: the same values the Adam settings have here (adam_epsilon, adam_beta1/2)")


def _parallel_size(value: Any, config: dict) -> Outcome:
    if value in (None, 0, 1):
        return Dropped("1: no parallelism of this kind")
    return Refused("ftclip has no tensor, context or expert parallelism (only DDP and FSDP over data)")


def _save_total_limit(value: Any, config: dict) -> Outcome:
    return Mapped({"save_total_limit": value})


def _tokenizer_config(value: Any, config: dict) -> Outcome:
    return Mapped({"tokenizer": value})


# Keys whose value is a number in Axolotl's schema: pydantic there reads "2e-4" or "16" written as strings (YAML
# reads 2e-4, without a dot, as a string), so the importer reads them as numbers too before converting.
NUMERIC_KEYS = {"learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "warmup_ratio", "lora_r", "lora_alpha",
                "lora_dropout", "micro_batch_size", "gradient_accumulation_steps", "batch_size", "num_epochs",
                "max_steps", "val_set_size", "sequence_len", "cosine_min_lr_ratio", "adam_beta1", "adam_beta2",
                "adam_epsilon", "adam_eps", "logging_steps", "save_steps", "eval_steps", "saves_per_epoch",
                "evals_per_epoch", "save_total_limit", "seed"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def as_number(value: Any) -> Any:
    """"16" → 16, "2e-4" → 0.0002, "1.0" → 1.0; anything else as it is."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and not any(mark in value for mark in ".eE") else number
    return value


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _steps(key: str, per_epoch: str | None) -> Converter:
    """save_steps, eval_steps, logging_steps: a whole number of steps, or (Hugging Face's form, which Axolotl passes
    on) a fraction below 1 of the run's total steps: every ceil(fraction × max_steps) steps."""
    def convert(value: Any, config: dict) -> Outcome:
        if key == "eval_steps" and not as_number(config.get("val_set_size")) and not config.get("test_datasets"):
            return Dropped("no held-out set (val_set_size is 0 or absent): Axolotl evaluates nothing")
        if _is_count(value) or (isinstance(value, float) and value.is_integer() and value >= 1):
            return Mapped({key: int(value)})
        if not (isinstance(value, float) and 0 < value < 1):
            return Refused(f"{show_value(value)}: a whole number of steps or a fraction below 1 of the run's steps")
        max_steps = as_number(config.get("max_steps"))
        if _is_count(max_steps):
            return Mapped({key: math.ceil(max_steps * value)}, f"{value} of max_steps {max_steps}, rounded up as "
                          "Hugging Face does")
        if per_epoch is None:
            return Dropped(f"{value}: every {value:.0%} of the run's steps (Hugging Face's form; Axolotl's schema now "
                           "takes whole numbers only); logging has no effect on training, so ftclip's default applies")
        epochs = as_number(config.get("num_epochs")) or 1
        if not _is_count(epochs):
            return Refused(f"{value} of the run's steps with num_epochs {show_value(epochs)}: cannot tell how often per epoch")
        per_run = 1 / value
        times = max(1, round(per_run / epochs))
        exact = abs(per_run - round(per_run)) < 1e-9 and round(per_run) % epochs == 0
        how = "the same count" if exact else "the nearest whole count"
        return Mapped({per_epoch: times}, f"a fraction: Hugging Face acts every ceil({value} × total steps) steps, "
                      f"{per_run:g} times in a run of {epochs} epoch(s); {per_epoch} {times} is {how} (when it fires "
                      "can differ by a step; no effect on the trained weights)")
    return convert


def _base_model_config(value: Any, config: dict) -> Outcome:
    if value == config.get("base_model"):
        return Dropped("the same as base_model, where ftclip reads the model's config")
    return Refused(f"loads the model's config (its architecture) from {show_value(value)} instead of base_model "
                   f"{show_value(config.get('base_model'))}; ftclip reads it from base_model (for single values use "
                   "model_config / overrides_of_model_config)")


def _misspelled(correct: str) -> Rule:
    """A key Axolotl's schema lacks whose name says what the author meant: Axolotl discarded it, so the setting the
    author wanted was never made; refused so the author notices, with the key that makes it."""
    return _refuse(f"not a key of Axolotl's config schema: Axolotl discards it, so it set nothing there; Axolotl's "
                   f"key for this is {correct}")


def _not_axolotl(note: str = "") -> Rule:
    """A key Axolotl's schema (at 067b021c) lacks: its validation discards it, so it had no effect there."""
    return _drop("not a key of Axolotl's config schema: Axolotl discards it, so it has no effect there"
                 + (f" ({note})" if note else ""))



# ---------------------------------------------------------------- the table

TRACKER_WHY = "a tracker setting: no effect on what is trained"
_EVAL_ONLY = "evaluation only: no effect on what is trained"
_MEMORY = "memory or speed only: the same gradients"
_HUB = "hub upload or credentials: no effect on what is trained"

AXOLOTL_KEYS: dict[str, Rule] = {
    # model
    "base_model": _same(),
    "base_model_config": _to("—", "dropped when it is base_model; refused when the config comes from elsewhere",
                             _base_model_config),
    "tokenizer_config": _to("tokenizer", convert=_tokenizer_config),
    "trust_remote_code": _same(),
    "model_type": _to("—", "dropped for *ForCausalLM, refused otherwise", _model_type),
    "tokenizer_type": _drop("ftclip loads AutoTokenizer, which picks the tokenizer class from the checkpoint"),
    "tokenizer_use_fast": _drop("ftclip uses the fast tokenizer when the checkpoint has one"),
    "tokenizer_legacy": _refuse("changes how a slow Llama tokenizer splits text"),
    "processor_type": _refuse("a multimodal processor: ftclip trains text-only causal LMs"),
    "model_config": _to("overrides_of_model_config", "set on the model's config before loading (alias accepted)"),
    "overrides_of_model_config": _same("Axolotl's field name for model_config"),
    "revision_of_model": _same("passed to from_pretrained"),
    "model_revision": _to("revision_of_model", "Axolotl's alias (accepted natively)"),
    "base_model_ignore_patterns": _drop("download filter: no effect on what is trained"),
    "low_cpu_mem_usage": _drop(_MEMORY),
    "device_map": _to("—", "one device: dropped; several (auto, per-layer maps): refused (model parallel)", _device_map),
    "resize_token_embeddings_to_32x": _drop("pads the embedding matrix for speed; the trained tokens are the same"),
    "reinit_weights": _refuse("re-initializes the model's weights"),
    "experimental_skip_move_to_device": _drop(_MEMORY),
    # adapter
    "adapter": _to("adapter", convert=_adapter),
    "lora_r": _same(), "lora_alpha": _same(),
    "lora_dropout": _same("Axolotl's default 0.0 is written out (ftclip's is 0.05)"),
    "lora_target_modules": _to("lora_target_modules", "a list, all-linear or a regex", _target_modules),
    "lora_target_linear": _same(), "lora_modules_to_save": _same(), "lora_model_dir": _same(),
    "lora_fan_in_fan_out": _same("peft's fan_in_fan_out (peft turns it off for nn.Linear layers)"),
    "lora_target_parameters": _same("peft's target_parameters (LoRA on parameters such as MoE experts)"),
    "peft_use_rslora": _same("peft's use_rslora (alpha/√r scaling)"), "peft_use_dora": _same("peft's use_dora"),
    "peft_layers_to_transform": _refuse("LoRA on a subset of layers"),
    "peft": _to("peft", "loftq_config → peft's LoftQ initialization; other options refused", _peft_block),
    "lora_mlp_kernel": _drop(KERNEL_ONLY), "lora_qkv_kernel": _drop(KERNEL_ONLY), "lora_o_kernel": _drop(KERNEL_ONLY),
    "lora_on_cpu": _drop(_MEMORY),
    "unfrozen_parameters": _to("unfrozen_parameters", "full fine-tuning of the matching parameters; refused with an "
                               "adapter", _unfrozen_parameters),
    "relora": _refuse("ReLoRA (periodic merge and restart)"),
    **{key: _refuse("ReLoRA (periodic merge and restart)") for key in (
        "relora_steps", "relora_warmup_steps", "relora_anneal_steps", "relora_prune_ratio", "relora_cpu_offload")},
    "rope_scaling": _refuse("Axolotl itself rejects a top-level rope_scaling (deprecated: it goes under model_config, "
                            "which ftclip takes as overrides_of_model_config)"),
    **{f"is_{family}_derived_model": _drop("tells Axolotl the model family; ftclip reads it from the checkpoint")
       for family in ("llama", "mistral", "falcon", "qwen")},
    "attention": _drop("not an Axolotl key (Axolotl ignores it); the attention kernel is attn_implementation"),
    "s2_attention": _refuse("shifted-sparse attention (LongLoRA)"),
    "load_in_4bit": _same(), "load_in_8bit": _same(),
    "bnb_config_kwargs": _to("—", "bnb_4bit_use_double_quant and bnb_4bit_quant_type carry over; storage dtype and "
                             "settings equal to ftclip's are dropped; others refused", _bnb_config_kwargs),
    "gptq": _refuse("GPTQ-quantized bases"), "gptq_groupsize": _refuse("GPTQ-quantized bases"),
    "gptq_model_v1": _refuse("GPTQ-quantized bases"), "gptq_disable_exllama": _refuse("GPTQ-quantized bases"),
    "fp8": _refuse("fp8 training"), "fp8_enable_fsdp_float8_all_gather": _refuse("fp8 training"),
    "llmcompressor": _refuse("sparsity or compression during training"),
    # data
    "datasets": _to("datasets", "each entry converted: path, type, split, name, data_files, revision, chat options"),
    "test_datasets": _to("test_datasets", "each entry converted as datasets' are; evaluated on, never trained on"),
    "pretraining_dataset": _refuse("streamed pretraining data (Axolotl streams it in file order and packs it); "
                                   "ftclip reads datasets whole: list the files under datasets with type: completion"),
    "streaming": _refuse("streamed datasets"),
    "val_set_size": _same(), "sequence_len": _same(), "train_on_inputs": _same(), "sample_packing": _same(),
    "dataset_prepared_path": _to("dataset_cache_dir", "the tokenized-data cache; alias accepted natively"),
    "dataset_processes": _same(), "dataset_num_proc": _to("dataset_processes"),
    "push_dataset_to_hub": _drop(_HUB), "hub_model_id": _drop(_HUB), "hub_strategy": _drop(_HUB),
    "hf_use_auth_token": _drop(_HUB),
    "chat_template": _same("names are Axolotl's (tokenizer_default, chatml, llama3, ...)"),
    "chat_template_jinja": _same(), "special_tokens": _same(), "tokens": _to("tokens", convert=_tokens),
    "eot_tokens": _to("—", "one marker: dropped (ftclip's chat masking takes the end-of-turn marker from the chat "
                      "template's render); several: refused", lambda value, config: _eot_tokens(value, config)),
    "default_system_message": _refuse("inserts a system message into every conversation"),
    "eval_sample_packing": _drop(_EVAL_ONLY), "pad_to_sequence_len": _drop(_MEMORY),
    "sample_packing_eff_est": _drop("a packing estimate Axolotl computes"),
    "total_num_tokens": _drop("a token count Axolotl computes"),
    "max_packed_sequence_len": _refuse("Axolotl itself rejects it (deprecated: no longer supported); packing uses "
                                       "sequence_len"),
    "sample_packing_sequentially": _refuse("packs in data order instead of by length"),
    "curriculum_sampling": _refuse("trains in data order without shuffling"),
    "group_by_length": _refuse("batches examples of similar length together"),
    "shuffle_merged_datasets": _drop("ftclip shuffles the training data every epoch"),
    "dataset_exact_deduplication": _same("exact repeats by tokens and labels, dropped after the held-out split"),
    "min_sample_len": _refuse("drops short examples"), "remove_unused_columns": _drop("dataset columns the trainer keeps"),
    "skip_prepare_dataset": _drop("Axolotl's preprocessing switch"),
    "dataset_shard_num": _refuse("trains on a shard of the data"), "dataset_shard_idx": _refuse("trains on a shard"),
    # schedule
    "micro_batch_size": _same(), "gradient_accumulation_steps": _same(),
    "batch_size": _to("gradient_accumulation_steps", "batch_size ÷ micro_batch_size", _batch_size),
    "eval_batch_size": _drop(_EVAL_ONLY), "num_epochs": _same(), "max_steps": _same(),
    "learning_rate": _same(), "weight_decay": _same(),
    "optimizer": _to("optimizer", "adamw_bnb_8bit → adamw_8bit; the rest by the same name or refused", _optimizer),
    "lr_scheduler": _to("lr_scheduler", "constant_with_warmup → constant; cosine_with_min_lr → cosine", _scheduler),
    "lr_scheduler_kwargs": _to("—", "refused unless it only carries cosine_with_min_lr's min_lr_rate",
                               _scheduler_kwargs),
    "cosine_min_lr_ratio": _to("min_lr_ratio", convert=_min_lr_ratio),
    "cosine_constant_lr_ratio": _refuse("holds the LR flat for the last part of the run"),
    "lr_quadratic_warmup": _refuse("quadratic warmup"), "lr_div_factor": _refuse("one-cycle schedule settings"),
    "eta_min": _drop("not a key of Axolotl's config schema (at 067b021c): its validation discards it, so it has "
                     "no effect there"),
    "warmup_steps": _to("warmup_steps", "a fraction below 1 becomes warmup_ratio", _warmup_steps),
    "warmup_ratio": _to("warmup_ratio", convert=_warmup_ratio),
    "adam_beta1": _same(), "adam_beta2": _same(), "adam_epsilon": _same(), "adam_eps": _to("adam_epsilon"),
    "adam_beta3": _refuse("a third beta (CAME/AdEMAMix)"), "adam_epsilon2": _refuse("a second epsilon (CAME)"),
    "optim_args": _to("—", "dropped where it repeats the Adam settings; refused otherwise", _optim_args),
    "optim_target_modules": _refuse("GaLore/APOLLO targets"),
    "embedding_lr": _refuse("a separate embedding LR"), "embedding_lr_scale": _refuse("a separate embedding LR"),
    "loraplus_lr_ratio": _refuse("LoRA+ (a higher LR for LoRA B)"),
    "loraplus_lr_embedding": _refuse("LoRA+ (a higher LR for LoRA B)"),
    "max_grad_norm": _to("gradient_clipping", "a number clips by norm; empty means Hugging Face's default 1.0"),
    "neftune_noise_alpha": _to("neftune_noise_alpha", "noise on the input embeddings in training forwards, "
                               "transformers' formula; 0 is no noise", _neftune),
    "noisy_embedding_alpha": _to("neftune_noise_alpha", "Axolotl's older name", _neftune),
    "early_stopping_patience": _to("early_stopping_patience", "with load_best_model_at_end, as Axolotl turns it on; "
                                   "refused where Axolotl rejects the config", _early_stopping),
    "loss_watchdog_threshold": _drop("a safety stop on a high loss; ftclip stops on non-finite steps "
                                     "(max_skipped_steps)"),
    "loss_watchdog_patience": _drop("a safety stop on a high loss (see loss_watchdog_threshold)"),
    "jagged_restart_steps": _refuse("jagged LR restarts"), "jagged_restart_warmup_steps": _refuse("jagged LR restarts"),
    "jagged_restart_anneal_steps": _refuse("jagged LR restarts"),
    "lisa_n_layers": _refuse("LISA layer sampling"), "lisa_step_interval": _refuse("LISA layer sampling"),
    "lisa_layers_attribute": _refuse("LISA layer sampling"),
    "process_reward_model": _refuse("process reward models (a score per reasoning step)"),
    "cls_model_config": _refuse("classification heads"),
    # precision and memory
    "bf16": _to("bf16", "auto, as in Axolotl, when absent", _precision_flag("bf16")),
    "fp16": _same(), "tf32": _same("Axolotl's default auto is written out (ftclip's is false)"),
    "bfloat16": _to("bf16", convert=_legacy_dtype("bf16")), "float16": _to("fp16", convert=_legacy_dtype("fp16")),
    "torch_dtype": _not_axolotl("Axolotl sets its own torch_dtype from bf16/fp16/load_in_8bit, as ftclip does"),
    "gradient_checkpointing": _to("gradient_checkpointing", "offload → true", _gradient_checkpointing),
    "gradient_checkpointing_kwargs": _same(), "activation_offloading": _drop(_MEMORY), "tiled_mlp": _drop(_MEMORY),
    "attn_implementation": _to("attn_implementation", "xformers and hub kernels → sdpa", _attention),
    "flash_attention": _to("attn_implementation", "true → flash_attention_2", _attention_flag("flash_attention_2")),
    "sdp_attention": _to("attn_implementation", "true → sdpa", _attention_flag("sdpa")),
    "xformers_attention": _to("attn_implementation", "true → sdpa", _attention_flag("sdpa")),
    "flex_attention": _to("attn_implementation", "true → flex_attention", _attention_flag("flex_attention")),
    "eager_attention": _to("attn_implementation", "true → eager", _attention_flag("eager")),
    "flex_attn_compile_kwargs": _drop(KERNEL_ONLY), "flash_attn_cross_entropy": _drop(KERNEL_ONLY),
    "flash_attn_rms_norm": _drop(KERNEL_ONLY), "flash_attn_fuse_mlp": _drop(KERNEL_ONLY),
    "flash_attn_fuse_qkv": _drop(KERNEL_ONLY), "flash_optimum": _drop(KERNEL_ONLY),
    "fused_attn_kernel": _drop(KERNEL_ONLY), "gemma4_hybrid_attn_impl": _drop(KERNEL_ONLY),
    "use_kernels": _drop(KERNEL_ONLY), "use_scattermoe": _drop(KERNEL_ONLY), "use_sonicmoe": _drop(KERNEL_ONLY),
    "experts_implementation": _drop(KERNEL_ONLY), "torch_compile": _drop(KERNEL_ONLY),
    "torch_compile_backend": _drop(KERNEL_ONLY), "torch_compile_mode": _drop(KERNEL_ONLY),
    "chunked_cross_entropy": _same(), "chunked_cross_entropy_num_chunks": _drop(_MEMORY),
    "cut_cross_entropy": _to("chunked_cross_entropy", "the same loss without materializing all logits"),
    "liger_fused_linear_cross_entropy": _to("liger_fused_linear_cross_entropy", "SFT runs (dropped under rl and "
                                            "reward_model)", _liger_loss),
    "liger_rope": _drop(KERNEL_ONLY), "liger_rms_norm": _drop(KERNEL_ONLY), "liger_glu_activation": _drop(KERNEL_ONLY),
    "liger_layer_norm": _drop(KERNEL_ONLY), "liger_cross_entropy": _drop(KERNEL_ONLY),
    "liger_rms_norm_gated": _drop(KERNEL_ONLY),
    "plugins": _to("—", "CutCrossEntropy → chunked_cross_entropy; Liger, Kernels, SwanLab dropped; others refused",
                   _plugins),
    # distributed
    "deepspeed": _to("distributed.strategy", "ZeRO-3 → fsdp; ZeRO-1/2 → ddp"),
    "fsdp": _to("distributed.strategy", "full_shard → fsdp", _strategy_from_fsdp),
    "fsdp_config": _to("distributed.strategy", "FULL_SHARD → fsdp; NO_SHARD → ddp", _strategy_from_fsdp),
    "fsdp_version": _drop("ftclip's fsdp is FSDP2 (fully_shard)"),
    "dp_shard_size": _drop("FSDP's shard group size: the same math"),
    "dp_replicate_size": _drop("HSDP's replica count: the same math"),
    "tensor_parallel_size": _to("—", "refused above 1", _parallel_size),
    "context_parallel_size": _to("—", "refused above 1", _parallel_size),
    "expert_parallel_size": _to("—", "refused above 1", _parallel_size),
    "ddp": _drop("ftclip uses DDP whenever it runs under torchrun"),
    "ddp_find_unused_parameters": _drop(_MEMORY), "ddp_timeout": _to(
        "distributed.timeout", "seconds, as Axolotl's", lambda value, config: Mapped({"distributed": {"timeout": value}})),
    "ddp_bucket_cap_mb": _drop(_MEMORY), "ddp_broadcast_buffers": _drop(_MEMORY),
    "torchdistx_path": _drop(_MEMORY), "local_rank": _drop("set by the launcher"),
    "use_ray": _refuse("Ray launching: ftclip runs under torchrun"), "ray_num_workers": _refuse("Ray launching"),
    # run
    "seed": _same(), "output_dir": _same(),
    "logging_steps": _to("logging_steps", "a fraction below 1 of the run's steps: dropped (logging only)",
                         _steps("logging_steps", None)),
    "save_steps": _to("save_steps", "a fraction below 1 of the run's steps → saves_per_epoch (× max_steps when set)",
                      _steps("save_steps", "saves_per_epoch")),
    "eval_steps": _to("eval_steps", "a fraction below 1 of the run's steps → evals_per_epoch (× max_steps when set)",
                      _steps("eval_steps", "evals_per_epoch")),
    "saves_per_epoch": _to("saves_per_epoch", "0 is unset, as Axolotl reads it", _zero_is_unset("saves_per_epoch")),
    "evals_per_epoch": _same(),
    "save_total_limit": _to("save_total_limit", "absent = keep all (written as 0; ftclip's default keeps 3)",
                            _save_total_limit),
    "save_strategy": _drop("when checkpoints are written: save_steps/saves_per_epoch carry it"),
    "eval_strategy": _drop(_EVAL_ONLY), "evaluation_strategy": _drop(_EVAL_ONLY),
    "save_safetensors": _drop("ftclip always writes safetensors"), "save_only_model": _drop("checkpoint contents"),
    "save_first_step": _drop("an extra checkpoint"),
    "resume_from_checkpoint": _to("resume_from_checkpoint", "a checkpoint folder", _resume_from),
    "auto_resume_from_checkpoints": _drop("ftclip resumes from output_dir's latest checkpoint by default"),
    "eval_table_size": _drop(_EVAL_ONLY), "eval_max_new_tokens": _drop(_EVAL_ONLY),
    "eval_table_max_new_tokens": _drop(_EVAL_ONLY),
    "do_causal_lm_eval": _drop(_EVAL_ONLY), "eval_causal_lm_metrics": _drop(_EVAL_ONLY), "do_bench_eval": _drop(_EVAL_ONLY),
    "strict": _drop("Axolotl's config-merging switch"), "debug": _drop("logging"), "gpu_memory_limit": _drop(_MEMORY),
    "wandb_project": _same(), "wandb_entity": _same(), "wandb_name": _same(), "wandb_mode": _same(),
    "wandb_run_id": _same(), "wandb_watch": _drop(TRACKER_WHY), "wandb_log_model": _drop(TRACKER_WHY),
    "use_wandb": _drop(TRACKER_WHY),
    "mlflow_tracking_uri": _same(), "mlflow_experiment_name": _same(), "mlflow_run_name": _same(),
    "hf_mlflow_log_artifacts": _drop(TRACKER_WHY), "use_mlflow": _drop(TRACKER_WHY),
    "use_tensorboard": _drop("ftclip always writes TensorBoard logs"),
    "comet_api_key": _drop(TRACKER_WHY), "comet_workspace": _drop(TRACKER_WHY), "comet_project_name": _drop(TRACKER_WHY),
    "use_comet": _drop(TRACKER_WHY), "use_swanlab": _drop(TRACKER_WHY), "use_otel_metrics": _drop(TRACKER_WHY),
    "otel_metrics_host": _drop(TRACKER_WHY), "otel_metrics_port": _drop(TRACKER_WHY),
    "ebft": _refuse("energy-based fine-tuning (an RL-style trainer)"), "vllm": _refuse("vLLM generation for RL"),
    "diffusion": _refuse("diffusion language-model training"),
    "llama4_linearized_experts": _refuse("Llama 4 MoE experts rewritten as linear layers"),
    "dsv4_fp4_grouped_mode": _refuse("fp4 expert kernels that quantize the weights"),
    "nvfp4_merge_aware": _refuse("nvfp4 quantization"), "use_onebitllms": _refuse("1-bit (BitNet) training"),
    "freeze_mm_modules": _refuse("multimodal models"), "full_finetune": _refuse("multimodal full fine-tuning switch"),
    "use_eaft": _refuse("EAFT loss reweighting"), "eaft_alpha": _refuse("EAFT loss reweighting"),
    "eaft_k": _refuse("EAFT loss reweighting"),
    "pretrain_multipack_attn": _refuse("streamed pretraining data"),
    "streaming_multipack_buffer_size": _refuse("streamed datasets"),
    "sample_packing_seq_len_multiplier": _drop("a packing buffer size Axolotl computes"),
    "expert_parallel_num_nvl_bytes": _refuse("expert parallelism"),
    "expert_parallel_token_capacity": _refuse("expert parallelism"),
    "use_dsv4_kernels": _drop(KERNEL_ONLY), "use_glm_dsa_kernels": _drop(KERNEL_ONLY),
    "accelerator_config": _drop("accelerate's launcher settings"),
    # Hugging Face TrainingArguments and other settings seen in configs outside Axolotl's repository
    "report_to": _drop(TRACKER_WHY), "push_to_hub": _drop(_HUB), "hub_private_repo": _drop(_HUB),
    "hub_token": _drop(_HUB), "logging_first_step": _drop("logging"), "logging_dir": _drop("logging"),
    "dataloader_pin_memory": _drop(_MEMORY), "dataloader_num_workers": _drop(_MEMORY),
    "dataloader_prefetch_factor": _drop(_MEMORY), "max_memory": _drop("per-device memory caps for device_map"),
    "eval_accumulation_steps": _drop(_EVAL_ONLY), "torch_distributed_port": _drop("a launcher port"),
    "load_best_model_at_end": _to("load_best_model_at_end", "on where Axolotl turns it on (a held-out set, save_steps a "
                                  "multiple of eval_steps); dropped where Axolotl leaves it off", _load_best_model),
    "metric_for_best_model": _to("metric_for_best_model", "dropped where neither early stopping nor the best model "
                                 "is on", _best_model_option("metric_for_best_model")),
    "greater_is_better": _to("greater_is_better", "dropped where neither early stopping nor the best model is on",
                             _best_model_option("greater_is_better")),
    "max_packed_no_ctx_sequence_len": _refuse("an old packing setting Axolotl no longer has; packing uses "
                                              "sequence_len"),
    "sequence_parallel_degree": _to("—", "Axolotl's older name for context_parallel_size: refused above 1",
                                    _parallel_size),
    "heads_k_stride": _drop("a setting of sequence parallelism (refused above 1 there)"),
    "ring_attn_func": _drop("a setting of sequence parallelism (refused above 1 there)"),
    "save_embedding_layers": _not_axolotl("peft's switch to save embeddings with the adapter"),
    "sample_packing_size": _not_axolotl(), "datasets_path": _not_axolotl(), "output_file": _not_axolotl(),
    "deepspeed_config": _not_axolotl("the deepspeed key decides"),
    "eval_dataset": _not_axolotl("Axolotl's is test_datasets"),
    **{key: _not_axolotl("Axolotl's is special_tokens." + key)
       for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
    # seen in configs committed in other repositories (tests/fixtures/axolotl_wild), checked against Axolotl's schema
    "auto_find_batch_size": _drop("Hugging Face halves the micro-batch and retries after running out of memory; ftclip "
                                  "trains with micro_batch_size as given (where that search starts) or stops"),
    "dataset_keep_in_memory": _drop(_MEMORY),
    "sample_packing_group_size": _drop("how many examples Axolotl's multipack packs at a time: the packing layout, "
                                       "which ftclip's own packer decides"),
    "sample_packing_bin_size": _drop("the most examples Axolotl's multipack puts in one row: the packing layout, "
                                     "which ftclip's own packer decides"),
    "batch_flattening": _drop(_MEMORY), "profiler_steps": _drop("a profiler: no effect on what is trained"),
    "chat_template_kwargs": _refuse("arguments given to the chat template when it renders (such as enable_thinking), "
                                    "which change the rendered text; ftclip renders the template without them"),
    "data_seed": _not_axolotl("Hugging Face's seed for the data order; Axolotl never passes it on, its data order "
                              "follows seed"),
    "safe_serialization": _not_axolotl("ftclip writes safetensors"), "tokenizer_padding_side": _not_axolotl(),
    "push_adapter_to_hub": _not_axolotl(), "checkpoint_dir": _not_axolotl(), "global_batch_size": _not_axolotl(),
    # cloud launcher settings (axolotl's modal/baseten runners), not training
    **{key: _drop("cloud launcher setting, not training") for key in (
        "gpu", "gpu_count", "provider", "node_count", "volumes", "branch", "dockerfile_commands", "memory", "timeout",
        "memory_preprocess", "timeout_preprocess", "secrets", "project_name")},
}
# ---------------------------------------------------------------- model families (MoE, quantized formats, QAT)
# Axolotl's keys for the model families ftclip loads natively (ftclip/moe.py, expert_quant.py, modeling.py,
# qat.py): their rows are kept together here and joined into AXOLOTL_KEYS below.

_QAT_KEYS = {"weight_dtype", "activation_dtype", "group_size", "fake_quant_after_n_steps", "quantize_embedding"}


def _quantize_moe_experts(value: Any, config: dict) -> Outcome:
    if config.get("load_in_8bit") and not config.get("load_in_4bit"):
        return Refused("8-bit MoE experts (with load_in_8bit): ftclip stores the experts in 4 bits only "
                       "(load_in_4bit: true)")
    return Mapped({"quantize_moe_experts": bool(value)}, "the fused expert weights in bitsandbytes 4-bit, as Axolotl "
                  "stores them")


def _model_quantization_config(value: Any, config: dict) -> Outcome:
    if value != "Mxfp4Config":
        return Refused(f"{show_value(value)}: ftclip loads quantized checkpoints of the Mxfp4Config kind only (gpt-oss)")
    if not (config.get("model_quantization_config_kwargs") or {}).get("dequantize"):
        return Refused("Mxfp4Config without dequantize: true keeps the experts in MXFP4 for inference kernels, which "
                       "do not train")
    return Mapped({"model_quantization_config": value}, "gpt-oss's MXFP4 checkpoint, dequantized while loading")


def _model_quantization_config_kwargs(value: Any, config: dict) -> Outcome:
    if config.get("model_quantization_config") is None:
        return Dropped("no model_quantization_config for these arguments")
    return Mapped({"model_quantization_config_kwargs": value})


def _qat_block(value: Any, config: dict) -> Outcome:
    if not isinstance(value, dict):
        return Refused(f"{show_value(value)}: qat is a mapping (weight_dtype, activation_dtype, group_size, ...)")
    unknown = sorted(set(value) - _QAT_KEYS)
    if unknown:
        return Refused(f"qat settings ftclip does not take: {', '.join(unknown)}")
    settings = {key: setting for key, setting in value.items() if setting is not None}
    return Mapped({"qat": settings}, "torchao's quantization-aware training, as Axolotl runs it (pip install "
                  "'ftclip[torchao]')")


MODEL_FAMILY_KEYS: dict[str, Rule] = {
    "quantize_moe_experts": _to("quantize_moe_experts", "with load_in_4bit; with load_in_8bit: refused",
                                _quantize_moe_experts),
    "model_quantization_config": _to("model_quantization_config", "Mxfp4Config with dequantize: true; others refused",
                                     _model_quantization_config),
    "model_quantization_config_kwargs": _to("model_quantization_config_kwargs", convert=_model_quantization_config_kwargs),
    "tokenizer_use_mistral_common": _same("mistral-common's tokenizer through transformers' MistralCommonBackend "
                                          "(pip install 'ftclip[mistral]')"),
    "qat": _to("qat", "weight_dtype, activation_dtype, group_size, fake_quant_after_n_steps, quantize_embedding",
               _qat_block),
}
AXOLOTL_KEYS.update(MODEL_FAMILY_KEYS)

TRACKER_PREFIXES = ("trackio_", "swanlab_", "comet_", "wandb_", "mlflow_", "otel_")

# ---------------------------------------------------------------- vision-language models (issue 23, ftclip/vlm.py)
# Axolotl's multimodal keys are ftclip's own: these rows replace the refusals of processor_type and
# freeze_mm_modules above (skip_prepare_dataset and remove_unused_columns stay dropped: no-ops in ftclip too).
AXOLOTL_KEYS.update({
    "processor_type": _same("AutoProcessor or a transformers processor class; the model loads through "
                            "AutoModelForImageTextToText"),
    "image_size": _same("an int pads to a square, [width, height] resizes, as Axolotl does"),
    "image_resize_algorithm": _same(),
    "freeze_mm_modules": _same(),
})

# Keys that are not Axolotl's (its schema discards them) whose names say which setting the author meant: the
# importer refuses them with the key that makes it. Not in AXOLOTL_KEYS, so they do not make a file an Axolotl
# config: in an ftclip recipe they stay unknown keys with ftclip's "did you mean".
NOT_AXOLOTL_SPELLINGS = {key: _misspelled(correct) for key, correct in (
    ("lr", "learning_rate"), ("epochs", "num_epochs"), ("train_batch_size", "micro_batch_size"),
    ("tokenizer_path", "tokenizer_config"))}

# ftclip's own keys that Axolotl lacks: their presence marks a config as an ftclip recipe already.
FTCLIP_ONLY_KEYS = {"gradient_clipping", "distributed", "device", "max_skipped_steps", "dataset_cache_dir",
                    "min_lr_ratio", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "fp32", "tokenizer"}

# Dataset entry keys.
DATASET_TYPES = {"alpaca": "alpaca", "completion": "completion", "chat_template": "chat",
                 "chat_template.default": "chat", "chat": "chat"}
DATASET_KEYS: dict[str, Rule] = {
    "path": _same("a local path is rewritten relative to the written recipe"),
    "type": _to("datasets[].type", "alpaca, completion, chat_template → chat; sharegpt → chat with field_messages and "
                "message_property_mappings, as Axolotl's migration says; a user-defined mapping → a prompt format; "
                "alpaca_chat (.load_qa, .load_camel_ai, .load_no_prompt), alpaca_instruct.load_no_prompt → the prompt "
                "format they write"),
    "split": _same(), "name": _same(), "data_files": _same(), "revision": _same(),
    "field_messages": _same(), "message_property_mappings": _same(), "roles": _same(), "roles_to_train": _same(),
    "train_on_eos": _same(),
    "message_field_role": _to("datasets[].message_property_mappings.role"),
    "message_field_content": _to("datasets[].message_property_mappings.content"),
    "ds_type": _drop("ftclip reads the format from the file extension"),
    "trust_remote_code": _drop("dataset loading scripts are not run"),
    "field": _to("datasets[].field", "completion: the text key; other types: dropped (Axolotl does not read it)"),
    "chat_template": _to("chat_template", "per dataset: must match the recipe's one chat_template"),
    "drop_system_message": _same("the records' system turns are left out; a template's default system prompt stays"),
    "field_thinking": _refuse("Axolotl also splits <think>…</think> out of assistant content into the template's "
                              "thinking key; ftclip passes thinking/reasoning_content through but does not split"),
    "template_thinking_key": _refuse("see field_thinking: Axolotl splits <think>…</think> out of the content"),
    **{key: _drop("not a key of Axolotl's SFT dataset schema: Axolotl discards it (it belongs inside a user-defined "
                  "type mapping, where ftclip's prompt formats read it too)") for key in ("field_system", "system_prompt")},
    "conversation": _to("chat_template", "type: sharegpt's fastchat conversation → the chat template of the same format "
                        "(chatml, llama3, llama-3, mistral, gemma); others, and none (vicuna_v1.1), refused"),
    "field_human": _to("datasets[].roles.user", "type: sharegpt: the role name of the human turns"),
    "field_model": _to("datasets[].roles.assistant", "type: sharegpt: the role name of the model's turns"),
    **{key: _to("—", f"{column}: dropped (alpaca's own column); another column: refused")
       for key, column in (("field_instruction", "instruction"), ("field_input", "input"), ("field_output", "output"))},
    "field_prompt": _refuse("Axolotl's completion format reads one text column (field) and discards field_prompt/"
                            "field_completion (preference-data keys): the prompt and completion columns are not read"),
    "field_completion": _refuse("see field_prompt: Axolotl's completion format reads one text column"),
    "prompt_style": _drop("not a key of Axolotl's dataset schema: Axolotl discards it, so it has no effect there"),
    **{key: _drop("not a key of Axolotl's dataset schema: Axolotl discards it, so it has no effect there")
       for key in ("overlap_len", "min_sample_len", "discard_portion", "dset_type")},
    "field_chosen": _refuse("preference pairs"), "field_rejected": _refuse("preference pairs"),
    "shards": _refuse("reads one shard of the dataset"), "shards_idx": _refuse("reads one shard of the dataset"),
    "preprocess_shards": _refuse("reads one shard of the dataset"),
    "train_on_split": _to("datasets[].split", "Axolotl's older key for the split"),
    "train_on_inputs": _refuse("per-dataset train_on_inputs; ftclip has one for the recipe"),
    "step_separator": _refuse("process-reward-model data"), "train_on_last_step_only": _refuse("process-reward-model data"),
    "max_completion_length": _refuse("preference/RL completions"),
}


# ---------------------------------------------------------------- preference training (rl, reward_model)
# ftclip trains Axolotl's rl: dpo, ipo, orpo, simpo and kto, and reward_model, on its own loop (docs/preference.md).
# Axolotl hands these keys to TRL's trainers (src/axolotl/core/builders/rl.py, core/trainers/dpo/__init__.py); a key
# the chosen method's trainer does not read has no effect there, so it is dropped here.

PREFERENCE_METHODS = ("dpo", "ipo", "orpo", "simpo", "kto")


def _rl(value: Any, config: dict) -> Outcome:
    if value not in PREFERENCE_METHODS:
        return Refused(f"{show_value(value)}: online RL that generates as it trains (GRPO, GDPO, EBFT); ftclip trains "
                       f"the offline preference methods {', '.join(PREFERENCE_METHODS)}")
    if value == "simpo" and config.get("cpo_alpha") is None:
        return Mapped({"rl": value, "cpo_alpha": 1.0}, "Axolotl leaves cpo_alpha at TRL's CPOConfig default 1.0 (the "
                                                       "NLL of the chosen answer); ftclip's default is pure SimPO (0)")
    return Mapped({"rl": value})


def _beta_source(config: dict) -> str | None:
    """Which key sets TRL's beta in Axolotl: trl.beta, else rl_beta (or its old name dpo_beta)."""
    if isinstance(config.get("trl"), dict) and config["trl"].get("beta") is not None:
        return "trl.beta"
    for key in ("rl_beta", "dpo_beta"):
        if config.get(key) is not None:
            return key
    return None


def _beta(key: str) -> Converter:
    def convert(value: Any, config: dict) -> Outcome:
        source = _beta_source(config)
        if source != key:
            return Dropped(f"{source} sets TRL's beta in Axolotl, so this value is not read")
        if config.get("rl") == "orpo":  # TRL's ORPO calls its odds-ratio weight λ beta
            return Mapped({"orpo_alpha": float(value)}, "under rl: orpo, Axolotl passes it to TRL's ORPO as its weight λ")
        return Mapped({"rl_beta": float(value)})
    return convert


def _trl(value: Any, config: dict) -> Outcome:
    if not isinstance(value, dict):
        raise TypeError("trl is a mapping")
    settings = {key: setting for key, setting in value.items() if not is_off(setting)}
    others = sorted(set(settings) - {"beta"})
    if others:
        return Refused(f"TRL trainer settings ftclip does not have: {', '.join(others)} (GRPO/vLLM generation)")
    if "beta" not in settings:
        return Dropped("no setting that is on")
    return _beta("trl.beta")(settings["beta"], config)


def _read_by(key: str, methods: tuple[str, ...], why: str = "") -> Converter:
    """A method's own setting: the same key under those methods, dropped (not read by Axolotl's trainer) otherwise."""
    def convert(value: Any, config: dict) -> Outcome:
        method = config.get("rl") or ("reward_model" if config.get("reward_model") else None)
        if method not in methods:
            return Dropped(f"read under {' or '.join(methods)} only; {method or 'SFT'} does not read it")
        return Mapped({key: value}, why)
    return convert


def _method_key(key: str, methods: tuple[str, ...], why: str = "") -> Rule:
    return _to(key, f"read under {' or '.join(methods)} (dropped otherwise)", _read_by(key, methods, why))


def _orpo_alpha(value: Any, config: dict) -> Outcome:
    if config.get("rl") == "orpo" and _beta_source(config):
        return Dropped(f"{_beta_source(config)} sets ORPO's weight in Axolotl, so orpo_alpha is not read")
    return _read_by("orpo_alpha", ("orpo",))(value, config)


def _label_smoothing(value: Any, config: dict) -> Outcome:
    losses = config.get("dpo_loss_type") or ["sigmoid"]
    losses = [losses] if isinstance(losses, str) else losses
    if config.get("rl") != "dpo":
        return Dropped("Axolotl passes it under rl: dpo only")
    if not {"robust", "exo_pair"} & set(losses):
        return Dropped(f"TRL's {', '.join(losses)} loss does not read it (only robust and exo_pair do): no effect")
    return Mapped({"dpo_label_smoothing": value})


def _num_labels(value: Any, config: dict) -> Outcome:
    if config.get("reward_model") and value == 1:
        return Dropped("a reward model has one output, as ftclip builds it")
    return Refused(f"{show_value(value)} labels: classification heads other than a one-output reward model")


def _precompute(value: Any, config: dict) -> Outcome:
    if config.get("rl") in ("dpo", "ipo"):
        return Mapped({"precompute_ref_log_probs": bool(value)})
    return Dropped("Axolotl passes it to TRL's DPO trainer only (rl: dpo or ipo)")


PREFERENCE_KEYS: dict[str, Rule] = {
    "rl": _to("rl", "dpo, ipo, orpo, simpo, kto; simpo without cpo_alpha writes TRL's 1.0; grpo/gdpo/ebft refused", _rl),
    "rl_beta": _to("rl_beta", "TRL's beta (under rl: orpo, orpo_alpha: Axolotl passes it as ORPO's weight)", _beta("rl_beta")),
    "dpo_beta": _to("rl_beta", "Axolotl's old name for rl_beta", _beta("dpo_beta")),
    "trl": _to("rl_beta", "beta → rl_beta; other TRL (GRPO/vLLM) settings refused", _trl),
    "orpo_alpha": _to("orpo_alpha", "rl: orpo's weight λ, unless rl_beta or trl.beta sets it", _orpo_alpha),
    "simpo_gamma": _method_key("simpo_gamma", ("simpo",)),
    "cpo_alpha": _method_key("cpo_alpha", ("simpo",)),
    "kto_desirable_weight": _method_key("kto_desirable_weight", ("kto",)),
    "kto_undesirable_weight": _method_key("kto_undesirable_weight", ("kto",)),
    "dpo_loss_type": _method_key("dpo_loss_type", ("dpo",)),
    "dpo_loss_weights": _method_key("dpo_loss_weights", ("dpo",)),
    "dpo_label_smoothing": _to("dpo_label_smoothing", "with the robust or exo_pair loss; dropped otherwise (no effect "
                               "in TRL)", _label_smoothing),
    "precompute_ref_log_probs": _to("precompute_ref_log_probs", "rl: dpo or ipo (dropped otherwise)", _precompute),
    "max_prompt_len": _method_key("max_prompt_len", ("dpo", "ipo", "orpo", "simpo", "kto", "reward_model"),
                                  "ftclip keeps the prompt's last max_prompt_len tokens"),
    "reward_model": _same("a sequence-classification head with one output, the Bradley–Terry loss"),
    "center_rewards_coefficient": _method_key("center_rewards_coefficient", ("reward_model",)),
    "num_labels": _to("—", "1 with reward_model: dropped; refused otherwise", _num_labels),
    "rl_adapter_ref_model": _drop("a second copy of the base as the reference; ftclip disables the adapter instead "
                                  "(the same reference, no second copy)"),
    "dpo_use_weighting": _refuse("WPO weighting of DPO pairs"),
    "dpo_padding_free": _drop(_MEMORY), "dpo_use_liger_kernel": _drop(KERNEL_ONLY),
    "remove_unused_columns": _drop("a Trainer setting on dataset columns"),
}
AXOLOTL_KEYS.update(PREFERENCE_KEYS)
NUMERIC_KEYS.update({"rl_beta", "dpo_beta", "orpo_alpha", "simpo_gamma", "cpo_alpha", "kto_desirable_weight",
                     "kto_undesirable_weight", "dpo_label_smoothing", "center_rewards_coefficient"})

# Axolotl's preference dataset formats ftclip reads natively (ftclip/data/preference_records.py).
PREFERENCE_DATASET_TYPES = {"chat_template.default", "chat_template.argilla", "chat_template.argilla_chat",
                            "bradley_terry.chat_template", "chatml", "llama3"} | {
    f"{family}.{name}" for family in ("chatml", "llama3")
    for name in ("default", "argilla", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")}
DATASET_KEYS.update({
    "field_chosen": _same("chat_template.default / argilla_chat: the chosen answer's column"),
    "field_rejected": _same("chat_template.default / argilla_chat: the rejected answer's column"),
})


def preference_dataset_type(value: Any, config: dict) -> Outcome | None:
    """A dataset type under rl or reward_model (Axolotl then reads it from its dpo/, kto/, orpo/ or bradley_terry/
    strategies), or None for an SFT config."""
    if not (config.get("rl") or config.get("reward_model")):
        return None
    if value == "chat_template" and config.get("rl"):
        value = "chat_template.default"
    if isinstance(value, str) and value in PREFERENCE_DATASET_TYPES:
        return Mapped({"type": value}, "Axolotl's preference format, read natively")
    if isinstance(value, dict):
        return Refused("a user-defined preference format (type as a mapping of format strings); ftclip reads TRL's "
                       "layouts (type: preference / kto) and Axolotl's chatml.*, llama3.*, chat_template.* formats")
    return Refused(f"{show_value(value)} is not a preference format ftclip reads: type preference ({{prompt, chosen, "
                   "rejected}}), kto, or Axolotl's chatml.*, llama3.*, chat_template.default/argilla/argilla_chat, "
                   "bradley_terry.chat_template")


# ---------------------------------------------------------------- README table


def mapping_markdown() -> str:
    """The README's "Coming from Axolotl" table, made from AXOLOTL_KEYS and DATASET_KEYS."""
    rows = ["| Axolotl key | ftclip | note |", "| --- | --- | --- |"]

    def add(table: dict[str, Rule], prefix: str) -> None:
        for key in sorted(table):
            rule = table[key]
            if rule.kind == "same":
                target = f"`{prefix}{key}`"
            elif rule.kind == "map":
                target = f"`{rule.ftclip}`" if rule.ftclip not in ("", "—") else "converted"
            else:
                target = {"drop": "dropped", "refuse": "refused"}[rule.kind]
            note = rule.why.replace("|", "\\|")
            rows.append(f"| `{prefix}{key}` | {target} | {note} |")

    add(AXOLOTL_KEYS, "")
    add(DATASET_KEYS, "datasets[].")
    return "\n".join(rows)


# ---------------------------------------------------------------- Axolotl's dataset type names


# The first part of every dataset `type` Axolotl knows (src/axolotl/prompt_strategies: module names, the dpo/,
# kto/, orpo/ and bradley_terry/ strategies' modules, and the older prompt_tokenizers names; a type is written
# `module`, `module.function` or `module:variant`). ftclip.recipe_files reads a file whose dataset type is one of
# these through the importer; any other unknown type is a plain validation error (a typo in a native recipe).
AXOLOTL_DATASET_TYPE_NAMES = frozenset({
    "alpaca", "alpaca_chat", "alpaca_instruct", "alpaca_w_system", "aptchat", "aptchat_v2", "base", "bradley_terry",
    "chat", "chat_template", "chatml", "completion", "concisechoice", "context_qa", "conversational_lm",
    "creative_acr", "dpo", "ebft", "explainchoice", "gpteacher", "input_output", "instruct", "jeopardy", "kto",
    "llama2_chat", "llama3", "messages", "metharme", "mistral", "multimodal_pretrain", "oasst", "orcamini", "orpo",
    "passthrough", "pretrain", "pygmalion", "reflection", "sharegpt", "sharegpt_jokes", "sharegpt_simple",
    "stepwise", "stepwise_supervised", "summarization", "summarizetldr", "synthetic", "user_defined", "vicuna",
    "zephyr",
})


def is_axolotl_dataset_type(value) -> bool:
    """True for a dataset type Axolotl spells this way: a mapping (a user-defined prompt format, which ftclip's
    recipe takes too) or a name from AXOLOTL_DATASET_TYPE_NAMES (with its `.function` or `:variant`)."""
    if isinstance(value, dict):
        return True
    return isinstance(value, str) and value.split(":")[0].split(".")[0] in AXOLOTL_DATASET_TYPE_NAMES
