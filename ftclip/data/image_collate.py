"""Collation of image chat rows (ftclip/data/vision_batches.py loads them): each row was processed on its own (one
sample for the processor), so the rows' tensors are merged here. A tensor whose first dimension counts images
(Qwen2-VL's patches and grids, LLaVA's and Gemma 3's pixel_values) is concatenated; one whose first dimension is
the sample (Idefics3's and Mllama's [sample, image, ...] layouts) is padded with zeros to the largest row, as the
processors pad a batch themselves, then stacked; per-token ones (token type ids, Mllama's cross-attention mask)
are padded to the batch's length like the ids."""

from __future__ import annotations

import torch


def _padded(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) == shape:
        return tensor
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, size) for size in tensor.shape)] = tensor
    return out


def image_batch_inputs(batch: list[list], length: int) -> dict[str, torch.Tensor]:
    """The rows' processor tensors as one batch: image-first ones concatenated, sample-first ones padded and
    stacked (a row without images gets zeros there, as a processor pads a sample with fewer images), and
    per-token ones padded to the batch's length."""
    rows = [row for row in batch if hasattr(row, "image_inputs")]
    inputs: dict[str, torch.Tensor] = {}
    batch_first = rows[0].batch_first if rows and hasattr(rows[0], "batch_first") else frozenset()
    names = dict.fromkeys(name for row in rows for name in row.image_inputs)
    for name in names:
        values = [row.image_inputs.get(name) for row in rows]
        present = [value for value in values if value is not None]
        rest = tuple(max(value.shape[d] for value in present) for d in range(1, present[0].dim()))
        if name in batch_first:
            template = present[0]
            values = [value if value is not None else template.new_zeros((1, *rest)) for value in values]
            inputs[name] = torch.cat([_padded(value, (1, *rest)) for value in values])
        else:
            inputs[name] = torch.cat([_padded(value, (value.shape[0], *rest)) for value in present])
    for name in dict.fromkeys(name for row in rows for name in row.token_inputs):
        values = [torch.as_tensor(row.token_inputs[name]) if name in row.token_inputs
                  else torch.zeros(sum(len(ids) for ids, _ in row), dtype=torch.long) for row in rows]
        rest = tuple(max(value.shape[d] if value.dim() > d else 1 for value in values) for d in range(1, values[0].dim()))
        inputs[name] = torch.stack([_padded(value if value.dim() > 1 or not rest else value.reshape(-1, *(1,) * len(rest)),
                                            (length, *rest)) for value in values])
    return inputs


