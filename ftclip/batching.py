"""From tokenized examples to model inputs: optional sample packing, per-epoch shuffling into micro-batches,
and collation (padding, or packed rows with per-example position ids)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ftclip.data import IGNORE_INDEX, Example


@dataclass
class PackingStats:
    examples: int
    rows: int
    tokens: int
    capacity: int

    @property
    def efficiency(self) -> float:
        """Share of the rows' sequence_len slots holding real tokens (the rest is padding)."""
        return self.tokens / (self.rows * self.capacity) if self.rows else 0.0


def pack_examples(examples: list[Example], sequence_len: int) -> tuple[list[Example], PackingStats]:
    """First-fit decreasing: the longest examples first, each into the first row with room. Deterministic.

    Each example's first label becomes -100: unpacked, the first token is never a target (nothing precedes
    it); packed, it would be predicted from the previous example's last token. Position ids restart per
    example (see `collate`), which makes transformers build a block-diagonal causal mask: no token attends
    across an example boundary, so each example's loss is what it would be on its own."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        for index, free in enumerate(room):
            if free >= size:
                rows[index].append(example)
                room[index] -= size
                break
        else:
            rows.append([example])
            room.append(sequence_len - size)
    packed = []
    for row in rows:
        input_ids, labels = [], []
        for example in row:
            input_ids += example.input_ids
            labels += [IGNORE_INDEX] + example.labels[1:]
        packed.append(Example(input_ids, labels, [len(e.input_ids) for e in row]))
    stats = PackingStats(len(examples), len(packed), sum(len(e.input_ids) for e in examples), sequence_len)
    return packed, stats


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def micro_batches(examples: list[Example], micro_batch_size: int, seed: int, epoch: int, world_size: int = 1
                  ) -> Iterator[list[Example]]:
    order = epoch_order(len(examples), seed, epoch)
    if len(order) % world_size:  # as DistributedSampler: repeat from the start so every rank has a share
        order += order[: world_size - len(order) % world_size]
    for start in range(0, len(order), micro_batch_size):
        yield [examples[i] for i in order[start : start + micro_batch_size]]


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Unpacked rows get an attention mask; packed rows get position ids that
    restart at each example instead (transformers derives the block-diagonal mask from them, and only when
    no attention mask is passed). Padding is never a target."""
    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    packed = any(example.segments for example in batch)
    mask_or_positions = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        if packed:
            segments = (example.segments or [n]) + ([length - n] if length > n else [])  # padding: its own segment
            mask_or_positions[row] = torch.cat([torch.arange(size) for size in segments])
        else:
            mask_or_positions[row, :n] = 1
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": mask_or_positions, "use_cache": False}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask_or_positions}
