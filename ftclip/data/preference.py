"""Preference data for rl and reward_model: records (ftclip/data/preference_records.py) → token ids → the Arrow
cache → held-out split → rows the loop draws micro-batches from (`len(rows)`, `rows.rows(indices)`), like SFT data.

Tokenization is TRL's (trl/trainer/dpo_trainer.py `_prepare_dataset`, kto_trainer.py likewise), so the same records
give the same ids:
- text: the prompt is tokenized with the tokenizer's special tokens (BOS), each answer gets the eos token's text
  unless it ends with it, and prompt + answer is tokenized as one text;
- messages: the prompt is rendered by the chat template with the generation prompt, prompt + answer without it;
- the answer's ids start where the prompt's ids and the prompt + answer ids part (a template may render the prompt
  alone differently, or tokens may merge across the boundary), so prompt tokens never count in an answer.
Truncation, counted and reported: a prompt longer than max_prompt_len keeps its last max_prompt_len tokens (the part
next to the answer); prompt + answer is cut to sequence_len keeping the start, and a pair whose prompt alone fills
sequence_len is left out (TRL leaves it out too: no answer token would remain).

KTO's KL term is estimated, as TRL does, from mismatched pairs: each example's prompt with another example's
completion. Here the partner is the previous example of the same split (the first takes the last), fixed for the
whole run so its reference log-probability can be precomputed like the others."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from ftclip.data.cache import entry_key, publish, staging_folder, tokenizer_digest
from ftclip.data.chat import _RENDER_ERRORS
from ftclip.data.examples import _Column, open_shards, split_indices
from ftclip.data.preference_records import Labelled, Pair, labelled_from_record, pair_from_record
from ftclip.data.prepared import PreparedData, cached_tokens, first_problem, num_processes, tokens_digest
from ftclip.data.sources import Source
from ftclip.data.tokenize import _encode, _rows
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec, Recipe

PREFERENCE_FORMAT = 1  # bump when tokenization or truncation of preference data changes


@dataclass(frozen=True)
class PreferenceSettings:
    spec: DatasetSpec
    kind: str  # "pairs" or "kto"
    sequence_len: int
    max_prompt_len: int | None


# ---------------------------------------------------------------- tokenization (runs inside Dataset.map workers)


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


def _with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def _texts(item: Pair | Labelled, answers: tuple[str, ...], tokenizer) -> tuple[str, list[str]] | str:
    """(prompt text, [prompt + answer text, ...]) as TRL builds them, or why the chat template refused the record."""
    if not item.conversational:
        eos = tokenizer.eos_token
        return item.prompt, [item.prompt + _with_eos(getattr(item, answer), eos) for answer in answers]
    if not getattr(tokenizer, "chat_template", None):
        return "message records are rendered by a chat template and the tokenizer has none (set chat_template:)"
    try:
        prompt = tokenizer.apply_chat_template(item.prompt, tokenize=False, add_generation_prompt=True)
        return prompt, [tokenizer.apply_chat_template(item.prompt + getattr(item, answer), tokenize=False)
                        for answer in answers]
    except _RENDER_ERRORS as error:
        return f"the chat template refused it: {error}"


def _split_ids(prompt: list[int], sequences: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The answers' ids start where the prompt's ids and each prompt + answer's ids part (TRL's common prefix)."""
    cut = min(common_prefix_length(prompt, sequence) for sequence in sequences)
    return prompt[:cut], [sequence[cut:] for sequence in sequences]


def _truncated(prompt: list[int], answers: list[list[int]], settings: PreferenceSettings):
    """(prompt, answers, prompt cut, answer cut, dropped) after max_prompt_len and sequence_len."""
    prompt_cut = bool(settings.max_prompt_len and len(prompt) > settings.max_prompt_len)
    if prompt_cut:
        prompt = prompt[-settings.max_prompt_len:]
    room = settings.sequence_len - len(prompt)
    if room <= 0:
        return prompt, answers, prompt_cut, False, True
    answer_cut = any(len(answer) > room for answer in answers)
    return prompt, [answer[:room] for answer in answers], prompt_cut, answer_cut, False


