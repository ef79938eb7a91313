"""Tokenize once: the tokenized examples are cached on disk, keyed by everything that decides them
(the data files' bytes and types, the tokenizer, sequence_len, train_on_inputs, ftclip's tokenization
format). Anything else in the recipe can change without invalidating the cache.

Files are plain tensors (`torch.save`, read back with `weights_only=True`), written to a temp file and
renamed, so a killed `preprocess` never leaves a cache entry that a later run would trust."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ftclip.data import Example, tokenize_datasets
from ftclip.recipe import Recipe, resolve_input_path

FORMAT_VERSION = 1  # bump when tokenization or masking rules change


def cache_dir(recipe: Recipe) -> Path:
    if recipe.dataset_cache_dir:
        return Path(recipe.dataset_cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ftclip" / "tokenized"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """The vocabulary, merges, normalizer, special tokens and chat template: what turns text into ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True),
        str(getattr(tokenizer, "add_bos_token", None)), str(getattr(tokenizer, "add_eos_token", None)),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(recipe: Recipe, recipe_path: str | Path | None, tokenizer) -> str:
    inputs = {
        "format": FORMAT_VERSION,
        "datasets": [(_file_digest(resolve_input_path(spec.path, recipe_path)), spec.type) for spec in recipe.datasets],
        "tokenizer": tokenizer_digest(tokenizer),
        "sequence_len": recipe.sequence_len,
        "train_on_inputs": recipe.train_on_inputs,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(recipe: Recipe, recipe_path: str | Path | None, tokenizer) -> Path:
    return cache_dir(recipe) / f"{cache_key(recipe, recipe_path, tokenizer)}.pt"


def _save(examples: list[Example], path: Path) -> None:
    payload = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64),
        "lengths": torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, staging)
    os.replace(staging, path)


def _load(path: Path) -> list[Example] | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        lengths = payload["lengths"].tolist()
        input_ids = payload["input_ids"].split(lengths)
        labels = payload["labels"].split(lengths)
    except Exception:  # an unreadable or foreign file is a cache miss, never an error
        return None
    return [Example(ids.tolist(), lab.tolist()) for ids, lab in zip(input_ids, labels)]


def cached_examples(recipe: Recipe, recipe_path: str | Path | None, tokenizer, progress=None,
                    report=None) -> list[Example]:
    """The tokenized examples: from the cache on a hit, else tokenized now and stored. `report(path, hit)`
    is told which happened."""
    path = cache_path(recipe, recipe_path, tokenizer)
    examples = _load(path) if path.is_file() else None
    hit = examples is not None
    if not hit:
        examples = tokenize_datasets(recipe, recipe_path, tokenizer, progress)
        try:
            _save(examples, path)
        except OSError:
            pass  # an unwritable cache folder costs the next run a re-tokenization, not this run its data
    if report:
        report(path, hit)
    return examples
