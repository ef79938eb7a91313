"""The recipe: one typed pydantic model, loaded from YAML with `safe_load`, validated completely
before anything heavy loads. Errors name the file, the line, the key path and what is allowed."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from ftclip.errors import Problem, RecipeError

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd")
SCHEDULERS = ("constant", "linear", "cosine")
# Hugging Face's names for what ftclip has under another name (accepted as aliases).
OPTIMIZER_ALIASES = {"adamw_bnb_8bit": "adamw_8bit", "adamw_hf": "adamw_torch"}
SCHEDULER_ALIASES = {"constant_with_warmup": "constant", "cosine_with_min_lr": "cosine"}
DATASET_TYPES = ("alpaca", "completion", "chat")
# TRL's DPO loss types that are a function of each pair alone (aot sorts across the batch and discopop needs its
# own τ: not offered).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "sigmoid_norm", "sft")
# Preference data (rl / reward_model): ftclip's own layouts (TRL's), and Axolotl's preference prompt formats read
# natively (ftclip/data/preference.py). Axolotl's chatml.* and llama3.* names are pairs under rl: dpo/ipo/orpo/simpo
# and single completions with a label under rl: kto, as in Axolotl (its dpo/ and kto/ strategy modules).
AXOLOTL_PREFERENCE_FORMATS = ("argilla", "argilla_chat", "icr", "intel", "prompt_pairs", "ultra")
PREFERENCE_TYPES = (
    "preference", "kto",
    "chat_template.default", "chat_template.argilla", "chat_template.argilla_chat", "bradley_terry.chat_template",
    "chatml", "llama3",
    *(f"{family}.{name}" for family in ("chatml", "llama3") for name in ("default", *AXOLOTL_PREFERENCE_FORMATS)),
)
# Hugging Face names ftclip has no equivalent for, refused by name (the rest get pydantic's list of choices).
FOREIGN_OPTIMIZERS = {
    "adamw_torch_8bit": "torchao's 8-bit AdamW; ftclip's 8-bit AdamW is bitsandbytes' adamw_8bit (the same algorithm)",
    **{name: "not an optimizer ftclip has (adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit, "
             "paged_adamw_32bit, sgd, adamw_torch_4bit)"
       for name in ("adafactor", "adagrad", "adalomo", "adamw_anyprecision", "ademamix", "ademamix_8bit", "apollo_adamw",
                    "galore_adamw", "galore_adamw_8bit", "grokadamw", "lion_32bit", "lion_8bit", "lomo", "muon",
                    "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop",
                    "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "schedule_free_adamw", "schedule_free_radam",
                    "schedule_free_sgd", "stable_adamw", "optimi_adamw", "ao_adamw_8bit", "ao_adamw_4bit",
                    "ao_adamw_fp8", "adopt_adamw", "came_pytorch", "dion", "flash_adamw")},
}
FOREIGN_SCHEDULERS = {
    name: "a Hugging Face/Axolotl schedule ftclip does not have (constant, linear, cosine with optional min_lr_ratio)"
    for name in ("cosine_with_restarts", "polynomial", "inverse_sqrt", "reduce_lr_on_plateau", "warmup_stable_decay",
                 "one_cycle", "rex", "constant_with_min_lr", "cosine_warmup_with_min_lr")
}


class PromptFormat(BaseModel):
    """A prompt format of the recipe's own, Axolotl's user-defined dataset type (a dataset `type` given as a
    mapping; defaults as in Axolotl's src/axolotl/prompt_strategies/user_defined.py). A record's prompt is
    system_format (with the record's field_system text, else system_prompt; nothing when both are empty), then
    format (with {instruction} and {input}), or no_input_format when the record's input is empty or absent. The
    prompt is masked unless train_on_inputs; the output and EOS are trained."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = Field("", description="The system text when the record has none in field_system.")
    system_format: str = Field("{system}", description="How the system text is written; {system} is replaced.")
    field_system: str = Field("system", description="The record key of a per-record system text.")
    field_instruction: str = Field("instruction", description="The record key of the instruction (required).")
    field_input: str = Field("input", description="The record key of the input (optional).")
    field_output: str = Field("output", description="The record key of the output: what is trained.")
    format: str = Field("{instruction} {input} ", description="The prompt when the record has an input; "
                        "{instruction} and {input} are replaced (literal braces are written {{ and }}).")
    no_input_format: str = Field("{instruction} ", description="The prompt when the input is empty; {instruction} "
                                 "is replaced.")

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, data: Any) -> Any:
        # Axolotl drops keys given as null (its schema dumps with exclude_none), so their defaults apply.
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _placeholders(self) -> PromptFormat:
        for key, allowed in (("format", {"instruction", "input"}), ("no_input_format", {"instruction"}),
                             ("system_format", {"system"})):
            text = getattr(self, key)
            try:
                names = {name for _, name, _, _ in Formatter().parse(text) if name is not None}
            except ValueError as error:
                raise ValueError(f"{key}: {error} (literal braces are written {{{{ and }}}})") from None
            unknown = sorted(names - allowed)
            if unknown:
                raise ValueError(f"{key}: {{{unknown[0]}}} is not a placeholder it takes ({', '.join(sorted(allowed))}); "
                                 "literal braces are written {{ and }}")
        return self

    def prompt(self, record: dict) -> str:
        """The record's prompt, as Axolotl's user-defined type writes it."""
        system = record.get(self.field_system) if record.get(self.field_system) is not None else self.system_prompt
        head = self.system_format.format(system=system) if system and self.system_format else ""
        given = record.get(self.field_input)
        if given:
            return head + self.format.format(instruction=record[self.field_instruction], input=given)
        return head + self.no_input_format.format(instruction=record[self.field_instruction])


def _dataset_type(value: Any) -> str | PromptFormat:
    """A record format's name (chat_template is Axolotl's name for chat), a preference format's name, or a prompt
    format given as a mapping."""
    if isinstance(value, PromptFormat):
        return value
    if isinstance(value, dict):
        return PromptFormat.model_validate(value)
    if value == "chat_template":
        return "chat"
    if isinstance(value, str) and value in DATASET_TYPES + PREFERENCE_TYPES:
        return value
    # pydantic's wording for the SFT names (the README shows it; listing all 26 preference names would bury them).
    raise ValueError("Input should be 'alpaca', 'completion', 'chat' or 'chat_template' (or a prompt format mapping; "
                     "with rl: a preference type, docs/preference.md)")


DatasetType = Annotated[
    Literal[DATASET_TYPES + PREFERENCE_TYPES] | PromptFormat,
    PlainValidator(_dataset_type,
                   json_schema_input_type=Literal[("alpaca", "completion", "chat", "chat_template") + PREFERENCE_TYPES]
                   | PromptFormat),
]


class DatasetSpec(BaseModel):
    """One dataset: where it is, which split and subset, and the format of its records."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="A hub dataset id (org/name, read from the local Hugging Face cache: no download at run time), "
        "a local .jsonl/.json/.parquet/.csv/.arrow file, or a local folder (a `save_to_disk` dataset or a folder of "
        "data files); local paths are relative to the recipe's folder."
    )
    type: DatasetType = Field(
        description="alpaca: {instruction, input?, output}; completion: {text} (or the key named by field); "
        "chat (alias chat_template): {messages: [{role, content}]} or ShareGPT {conversations: [{from, value}]}; "
        "or a prompt format of your own as a mapping (Axolotl's user-defined type): {system_prompt, system_format, "
        "field_system, field_instruction, field_input, field_output, format, no_input_format}; "
        "with rl or reward_model: preference: {prompt?, chosen, rejected} as strings or message lists (TRL's "
        "layouts), kto: {prompt, completion, label}, or one of Axolotl's preference formats (chatml.intel, "
        "llama3.ultra, chat_template.default, ...; see docs/preference.md)."
    )
    split: str = Field("train", description="Which split to read (a hub dataset or a folder with several splits; a "
                       "single file is the train split). A slice takes part of it, as `datasets` writes them: "
                       "train[:10%], train[100:200].")
    field: str | None = Field(
        None, description="completion: the record key holding the text (default text; Axolotl's field)."
    )
    name: str | None = Field(None, description="The dataset configuration (subset) of a hub dataset.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Which files of a hub dataset or folder to read (as `datasets.load_dataset` takes them)."
    )
    revision: str | None = Field(
        None, description="A hub dataset's commit, tag or branch: pin it so a committed recipe reads the same data."
    )
    # Chat options, spelled as Axolotl's chat_template dataset type spells them.
    field_messages: str | None = Field(
        None, description="chat: the record key holding the turns (default: messages, else conversations)."
    )
    message_property_mappings: dict[str, str] | None = Field(
        None, description="chat: which turn keys hold the role and the content, e.g. {role: from, content: value}."
    )
    roles: dict[str, list[str]] | None = Field(
        None, description="chat: role names in the data for each template role, e.g. {user: [human], assistant: [gpt]}."
    )
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"], description="chat: the roles whose turns are trained on."
    )
    train_on_eos: Literal["turn", "all", "last", "none"] = Field(
        "turn", description="chat: which end-of-turn markers are trained: after each trained turn, all, the last, none."
    )
    drop_system_message: bool = Field(
        False, description="chat: leave the records' system turns out (a template's own default system prompt stays)."
    )
    # Preference data options, spelled as Axolotl's chat_template preference format spells them.
    field_chosen: str | None = Field(
        None, description="preference (chat_template.default, chat_template.argilla_chat): the record key of the "
        "chosen answer (default: chosen)."
    )
    field_rejected: str | None = Field(
        None, description="preference (chat_template.default, chat_template.argilla_chat): the record key of the "
        "rejected answer (default: rejected)."
    )

    @property
    def kind(self) -> str:
        """alpaca, completion, chat, or prompt_format (a PromptFormat)."""
        return "prompt_format" if isinstance(self.type, PromptFormat) else self.type


    # The recipe's rl (set by Recipe after validation): Axolotl's chatml.*/llama3.* names are KTO formats under
    # rl: kto and pair formats otherwise.
    _rl: str | None = PrivateAttr(default=None)

    @property
    def preference_kind(self) -> str | None:
        """"pairs", "kto", or None for SFT data (see preference_kind)."""
        return preference_kind(self.type, self._rl)


class LoftQSettings(BaseModel):
    """peft's LoftQ initialization of the LoRA weights (Axolotl: peft.loftq_config)."""

    model_config = ConfigDict(extra="forbid")

    loftq_bits: int = Field(4, gt=0, le=8, description="Bits of the quantization LoftQ's initialization fits (typically 4).")


class PeftSettings(BaseModel):
    """Axolotl's `peft:` block: options passed to peft's LoraConfig."""

    model_config = ConfigDict(extra="forbid")

    loftq_config: LoftQSettings | None = Field(
        None, description="Initialize LoRA with LoftQ (peft's init_lora_weights: loftq; the base weights are replaced "
        "by their quantized-dequantized values, as peft does). Needs an unquantized base (no qlora)."
    )


# unfrozen_parameters, as Axolotl reads them (axolotl/utils/freeze.py): every '.' is a literal dot, the regex is
# matched at the start of the parameter name (re.match), and an optional trailing [start:end] (or [index]) keeps
# only those rows trainable (the other rows' gradients are zeroed).
_UNFROZEN_RANGE = re.compile(r"^(.+)\[([0-9]*)(?::([0-9]*))?\]$")


def parse_unfrozen_pattern(pattern: str) -> tuple[re.Pattern, tuple[int, int | None] | None]:
    """(compiled name regex, row range or None) for one unfrozen_parameters entry, as Axolotl parses it."""
    found = _UNFROZEN_RANGE.match(pattern)
    rows: tuple[int, int | None] | None = None
    if found:
        pattern, start, end = found.groups()
        if end is None and start.isdecimal():
            rows = (int(start), int(start) + 1)
        else:
            rows = (int(start) if start else 0, int(end) if end else None)
            if rows[1] is not None and rows[0] >= rows[1]:
                raise ValueError(f"range in {found.group(0)!r}: the end must be greater than the start")
    return re.compile(pattern.replace(".", "\\.")), rows


class SpecialTokens(BaseModel):
    """Special tokens to set on the tokenizer (added to the vocabulary when missing)."""

    model_config = ConfigDict(extra="forbid")

    pad_token: str | None = Field(None, description="Padding token.")
    eos_token: str | None = Field(None, description="End-of-sequence token.")
    bos_token: str | None = Field(None, description="Beginning-of-sequence token.")
    unk_token: str | None = Field(None, description="Unknown-token token.")


# Axolotl's names for torchao's quantized dtypes (its TorchAOQuantDType), with the aliases it accepts.
QAT_DTYPES = ("int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4")
_QAT_DTYPE_ALIASES = {"fp8": "float8_e4m3fn", "float8": "float8_e4m3fn"}


class QATSettings(BaseModel):
    """Axolotl's `qat:` block: quantization-aware training through torchao (fake-quantized forward, the
    quantized model saved at the end)."""

    model_config = ConfigDict(extra="forbid")

    weight_dtype: Literal["int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4"] = Field(
        "int8", description="The weights' quantized type the forward simulates (and the saved model uses): int4, int8, "
        "float8_e4m3fn (alias fp8, float8), nvfp4, mxfp4."
    )
    activation_dtype: Literal["int4", "int8", "float8_e4m3fn", "nvfp4", "mxfp4"] | None = Field(
        None, description="The activations' quantized type, or absent for weight-only quantization (int8 with int4 "
        "weights: torchao's int8 dynamic activation, int4 weight scheme)."
    )
    group_size: int | None = Field(32, gt=0, description="Values per quantization group of a weight row (int4/int8).")
    quantize_embedding: bool = Field(False, description="Quantize the input embedding too (int4/int8 weights only).")
    fake_quant_after_n_steps: int | None = Field(
        None, ge=0, description="Optimizer steps trained in full precision before fake quantization starts (absent: "
        "from the first step)."
    )

    @field_validator("weight_dtype", "activation_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return _QAT_DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


def _parse_norm_type(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity", ".inf"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"norm_type must be 1, 2 or inf, not {value!r}")
    if float(value) not in (1.0, 2.0, math.inf):
        raise ValueError(f"norm_type must be 1, 2 or inf, not {value!r}")
    return float(value)


class GradientClipping(BaseModel):
    """How the gradient is clipped between backward and the optimizer step."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["norm", "value", "off", "auto", "zscore"] = Field(
        "norm",
        description="norm: rescale the whole gradient when its global norm exceeds max_norm; "
        "value: cap each element at ±max_value; off: no clipping (the norm is still measured and logged); "
        "auto: threshold = percentile of the recent norm history (AutoClip); "
        "zscore: threshold = EMA mean + z_threshold × EMA std of the norm (ZClip).",
    )
    max_norm: float = Field(
        1.0, gt=0, description="Threshold on the global gradient norm (mode: norm; auto/zscore during their warm-up)."
    )
    norm_type: float = Field(2.0, description="Which p-norm: 1, 2 or inf.")
    max_value: float | None = Field(None, gt=0, description="Element cap for mode: value (required there).")
    percentile: float = Field(
        90.0, gt=0, le=100, description="mode: auto: the percentile of the norm history used as the threshold."
    )
    history_size: int = Field(1000, gt=0, description="mode: auto: how many recent steps' norms the percentile sees.")
    z_threshold: float = Field(2.5, gt=0, description="mode: zscore: clip norms more than this many EMA stds above the mean.")
    ema_decay: float = Field(0.97, gt=0, lt=1, description="mode: zscore: EMA decay of the norm mean and variance.")
    warmup_steps: int = Field(
        25, ge=1, description="mode: auto/zscore: steps that clip at the fixed max_norm while the norm statistics fill."
    )
    skip_nonfinite: bool = Field(
        True,
        description="Skip the optimizer step when the gradient norm is inf or nan "
        "(weights and optimizer state stay unchanged); the skip is counted and reported.",
    )

    @field_validator("norm_type", mode="before")
    @classmethod
    def _norm_type(cls, value: Any) -> float:
        return _parse_norm_type(value)

    @field_serializer("norm_type")
    def _dump_norm_type(self, value: float) -> float | str:
        return "inf" if math.isinf(value) else value

    @model_validator(mode="after")
    def _value_mode_needs_max_value(self) -> GradientClipping:
        if self.mode == "value" and self.max_value is None:
            raise ValueError("mode: value needs max_value (the element cap, e.g. 1.0)")
        return self


def _without_empty_values(data: dict) -> dict:
    """`key:` left empty means "not set" (the default applies), as in Axolotl, at every level of the recipe."""
    cleaned = {}
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = _without_empty_values(value)
        elif isinstance(value, list):
            value = [_without_empty_values(item) if isinstance(item, dict) else item for item in value]
        cleaned[key] = value
    return cleaned


def _clipping_from_shorthand(value: Any) -> Any:
    """A bare number is a norm threshold (Axolotl/HF style); false, 0 and 'off' mean no clipping.
    (An empty value never gets here: it means the default, norm clipping at 1.0.)"""
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return {"mode": "off"}
    if isinstance(value, bool):
        return {"mode": "norm"}
    if isinstance(value, (int, float)):
        return {"mode": "off"} if value == 0 else {"mode": "norm", "max_norm": value}
    return value


class DistributedSettings(BaseModel):
    """How several processes (launched by torchrun) share the work; ignored in a single process."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: replicate the model, all-reduce gradients; fsdp: FSDP2 fully_shard per decoder layer."
    )
    timeout: float | None = Field(
        None, gt=0, description="Seconds a collective (a gradient all-reduce, a barrier) waits for the other processes "
        "before the run stops with an error; bounds the wait when a node hangs or its network fails. Default: "
        "torch's (30 min for gloo, 10 min for NCCL). Raise it if the first node's data preparation takes longer. "
        "Axolotl: ddp_timeout."
    )


def _hf_name(value: Any, aliases: dict[str, str], foreign: dict[str, str]) -> Any:
    """A Hugging Face name: ftclip's own name where ftclip has the same thing, a refusal saying why where not."""
    if isinstance(value, str) and value in aliases:
        return aliases[value]
    if isinstance(value, str) and value in foreign:
        raise ValueError(f"{value} is {foreign[value]}")
    return value


class Recipe(BaseModel):
    """A fine-tuning run. Key names follow Axolotl's where Axolotl has one."""

    model_config = ConfigDict(extra="forbid")

    # Model
    base_model: str = Field(description="Local model folder (relative to the recipe) or a hub id like org/name.")
    tokenizer: str | None = Field(None, description="Tokenizer folder or hub id; default: base_model's.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off unless set.")
    revision_of_model: str | None = Field(
        None, description="base_model's hub commit, tag or branch (passed to from_pretrained; also the tokenizer's "
        "when tokenizer is not set). Alias: model_revision."
    )
    overrides_of_model_config: dict[str, Any] | None = Field(
        None, description="Values set on the model's config before the weights load, e.g. {output_router_logits: true} "
        "or {max_position_embeddings: 8192}. Alias: model_config (Axolotl's name)."
    )
    unfrozen_parameters: list[str] | None = Field(
        None, description="Full fine-tuning of only the parameters whose names match one of these regexes (Axolotl's "
        "rules: '.' is a literal dot, matched from the start of the name, e.g. ^lm_head.weight$ or "
        "model.layers.[0-9]+.mlp; a trailing [start:end] trains only those rows). The rest stay frozen."
    )

    # Adapter
    adapter: Literal["lora", "qlora"] | None = Field(
        None, description="lora, qlora (LoRA on a 4-bit base), or absent for full fine-tuning."
    )
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]), all-linear, or a regex string matched against "
        "each module's full name (peft's full match, e.g. '.*\\.(q|v)_proj').",
    )
    lora_target_linear: bool | None = Field(
        None, description="Axolotl's spelling: true means lora_target_modules: all-linear."
    )
    lora_modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. [embed_tokens, lm_head])."
    )
    lora_model_dir: str | None = Field(
        None, description="An existing LoRA adapter folder to continue training (relative to the recipe); "
        "its rank, alpha and targets are the adapter's own."
    )
    load_in_4bit: bool = Field(False, description="Quantize the base to 4 bits with bitsandbytes (QLoRA).")
    load_in_8bit: bool = Field(False, description="Quantize the base to 8 bits with bitsandbytes.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    peft_use_rslora: bool = Field(
        False, description="Rank-stabilized LoRA: scale by alpha/√r instead of alpha/r (peft's use_rslora)."
    )
    peft_use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (peft's use_dora).")
    lora_fan_in_fan_out: bool = Field(
        False, description="The adapted layers store weights as (fan_in, fan_out), as GPT-2's Conv1D does (peft's "
        "fan_in_fan_out; peft turns it off for nn.Linear layers)."
    )
    lora_target_parameters: list[str] | str | None = Field(
        None, description="Parameter names (e.g. MoE experts' mlp.experts.gate_up_proj) to adapt with LoRA directly, "
        "besides lora_target_modules (peft's target_parameters; lora_dropout then applies to the linear targets only)."
    )
    peft: PeftSettings | None = Field(None, description="{loftq_config: {loftq_bits: 4}}: peft options (Axolotl's peft block).")

    # Vision-language models
    processor_type: str | None = Field(
        None, description="Makes the run a vision-language one: the transformers processor that turns images and text "
        "into model inputs, AutoProcessor (the model's own) or a processor class name (e.g. Qwen2VLProcessor). The model "
        "loads through AutoModelForImageTextToText, datasets are image chats (type: chat), and LoRA adapts the language "
        "model's linear layers unless lora_target_modules says otherwise."
    )
    image_size: int | list[int] | None = Field(
        None, description="Resize every image before the processor sees it (Axolotl's meaning): an int fits it into a "
        "square of that side, aspect kept, padded black; [width, height] resizes to exactly that. Default: only the "
        "processor's own sizing."
    )
    image_resize_algorithm: Literal["bilinear", "bicubic", "lanczos"] | None = Field(
        None, description="The resampling image_size uses (PIL's): bilinear (the default), bicubic or lanczos."
    )
    freeze_mm_modules: bool | None = Field(
        None, description="Freeze the vision (and audio) towers and the multimodal projector: a full fine-tune then "
        "trains the language model only (LoRA leaves them frozen anyway)."
    )
    skip_prepare_dataset: bool | None = Field(
        None, description="Axolotl's switch for multimodal data; accepted and ignored: ftclip tokenizes the text once "
        "(cached) and processes the images per batch either way."
    )
    remove_unused_columns: bool | None = Field(
        None, description="Axolotl's (Trainer's) switch; accepted and ignored: ftclip's batches carry only what the "
        "model takes."
    )

    @field_validator("image_size")
    @classmethod
    def _image_size_shape(cls, value: int | list[int] | None) -> int | list[int] | None:
        sides = [value] if isinstance(value, int) else value or []
        if isinstance(value, list) and len(value) != 2:
            raise ValueError("image_size is one side (an int) or [width, height]")
        if any(side <= 0 for side in sides):
            raise ValueError("image_size: sides must be positive")
        return value

    # Data
    datasets: list[DatasetSpec] = Field(min_length=1, description="Training data files.")
    val_set_size: float = Field(
        0.0, ge=0, description="Held-out share (0 < x < 1) or number of examples (x >= 1) for eval loss."
    )
    test_datasets: list[DatasetSpec] | None = Field(
        None, min_length=1, description="Datasets evaluated on and never trained on (Axolotl's test_datasets), "
        "instead of holding out val_set_size of the training data; entries as in datasets."
    )
    sequence_len: int = Field(512, gt=0, description="Longest tokenized example; longer ones are truncated.")
    train_on_inputs: bool = Field(False, description="Also train on prompts / user turns (default: mask them).")
    sample_packing: bool = Field(
        False, description="Pack several examples into each sequence_len row (no attention across them)."
    )
    dataset_exact_deduplication: bool = Field(
        False, description="Drop training examples whose tokens and labels repeat an earlier one, and held-out "
        "examples that repeat a training one (Axolotl's key of the same name)."
    )
    dataset_cache_dir: str | None = Field(
        None, description="Where tokenized data is cached (relative to cwd); default ~/.cache/ftclip/tokenized. "
        "Alias: dataset_prepared_path."
    )
    dataset_processes: int | None = Field(
        None, gt=0, description="Processes that tokenize in parallel; default: the CPU count, at most 8."
    )
    chat_template: str = Field(
        "tokenizer_default",
        description="chat: the template that renders conversations: tokenizer_default (the tokenizer's own), "
        "a built-in name (chatml, llama3, qwen3, mistral, gemma and Axolotl's names such as qwen_25, phi_3, gemma3), "
        "tokenizer_default_fallback_<name> (the tokenizer's own, else that one), or jinja (then chat_template_jinja).",
    )
    chat_template_jinja: str | None = Field(None, description="chat: a literal Jinja chat template.")
    special_tokens: SpecialTokens | None = Field(None, description="{pad_token, eos_token, bos_token, unk_token} to set.")
    tokens: list[str] | None = Field(None, description="Tokens to add to the vocabulary (the embeddings are resized).")

    # Preference training
    rl: Literal["dpo", "ipo", "orpo", "simpo", "kto"] | None = Field(
        None, description="Preference training instead of SFT: dpo, ipo (dpo with dpo_loss_type [ipo]), orpo, simpo "
        "(TRL's CPO loss_type simpo) or kto, on preference data (datasets[].type: preference, kto or an Axolotl "
        "preference format). The loop, clip, checkpoints and telemetry are SFT's; see docs/preference.md."
    )
    rl_beta: float | None = Field(
        None, gt=0, description="β: how far the policy may move from the reference (dpo, ipo: IPO's τ, kto) or the "
        "reward scale (simpo); default 0.1 as in TRL. Alias: beta (and Axolotl's trl.beta)."
    )
    dpo_loss_type: list[Literal[DPO_LOSS_TYPES]] | None = Field(
        None, description="rl: dpo: TRL's loss types, combined by dpo_loss_weights: sigmoid (default), hinge, ipo, "
        "robust, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, sigmoid_norm, sft (NLL on chosen)."
    )
    dpo_loss_weights: list[float] | None = Field(
        None, description="rl: dpo: one weight per dpo_loss_type entry (default 1.0 each)."
    )
    dpo_label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="rl: dpo: ε, the probability that a label is flipped (robust) or EXO's ε "
        "(exo_pair); TRL's sigmoid loss does not read it."
    )
    rpo_alpha: float | None = Field(
        None, ge=0, description="rl: dpo: weight of the NLL of the chosen answer added to the loss (RPO; TRL's loss "
        "type sft with this weight)."
    )
    orpo_alpha: float | None = Field(
        None, gt=0, description="rl: orpo: λ, the weight of the odds-ratio term (TRL's ORPO beta); default 0.1."
    )
    simpo_gamma: float | None = Field(
        None, ge=0, description="rl: simpo: the target reward margin γ; default 0.5 as in TRL."
    )
    cpo_alpha: float | None = Field(
        None, ge=0, description="rl: simpo: weight of the NLL of the chosen answer (CPO's BC term); default 0 (pure "
        "SimPO; Axolotl leaves TRL's 1.0, which import-axolotl writes out)."
    )
    kto_desirable_weight: float = Field(1.0, gt=0, description="rl: kto: weight of the desirable examples' loss.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="rl: kto: weight of the undesirable examples' loss.")
    precompute_ref_log_probs: bool = Field(
        False, description="dpo/ipo/kto: compute the reference log-probabilities once before training (cached beside "
        "the tokens, keyed by model and data) instead of a reference forward every step."
    )
    max_prompt_len: int | None = Field(
        None, gt=0, description="Preference data: prompts longer than this keep their last max_prompt_len tokens "
        "(counted and reported); prompt + answer are then cut to sequence_len."
    )
    reward_model: bool = Field(
        False, description="Train a reward model: a sequence-classification head (AutoModelForSequenceClassification, "
        "one output) on preference pairs with the Bradley–Terry loss."
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="reward_model: weight of mean((r_chosen + r_rejected)²), which pulls rewards toward "
        "zero mean (TRL's; 0.01 recommended)."
    )

    # Schedule
    micro_batch_size: int = Field(1, gt=0, description="Examples per forward/backward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")

    # Optimizer
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd",
                       "adamw_torch_4bit"] = (
        Field(
            "adamw_torch_fused",
            description="adamw_torch_fused folds the clip into its own pass; adamw_8bit and paged_adamw_8bit/32bit "
            "are bitsandbytes' (paged ones need CUDA); adamw_torch_4bit is torchao's AdamW4bit "
            "(pip install 'ftclip[torchao]').",
        )
    )
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="LR decay after warmup. Hugging Face's constant_with_warmup and cosine_with_min_lr "
        "are accepted as constant and cosine."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="cosine: decay to this share of learning_rate instead of 0 (Axolotl: cosine_min_lr_ratio)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer steps.")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Linear warmup as a share of the run's optimizer steps (instead of warmup_steps)."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW's first-moment decay.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW's second-moment decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW's epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    gradient_clipping: GradientClipping = Field(
        default_factory=GradientClipping,
        description="A number (norm threshold), false/off, or {mode, max_norm, norm_type, max_value}. "
        "Alias: max_grad_norm. Default: norm clipping at 1.0.",
    )

    # Model families (MoE, quantized formats, QAT)
    quantize_moe_experts: bool = Field(
        False, description="MoE models: store the fused expert weights (3-D parameters such as mlp.experts.gate_up_proj) "
        "in 4 bits with bitsandbytes (bnb_4bit_quant_type, double quantization as bnb_4bit_use_double_quant says) "
        "while LoRA trains; load_in_4bit alone quantizes the linear layers only. Needs load_in_4bit and an adapter."
    )
    model_quantization_config: Literal["Mxfp4Config"] | None = Field(
        None, description="Load a checkpoint stored in a quantized format through transformers: Mxfp4Config (gpt-oss's "
        "MXFP4 experts). Training needs model_quantization_config_kwargs: {dequantize: true} (the weights are "
        "dequantized to the training dtype while loading)."
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(
        None, description="Arguments of model_quantization_config's class, e.g. {dequantize: true} for Mxfp4Config."
    )
    tokenizer_use_mistral_common: bool = Field(
        False, description="Tokenize with Mistral's own tokenizer (mistral-common's tekken.json or SentencePiece file, "
        "through transformers' MistralCommonBackend; pip install 'ftclip[mistral]'). Chat records are rendered and "
        "masked by mistral-common's own encoding; chat_template, special_tokens and tokens do not apply."
    )
    qat: QATSettings | None = Field(
        None, description="{weight_dtype, activation_dtype, group_size, fake_quant_after_n_steps}: quantization-aware "
        "training through torchao (pip install 'ftclip[torchao]'); full fine-tuning only."
    )

    # Precision and memory
    bf16: bool | Literal["auto"] = Field(False, description="bfloat16 weights; auto = when the GPU supports it.")
    fp16: bool = Field(False, description="float16 weights (adapters train in fp32).")
    fp32: bool = Field(False, description="float32 weights (the default when neither bf16 nor fp16 is set).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        None, description="Passed to transformers' gradient_checkpointing_enable; default {use_reentrant: false}."
    )
    tf32: bool | Literal["auto"] = Field(
        False, description="Let CUDA float32 matmuls use TF32 (faster, ~10-bit mantissa); auto = when the GPU has it."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa", description="Attention kernel (transformers' attn_implementation); flash_attention_2 needs flash-attn and CUDA."
    )
    chunked_cross_entropy: bool = Field(
        True, description="Compute the loss over chunks of tokens, never materializing the whole sequence's logits."
    )
    liger_fused_linear_cross_entropy: bool = Field(
        False, description="Liger's fused linear cross-entropy (needs liger-kernel and CUDA)."
    )

    neftune_noise_alpha: float | None = Field(
        None, gt=0, description="NEFTune: uniform noise on the input embeddings in training forward passes (never in "
        "evaluation), of magnitude alpha/√(sequence length × hidden size), as transformers computes it."
    )

    # Run
    seed: int = Field(42, description="Seeds data order, the validation split and initialization.")
    data_seed: int | None = Field(
        None, description="Seeds the training data's order (the shuffle of each epoch) instead of seed; the held-out "
        "split and initialization still follow seed (Hugging Face's data_seed)."
    )
    output_dir: str = Field("./outputs/ftclip-run", description="Where metrics and the adapter go (relative to cwd).")
    logging_steps: int = Field(1, gt=0, description="Log (and read the grad norm back) every N optimizer steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Eval loss on the held-out set every N optimizer steps (and at the end); needs val_set_size."
    )
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N optimizer steps to output_dir/checkpoints/step-N (resumable)."
    )
    save_total_limit: int | None = Field(
        3, ge=0, description="Keep only the newest N checkpoints (0 keeps all)."
    )
    saves_per_epoch: int | None = Field(
        None, gt=0, description="Checkpoint N times per epoch (instead of save_steps)."
    )
    evals_per_epoch: int | None = Field(
        None, ge=0, description="Eval loss N times per epoch (instead of eval_steps); 0 = only at the end."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop training when the best-model metric (metric_for_best_model, default eval "
        "loss) has not improved for this many evaluations in a row (Hugging Face's EarlyStoppingCallback)."
    )
    metric_for_best_model: str | None = Field(
        None, description="The evaluation value early stopping and load_best_model_at_end compare: loss (eval_loss, "
        "the default) or another eval_* value the run logs; an eval_ prefix is implied."
    )
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric_for_best_model is better; default: false for names ending in "
        "loss, true otherwise (as Hugging Face)."
    )
    load_best_model_at_end: bool = Field(
        False, description="Save the checkpoint with the best metric_for_best_model as the result, instead of the last "
        "step's weights (that checkpoint is kept from pruning); needs save_steps a multiple of eval_steps."
    )
    resume_from_checkpoint: str | None = Field(
        None, description="Resume from this checkpoint folder (relative to cwd), as `ftclip train --resume` does."
    )
    max_skipped_steps: int = Field(
        10, gt=0, description="Abort (with a checkpoint) after this many non-finite steps in a row."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description="{strategy: ddp or fsdp} for runs under torchrun (WORLD_SIZE > 1); default ddp.",
    )

    # Trackers (optional extras: pip install 'ftclip[wandb]' / 'ftclip[mlflow]')
    wandb_project: str | None = Field(None, description="Log to this Weights & Biases project.")
    wandb_entity: str | None = Field(None, description="W&B team or user.")
    wandb_name: str | None = Field(None, description="W&B run name.")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(None, description="W&B mode.")
    wandb_run_id: str | None = Field(None, description="W&B run id: resume that run.")
    mlflow_tracking_uri: str | None = Field(None, description="Log to this MLflow tracking server or file store.")
    mlflow_experiment_name: str | None = Field(None, description="MLflow experiment.")
    mlflow_run_name: str | None = Field(None, description="MLflow run name.")

    # The command line's `--set KEY=VALUE` overrides already applied (ftclip.overrides), recorded by dump_recipe.
    _overrides: list = PrivateAttr(default_factory=list)
    # What `bf16: auto` resolved to on the training device (e.g. "bfloat16"), recorded by dump_recipe for merge.
    _trained_dtype: str | None = PrivateAttr(default=None)
    # The Axolotl importer's report when the file was an Axolotl config read in memory (ftclip.recipe_files).
    _imported: Any = PrivateAttr(default=None)
    # The folder of the recipe file, set once when it is loaded: every input path is resolved against it, so
    # no stage needs to know where the recipe came from. None (a recipe built in code): the working directory.
    _folder: Path | None = PrivateAttr(default=None)

    @property
    def folder(self) -> Path | None:
        return self._folder

    def input_path(self, value: str) -> Path:
        """An input path (data file, model or adapter folder) as the recipe means it: relative to the recipe's
        folder, so recipes work from any working directory. Output paths (output_dir, dataset_cache_dir) stay
        relative to the working directory, as Axolotl and Hugging Face read them."""
        candidate = Path(value).expanduser()
        if candidate.is_absolute() or self._folder is None:
            return candidate
        return self._folder / candidate

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, value: str) -> str:
        from ftclip.chat_templates import CHAT_TEMPLATE_CHOICES, FALLBACK_PREFIX

        if value not in CHAT_TEMPLATE_CHOICES:
            names = [name for name in CHAT_TEMPLATE_CHOICES if not name.startswith(FALLBACK_PREFIX)]
            raise ValueError(f"unknown chat template {value!r}; allowed: {', '.join(names)}, or "
                             f"{FALLBACK_PREFIX}<one of those> (jinja: a literal template in chat_template_jinja)")
        return value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _target_modules(cls, value: Any) -> Any:
        if value == "all-linear" or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{value!r} is not a valid regular expression ({error})") from None
            return value
        raise ValueError("must be a list of module names (e.g. [q_proj, v_proj]), all-linear, or a regex string")

    @field_validator("unfrozen_parameters")
    @classmethod
    def _unfrozen_patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                parse_unfrozen_pattern(pattern)
            except re.error as error:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
        return value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_alias(cls, value: Any) -> Any:
        return _hf_name(value, OPTIMIZER_ALIASES, FOREIGN_OPTIMIZERS)

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _scheduler_alias(cls, value: Any) -> Any:
        return _hf_name(value, SCHEDULER_ALIASES, FOREIGN_SCHEDULERS)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _without_empty_values(data)
        for key in ("overrides_of_model_config", "revision_of_model", "dataset_cache_dir"):
            alias = _ALIASES[key]
            if alias in data:  # Axolotl's other names for these keys
                if key in data:
                    raise ValueError(f"{key} and {alias} (its Axolotl alias) are both given; keep one")
                data[key] = data.pop(alias)
        if "max_grad_norm" in data:
            if "gradient_clipping" in data:
                raise ValueError(
                    "gradient_clipping and max_grad_norm (its Hugging Face alias) are both given; keep one"
                )
            data["gradient_clipping"] = data.pop("max_grad_norm")
        if "gradient_clipping" in data:
            data["gradient_clipping"] = _clipping_from_shorthand(data["gradient_clipping"])
        return data

    @model_validator(mode="after")
    def _datasets_know_the_method(self) -> Recipe:
        for spec in self.datasets:
            spec._rl = self.rl
        return self

    @model_validator(mode="before")
    @classmethod
    def _preference_spellings(cls, data: Any) -> Any:
        """beta (alias of rl_beta), a single dpo_loss_type string, and Axolotl's `chat_template` dataset type,
        which names its DPO format under rl (chat_template.default) and its SFT format otherwise (chat)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        beta = data.pop("beta", None)
        if beta is not None:
            if data.get("rl_beta") is not None:
                raise ValueError("rl_beta and beta (its alias) are both given; keep one")
            data["rl_beta"] = beta
        if isinstance(data.get("dpo_loss_type"), str):
            data["dpo_loss_type"] = [data["dpo_loss_type"]]
        if data.get("rl"):
            renamed = {"chat_template": "chat_template.default"}
        elif data.get("reward_model") is True:
            renamed = {}
        else:
            renamed = {"chat_template.default": "chat"}
        if isinstance(data.get("datasets"), list):
            data["datasets"] = [
                {**entry, "type": renamed.get(entry.get("type"), entry.get("type"))}
                if isinstance(entry, dict) and isinstance(entry.get("type"), str) and entry["type"] in renamed else entry
                for entry in data["datasets"]
            ]
        return data

    @property
    def precision(self) -> Literal["bf16", "fp16", "fp32", "auto"]:
        if self.fp16:
            return "fp16"
        if self.bf16 == "auto":
            return "auto"
        return "bf16" if self.bf16 else "fp32"

    @property
    def data_order_seed(self) -> int:
        """What shuffles the training data each epoch: data_seed, else seed."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def target_modules(self) -> list[str] | str:
        return "all-linear" if self.lora_target_linear else self.lora_target_modules

    @property
    def quantized(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit or self.adapter == "qlora"


@dataclass(frozen=True)
class Schedule:
    """Step settings the recipe gives relative to the run's length, in optimizer steps."""

    warmup_steps: int
    save_steps: int | None
    eval_steps: int | None


def schedule_steps(recipe: Recipe, total_steps: int) -> Schedule:
    """The one place where warmup_ratio, saves_per_epoch and evals_per_epoch become step counts, as Axolotl
    and Hugging Face compute them: warmup = int(ratio × steps); a per-epoch count N saves/evaluates every
    ceil(steps / (N × num_epochs)) steps."""
    warmup = int(recipe.warmup_ratio * total_steps) if recipe.warmup_ratio is not None else recipe.warmup_steps

    def every(per_epoch: int | None, fixed: int | None) -> int | None:
        if not per_epoch:
            return fixed
        return max(1, math.ceil(total_steps / (per_epoch * recipe.num_epochs)))

    evals = every(recipe.evals_per_epoch, recipe.eval_steps) if has_held_out(recipe) else None
    return Schedule(warmup, every(recipe.saves_per_epoch, recipe.save_steps), evals)


def warmup_warning(recipe: Recipe, total_steps: int) -> str | None:
    """A run shorter than its warmup is allowed (a smoke run with --max-steps 3 is the most common use of
    max_steps, as in HF Trainer and Axolotl), with one line saying what it means for the learning rate."""
    warmup = schedule_steps(recipe, total_steps).warmup_steps
    if warmup < total_steps or warmup <= 1:
        return None
    reached = recipe.learning_rate * total_steps / warmup
    steps = f"{total_steps} optimizer step{'s' if total_steps != 1 else ''}"
    return (f"warmup_steps: {warmup} warmup steps but the run has {steps}: the learning rate "
            f"will not reach its peak ({recipe.learning_rate:g}; it ends warming up at {reached:.3g})")


def resolve_schedule(recipe: Recipe, total_steps: int) -> Recipe:
    """The recipe with save_steps and eval_steps derived from saves_per_epoch/evals_per_epoch, once the step
    count is known. Warmup stays a ratio in the recipe (a resumed run compares recipes before it counts
    steps); the scheduler asks schedule_steps for it."""
    schedule = schedule_steps(recipe, total_steps)
    return recipe.model_copy(update={"save_steps": schedule.save_steps, "eval_steps": schedule.eval_steps})


def has_held_out(recipe: Recipe) -> bool:
    """Whether the run evaluates: on a held-out share of the training data, or on test_datasets."""
    return bool(recipe.val_set_size or recipe.test_datasets)


def best_model_alignment(recipe: Recipe) -> str | None:
    """load_best_model_at_end picks among checkpoints, so every checkpoint needs an evaluation at its step:
    save_steps a multiple of eval_steps (Hugging Face's rule). Checked again once per-epoch counts are steps."""
    if recipe.load_best_model_at_end and recipe.save_steps and recipe.eval_steps and recipe.save_steps % recipe.eval_steps:
        return (f"save_steps {recipe.save_steps} is not a multiple of eval_steps {recipe.eval_steps}: every checkpoint "
                "needs an evaluation at its step to be compared (as Hugging Face requires)")
    return None


def _evaluation_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """test_datasets, early stopping and the best model, against the rest of the recipe."""
    problems = []
    if recipe.test_datasets and recipe.val_set_size:
        problems.append(("test_datasets", "given with val_set_size: evaluate on one of them (set val_set_size: 0, or "
                                          "drop test_datasets; Axolotl refuses both too)"))
    if recipe.test_datasets and (recipe.rl or recipe.reward_model):
        problems.append(("test_datasets", "preference runs evaluate on pairs held out of datasets: use val_set_size "
                                          "(a separate preference test set is not read yet)"))
    for key in ("early_stopping_patience", "load_best_model_at_end"):
        if not getattr(recipe, key):
            continue
        if not has_held_out(recipe):
            problems.append((key, "compares evaluations: set val_set_size or test_datasets, and eval_steps"))
        elif not (recipe.eval_steps or recipe.evals_per_epoch):
            problems.append((key, "compares evaluations during the run: set eval_steps or evals_per_epoch"))
    if recipe.load_best_model_at_end and not (recipe.save_steps or recipe.saves_per_epoch):
        problems.append(("load_best_model_at_end", "picks among the run's checkpoints: set save_steps (a multiple of "
                                                   "eval_steps)"))
    aligned = best_model_alignment(recipe)
    if aligned:
        problems.append(("load_best_model_at_end", aligned))
    for key in ("metric_for_best_model", "greater_is_better"):
        if getattr(recipe, key) is not None and not (recipe.early_stopping_patience or recipe.load_best_model_at_end):
            problems.append((key, "is read by early_stopping_patience and load_best_model_at_end; set one of them"))
    for group in ("datasets", "test_datasets"):
        for index, spec in enumerate(getattr(recipe, group) or []):
            if spec.field is not None and spec.kind != "completion":
                problems.append((f"{group}.{index}.field", f"names the text key of completion records; this dataset's "
                                                           f"type is {spec.kind}"))
    return problems


def combination_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """Settings that are each valid but make no sense together, all reported at once."""
    problems = []
    if recipe.fp16 and recipe.bf16 is not False:
        problems.append(("fp16", "fp16 and bf16 are both set; choose one precision"))
    if recipe.fp32 and (recipe.fp16 or recipe.bf16 is not False):
        problems.append(("fp32", "fp32 is set together with bf16/fp16; choose one precision"))
    if recipe.load_in_4bit and recipe.load_in_8bit:
        problems.append(("load_in_8bit", "load_in_4bit and load_in_8bit are both set; choose one"))
    if recipe.adapter == "qlora" and recipe.load_in_8bit:
        problems.append(("adapter", "qlora means a 4-bit base; use adapter: lora with load_in_8bit"))
    if (recipe.load_in_4bit or recipe.load_in_8bit) and recipe.adapter is None:
        problems.append(
            ("adapter", "a quantized base cannot be fully fine-tuned; set adapter: lora or adapter: qlora")
        )
    if recipe.lora_target_linear is False and recipe.lora_target_modules == "all-linear":
        problems.append(("lora_target_linear", "false, but lora_target_modules is all-linear; set lora_target_modules"))
    if isinstance(recipe.lora_target_modules, list) and not recipe.lora_target_modules:
        problems.append(("lora_target_modules", "empty list; name modules (e.g. [q_proj, v_proj]) or use all-linear"))
    if recipe.val_set_size >= 1 and recipe.val_set_size != int(recipe.val_set_size):
        problems.append(("val_set_size", "a count (>= 1) must be a whole number; a share must be below 1"))
    if recipe.optimizer.startswith("paged_") and recipe.device == "cpu":
        problems.append(("optimizer", f"{recipe.optimizer} needs CUDA (it pages state through unified memory), "
                                      "but device is cpu; use adamw_8bit"))
    if recipe.eval_steps and not has_held_out(recipe):
        problems.append(("eval_steps", "needs a held-out set: set val_set_size (e.g. 0.05) or test_datasets"))
    if recipe.warmup_ratio is not None and recipe.warmup_steps:
        problems.append(("warmup_ratio", "warmup_steps and warmup_ratio are both set; keep one"))
    if recipe.saves_per_epoch and recipe.save_steps:
        problems.append(("saves_per_epoch", "save_steps and saves_per_epoch are both set; keep one"))
    if recipe.evals_per_epoch is not None and recipe.eval_steps:
        problems.append(("evals_per_epoch", "eval_steps and evals_per_epoch are both set; keep one"))
    if recipe.min_lr_ratio and recipe.lr_scheduler != "cosine":
        problems.append(("min_lr_ratio", f"applies to lr_scheduler: cosine, not {recipe.lr_scheduler}"))
    if recipe.lora_model_dir and recipe.adapter is None:
        problems.append(("lora_model_dir", "continues a LoRA adapter; set adapter: lora or adapter: qlora"))
    if recipe.chat_template == "jinja" and not recipe.chat_template_jinja:
        problems.append(("chat_template", "jinja needs the template text in chat_template_jinja"))
    if recipe.chat_template_jinja and recipe.chat_template not in ("jinja", "tokenizer_default"):
        problems.append(("chat_template_jinja", f"given, but chat_template is {recipe.chat_template}; keep one of them"))
    problems += _peft_option_problems(recipe)
    problems += _vision_problems(recipe)
    problems += _model_family_problems(recipe)
    problems += _preference_problems(recipe)
    problems += _evaluation_problems(recipe)
    return problems


# (weight, activation) dtype pairs torchao has a QAT scheme for (besides nvfp4 and mxfp4), as Axolotl maps them.
_QAT_SCHEMES = {("int4", None), ("int4", "int8"), ("int4", "float8_e4m3fn"), ("float8_e4m3fn", "float8_e4m3fn")}


def _model_family_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """quantize_moe_experts, model_quantization_config, tokenizer_use_mistral_common and qat against the rest of
    the recipe. (What this machine can run is modeling.kernel_problems' part.)"""
    problems = []
    if recipe.quantize_moe_experts:
        if recipe.adapter is None:
            problems.append(("quantize_moe_experts", "the 4-bit experts are frozen: train a LoRA adapter on them "
                                                     "(adapter: lora or qlora)"))
        if recipe.load_in_8bit:
            problems.append(("quantize_moe_experts", "ftclip stores the experts in 4 bits only; use load_in_4bit "
                                                     "(or adapter: qlora) instead of load_in_8bit"))
        elif not (recipe.load_in_4bit or recipe.adapter == "qlora"):
            problems.append(("quantize_moe_experts", "needs load_in_4bit: true (or adapter: qlora); the linear layers "
                                                     "are quantized with the experts"))
    kwargs = recipe.model_quantization_config_kwargs
    if kwargs is not None and recipe.model_quantization_config is None:
        problems.append(("model_quantization_config_kwargs", "given without model_quantization_config"))
    if recipe.model_quantization_config == "Mxfp4Config":
        if recipe.quantized:
            problems.append(("model_quantization_config", "the checkpoint's MXFP4 format and bitsandbytes quantization "
                                                          "(load_in_4bit/8bit, qlora, quantize_moe_experts) exclude each "
                                                          "other; drop one"))
        unknown = sorted(set(kwargs or {}) - {"dequantize"})
        if unknown:
            problems.append(("model_quantization_config_kwargs", f"{', '.join(unknown)}: Mxfp4Config takes dequantize"))
        elif not (kwargs or {}).get("dequantize"):
            problems.append(("model_quantization_config_kwargs", "Mxfp4Config without dequantize: true keeps the "
                                                                 "experts in MXFP4 for inference kernels, which do not "
                                                                 "train; set {dequantize: true}"))
    if recipe.tokenizer_use_mistral_common:
        for key in ("special_tokens", "tokens", "chat_template_jinja"):
            if getattr(recipe, key):
                problems.append((key, "mistral-common's tokenizer has a fixed vocabulary and its own chat encoding; "
                                      "drop it or tokenizer_use_mistral_common"))
        if recipe.chat_template != "tokenizer_default":
            problems.append(("chat_template", "mistral-common renders chats with its own encoding; keep "
                                              "tokenizer_default or drop tokenizer_use_mistral_common"))
        for index, spec in enumerate(recipe.datasets):
            if spec.type == "chat" and spec.roles_to_train != ["assistant"] and not recipe.train_on_inputs:
                problems.append((f"datasets.{index}.roles_to_train", "with mistral-common's encoding ftclip trains "
                                                                     "the assistant turns only ([assistant])"))
    if recipe.qat is not None:
        if recipe.adapter is not None:
            problems.append(("qat", "fake-quantizes the weights a full fine-tune trains; with a LoRA adapter the base "
                                    "stays frozen (drop adapter, or qat)"))
        if recipe.quantized or recipe.model_quantization_config:
            problems.append(("qat", "trains full-precision weights under fake quantization; a quantized base "
                                    "(load_in_4bit/8bit, model_quantization_config) cannot be one"))
        if recipe.qat.quantize_embedding and recipe.qat.weight_dtype != "int4":
            problems.append(("qat.quantize_embedding", f"torchao's QAT quantizes embeddings to int4 weights, not "
                                                       f"{recipe.qat.weight_dtype}"))
        pair = (recipe.qat.weight_dtype, recipe.qat.activation_dtype)
        if pair not in _QAT_SCHEMES and recipe.qat.weight_dtype not in ("nvfp4", "mxfp4"):
            problems.append(("qat", f"weight_dtype {pair[0]} with activation_dtype {pair[1]}: torchao has no QAT scheme "
                                    "for that pair (int4 weights with int8, float8 or no activations; float8 with "
                                    "float8; nvfp4; mxfp4)"))
        if recipe.qat.weight_dtype == "nvfp4" and recipe.qat.group_size not in (None, 16):
            problems.append(("qat.group_size", "nvfp4 quantizes blocks of 16 values: set group_size: 16"))
        if recipe.qat.weight_dtype == "mxfp4" and recipe.qat.group_size not in (None, 32):
            problems.append(("qat.group_size", "mxfp4 quantizes blocks of 32 values: set group_size: 32"))
    return problems


def _peft_option_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """unfrozen_parameters and the peft options, against the rest of the recipe."""
    problems = []
    if recipe.unfrozen_parameters:
        if recipe.adapter:
            # Axolotl freezes after peft has wrapped the model, so its patterns meet names like
            # base_model.model.model.layers...: '^model...' then freezes everything, LoRA weights included.
            problems.append(("unfrozen_parameters", "chooses the parameters of a full fine-tune; with an adapter "
                                                    "(Axolotl matches them against the LoRA-wrapped names, freezing "
                                                    "the LoRA weights too) ftclip refuses it: drop one of them"))
        if (recipe.gradient_checkpointing_kwargs or {}).get("use_reentrant") is True:
            problems.append(("gradient_checkpointing_kwargs", "use_reentrant: true cannot train a partially frozen "
                                                              "model (unfrozen_parameters); use false"))
        ranged = [p for p in recipe.unfrozen_parameters if parse_unfrozen_pattern(p)[1] is not None]
        if ranged and recipe.distributed.strategy == "fsdp":
            problems.append(("unfrozen_parameters", f"row ranges ({ranged[0]}) zero gradient rows of whole "
                                                    "parameters, which FSDP shards; use strategy: ddp"))
    if recipe.adapter is None:
        for key in ("peft_use_rslora", "peft_use_dora", "lora_fan_in_fan_out", "lora_target_parameters", "peft"):
            if getattr(recipe, key):
                problems.append((key, "a LoRA option, but adapter is not set; set adapter: lora (or qlora)"))
    if recipe.peft and recipe.peft.loftq_config and recipe.quantized:
        problems.append(("peft", "LoftQ initializes LoRA from the unquantized weights; use adapter: lora without "
                                 "load_in_4bit/8bit"))
    if recipe.peft and recipe.peft.loftq_config and recipe.lora_model_dir:
        problems.append(("peft", "LoftQ initializes a new adapter; lora_model_dir continues an existing one"))
    return problems


def _vision_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """The vision-language keys, against the rest of the recipe."""
    problems = []
    if recipe.processor_type is None:
        for key in ("image_size", "image_resize_algorithm", "freeze_mm_modules"):
            if getattr(recipe, key) is not None:
                problems.append((key, "applies to vision-language runs; set processor_type: AutoProcessor (or the "
                                      "model's processor class)"))
        return problems
    if recipe.processor_type != "AutoProcessor" and not re.fullmatch(r"[A-Z]\w*Processor", recipe.processor_type):
        problems.append(("processor_type", f"{recipe.processor_type!r} is not a processor class name; use AutoProcessor "
                                           "or a transformers class such as Qwen2VLProcessor"))
    if recipe.sample_packing:
        problems.append(("sample_packing", "vision-language runs are not packed (each example's image placeholders "
                                           "and pixels are batched together per example); set sample_packing: false"))
    for index, spec in enumerate(recipe.datasets):
        if spec.type != "chat":
            problems.append((f"datasets.{index}.type", f"{spec.type}: vision-language runs train on image chats; "
                                                       "use type: chat (alias chat_template)"))
    if recipe.distributed.strategy == "fsdp":
        problems.append(("distributed", "FSDP is not supported for vision-language models in ftclip yet; use "
                                        "strategy: ddp"))
    return problems


def preference_kind(dataset_type: str, rl: str | None) -> str | None:
    """What a dataset's records hold: "pairs" (prompt, chosen, rejected), "kto" (prompt, completion, label), or
    None (SFT data). Axolotl's chatml.*/llama3.* names are KTO formats under rl: kto, pair formats otherwise."""
    if dataset_type not in PREFERENCE_TYPES:
        return None
    if dataset_type == "kto":
        return "kto"
    if dataset_type.startswith(("chatml", "llama3")) and rl == "kto":
        return "kto"
    return "pairs"


# Keys that mean something for one preference method only, with the methods that read them.
_METHOD_KEYS = {
    "dpo_loss_type": ("dpo",), "dpo_loss_weights": ("dpo",), "rpo_alpha": ("dpo",), "dpo_label_smoothing": ("dpo",),
    "orpo_alpha": ("orpo",), "simpo_gamma": ("simpo",), "cpo_alpha": ("simpo",),
    "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",),
    "center_rewards_coefficient": ("reward_model",), "precompute_ref_log_probs": ("dpo", "ipo", "kto"),
    "rl_beta": ("dpo", "ipo", "simpo", "kto"), "max_prompt_len": ("dpo", "ipo", "orpo", "simpo", "kto", "reward_model"),
}


