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
    kind = spec.type
    if not isinstance(record, dict):
        return f"a record must be a JSON object, not {type(record).__name__}"
    if kind == "alpaca":
        for key in ("instruction", "output"):
            if not _is_text(record.get(key)):
                return f"an alpaca record needs a string {key!r}"
        if record.get("input") is not None and not _is_text(record["input"]):
            return "'input' must be a string"
    elif kind == "completion":
        if not _is_text(record.get("text")) or not record["text"]:
            return "a completion record needs a non-empty string 'text'"
    elif kind == "chat":
        conversation = conversation_from_record(record, spec)
        if isinstance(conversation, str):
            return conversation
    return None


REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "completion": ("text",), "chat": None}


def missing_columns(columns: list[str], spec: DatasetSpec) -> str | None:
    """For sources checked by their schema rather than record by record (parquet and Arrow files)."""
    kind = spec.type
    if kind == "chat":
        wanted = [spec.field_messages] if spec.field_messages else ["messages", "conversations"]
        return None if set(wanted) & set(columns) else (
            f"a chat dataset needs a {' or '.join(repr(w) for w in wanted)} column; it has {', '.join(columns)}")
    missing = [name for name in REQUIRED_COLUMNS[kind] if name not in columns]
    if missing:
        return f"an {kind} dataset needs column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}"
    return None