def tokenize_preference_batch(batch: dict[str, list], tokenizer, settings: PreferenceSettings) -> dict[str, list]:
    records = _rows(batch)
    parse = labelled_from_record if settings.kind == "kto" else pair_from_record
    parsed = [parse(record, settings.spec) for record in records]
    answers = ("completion",) if settings.kind == "kto" else ("chosen", "rejected")
    texts = [item if isinstance(item, str) else _texts(item, answers, tokenizer) for item in parsed]
    # One batched tokenizer call per layout (text: with the tokenizer's special tokens; messages: the template
    # writes them), for the prompts and for each answer.
    encoded = {}
    for conversational in (False, True):
        chosen = [text for item, text in zip(parsed, texts)
                  if not isinstance(text, str) and item.conversational == conversational]
        if chosen:
            flat = [prompt for prompt, _ in chosen] + [full for _, fulls in chosen for full in fulls]
            ids = _encode(tokenizer, flat, add_special_tokens=not conversational)
            width = len(answers)
            count = len(chosen)
            encoded[conversational] = iter([(ids[index], ids[count + index * width:count + (index + 1) * width])
                                            for index in range(count)])
    names = ["prompt_ids", *(f"{answer}_ids" for answer in answers)]
    out: dict[str, list] = {name: [] for name in names}
    out.update(label=[], problem=[], prompt_cut=[], answer_cut=[], dropped=[])
    for item, text in zip(parsed, texts):
        problem, prompt, ids, cuts = None, [], [[] for _ in answers], (False, False, True)
        if isinstance(text, str):
            problem = text
        else:
            prompt, ids = _split_ids(*next(encoded[item.conversational]))
            empty = [answer for answer, answer_ids in zip(answers, ids) if not answer_ids]
            if empty:
                problem = f"the {empty[0]} answer has no tokens of its own after the prompt"
            else:
                prompt, ids, *cuts = _truncated(prompt, ids, settings)
        out["prompt_ids"].append(prompt)
        for answer, answer_ids in zip(answers, ids):
            out[f"{answer}_ids"].append(answer_ids)
        out["label"].append(bool(item.desirable) if isinstance(item, Labelled) else True)
        out["problem"].append(problem)
        out["prompt_cut"].append(int(cuts[0]))
        out["answer_cut"].append(int(cuts[1]))
        out["dropped"].append(int(cuts[2]))
    return out


# ---------------------------------------------------------------- tokenized examples, memory-mapped


class PreferenceExamples:
    """All datasets' kept pairs (or KTO completions), in order; ids are numpy views into the mapped Arrow files."""

    def __init__(self, tables: list, kept: list[np.ndarray], kind: str):
        self.kind = kind
        self._tables = tables  # keep the memory maps alive
        self._kept = kept
        self.answers = ("completion",) if kind == "kto" else ("chosen", "rejected")
        self._columns = {name: _Column() for name in ("prompt", *self.answers)}
        labels = []
        for table, rows in zip(tables, kept):
            for name, column in self._columns.items():
                column.add(table.column(f"{name}_ids"), rows)
            labels.append(np.concatenate([c.to_numpy(zero_copy_only=False) for c in table.column("label").chunks])[rows]
                          if len(table) else np.zeros(0, bool))
        for column in self._columns.values():
            column.freeze()
        self.desirable = np.concatenate(labels).astype(bool) if labels else np.zeros(0, bool)
        size = {name: column.end - column.start for name, column in self._columns.items()}
        # What the model reads of each example (the prompt once per answer), its longest sequence, its answer tokens.
        self.sequence_tokens = sum(size["prompt"] + size[answer] for answer in self.answers)
        self.lengths = size["prompt"] + np.max([size[answer] for answer in self.answers], axis=0)
        self.trained = sum(size[answer] for answer in self.answers)
        self.unit = "KTO examples" if kind == "kto" else "pairs"

    def __len__(self) -> int:
        return len(self.lengths)

    def digest(self) -> str:
        """What ranks on several nodes compare (ftclip.data.prepared.tokens_digest)."""
        return tokens_digest(self._tables, self._kept)

    def ids(self, name: str, index: int) -> np.ndarray:
        return self._columns[name].get(index)

    def sequences(self, index: int) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of each of the example's sequences (prompt + chosen, prompt + rejected; or prompt +
        completion), the prompt's labels -100: what `ftclip preprocess --show` prints."""
        prompt = self.ids("prompt", index).tolist()
        return [(prompt + answer, [-100] * len(prompt) + answer)
                for answer in (self.ids(name, index).tolist() for name in self.answers)]

    @property
    def tokens(self) -> int:
        return int(self.sequence_tokens.sum())


