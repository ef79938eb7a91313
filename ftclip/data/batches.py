"""From tokenized examples to model inputs: training rows (one example each, or several packed), per-epoch
shuffling into micro-batches, and collation (padding, or packed rows with per-example position ids).

A micro-batch is a list of rows; a row is a list of examples; an example is a pair (input_ids, labels) of
1-D int64 numpy arrays. In a packed row each example's first label is IGNORE_INDEX: unpacked, the first
token is never a target (nothing precedes it); packed, it would be predicted from the previous example."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ftclip.data.examples import TokenizedExamples
from ftclip.data.records import IGNORE_INDEX

Segment = tuple[np.ndarray, np.ndarray]
Row = list[Segment]


@dataclass
class Rows:
    """Training rows over a set of examples: row r holds examples members[offsets[r]:offsets[r+1]]."""

    examples: TokenizedExamples
    offsets: np.ndarray
    members: np.ndarray
    packed: bool = False

    @classmethod
    def single(cls, examples: TokenizedExamples, indices: np.ndarray) -> Rows:
        return cls(examples, np.arange(len(indices) + 1, dtype=np.int64), np.asarray(indices, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example_indices(self, row: int) -> np.ndarray:
        return self.members[self.offsets[row]:self.offsets[row + 1]]

    def row(self, index: int) -> Row:
        segments = []
        for example in self.example_indices(index).tolist():
            ids = self.examples.input_ids(example).astype(np.int64)
            labels = self.examples.labels(example).astype(np.int64)
            if self.packed:
                labels[0] = IGNORE_INDEX
            segments.append((ids, labels))
        return segments

    def rows(self, indices) -> list[Row]:
        return [self.row(int(index)) for index in indices]

    def micro_batches(self, chunks: list[list[int]]) -> Iterator[list[Row]]:
        """The rows of each chunk of row indices, in order (image rows load theirs in worker processes)."""
        for chunk in chunks:
            yield self.rows(chunk)


def trained_tokens(rows: list[Row]) -> int:
    """Labels the loss scores: the model predicts token t+1 from t, so a row's first label never counts."""
    total = 0
    for row in rows:
        labels = np.concatenate([labels for _, labels in row])
        total += int(np.count_nonzero(labels[1:] != IGNORE_INDEX))
    return total


def row_tokens(rows: list[Row]) -> int:
    return sum(len(ids) for row in rows for ids, _ in row)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def micro_batches(rows: Rows, micro_batch_size: int, seed: int, epoch: int, world_size: int = 1, skip: int = 0
                  ) -> Iterator[list[Row]]:
    """The epoch's micro-batches, from the `skip`-th on (a resumed run builds none of those it skips)."""
    order = epoch_order(len(rows), seed, epoch)
    if len(order) % world_size:  # as DistributedSampler: repeat from the start so every rank has a share
        order += order[: world_size - len(order) % world_size]
    chunks = [order[start : start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]
    yield from rows.micro_batches(chunks[skip:])


def collate(batch: list[Row], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Unpacked rows get an attention mask; packed rows get position ids that
    restart at each example instead (transformers derives the block-diagonal mask from them, and only when
    no attention mask is passed). Padding is never a target."""
    lengths = [sum(len(ids) for ids, _ in row) for row in batch]
    length = max(lengths)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    packed = any(len(row) > 1 for row in batch)
    mask_or_positions = torch.zeros((len(batch), length), dtype=torch.long)
    for index, (row, n) in enumerate(zip(batch, lengths)):
        input_ids[index, :n] = torch.from_numpy(np.concatenate([ids for ids, _ in row]))
        labels[index, :n] = torch.from_numpy(np.concatenate([row_labels for _, row_labels in row]))
        if packed:
            segments = [len(ids) for ids, _ in row] + ([length - n] if length > n else [])  # padding: its own segment
            mask_or_positions[index] = torch.cat([torch.arange(size) for size in segments])
        else:
            mask_or_positions[index, :n] = 1
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": mask_or_positions, "use_cache": False}
    inputs = {"input_ids": input_ids, "labels": labels, "attention_mask": mask_or_positions}
    if any(hasattr(row, "image_inputs") for row in batch):  # image chats: the processor's tensors too
        from ftclip.data.image_collate import image_batch_inputs

        inputs.update(image_batch_inputs(batch, length))
    return inputs
