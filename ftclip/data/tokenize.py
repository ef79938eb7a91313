"""Records to token ids and labels, a batch of records at a time (the function `Dataset.map(batched=True)`
runs, in several processes): prompts are masked with IGNORE_INDEX unless train_on_inputs.

Each output row has input_ids, labels, `trained` (how many labels after the first are trained: the first
token is never predicted), `problem` (why the record does not fit its type, else None) and `skipped` (why a
valid chat record could not be masked on this template, else None). Nothing raises inside the worker
processes: the caller reads those columns, names the first bad record and counts the skipped ones."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ftclip.data.chat import Skip, conversation_from_record, tokenize_conversations
from ftclip.data.mistral_chat import encode_texts, is_mistral_common
from ftclip.data.mistral_chat import tokenize_conversations as tokenize_mistral_conversations
from ftclip.data.records import IGNORE_INDEX, alpaca_prompt, completion_field, record_problem
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec


@dataclass(frozen=True)
class TokenizeSettings:
    spec: DatasetSpec
    sequence_len: int
    train_on_inputs: bool

    @property
    def kind(self) -> str:
        return self.spec.kind


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]


def _finish(ids: list[int], labels: list[int], settings: TokenizeSettings) -> tuple[list[int], list[int], int]:
    ids, labels = ids[: settings.sequence_len], labels[: settings.sequence_len]
    return ids, labels, sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenize_batch(batch: dict[str, list], tokenizer, settings: TokenizeSettings) -> dict[str, list]:
    records = _rows(batch)
    problems = [record_problem(record, settings.spec) for record in records]
    good = [record for record, problem in zip(records, problems) if problem is None]
    if settings.kind == "alpaca":
        pieces = _alpaca(good, tokenizer, settings)
    elif settings.kind == "prompt_format":
        pieces = _prompt_format(good, tokenizer, settings)
    elif settings.kind == "completion":
        pieces = _completion(good, tokenizer, settings)
    else:
        pieces = _chat(good, tokenizer, settings)
    out: dict[str, list] = {"input_ids": [], "labels": [], "trained": [], "problem": [], "skipped": []}
    produced = iter(pieces)
    for problem in problems:
        piece = ([], [], 0) if problem else next(produced)
        skipped = piece.reason if isinstance(piece, Skip) else None
        ids, labels, trained = ([], [], 0) if skipped else piece
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["trained"].append(trained)
        out["problem"].append(problem)
        out["skipped"].append(skipped)
    return out


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text: the fast tokenizer's own batch encode (the same ids as `tokenizer(texts)`),
    without transformers' per-encoding conversion into dicts and attention masks, a third of the time."""
    if is_mistral_common(tokenizer):
        return encode_texts(tokenizer, texts, add_special_tokens)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    if backend.truncation is not None or backend.padding is not None:  # as transformers resets them per call
        backend = copy.deepcopy(backend)
        backend.no_truncation()
        backend.no_padding()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: not needed here
    return [encoding.ids for encoding in encode(texts, add_special_tokens=add_special_tokens)]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _alpaca(records: list[dict], tokenizer, settings: TokenizeSettings) -> list[tuple]:
    """The prompt (with the tokenizer's special tokens, e.g. BOS) is masked; the output and EOS are trained.
    Prompt and output are tokenized separately, in one batched call each."""
    return _prompt_and_output(records, [alpaca_prompt(r) for r in records], [r["output"] for r in records], tokenizer,
                              settings)


def _prompt_format(records: list[dict], tokenizer, settings: TokenizeSettings) -> list[tuple]:
    """A prompt format of the recipe's own (Axolotl's user-defined type), masked and trained as alpaca is: Axolotl
    tokenizes the prompt with the special tokens, the output without its BOS, and appends EOS."""
    prompt_format = settings.spec.type
    prompts = [prompt_format.prompt(record) for record in records]
    outputs = [record.get(prompt_format.field_output) or "" for record in records]
    # An empty output is no text at all to Axolotl's tokenizer: not even the EOS is trained (nothing is).
    return _prompt_and_output(records, prompts, outputs, tokenizer, settings, eos_after_empty=False)


def _prompt_and_output(records: list[dict], prompt_texts: list[str], output_texts: list[str], tokenizer,
                       settings: TokenizeSettings, eos_after_empty: bool = True) -> list[tuple]:
    if not records:
        return []
    prompts = _encode(tokenizer, prompt_texts, add_special_tokens=True)
    outputs = _encode(tokenizer, output_texts, add_special_tokens=False)
    eos = _eos(tokenizer)
    limit = settings.sequence_len
    pieces = []
    for prompt, output in zip(prompts, outputs):
        ids = (prompt + output + (eos if output or eos_after_empty else []))[:limit]
        if settings.train_on_inputs:
            pieces.append((ids, ids, len(ids) - 1))
            continue
        masked = min(len(prompt), limit)
        labels = [IGNORE_INDEX] * masked + ids[masked:]
        # Trained: the labels after the first position that are not masked (the first is never predicted).
        pieces.append((ids, labels, len(ids) - max(masked, 1)))
    return pieces


def _completion(records: list[dict], tokenizer, settings: TokenizeSettings) -> list[tuple]:
    if not records:
        return []
    key = completion_field(settings.spec)
    texts = _encode(tokenizer, [r[key] for r in records], add_special_tokens=True)
    eos = _eos(tokenizer)
    rows = [(ids + eos)[: settings.sequence_len] for ids in texts]
    return [(ids, ids, len(ids) - 1) for ids in rows]


def _chat(records: list[dict], tokenizer, settings: TokenizeSettings) -> list:
    """One render per conversation, one offset tokenization for the batch (see ftclip/data/chat.py)."""
    if not records:
        return []
    spec = settings.spec
    conversations = [conversation_from_record(record, spec) for record in records]
    # Mistral's own tokenizer encodes chats message by message, with no text template (data/mistral_chat.py).
    tokenize = tokenize_mistral_conversations if is_mistral_common(tokenizer) else tokenize_conversations
    results = tokenize(conversations, tokenizer, roles_to_train=spec.roles_to_train,
                                     train_on_eos=spec.train_on_eos, train_on_inputs=settings.train_on_inputs,
                                     sequence_len=settings.sequence_len)
    return [result if isinstance(result, Skip) else _finish(*result, settings) for result in results]


def check_chat_template(tokenizer, kind: str) -> None:
    if is_mistral_common(tokenizer):  # mistral-common's encoding is its chat format
        return
    if kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat datasets need one (set chat_template: or tokenizer:)")