@dataclass
class PairRow:
    """One preference pair as the objective reads it: 1-D int64 ids, and the reference model's log-probabilities
    of (chosen, rejected) when they were precomputed."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    reference: tuple[float, float] | None = None


@dataclass
class KTORow:
    """One KTO example: the prompt with its completion, and the same prompt with another example's completion
    (the mismatched pair the KL term is estimated from); reference: (completion, mismatched) log-probabilities."""

    prompt: np.ndarray
    completion: np.ndarray
    desirable: bool
    mismatched: np.ndarray
    reference: tuple[float, float] | None = None


@dataclass
class PreferenceRows:
    """The loop's rows over preference examples: `len(rows)`, `rows.rows(indices)` and `rows.micro_batches(chunks)`,
    as SFT's Rows."""

    examples: PreferenceExamples
    members: np.ndarray  # example indices
    reference: np.ndarray | None = None  # [len(examples), 2] float64, precomputed reference log-probs

    def __len__(self) -> int:
        return len(self.members)

    def partner(self, position: int) -> int:
        """KTO: the example whose completion pairs with this one's prompt for the KL estimate: the previous one of
        this split (the first takes the last)."""
        return int(self.members[position - 1])

    def row(self, position: int) -> PairRow | KTORow:
        index = int(self.members[position])
        examples = self.examples
        ids = {name: examples.ids(name, index).astype(np.int64) for name in ("prompt", *examples.answers)}
        reference = tuple(float(v) for v in self.reference[index]) if self.reference is not None else None
        if examples.kind == "kto":
            mismatched = examples.ids("completion", self.partner(position)).astype(np.int64)
            return KTORow(ids["prompt"], ids["completion"], bool(examples.desirable[index]), mismatched, reference)
        return PairRow(ids["prompt"], ids["chosen"], ids["rejected"], reference)

    def rows(self, positions) -> list:
        return [self.row(int(position)) for position in positions]

    def micro_batches(self, chunks: list[list[int]]) -> Iterator[list]:
        """The rows of each chunk of positions, in order (as SFT's Rows)."""
        for chunk in chunks:
            yield self.rows(chunk)

    def with_reference(self, reference: np.ndarray) -> PreferenceRows:
        return replace(self, reference=reference)


def without_duplicate_pairs(examples: PreferenceExamples, train: np.ndarray, val: np.ndarray):
    """dataset_exact_deduplication for preference data: an example whose prompt and answers (and label) repeat an
    earlier one's is dropped, as for SFT (a held-out one that repeats a training one too)."""
    seen: set[bytes] = set()

    def first_seen(indices: np.ndarray) -> np.ndarray:
        kept = []
        for index in indices.tolist():
            digest = hashlib.blake2b(digest_size=16)
            for name in ("prompt", *examples.answers):
                digest.update(examples.ids(name, index).tobytes() + b"|")
            digest.update(bytes([examples.desirable[index]]))
            key = digest.digest()
            if key not in seen:
                seen.add(key)
                kept.append(index)
        return np.asarray(kept, dtype=np.int64)

    return first_seen(train), first_seen(val)


# ---------------------------------------------------------------- the cache


def _features(kind: str):
    import datasets

    ids = datasets.Sequence(datasets.Value("int32"))
    answers = ("completion",) if kind == "kto" else ("chosen", "rejected")
    return datasets.Features({
        "prompt_ids": ids, **{f"{answer}_ids": ids for answer in answers}, "label": datasets.Value("bool"),
        "problem": datasets.Value("string"), "prompt_cut": datasets.Value("int8"),
        "answer_cut": datasets.Value("int8"), "dropped": datasets.Value("int8"),
    })


def _column_numpy(mapped, name: str) -> np.ndarray:
    return np.concatenate([chunk.to_numpy() for chunk in mapped.data.column(name).chunks])