def _preference_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """rl, reward_model and their settings, against each other, the data and the rest of the recipe."""
    problems = []
    method = recipe.rl or ("reward_model" if recipe.reward_model else None)
    if recipe.rl and recipe.reward_model:
        problems.append(("reward_model", f"a reward model is trained with the Bradley–Terry loss, not with rl: "
                                         f"{recipe.rl}; drop one of them"))
    for index, spec in enumerate(recipe.datasets):
        kind = preference_kind(spec.type, recipe.rl)
        key = f"datasets.{index}.type"
        if method is None and kind is not None:
            problems.append((key, f"{spec.type} is preference data: set rl (dpo, ipo, orpo, simpo, kto) or "
                                  "reward_model: true, or use alpaca, completion or chat for SFT"))
        elif method is not None and kind is None:
            problems.append((key, f"{spec.type} is SFT data, and {method} trains on preferences: use type preference "
                                  "({prompt?, chosen, rejected}), kto for rl: kto, or an Axolotl preference format"))
        elif recipe.rl == "kto" and kind == "pairs":
            problems.append((key, f"rl: kto reads single completions with a label, not pairs ({spec.type}): use type "
                                  "kto ({prompt, completion, label}) or Axolotl's chatml.*/llama3.* KTO formats"))
        elif kind == "kto" and recipe.rl != "kto":
            problems.append((key, f"type kto holds single labelled completions, which only rl: kto trains on; {method} "
                                  "needs pairs (type preference)"))
        if (spec.field_chosen or spec.field_rejected) and spec.type not in (
                "preference", "chat_template.default", "chat_template.argilla_chat"):
            problems.append((f"datasets.{index}.field_chosen", f"names the chosen/rejected columns of preference, "
                                                               f"chat_template.default or chat_template.argilla_chat "
                                                               f"data, not of {spec.type}"))
    defaults = {"dpo_label_smoothing": 0.0, "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0,
                "precompute_ref_log_probs": False}
    for key, methods in _METHOD_KEYS.items():
        value = getattr(recipe, key)
        if value is None or value == defaults.get(key, None) or method in methods:
            continue
        if method is None:
            problems.append((key, "a preference-training setting: set rl (or reward_model: true), or remove it"))
        elif recipe.rl == "orpo" and key == "rl_beta":
            problems.append((key, "ORPO has no β: its odds-ratio weight is orpo_alpha (Axolotl passes rl_beta to TRL's "
                                  "ORPO as that weight; write it as orpo_alpha)"))
        elif key == "precompute_ref_log_probs":
            problems.append((key, f"{method} has no reference model, so there are no reference log-probabilities"))
        else:
            hint = " (rl: ipo is rl: dpo with dpo_loss_type: [ipo])" if recipe.rl == "ipo" and key.startswith("dpo") else ""
            problems.append((key, f"applies to {' or '.join(methods)}, not {method}{hint}"))
    if method is None:
        return problems
    if recipe.sample_packing:
        problems.append(("sample_packing", "preference pairs are not packed: chosen and rejected share one padded "
                                           "forward; set sample_packing: false"))
    if recipe.train_on_inputs:
        problems.append(("train_on_inputs", "prompt tokens never count in a completion's log-probability (or a reward); "
                                            "set train_on_inputs: false"))
    if recipe.liger_fused_linear_cross_entropy:
        problems.append(("liger_fused_linear_cross_entropy", "Liger's kernel computes SFT's loss; preference "
                                                             "log-probabilities go through the chunked path"))
    if recipe.max_prompt_len and recipe.max_prompt_len >= recipe.sequence_len:
        problems.append(("max_prompt_len", f"{recipe.max_prompt_len} leaves no room for the answer within sequence_len "
                                           f"{recipe.sequence_len}"))
    losses = recipe.dpo_loss_type or ["sigmoid"]
    if recipe.dpo_loss_weights is not None and len(recipe.dpo_loss_weights) != len(losses):
        problems.append(("dpo_loss_weights", f"{len(recipe.dpo_loss_weights)} weight(s) for {len(losses)} loss "
                                             f"type(s) ({', '.join(losses)}); give one per dpo_loss_type entry"))
    if recipe.rl == "dpo" and recipe.dpo_label_smoothing and not {"robust", "exo_pair"} & set(losses):
        problems.append(("dpo_label_smoothing", f"read by the robust and exo_pair losses only; {', '.join(losses)} "
                                                "ignores it (TRL's sigmoid no longer smooths labels)"))
    if recipe.rl == "dpo" and "exo_pair" in losses and not recipe.dpo_label_smoothing:
        problems.append(("dpo_label_smoothing", "exo_pair needs EXO's ε > 0 (the paper suggests 1e-3)"))
    if recipe.rl in ("dpo", "ipo", "kto") and not recipe.precompute_ref_log_probs:
        if recipe.adapter is None and recipe.distributed.strategy == "fsdp":
            problems.append(("precompute_ref_log_probs", f"{recipe.rl} under FSDP with full fine-tuning: the frozen "
                                                         "reference copy would not be sharded; set "
                                                         "precompute_ref_log_probs: true"))
        if recipe.lora_model_dir:
            problems.append(("precompute_ref_log_probs", f"{recipe.rl} continuing an adapter (lora_model_dir): the "
                                                         "reference is the model as loaded, adapter included, which "
                                                         "disabling the adapter would not give; set "
                                                         "precompute_ref_log_probs: true"))
    return problems


