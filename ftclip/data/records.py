"""Record formats: what a record of each dataset type must hold, and the prompt templates.

Record schemas (one JSON object per record):
- alpaca:     {"instruction": str, "input": str (optional), "output": str}
- completion: {"text": str}
- chat:       {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              or ShareGPT {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100  # label value the loss skips (transformers' and torch's convention)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def alpaca_prompt(record: dict) -> str:
    template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input") or "")


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def chat_messages(record: dict) -> list[dict[str, str]] | str:
    """The record's turns as [{role, content}], or a description of what is wrong."""
    if record.get("messages") is not None:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            return "messages must be a non-empty list"
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or not _is_text(turn.get("role")) or not _is_text(turn.get("content")):
                return f"messages[{index}] needs string 'role' and 'content'"
            if turn["role"] not in ("system", "user", "assistant"):
                return f"messages[{index}].role is {turn['role']!r}; allowed: system, user, assistant"
            messages.append({"role": turn["role"], "content": turn["content"]})
    elif record.get("conversations") is not None:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns:
            return "conversations must be a non-empty list"
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or not _is_text(turn.get("from")) or not _is_text(turn.get("value")):
                return f"conversations[{index}] needs string 'from' and 'value'"
            if turn["from"] not in SHAREGPT_ROLES:
                return f"conversations[{index}].from is {turn['from']!r}; allowed: system, human, gpt"
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    else:
        return "a chat record needs 'messages' (OpenAI style) or 'conversations' (ShareGPT style)"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn: nothing to train on"
    return messages


def record_problem(record: Any, kind: str) -> str | None:
    """Why a record does not fit its dataset type, or None."""
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
        messages = chat_messages(record)
        if isinstance(messages, str):
            return messages
    return None


REQUIRED_COLUMNS = {"alpaca": ("instruction", "output"), "completion": ("text",), "chat": None}


def missing_columns(columns: list[str], kind: str) -> str | None:
    """For sources checked by their schema rather than record by record (folders, Arrow, hub datasets)."""
    if kind == "chat":
        return None if {"messages", "conversations"} & set(columns) else (
            "a chat dataset needs a 'messages' or 'conversations' column")
    missing = [name for name in REQUIRED_COLUMNS[kind] if name not in columns]
    if missing:
        return f"an {kind} dataset needs column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}"
    return None