def _build(recipe: Recipe, sources: list[Source], opened: list, tokenizer, root: Path, key: str, kind: str):
    staging = staging_folder(root, key)
    records, shards, kept_counts, counts = 0, [], [], {"prompt_cut": 0, "answer_cut": 0, "dropped": 0}
    for index, (source, dataset) in enumerate(zip(sources, opened)):
        if len(dataset) == 0:
            raise DataError(f"{source.label}: the dataset is empty")
        settings = PreferenceSettings(source.spec, kind, recipe.sequence_len, recipe.max_prompt_len)
        processes = num_processes(recipe, len(dataset))
        environ = os.environ
        try:
            mapped = dataset.map(
                functools.partial(tokenize_preference_batch, tokenizer=tokenizer, settings=settings),
                batched=True, batch_size=1000, num_proc=processes if processes > 1 else None,
                remove_columns=dataset.column_names, features=_features(kind),
                cache_file_name=str(staging / f"d{index}-tokens.arrow"), new_fingerprint=f"{key}-{index}",
                desc=f"tokenizing {Path(source.location).name}",
            )
        finally:
            os.environ = environ  # see pipeline._build: datasets' workers swap it for a copy
        first_problem(mapped, source)
        for name in counts:
            counts[name] += int(_column_numpy(mapped, name).sum())
        kept = np.flatnonzero(_column_numpy(mapped, "dropped") == 0)
        np.save(staging / f"d{index}-kept.npy", kept)
        shards.append([Path(f["filename"]).name for f in mapped.cache_files])
        kept_counts.append(len(kept))
        records += len(dataset)
        del mapped
    if not sum(kept_counts):
        raise DataError(f"every prompt fills sequence_len ({recipe.sequence_len}) on its own: no answer token would "
                        "remain; raise sequence_len or set max_prompt_len")
    return publish(staging, root / key, {"format": 2, "preference": kind, "shards": shards, "kept": kept_counts,
                                         "records": records, "sources": [s.label for s in sources], "notes": [],
                                         "truncation": counts}), records


def _open(entry: Path, manifest: dict) -> PreferenceExamples:
    tables, kept = open_shards(entry, manifest)
    return PreferenceExamples(tables, kept, manifest["preference"])


def preference_kind(recipe: Recipe) -> str:
    return "kto" if recipe.rl == "kto" else "pairs"


def tokenized_preferences(recipe: Recipe, tokenizer, build: bool = True):
    """(examples, cache entry, manifest, hit, records read, seconds): from the cache, else tokenized now and stored.
    The key covers what decides the ids: the data, the tokenizer (and its chat template), sequence_len,
    max_prompt_len, the kind of record and ftclip's preference format."""
    kind = preference_kind(recipe)

    def key_of(sources, identities) -> str:
        return entry_key({
            "datasets": [(identity, source.spec.model_dump(mode="json", exclude={"path"}))
                         for source, identity in zip(sources, identities)],
            "tokenizer": tokenizer_digest(tokenizer), "sequence_len": recipe.sequence_len,
            "max_prompt_len": recipe.max_prompt_len, "preference": kind, "preference_format": PREFERENCE_FORMAT,
        })

    return cached_tokens(recipe, build, key_of,
                         lambda sources, datasets, root, key: _build(recipe, sources, datasets, tokenizer, root, key, kind),
                         _open)


def truncation_summary(recipe: Recipe, counts: dict[str, int], total: int) -> str:
    """What truncation did, for the data line: nothing, or the prompts cut, the answers cut and the pairs left out."""
    parts = []
    if counts.get("prompt_cut"):
        parts.append(f"prompts cut to their last {recipe.max_prompt_len} tokens (max_prompt_len): {counts['prompt_cut']:,}")
    if counts.get("answer_cut"):
        parts.append(f"answers cut at sequence_len {recipe.sequence_len}: {counts['answer_cut']:,}")
    if counts.get("dropped"):
        parts.append(f"left out, the prompt alone filling sequence_len: {counts['dropped']:,}")
    return f"truncation of {total:,} records: {'; '.join(parts)}" if parts else "truncation: none"


def prepare_preference(recipe: Recipe, tokenizer, build: bool):
    """Tokenized, split preference data as the pipeline's PreparedData (never packed)."""
    examples, entry, manifest, hit, records, seconds = tokenized_preferences(recipe, tokenizer, build)
    train, val = split_indices(len(examples), recipe.val_set_size, recipe.seed)
    notes = list(manifest.get("notes", []))
    if recipe.dataset_exact_deduplication:
        unique_train, unique_val = without_duplicate_pairs(examples, train, val)
        notes.append(f"dataset_exact_deduplication: dropped {len(train) - len(unique_train):,} repeated training and "
                     f"{len(val) - len(unique_val):,} repeated held-out {examples.unit}")
        train, val = unique_train, unique_val
    if examples.kind == "kto" and (len(train) < 2 or 0 < len(val) < 2):
        raise DataError("rl: kto estimates its KL term from each example's prompt with another example's completion: "
                        "each split needs at least 2 examples")
    summary = truncation_summary(recipe, manifest.get("truncation", {}), manifest.get("records", len(examples)))
    return PreparedData(examples, PreferenceRows(examples, train), PreferenceRows(examples, val), None, entry, hit,
                        records, seconds, notes, detail=summary)