# ---------------------------------------------------------------- loading from YAML


def _key_lines(node: yaml.Node, path: tuple = (), lines: dict | None = None, dupes: list | None = None):
    """Map each key path in a composed YAML document to its line number, noting duplicate keys."""
    lines = {} if lines is None else lines
    dupes = [] if dupes is None else dupes
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                dupes.append((path + (key,), key_node.start_mark.line + 1))
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _key_lines(value_node, path + (key,), lines, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[path + (index,)] = item.start_mark.line + 1
            _key_lines(item, path + (index,), lines, dupes)
    return lines, dupes


# Names other tools use for the same setting, so a ported recipe gets a pointed suggestion.
_OTHER_TOOLS_NAMES = {
    "lr": "learning_rate", "epochs": "num_epochs", "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "model": "base_model", "model_name_or_path": "base_model",
    "grad_clip": "gradient_clipping", "clip_grad_norm": "gradient_clipping", "lr_scheduler_type": "lr_scheduler",
    "max_seq_length": "sequence_len", "seq_len": "sequence_len", "optim": "optimizer",
}

_NESTED_MODELS: dict[str, type[BaseModel]] = {
    "datasets": DatasetSpec, "test_datasets": DatasetSpec, "gradient_clipping": GradientClipping,
    "special_tokens": SpecialTokens, "peft": PeftSettings, "qat": QATSettings,
}
_ALIASES = {"gradient_clipping": "max_grad_norm", "dataset_cache_dir": "dataset_prepared_path",
            "overrides_of_model_config": "model_config", "revision_of_model": "model_revision", "rl_beta": "beta"}


def _model_at(loc: tuple) -> type[BaseModel]:
    if len(loc) > 3 and loc[0] in ("datasets", "test_datasets") and loc[2] == "type":
        return PromptFormat  # datasets.N.type.<key>: a key of a prompt format
    return _NESTED_MODELS.get(loc[0], Recipe) if len(loc) > 1 else Recipe


def allowed_keys(model: type[BaseModel]) -> list[str]:
    """The keys a recipe (or one of its nested blocks) takes, aliases included."""
    keys = list(model.model_fields)
    aliases = ["max_grad_norm", "dataset_prepared_path", "model_config", "model_revision", "beta"]
    return keys + aliases if model is Recipe else keys


_UNION_TAGS = {"bool", "int", "float", "str", "list", "dict", "none"}


def _clean_loc(loc: tuple, lines: dict) -> tuple:
    """Drop pydantic's union-member tags (e.g. 'list[str]', 'bool') that are not recipe keys."""
    cleaned: list = []
    for part in loc:
        in_yaml = tuple(cleaned) + (part,) in lines
        is_key = isinstance(part, int) or (part.isidentifier() and part not in _UNION_TAGS)
        if in_yaml or is_key:
            cleaned.append(part)
    return tuple(cleaned)


def _key_path(key: str) -> tuple:
    """A dotted key ('datasets.0.type') as the path _key_lines records (list positions as ints)."""
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def _line_of(loc: tuple, lines: dict) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
        if end == 1 and loc[0] in _ALIASES and (_ALIASES[loc[0]],) in lines:
            return lines[(_ALIASES[loc[0]],)]
    return None


def _describe(error: dict) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        loc = error["loc"]
        allowed = allowed_keys(_model_at(loc))
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if not close and _model_at(loc) is Recipe and loc[-1] in _OTHER_TOOLS_NAMES:
            close = [_OTHER_TOOLS_NAMES[loc[-1]]]
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(allowed)}"
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    message = message.removeprefix("Value error, ")
    shown = error.get("input")
    if "input" in error and not isinstance(shown, dict) and repr(shown) not in message:
        message += f" (got {error['input']!r})"
    return message


