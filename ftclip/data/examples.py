"""Tokenized examples read straight from memory-mapped Arrow files: each example's input_ids and labels are
numpy views into the mapped buffers, so a million examples cost a few index arrays, not Python ints."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np

from ftclip.errors import DataError


def open_arrow(path: Path):
    """A table backed by the file's memory map (datasets writes Arrow IPC streams)."""
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


def _list_index(column) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """For a chunked list<int> column: the chunks' value buffers, and per row its chunk, start and end."""
    buffers, chunk_of_row, starts, ends = [], [], [], []
    for number, chunk in enumerate(column.chunks):
        offsets = chunk.offsets.to_numpy()
        buffers.append(chunk.values.to_numpy(zero_copy_only=True))
        chunk_of_row.append(np.full(len(chunk), number, dtype=np.int32))
        starts.append(offsets[:-1].astype(np.int64))
        ends.append(offsets[1:].astype(np.int64))
    if not buffers:
        empty = np.zeros(0, dtype=np.int64)
        return [], empty.astype(np.int32), empty, empty
    return buffers, np.concatenate(chunk_of_row), np.concatenate(starts), np.concatenate(ends)


class _Column:
    def __init__(self):
        self.buffers: list[np.ndarray] = []
        self.chunk: list[np.ndarray] = []
        self.start: list[np.ndarray] = []
        self.end: list[np.ndarray] = []

    def add(self, column, rows: np.ndarray) -> None:
        buffers, chunk, start, end = _list_index(column)
        self.chunk.append(chunk[rows] + len(self.buffers))
        self.start.append(start[rows])
        self.end.append(end[rows])
        self.buffers += buffers

    def freeze(self) -> None:
        self.chunk = np.concatenate(self.chunk) if self.chunk else np.zeros(0, np.int32)
        self.start = np.concatenate(self.start) if self.start else np.zeros(0, np.int64)
        self.end = np.concatenate(self.end) if self.end else np.zeros(0, np.int64)

    def get(self, index: int) -> np.ndarray:
        return self.buffers[self.chunk[index]][self.start[index]:self.end[index]]


class TokenizedExamples:
    """All datasets' kept examples, in order. `kept[i]` are the rows of table i that have trained tokens."""

    def __init__(self, tables: list, kept: list[np.ndarray]):
        self._tables = tables  # keep the memory maps alive
        self._kept = kept
        self._ids, self._labels = _Column(), _Column()
        trained = []
        for table, rows in zip(tables, kept):
            self._ids.add(table.column("input_ids"), rows)
            self._labels.add(table.column("labels"), rows)
            # Per chunk: ChunkedArray.to_numpy goes through pandas, a second of import on a warm start.
            counts = np.concatenate([chunk.to_numpy() for chunk in table.column("trained").chunks])
            trained.append(counts[rows].astype(np.int64))
        self._ids.freeze()
        self._labels.freeze()
        # Image chats: each example's image references (opened per batch, ftclip/data/vision_batches.py).
        self._images = [(table.column("images"), rows) for table, rows in zip(tables, kept)
                        if "images" in table.column_names]
        self._image_starts = np.cumsum([0] + [len(rows) for _, rows in self._images])
        self.lengths = self._ids.end - self._ids.start
        self.trained = np.concatenate(trained) if trained else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def input_ids(self, index: int) -> np.ndarray:
        return self._ids.get(index)

    def labels(self, index: int) -> np.ndarray:
        return self._labels.get(index)

    def images(self, index: int) -> list[dict]:
        """The example's image references ({"path", "bytes"}), [] for text data."""
        if not self._images:
            return []
        table = int(np.searchsorted(self._image_starts, index, side="right")) - 1
        column, rows = self._images[table]
        return column[int(rows[index - self._image_starts[table]])].as_py() or []

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def digest(self) -> str:
        """What ranks on several nodes compare (ftclip.data.prepared.tokens_digest)."""
        from ftclip.data.prepared import tokens_digest

        return tokens_digest(self._tables, self._kept)


def split_indices(count: int, val_set_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out val_set_size examples, chosen by seed (the same recipe always holds out the same ones)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    val_count = int(val_set_size) if val_set_size >= 1 else round(val_set_size * count)
    if val_count >= count:
        raise DataError(f"val_set_size {val_set_size} leaves no training examples (there are {count})")
    val = np.sort(np.asarray(order[:val_count], dtype=np.int64))
    train = np.sort(np.asarray(order[val_count:], dtype=np.int64))
    return train, val


def without_duplicates(examples: TokenizedExamples, train: np.ndarray, val: np.ndarray,
                       held_out_examples: TokenizedExamples | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) without exact repeats: a training example whose input_ids and labels equal an earlier one's
    is dropped, and so is a held-out example that equals a training one or an earlier held-out one. Hashes of
    the token bytes, one pass over the examples. held_out_examples: where `val` indexes (test_datasets' own
    examples), when not in `examples`."""
    def digest(source: TokenizedExamples, index: int) -> bytes:
        ids, labels = source.input_ids(index), source.labels(index)
        return hashlib.blake2b(ids.tobytes() + b"|" + labels.tobytes(), digest_size=16).digest()

    seen: set[bytes] = set()

    def first_seen(source: TokenizedExamples, indices: np.ndarray) -> np.ndarray:
        kept = []
        for index in indices.tolist():
            key = digest(source, index)
            if key not in seen:
                seen.add(key)
                kept.append(index)
        return np.asarray(kept, dtype=np.int64)

    return first_seen(examples, train), first_seen(held_out_examples if held_out_examples is not None else examples, val)


def open_shards(entry: Path, manifest: dict) -> tuple[list, list]:
    """A cache entry's token tables (memory-mapped Arrow, one per dataset) and each one's kept-example indices."""
    import pyarrow as pa

    tables, kept = [], []
    for index, names in enumerate(manifest["shards"]):
        parts = [open_arrow(entry / name) for name in names]
        tables.append(pa.concat_tables(parts) if len(parts) > 1 else parts[0])
        kept.append(np.load(entry / f"d{index}-kept.npy"))
    return tables, kept
