"""Importing Axolotl configs: apply the table to each key, write the recipe (commented with where each value
came from) atomically, validate it, and report mapped / dropped / refused keys."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ftclip.axolotl.formats import BUILTIN_FORMATS, user_defined_format
from ftclip.axolotl.sharegpt import conversation_template, sharegpt_fields, sharegpt_loader
from ftclip.axolotl.table import (
    AXOLOTL_KEYS,
    DATASET_KEYS,
    DATASET_TYPES,
    FTCLIP_ONLY_KEYS,
    NOT_AXOLOTL_SPELLINGS,
    NUMERIC_KEYS,
    TRACKER_PREFIXES,
    TRACKER_WHY,
    Dropped,
    Mapped,
    Refused,
    Rule,
    as_number,
    is_off,
    preference_dataset_type,
    show_value,
    strategy_from_deepspeed,
)
from ftclip.errors import RecipeError
from ftclip.recipe import PromptFormat, Recipe, parse_recipe

# ---------------------------------------------------------------- importing one config


@dataclass
class ImportResult:
    source: str
    output: str | None = None
    mapped: list[tuple[str, str, str]] = field(default_factory=list)  # (axolotl key, ftclip key(s), note)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unreadable input, or the written recipe fails validation
    native: bool = False
    text: str | None = None  # the recipe as written: YAML with a comment per key saying where it came from
    recipe: dict[str, Any] | None = None  # the same recipe's keys and values, when it was made and is valid
    failure: str | None = None  # an unexpected error while importing it (the command reports it and goes on)

    @property
    def ok(self) -> bool:
        return not self.refused and not self.problems and self.failure is None and self.text is not None

    def as_json(self) -> dict:
        return {
            "source": self.source, "output": self.output if self.ok else None, "written": self.ok,
            "native_ftclip": self.native,
            "mapped": [{"from": old, "to": new, "note": note} for old, new, note in self.mapped],
            "dropped": [{"key": key, "why": why} for key, why in self.dropped],
            "refused": [{"key": key, "why": why} for key, why in self.refused],
            "problems": self.problems, "failure": self.failure,
        }




class _Builder:
    """Collects ftclip keys with the comment that says where each came from."""

    def __init__(self, result: ImportResult):
        self.result = result
        self.values: dict[str, Any] = {}
        self.origins: dict[str, list[str]] = {}

    def put(self, key: str, value: Any, origin: str) -> None:
        if key == "distributed":
            value = {**self.values.get("distributed", {}), **value}
        self.values[key] = value
        self.origins.setdefault(key, []).append(origin)


def _rebase(value: str, output_dir: Path) -> str:
    """A local path Axolotl reads relative to the working directory, made relative to the written recipe
    (ftclip reads input paths relative to the recipe's folder). Hub ids and absent paths stay as they are."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or not candidate.exists():
        return value
    return os.path.relpath(candidate.resolve(), output_dir.resolve())


ALPACA_COLUMNS = {"field_instruction": "instruction", "field_input": "input", "field_output": "output"}


def _dataset_type_refusal(value: Any) -> str:
    if value in ("json", "jsonl", "csv", "parquet", "text", "arrow"):
        return f"{value!r} is a file format (Axolotl's ds_type), not a prompt format; ftclip's are alpaca, completion, chat"
    return (f"prompt format {show_value(value)}: ftclip reads alpaca, completion and chat_template records, "
            f"Axolotl's user-defined formats and {', '.join(sorted(BUILTIN_FORMATS))}")


def _convert_sharegpt(where: str, entry: dict, loader: str, config: dict, builder: _Builder, converted: dict) -> None:
    """type: sharegpt → chat with the turns' field and spellings, and the conversation's chat template."""
    result = builder.result
    fields = sharegpt_fields(entry, loader)
    if isinstance(fields, str):
        result.refused.append((f"{where}.type", fields))
        return
    converted.update(fields)
    written = ", ".join(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}" for key, value in fields.items())
    result.mapped.append((f"{where}.type", f"{where}: {written}",
                          "Axolotl's ShareGPT records read as chat (its migration: type chat_template, field_messages, "
                          "message_property_mappings)" + (", roles from field_human/field_model"
                                                          if {"field_human", "field_model"} & set(entry) else "")))
    conversation = entry.get("conversation")
    template, note = conversation_template(conversation)
    name = f"{where}.conversation"
    if template is None:
        result.refused.append((name, note))
        return
    chosen = builder.values.get("chat_template", config.get("chat_template"))
    if chosen not in (None, template):
        result.refused.append((name, f"{conversation}: its turns are written in {template}, but the recipe's chat template "
                                     f"is {chosen}; ftclip has one chat template, for training and chat alike"))
        return
    builder.put("chat_template", template, f"from {name}: {conversation}")
    result.mapped.append((name, f"chat_template: {template}", note))


def _convert_prompt_format(where: str, value: Any, entry: dict, result: ImportResult, converted: dict) -> None:
    """A user-defined type (a mapping) carries over; a built-in strategy with fixed strings is written out."""
    name = f"{where}.type"
    if isinstance(value, dict):
        known, ignored = user_defined_format(value)
        try:
            PromptFormat.model_validate(known)
        except ValidationError as error:  # Axolotl's str.format raises on these at its first record
            problem = error.errors()[0]
            result.refused.append((name, f"{problem['msg'].removeprefix('Value error, ')}: Axolotl itself fails on it "
                                         "(str.format has no value for it)"))
            return
        converted["type"] = known
        result.mapped.append((name, f"{where}.type: a prompt format", "Axolotl's user-defined type, key for key"))
        result.dropped += [(f"{name}.{key}", "not a key of Axolotl's user-defined type: Axolotl discards it")
                           for key in ignored]
        return
    if value == "alpaca_chat" and entry.get("conversation") not in (None, "chat"):
        result.refused.append((name, f"alpaca_chat with conversation {show_value(entry['conversation'])}: an AlpacaPrompter "
                                     "style ftclip does not write out (it writes alpaca_chat's default, chat)"))
        return
    converted["type"] = dict(BUILTIN_FORMATS[value])
    result.mapped.append((name, f"{where}.type: a prompt format", f"Axolotl's {value} strategy written out as the "
                                                                  "prompt format that writes the same prompts"))


def _convert_dataset(index: int, entry: Any, config: dict, builder: _Builder, output_dir: Path,
                     group: str = "datasets") -> dict | None:
    result = builder.result
    where = f"{group}[{index}]"
    if not isinstance(entry, dict):
        result.refused.append((where, "a dataset entry must be a mapping with path and type"))
        return None
    converted: dict[str, Any] = {}
    loader = sharegpt_loader(entry.get("type"))
    for key, value in entry.items():
        name = f"{where}.{key}"
        if value is None:
            result.dropped.append((name, "empty: not set"))
            continue
        rule = DATASET_KEYS.get(key)
        if rule is None:
            result.refused.append((name, "not a dataset key ftclip's importer knows; it may change the data"))
        elif key == "path":
            converted["path"] = _rebase(str(value), output_dir)
        elif key == "type" and preference_dataset_type(value, config) is not None:  # rl / reward_model configs
            outcome = preference_dataset_type(value, config)
            if isinstance(outcome, Refused):
                result.refused.append((name, outcome.why))
            else:
                converted["type"] = outcome.updates["type"]
        elif loader is not None and key in ("type", "conversation", "field_human", "field_model"):
            if key == "type":
                _convert_sharegpt(where, entry, loader, config, builder, converted)
        elif key == "conversation" and entry.get("type") == "alpaca_chat":
            continue  # alpaca_chat's prompt style: read with the type
        elif key in ("conversation", "field_human", "field_model"):
            result.dropped.append((name, f"read by Axolotl's sharegpt type only; with type {show_value(entry.get('type'))} "
                                         "it has no effect"))
        elif key == "type" and (isinstance(value, dict) or (isinstance(value, str) and value in BUILTIN_FORMATS)):
            _convert_prompt_format(where, value, entry, result, converted)
        elif key == "type":
            if not isinstance(value, str) or value not in DATASET_TYPES:
                result.refused.append((name, _dataset_type_refusal(value)))
            else:
                converted["type"] = DATASET_TYPES[value]
                if value != DATASET_TYPES[value]:
                    result.mapped.append((name, f"{where}.type: {DATASET_TYPES[value]}", "the same record format"))
        elif key in ("message_field_role", "message_field_content"):
            mappings = converted.setdefault("message_property_mappings", {})
            mappings["role" if key.endswith("role") else "content"] = value
            result.mapped.append((name, f"{where}.message_property_mappings", "Axolotl's older spelling"))
        elif key == "field":
            if entry.get("type") != "completion":
                result.dropped.append((name, f"Axolotl's completion format alone reads it (the text column); with "
                                             f"type {show_value(entry.get('type'))} it has no effect"))
            else:
                converted["field"] = value
                result.mapped.append((name, f"{where}.field: {show_value(value)}", "the text key of completion records"))
        elif key == "train_on_split":
            split = entry.get("split")
            if split not in (None, value):
                result.refused.append((name, f"{show_value(value)} besides split {show_value(split)}: Axolotl read one "
                                             "of them depending on its version; keep split"))
            else:
                converted["split"] = value
                result.mapped.append((name, f"{where}.split: {show_value(value)}", "Axolotl's older key for the split "
                                      "trained on (it now ignores it and says to use split)"))
        elif key in ALPACA_COLUMNS:
            if entry.get("type") == "alpaca" and value == ALPACA_COLUMNS[key]:
                result.dropped.append((name, f"{value}: alpaca's own column, read by ftclip's alpaca too (Axolotl "
                                             "reads field_* only inside a user-defined type mapping)"))
            elif entry.get("type") == "alpaca":
                result.refused.append((name, f"reads {value!r} as the {ALPACA_COLUMNS[key]} column: ftclip's alpaca "
                                             "reads instruction, input and output (rename the columns)"))
            else:
                result.refused.append((name, f"a column of Axolotl's user-defined prompt formats; with type "
                                             f"{show_value(entry.get('type'))} there is no format that reads it"))
        elif key == "chat_template":
            top = config.get("chat_template")
            if top in (None, value):
                builder.put("chat_template", value, f"from {name}: {value}")
                result.mapped.append((name, "chat_template", "ftclip has one chat template per recipe"))
            else:
                result.refused.append((name, f"{value!r} differs from the recipe's chat_template {top!r}; ftclip has one"))
        elif rule.kind == "same":
            converted[key] = value
        elif rule.kind == "drop" or (rule.kind == "refuse" and is_off(value)):
            result.dropped.append((name, rule.why if rule.kind == "drop" else f"{show_value(value)}: off"))
        else:
            result.refused.append((name, rule.why))
    if "type" not in entry:
        result.refused.append((f"{where}.type", "missing: ftclip needs the record format (alpaca, completion, chat)"))
    return converted


def _apply(key: str, value: Any, config: dict, builder: _Builder, source: Path) -> None:
    result = builder.result
    origin = f"from {key}: {show_value(value)}"
    if value is None or value == "":  # `key:` or `key: ""`, as configs written from a template leave them
        result.dropped.append((key, "empty: not set, the default applies"))
        return
    if not isinstance(key, str):  # YAML reads `on:`, `yes:`, `no:` or `1:` as a boolean or a number, not a name
        result.refused.append((str(key), f"{key!r} ({type(key).__name__}) is not a key name; quote it if it is one"))
        return
    rule = AXOLOTL_KEYS.get(key) or NOT_AXOLOTL_SPELLINGS.get(key)
    if rule is None and key.startswith(TRACKER_PREFIXES) and key not in Recipe.model_fields:
        rule = Rule("drop", why=TRACKER_WHY)
    if rule is None:
        if key in Recipe.model_fields:  # ftclip's own key: carried over as it is
            builder.put(key, value, origin)
            result.mapped.append((key, key, "an ftclip key"))
        else:
            result.refused.append((key, "not a key ftclip's importer knows; it may change training"))
        return
    if rule.kind == "drop":
        result.dropped.append((key, rule.why))
        return
    if rule.kind == "refuse":
        if is_off(value):
            result.dropped.append((key, f"{show_value(value)}: the feature is off"))
        else:
            result.refused.append((key, rule.why))
        return
    try:
        if key == "deepspeed":
            outcome = strategy_from_deepspeed(value, config, source)
        elif rule.convert is not None:
            outcome = rule.convert(value, config)
        elif rule.kind == "same":
            outcome = Mapped({key: value})  # the rule's note is for the README table
        else:
            outcome = Mapped({rule.ftclip: value}, rule.why)
    except (TypeError, ValueError, AttributeError, KeyError):  # a value of a form Axolotl's schema does not take
        outcome = Refused(f"{show_value(value)} ({type(value).__name__}) is not a value of the form this key takes")
    if isinstance(outcome, Dropped):
        result.dropped.append((key, outcome.why))
    elif isinstance(outcome, Refused):
        result.refused.append((key, outcome.why))
    else:
        for new_key, new_value in outcome.updates.items():
            builder.put(new_key, new_value, origin)
        targets = ", ".join(f"{k}: {show_value(v)}" for k, v in outcome.updates.items()) or "—"
        result.mapped.append((key, targets, outcome.note))


# Where Axolotl's default differs from ftclip's, the importer writes Axolotl's out (when the key is absent).
def _axolotl_defaults(config: dict, values: dict) -> list[tuple[str, Any, str]]:
    defaults = [("bf16", "auto", "Axolotl's default bf16: auto (ftclip's is false)"),
                ("tf32", "auto", "Axolotl's default tf32: auto (ftclip's is false)"),
                ("save_total_limit", 0, "Axolotl keeps every checkpoint by default (ftclip keeps 3): 0 keeps all")]
    if values.get("adapter"):
        defaults.append(("lora_dropout", 0.0, "Axolotl's default lora_dropout 0.0 (ftclip's is 0.05)"))
    if "warmup_steps" not in values and "warmup_ratio" not in values:
        defaults.append(("warmup_ratio", 0.03, "Axolotl warms up over 3% of the steps when neither warmup_steps nor "
                                              "warmup_ratio is set (it caps that at 100 steps; ftclip does not)"))
    if values.get("fp16") and "bf16" not in values:
        defaults = [d for d in defaults if d[0] != "bf16"]  # Axolotl turns bf16: auto off when fp16 is set
    return [(key, value, why) for key, value, why in defaults if key not in values]


def _lora_target_check(values: dict, result: ImportResult) -> None:
    if values.get("adapter") and "lora_target_modules" not in values and not values.get("lora_target_linear"):
        result.refused.append(("lora_target_modules", "absent: Axolotl lets peft choose the modules by architecture; "
                                                      "name them (or set lora_target_linear: true)"))


def _sharded_reference(builder: _Builder) -> None:
    """Full fine-tuning under FSDP with a reference model (rl: dpo, ipo, kto): Axolotl's TRL trainer keeps a frozen
    copy; ftclip would not shard one, so it computes the same reference log-probabilities once before training."""
    values = builder.values
    if (values.get("rl") in ("dpo", "ipo", "kto") and not values.get("adapter") and not values.get("precompute_ref_log_probs")
            and values.get("distributed", {}).get("strategy") == "fsdp"):
        builder.put("precompute_ref_log_probs", True, "full fine-tuning under FSDP: the reference computed up front")
        builder.result.mapped.append(("(rl under FSDP)", "precompute_ref_log_probs: true",
                                      "the frozen reference copy TRL keeps would not be sharded; the reference "
                                      "log-probabilities are computed once before training (the same values)"))


def _render(builder: _Builder, source: str) -> str:
    lines = [f"# Imported from the Axolotl config {source} by `ftclip import-axolotl`.",
             "# Each key's comment says which Axolotl key it came from.", ""]
    order = list(Recipe.model_fields)
    for key in sorted(builder.values, key=lambda k: order.index(k) if k in order else len(order)):
        for origin in builder.origins[key]:
            lines.append(f"# {origin}")
        lines.append(yaml.safe_dump({key: builder.values[key]}, sort_keys=False, allow_unicode=True,
                                    width=1000).rstrip())
    return "\n".join(lines) + "\n"


def import_config(source: str | Path, output: str | Path | None = None) -> ImportResult:
    """Convert one Axolotl config file to ftclip recipe text (result.text), with the per-key report. Writes nothing."""
    source = Path(source)
    try:
        text = source.read_text(encoding="utf-8")
        config = yaml.safe_load(text)
    except FileNotFoundError:
        return ImportResult(str(source), str(output) if output else None, problems=["no such file"])
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        return ImportResult(str(source), str(output) if output else None,
                            problems=[f"cannot read it as YAML: {error}"])
    return import_mapping(config, source, output, text=text)


def import_mapping(config: Any, source: str | Path = "<config>", output: str | Path | None = None,
                   text: str | None = None, axolotl_defaults: bool = True) -> ImportResult:
    """Convert an Axolotl config already parsed (yaml.safe_load's mapping), in memory: result.recipe is the
    recipe's keys and values, result.text the same recipe rendered with a comment per key, and mapped / dropped /
    refused / problems the per-key report. Writes nothing. source names the config in messages and is where a
    deepspeed file is looked for; local paths are made relative to output's folder (source's when output is None).
    text, the config's own text when there is one, lets an ftclip recipe already be recognized by its lines.
    axolotl_defaults=False leaves absent keys at ftclip's defaults (an ftclip recipe carrying a few Axolotl keys)."""
    source = Path(source)
    result = ImportResult(str(source), str(output) if output else None)
    output_dir = Path(output).parent if output else source.parent
    if not isinstance(config, dict):
        result.problems.append("not a mapping of keys (an Axolotl config is one)")
        return result
    if set(config) & FTCLIP_ONLY_KEYS:
        own_text = text if text is not None else yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        try:
            parse_recipe(own_text, str(source))
        except RecipeError:
            pass
        else:  # already an ftclip recipe: its meaning rests on ftclip's defaults, so it is kept as it is
            result.native = True
            result.mapped = [(key, key, "an ftclip key") for key in config]
            result.recipe = dict(config)
            result.text = f"# Already an ftclip recipe ({source}); copied unchanged by `ftclip import-axolotl`.\n" + own_text
            return result

    # Numbers written as strings ("2e-4": YAML reads an exponent without a dot as text) are numbers to Axolotl.
    config = {key: as_number(value) if key in NUMERIC_KEYS else value for key, value in config.items()}
    builder = _Builder(result)
    for key, value in config.items():
        if key in ("datasets", "test_datasets") and value is not None:
            if isinstance(value, dict):  # one dataset written without the list's "- "
                result.mapped.append((key, key, "a single mapping: read as a list of one entry"))
                value = [value]
            if not isinstance(value, list):
                result.refused.append((key, f"{show_value(value)}: {key} is a list of entries with path and type"))
                continue
            entries = [_convert_dataset(i, entry, config, builder, output_dir, key) for i, entry in enumerate(value)]
            builder.put(key, [entry for entry in entries if entry is not None], f"from {key}")
            result.mapped.append((key, key, DATASET_KEYS["type"].why if key == "datasets" else
                                  "evaluated on, never trained on; each entry converted as datasets' are"))
            continue
        if key in ("base_model", "tokenizer", "lora_model_dir") and isinstance(value, str):
            value = _rebase(value, output_dir)
        _apply(key, value, config, builder, source)
    for key, value, why in _axolotl_defaults(config, builder.values) if axolotl_defaults else []:
        builder.put(key, value, f"not set in the Axolotl config: {why}")
        result.mapped.append(("(absent)", f"{key}: {show_value(value)}", why))
    if axolotl_defaults:  # absent targets mean peft's choice to Axolotl, all-linear to ftclip
        _lora_target_check(builder.values, result)
    _sharded_reference(builder)
    if result.refused:
        return result
    result.text = _render(builder, str(source))
    try:
        parse_recipe(result.text, str(output or source))
    except RecipeError as error:
        result.problems += [f"{p.key}: {p.message}" if p.key else p.message for p in error.problems]
        result.text = None
        return result
    result.recipe = builder.values
    return result


def write_atomically(path: Path, text: str) -> None:
    """Write the whole file or nothing: a temporary file in the same folder, renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def output_paths(sources: list[Path], output: Path | None, output_dir: Path | None) -> list[Path]:
    """Where each config's recipe goes: -o for one config; else NAME.ftclip.yaml next to it or in output_dir.
    Inputs with the same name (examples/a/qlora.yml, examples/b/qlora.yml) are named by their path below the
    folder they share (a__qlora.ftclip.yaml), so no recipe overwrites another."""
    if output is not None:
        return [output]
    folder = (lambda source: output_dir) if output_dir is not None else (lambda source: source.parent)
    targets = [folder(source) / f"{source.stem}.ftclip.yaml" for source in sources]
    if len(set(targets)) == len(targets):
        return targets
    resolved = [source.resolve() for source in sources]
    shared = Path(os.path.commonpath([path.parent for path in resolved]))
    return [folder(source) / ("__".join(path.relative_to(shared).with_suffix("").parts) + ".ftclip.yaml")
            for source, path in zip(sources, resolved)]