def problems_from_validation(error: ValidationError, file: str, lines: dict) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = _clean_loc(tuple(item["loc"]), lines)
        key = ".".join(str(part) for part in loc) or "recipe"
        if not loc and "max_grad_norm" in item["msg"]:
            key, loc = "max_grad_norm", ("max_grad_norm",)
        for alias in ("dataset_prepared_path", "overrides_of_model_config", "revision_of_model"):  # model-level alias errors
            if not loc and item["msg"].removeprefix("Value error, ").startswith(alias):
                key, loc = alias, (alias,)
                break
        problems.append(Problem(file, key, _describe(item), _line_of(loc, lines)))
    return problems


def parse_recipe(text: str, file: str = "<recipe>", folder: str | Path | None = None) -> Recipe:
    """Parse and validate recipe text; raise RecipeError listing every problem found. folder: where the
    recipe's relative input paths start (the recipe file's folder)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(error, "problem", None) or str(error)
        if isinstance(error, yaml.constructor.ConstructorError):
            reason += " (recipes are read with yaml.safe_load: no Python tags)"
        raise RecipeError([Problem(file, "", f"malformed YAML: {reason}", line)]) from None
    if data is None:
        raise RecipeError([Problem(file, "", "the recipe is empty; it needs at least base_model and datasets")])
    if not isinstance(data, dict):
        raise RecipeError([Problem(file, "", f"the recipe must be a mapping of keys, not a {type(data).__name__}", 1)])
    lines, duplicates = _key_lines(node)
    problems = [
        Problem(file, ".".join(map(str, path)), "key given twice; YAML would silently keep the last", line)
        for path, line in duplicates
    ]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        found = problems + problems_from_validation(error, file, lines)
        raise RecipeError(sorted(found, key=lambda p: p.line or 0)) from None
    problems += [Problem(file, key, message, _line_of(_key_path(key), lines))
                 for key, message in combination_problems(recipe)]
    if problems:
        raise RecipeError(problems)
    recipe._folder = Path(folder).resolve() if folder is not None else None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(str(path), "", "no such recipe file")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([Problem(str(path), "", f"cannot read the recipe: {error}")]) from None
    return parse_recipe(text, str(path), path.parent)


def key_line(path: str | Path, key: str) -> int | None:
    """The line of a dotted key path (e.g. 'datasets.0.path') in a recipe file, for error messages."""
    try:
        lines, _ = _key_lines(yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None
    loc = tuple(int(part) if part.isdigit() else part for part in key.split("."))
    return _line_of(loc, lines)


AUTO_PRECISION_NOTE = "# bf16: auto resolved to {dtype} on the training device"


def dump_recipe(recipe: Recipe) -> str:
    # The overrides as comments: the values below already include them; the comments say where they came from.
    header = "".join(f"# --set {override.text}\n" for override in recipe._overrides)
    if recipe.precision == "auto" and recipe._trained_dtype:
        header += AUTO_PRECISION_NOTE.format(dtype=recipe._trained_dtype) + "\n"
    return header + yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def keys_markdown() -> str:
    """The README's table of recipe keys, made from the same model as validation and the JSON Schema."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def add(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "see below"
            else:
                default = f"`{field.default}`" if field.default is not None else "—"
            rows.append(f"| `{prefix}{name}` | {default} | {field.description} |")

    add(Recipe, "")
    add(DatasetSpec, "datasets[].")
    add(GradientClipping, "gradient_clipping.")
    add(DistributedSettings, "distributed.")
    add(SpecialTokens, "special_tokens.")
    add(PeftSettings, "peft.")
    add(LoftQSettings, "peft.loftq_config.")
    add(QATSettings, "qat.")
    return "\n".join(rows)
