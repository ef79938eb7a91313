"""Record formats: what a record of each dataset type must hold, and the prompt templates.

Record schemas (one JSON object per record):
- alpaca:     {"instruction": str, "input": str (optional), "output": str}
- completion: {"text": str}
- chat:       {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
              or ShareGPT {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
              (other field and role names through the dataset's chat options; see ftclip/data/chat.py)
"""

from __future__ import annotations

from typing import Any

from ftclip.data.chat import conversation_from_record
from ftclip.data.labels import IGNORE_INDEX
from ftclip.recipe import DatasetSpec

__all__ = ["IGNORE_INDEX", "alpaca_prompt", "missing_columns", "record_problem"]

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def record_problem(record: Any, spec: DatasetSpec) -> str | None:
    """Why a record does not fit its dataset type, or None."""
    kind = spec.kind
    if spec.preference_kind:  # preference pairs and KTO completions: ftclip/data/preference_records.py
        from ftclip.data.preference_records import preference_problem

        return preference_problem(record, spec)
    if not isinstance(record, dict):
        return f"a record must be a JSON object, not {type(record).__name__}"
    if kind == "prompt_format":
        return _prompt_format_problem(record, spec.type)
    if kind == "alpaca":
        for key in ("instruction", "output"):
            if not _is_text(record.get(key)):
                return f"an alpaca record needs a string {key!r}"
        if record.get("input") is not None and not _is_text(record["input"]):
            return "'input' must be a string"
    elif kind == "completion":
        key = completion_field(spec)
        if not _is_text(record.get(key)) or not record[key]:
            return f"a completion record needs a non-empty string {key!r}"
    elif kind == "chat":
        conversation = conversation_from_record(record, spec)
        if isinstance(conversation, str):
            return conversation
    return None


def completion_field(spec: DatasetSpec) -> str:
    """The record key of a completion dataset's text."""
    return spec.field or "text"


def _prompt_format_problem(record: dict, prompt_format) -> str | None:
    """A prompt format needs its instruction; input, output and system text are optional strings (Axolotl reads
    an absent input or output as empty)."""
    if not _is_text(record.get(prompt_format.field_instruction)):
        return f"the prompt format needs a string {prompt_format.field_instruction!r} (field_instruction)"
    for key, name in ((prompt_format.field_input, "field_input"), (prompt_format.field_output, "field_output"),
                      (prompt_format.field_system, "field_system")):
        if record.get(key) is not None and not _is_text(record[key]):
            return f"{key!r} ({name}) must be a string"
    return None


REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "chat": None}


def missing_columns(columns: list[str], spec: DatasetSpec) -> str | None:
    """For sources checked by their schema rather than record by record (parquet and Arrow files)."""
    kind = spec.kind
    if spec.preference_kind:
        from ftclip.data.preference_records import required_columns

        missing = [name for name in required_columns(spec) if name not in columns]
        return (f"a {kind} dataset needs column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}"
                if missing else None)
    if kind == "chat":
        wanted = [spec.field_messages] if spec.field_messages else ["messages", "conversations"]
        return None if set(wanted) & set(columns) else (
            f"a chat dataset needs a {' or '.join(repr(w) for w in wanted)} column; it has {', '.join(columns)}")
    if kind == "completion":
        required = (completion_field(spec),)
    elif kind == "prompt_format":
        required = (spec.type.field_instruction,)
    else:
        required = REQUIRED_COLUMNS[kind]
    missing = [name for name in required if name not in columns]
    if missing:
        return f"an {kind} dataset needs column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}"
    return None
