"""Datasets: read local files, check records against their type, tokenize with prompt masking, split,
and cut into padded micro-batches.

Record schemas (one JSON object per record):
- alpaca:     {"instruction": str, "input": str (optional), "output": str}
- completion: {"text": str}
- chat:       {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              or ShareGPT {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec, Recipe, resolve_input_path

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


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    segments: list[int] | None = None  # lengths of the examples packed into this row (sample_packing)

    @property
    def trained_tokens(self) -> int:
        # The model predicts token t+1 from t, so the first label is never scored.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


# ---------------------------------------------------------------- reading and checking


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a .jsonl, .json (a list, or an object with a "data" list) or .parquet file."""
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON: {error.msg}") from None
        return records
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON: {error.msg}") from None
        records = data.get("data") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise DataError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
        return records
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow: pip install 'ftclip[parquet]'") from None
    try:
        return parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises its own ArrowInvalid/OSError family for damaged files
        raise DataError(f"{path}: not a readable parquet file: {error}") from None


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _chat_messages(record: dict) -> list[dict[str, str]] | str:
    """The record's turns as [{role, content}], or a description of what is wrong."""
    if "messages" in record:
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
    elif "conversations" in record:
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
        messages = _chat_messages(record)
        if isinstance(messages, str):
            return messages
    return None


def load_dataset_records(spec: DatasetSpec, recipe_path: str | Path | None) -> list[dict[str, Any]]:
    """Read a dataset and check every record; errors name the file and the record number."""
    path = resolve_input_path(spec.path, recipe_path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: the dataset is empty")
    for number, record in enumerate(records, start=1):
        problem = record_problem(record, spec.type)
        if problem:
            raise DataError(f"{path}: record {number}: {problem}")
    return records


def check_datasets(recipe: Recipe, recipe_path: str | Path) -> list[tuple[str, str]]:
    """For `validate`: every dataset exists, parses and matches its type. Returns (key, message) pairs."""
    problems = []
    for index, spec in enumerate(recipe.datasets):
        try:
            load_dataset_records(spec, recipe_path)
        except DataError as error:
            problems.append((f"datasets.{index}.path", str(error)))
    return problems


# ---------------------------------------------------------------- tokenizing


class _Builder:
    """Concatenates text segments token by token, masking the ones that are not trained on."""

    def __init__(self, tokenizer, train_on_inputs: bool):
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs
        self.input_ids: list[int] = []
        self.labels: list[int] = []

    def add_ids(self, ids: list[int], trained: bool) -> None:
        self.input_ids += ids
        self.labels += ids if (trained or self.train_on_inputs) else [IGNORE_INDEX] * len(ids)

    def add_text(self, text: str, trained: bool, special_tokens: bool = False) -> None:
        if text:
            self.add_ids(self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"], trained)

    def example(self, sequence_len: int) -> Example:
        return Example(self.input_ids[:sequence_len], self.labels[:sequence_len])


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_record(record: dict, kind: str, tokenizer, sequence_len: int, train_on_inputs: bool) -> Example:
    builder = _Builder(tokenizer, train_on_inputs)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "alpaca":
        template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
        builder.add_text(template.format(instruction=record["instruction"], input=record.get("input", "")),
                         trained=False, special_tokens=True)
        builder.add_text(record["output"], trained=True)
        builder.add_ids(eos, trained=True)
    elif kind == "completion":
        builder.add_text(record["text"], trained=True, special_tokens=True)
        builder.add_ids(eos, trained=True)
    else:
        _tokenize_chat(builder, _chat_messages(record), tokenizer)
    return builder.example(sequence_len)


def _tokenize_chat(builder: _Builder, messages: list[dict], tokenizer) -> None:
    """Render the conversation turn by turn so each assistant reply (with its end-of-turn marker) is
    trained and everything else is masked. Needs a template whose renderings extend one another."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat datasets need one (set `tokenizer:`)")
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1])
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise DataError("the chat template does not render turns as extensions of each other; cannot mask turns")
        builder.add_text(prompt[len(rendered):], trained=False)
        builder.add_text(full[len(prompt):], trained=True)
        rendered = full
    builder.add_text(_render(tokenizer, messages)[len(rendered):], trained=False)


def tokenize_datasets(recipe: Recipe, recipe_path: str | Path | None, tokenizer, progress=None) -> list[Example]:
    """Every record of every dataset, tokenized and masked; `progress(records)` wraps the record iterator
    (the CLI passes a rich progress bar)."""
    examples = []
    for spec in recipe.datasets:
        records = load_dataset_records(spec, recipe_path)
        for record in progress(records, spec.path) if progress else records:
            try:
                example = tokenize_record(record, spec.type, tokenizer, recipe.sequence_len, recipe.train_on_inputs)
            except DataError as error:
                raise DataError(f"{resolve_input_path(spec.path, recipe_path)}: {error}") from None
            if example.trained_tokens:  # a record truncated down to its prompt teaches nothing
                examples.append(example)
    if not examples:
        raise DataError("no example has a trained token left after truncation; raise sequence_len")
    return examples


def split_examples(examples: list[Example], recipe: Recipe) -> tuple[list[Example], list[Example]]:
    """Hold out val_set_size examples, chosen by seed (the same recipe always holds out the same ones)."""
    order = list(range(len(examples)))
    random.Random(recipe.seed).shuffle(order)
    size = recipe.val_set_size
    val_count = int(size) if size >= 1 else round(size * len(examples))
    if val_count >= len(examples):
        raise DataError(f"val_set_size {size} leaves no training examples (there are {len(examples)})")
    val = [examples[i] for i in sorted(order[:val_count])]
    train = [examples[i] for i in sorted(order[val_count:])]
    return train, val


def load_examples(recipe: Recipe, recipe_path: str | Path | None, tokenizer, progress=None
                  ) -> tuple[list[Example], list[Example]]:
    """Tokenized train and validation examples, from the on-disk cache when the inputs are unchanged."""
    from ftclip.data_cache import cached_examples

    return split_examples(cached_examples(recipe, recipe_path, tokenizer, progress), recipe)
