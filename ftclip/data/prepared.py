"""What a data stage returns (`PreparedData`) and the pieces its builds share: SFT's pipeline (pipeline.py) and
preference data (preference.py) both tokenize their sources into the same cache with them. A module of its own so
that the two stages import it and not each other."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftclip.data.cache import FileDigests
from ftclip.data.pack import PackingStats
from ftclip.data.sources import Source
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

    @property
    def held_out(self) -> str:
        """What `val` is, in words."""
        return "from test_datasets" if self.test is not None else "held out"


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
