"""What a data stage returns (`PreparedData`) and the pieces its builds share: SFT's pipeline (pipeline.py) and
preference data (preference.py) both tokenize their sources into the same cache with them. A module of its own so
that the two stages import it and not each other."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftclip.data.cache import FileDigests, cache_dir, read_manifest
from ftclip.data.pack import PackingStats
from ftclip.data.sources import Source, open_dataset, resolve_source
from ftclip.errors import DataError
from ftclip.recipe import Recipe

SMALL_DATASET = 5000  # below this many records, worker processes cost more than they save


@dataclass
class PreparedData:
    examples: Any  # TokenizedExamples (SFT) or PreferenceExamples: len(), .tokens, .lengths, .trained
    train: Any  # Rows or PreferenceRows: what the loop draws micro-batches from (len(rows), rows.rows(indices))
    val: Any
    packing: PackingStats | None
    cache: Path
    hit: bool
    records: int  # records read (0 on a cache hit)
    seconds: float  # time spent tokenizing (0 on a hit)
    notes: list[str]  # e.g. chat records skipped because the template could not mask them
    detail: str = ""  # a word more for the data line (preference data: what truncation did)
    test: Any = None  # test_datasets' examples (the held-out rows `val` are over them)
    tokens_digest: str | None = None  # SHA-256 of the tokens (under torchrun, where all ranks compare them)

    @property
    def held_out(self) -> str:
        """What `val` is, in words."""
        return "from test_datasets" if self.test is not None else "held out"


class NotBuilt(DataError):
    """A rank that waited for another to build the cache entry finds none under its own key (its key may differ:
    other data files on its node, which the ranks' comparison of keys then reports)."""

    def __init__(self, entry: Path):
        super().__init__(f"no readable tokenized cache at {entry}: the rank that builds it for this node did not "
                         "leave one")
        self.key = entry.name


def tokens_digest(tables: list, kept: list) -> str:
    """SHA-256 of every integer column (token ids, labels, counts) of the tables and of which rows are kept: equal on
    two machines that tokenized the same data the same way, however datasets split the tables into files and
    chunks (a list column's lengths and values are hashed as two streams, so chunk boundaries do not enter)."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    whole = hashlib.sha256()
    for table, rows in zip(tables, kept):
        whole.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
        for name in sorted(table.column_names):
            column = table.column(name)
            kind = column.type.value_type if pa.types.is_list(column.type) else column.type
            if not (pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
                continue  # notes (strings), image references: not tokens
            lengths, values = hashlib.sha256(), hashlib.sha256()
            for chunk in column.chunks:
                if pa.types.is_list(column.type):
                    lengths.update(np.diff(chunk.offsets.to_numpy()).astype(np.int64).tobytes())
                    chunk = chunk.flatten()
                values.update(chunk.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            whole.update(name.encode() + lengths.digest() + values.digest())
    return whole.hexdigest()


def num_processes(recipe: Recipe, records: int) -> int:
    if records < SMALL_DATASET:
        return 1
    chosen = recipe.dataset_processes or min(os.cpu_count() or 1, 8)
    return max(1, min(chosen, records // 1000))


def source_identity(source: Source, digests: FileDigests) -> str | None:
    """The content's identity without loading it (local data); None for a hub dataset (known once opened)."""
    if source.kind == "file":
        return digests.of(Path(source.location))
    if source.kind == "folder":
        return digests.of_folder(Path(source.location))
    return None


def first_problem(mapped, source: Source) -> None:
    """Stop at the first record the tokenizer marked as not fitting its format (the `problem` column)."""
    import pyarrow.compute as pc

    column = mapped.data.column("problem")
    if column.null_count == len(column):
        return
    first = pc.index(pc.is_valid(column), True).as_py()
    count = len(column) - column.null_count
    more = f" ({count} records have problems)" if count > 1 else ""
    raise DataError(f"{source.label}: record {first + 1}: {column[first].as_py()}{more}")


def cached_tokens(recipe: Recipe, build: bool, key_of, build_entry, open_entry):
    """(examples, cache entry, manifest, hit, records read, seconds) for recipe.datasets: the cached entry, else
    tokenized now and stored. The stage says how: key_of(sources, identities) names the entry, build_entry(sources,
    datasets, root, key) writes it and returns (entry, records), open_entry(entry, manifest) reads it.
    build=False (a rank that waits for another to build) only opens an entry that is there."""
    root = cache_dir(recipe)
    sources = [resolve_source(spec, recipe) for spec in recipe.datasets]
    digests = FileDigests(root)
    identities = [source_identity(source, digests) for source in sources]
    opened = [None] * len(sources)
    for index, source in enumerate(sources):
        if identities[index] is None:  # a hub dataset: its fingerprint is known once it is opened
            opened[index] = open_dataset(source, root / "sources")
            identities[index] = opened[index]._fingerprint
    key = key_of(sources, identities)
    entry = root / key
    manifest = read_manifest(entry)
    if manifest is not None:
        digests.save()
        return open_entry(entry, manifest), entry, manifest, True, 0, 0.0
    if not build:
        raise NotBuilt(entry)
    started = time.perf_counter()
    opened = [dataset if dataset is not None else open_dataset(source, root / "sources")
              for source, dataset in zip(sources, opened)]
    try:
        entry, records = build_entry(sources, opened, root, key)
    except OSError as error:
        raise DataError(f"dataset_cache_dir: cannot write the tokenized cache under {root}: {error}") from None
    digests.save()
    manifest = read_manifest(entry)
    return open_entry(entry, manifest), entry, manifest, False, records, time.perf_counter() - started

