"""Records to token ids and labels, a batch of records at a time (the function `Dataset.map(batched=True)`
runs, in several processes): prompts are masked with IGNORE_INDEX unless train_on_inputs.

Each output row has input_ids, labels, `trained` (how many labels after the first are trained: the first
token is never predicted) and `problem` (why the record does not fit its type, else None). Nothing raises
inside the worker processes: the caller reads the problem column and names the first bad record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftclip.data.records import IGNORE_INDEX, alpaca_prompt, chat_messages, record_problem
from ftclip.errors import DataError


@dataclass(frozen=True)
class TokenizeSettings:
    kind: str
    sequence_len: int
    train_on_inputs: bool


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]


def _finish(ids: list[int], labels: list[int], settings: TokenizeSettings) -> tuple[list[int], list[int], int]:
    ids, labels = ids[: settings.sequence_len], labels[: settings.sequence_len]
    return ids, labels, sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenize_batch(batch: dict[str, list], tokenizer, settings: TokenizeSettings) -> dict[str, list]:
    records = _rows(batch)
    problems = [record_problem(record, settings.kind) for record in records]
    good = [record for record, problem in zip(records, problems) if problem is None]
    if settings.kind == "alpaca":
        pieces = _alpaca(good, tokenizer, settings)
    elif settings.kind == "completion":
        pieces = _completion(good, tokenizer, settings)
    else:
        pieces = [_chat(chat_messages(record), tokenizer, settings) for record in good]
    out: dict[str, list] = {"input_ids": [], "labels": [], "trained": [], "problem": []}
    produced = iter(pieces)
    for problem in problems:
        ids, labels, trained = ([], [], 0) if problem else next(produced)
        if isinstance(ids, str):  # a chat record the template cannot mask
            problem, ids, labels, trained = ids, [], [], 0
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["trained"].append(trained)
        out["problem"].append(problem)
    return out


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _alpaca(records: list[dict], tokenizer, settings: TokenizeSettings) -> list[tuple]:
    """The prompt (with the tokenizer's special tokens, e.g. BOS) is masked; the output and EOS are trained.
    Prompt and output are tokenized separately, in one batched call each."""
    if not records:
        return []
    prompts = tokenizer([alpaca_prompt(r) for r in records], add_special_tokens=True)["input_ids"]
    outputs = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    eos = _eos(tokenizer)
    pieces = []
    for prompt, output in zip(prompts, outputs):
        ids = prompt + output + eos
        labels = ids if settings.train_on_inputs else [IGNORE_INDEX] * len(prompt) + output + eos
        pieces.append(_finish(ids, labels, settings))
    return pieces


def _completion(records: list[dict], tokenizer, settings: TokenizeSettings) -> list[tuple]:
    if not records:
        return []
    texts = tokenizer([r["text"] for r in records], add_special_tokens=True)["input_ids"]
    eos = _eos(tokenizer)
    return [_finish(ids + eos, ids + eos, settings) for ids in texts]


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat(messages: list[dict], tokenizer, settings: TokenizeSettings) -> tuple:
    """Render the conversation turn by turn so each assistant reply (with its end-of-turn marker) is
    trained and everything else is masked. Needs a template whose renderings extend one another."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, trained: bool) -> None:
        if text:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if (trained or settings.train_on_inputs) else [IGNORE_INDEX] * len(piece))

    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1])
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            return ("the chat template does not render turns as extensions of each other; cannot mask turns", [], 0)
        add(prompt[len(rendered):], trained=False)
        add(full[len(prompt):], trained=True)
        rendered = full
    add(_render(tokenizer, messages)[len(rendered):], trained=False)
    return _finish(ids, labels, settings)


def check_chat_template(tokenizer, kind: str) -> None:
    if kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat datasets need one (set `tokenizer:` or chat_template)")
