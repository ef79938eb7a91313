"""Padding-free packed batches: a micro-batch of packed rows becomes ONE flattened row [1, T] with position ids
that restart at each example and the cumulative sequence lengths flash-attention's varlen kernels take, as
transformers' `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` produces. No padding is computed
and no token attends across an example boundary, whichever attn_implementation runs.

What transformers 5.24 does with such a batch (no attention_mask, use_cache False), per attn_implementation:

- flash_attention_2: `flash_attention_mask` returns no mask; `_flash_attention_forward` sees cu_seq_lens_q/k
  and max_length_q/k and calls `flash_attn_varlen_func` on the flattened row: attention costs Σℓ², no mask
  exists. (Without those kwargs it infers them from position_ids, but only for batch size 1: with several
  rows of [B, L] position ids it falls back to plain causal attention over each row and attends ACROSS the
  packed examples. Flattening to one row is what makes it correct.)
- flex_attention: `find_packed_sequence_indices(position_ids)` numbers the examples and the mask function
  requires equal numbers; `flex_attention_mask` compiles that into a BlockMask, a sparse block index that
  skips the blocks across examples: no dense T×T tensor, work close to Σℓ².
- sdpa: the same sequence numbering goes into `sdpa_mask`, which MUST materialize it: a dense boolean
  [1, 1, T, T] block-diagonal causal mask (torch's SDPA has no varlen or block-mask input), and the causal
  shortcut (`is_causal=True`, no mask) is off. Memory is T² bytes (1 MiB at T = 1,024; 16 MiB at 4,096)
  and attention costs T² (on CUDA, SDPA's flash backend refuses an explicit mask, so the memory-efficient
  or math kernel runs). Correct, not padding-free in compute.
- eager: the same dense mask, as an additive float [1, 1, T, T] (4 bytes per entry), and T² scores.

ftclip's choice: always this flattened form, so flash and flex get their varlen paths; never the [B, L]
rows the plain collate builds, which flash would get wrong. For sdpa with sample_packing, ftclip registers
its own attention, `ftclip_sdpa_varlen` (`use_varlen_sdpa`): no mask is built, and each example runs through
torch's SDPA with is_causal=True on its own slice of q/k/v (the slices come from cu_seq_lens, or from the
position ids where they restart): Σℓ² work, the fast causal kernels (flash on CUDA, the fused CPU kernel),
no T×T tensor. Batches with padding (evaluation of unpacked rows) take transformers' sdpa path unchanged.
eager keeps transformers' dense mask: it is the reference implementation, not a fast one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from ftclip.data.records import IGNORE_INDEX

Example = tuple[np.ndarray, np.ndarray]  # (input_ids, labels), 1-D int64


def collate_flattened(rows: list[list[Example]], pad_token_id: int, pad_to_multiple_of: int | None = None
                      ) -> dict:
    """The model inputs of one micro-batch of packed rows, flattened into one row.

    rows: packed rows, each a list of examples (input_ids, labels) as 1-D int64 arrays. Returns input_ids,
    labels and position_ids of shape [1, T], cu_seq_lens_q/k (int32, [examples + 1]) and max_length_q/k
    (ints). Each example's first label is forced to -100: in the flattened row it would be predicted from the
    previous example's last token. pad_to_multiple_of rounds T up with pad_token_id (a segment of its own,
    never a target) for kernels that like aligned lengths."""
    examples = [example for row in rows for example in row if len(example[0])]
    if not examples:
        raise ValueError("collate_flattened: the micro-batch holds no tokens")
    lengths = [len(input_ids) for input_ids, _ in examples]
    input_ids = np.concatenate([ids for ids, _ in examples]).astype(np.int64)
    labels = np.concatenate([labels for _, labels in examples]).astype(np.int64)
    starts = np.cumsum([0] + lengths[:-1])
    labels[starts] = IGNORE_INDEX
    total = int(sum(lengths))
    if pad_to_multiple_of and total % pad_to_multiple_of:
        padding = pad_to_multiple_of - total % pad_to_multiple_of
        input_ids = np.concatenate([input_ids, np.full(padding, pad_token_id, dtype=np.int64)])
        labels = np.concatenate([labels, np.full(padding, IGNORE_INDEX, dtype=np.int64)])
        lengths.append(padding)
    position_ids = np.concatenate([np.arange(length, dtype=np.int64) for length in lengths])
    cu_seq_lens = torch.tensor(np.cumsum([0] + lengths), dtype=torch.int32)
    longest = int(max(lengths))
    return {
        "input_ids": torch.from_numpy(input_ids).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "position_ids": torch.from_numpy(position_ids).unsqueeze(0),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": longest,
        "max_length_k": longest,
    }


# ---------------------------------------------------------------- sdpa without the dense mask

VARLEN_SDPA = "ftclip_sdpa_varlen"


def _segments(kwargs: dict, batch_size: int, length: int) -> list[tuple[int, int, int]] | None:
    """(row, start, end) of each example, from cu_seq_lens (one flattened row) or from restarting position
    ids; None when the rows are not packed."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    source = cu_seq_lens if cu_seq_lens is not None and batch_size == 1 else kwargs.get("position_ids")
    if source is None:
        return None
    # Every layer gets the same tensor: read it back to the host once per forward, not once per layer.
    cached = getattr(source, "_ftclip_segments", None)
    if cached is None or cached[0] != (batch_size, length):
        cached = ((batch_size, length), _read_segments(source, cu_seq_lens is source, batch_size, length))
        source._ftclip_segments = cached
    return cached[1]


def _read_segments(source: torch.Tensor, is_cu_seq_lens: bool, batch_size: int, length: int):
    if is_cu_seq_lens:
        bounds = source.tolist()
        return [(0, start, end) for start, end in zip(bounds, bounds[1:]) if end > start]
    position_ids = source
    if position_ids.shape[-1] != length:
        return None
    position_ids = position_ids.expand(batch_size, -1)
    restarts = torch.diff(position_ids, dim=-1) != 1
    if not restarts.any():
        return None
    segments = []
    for row, row_restarts in enumerate(restarts.tolist()):
        starts = [0] + [index + 1 for index, restart in enumerate(row_restarts) if restart] + [length]
        segments += [(row, start, end) for start, end in zip(starts, starts[1:])]
    return segments


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """transformers' sdpa attention, one packed example at a time (query [B, heads, T, head_dim])."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = None if attention_mask is not None else _segments(kwargs, query.shape[0], query.shape[2])
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    with _per_example_backends(query):
        outputs = [
            sdpa_attention_forward(module, query[row:row + 1, :, start:end], key[row:row + 1, :, start:end],
                                   value[row:row + 1, :, start:end], None, dropout, scaling, True)[0]
            for row, start, end in segments
        ]
    rows = [torch.cat([out for out, (row, _, _) in zip(outputs, segments) if row == index], dim=1)
            for index in range(query.shape[0])]
    return torch.cat(rows, dim=0), None


def _per_example_backends(query: torch.Tensor):
    """On CUDA, flash or memory-efficient attention for the per-example calls: cuDNN's attention builds a graph
    for every new sequence length (every packed example has its own), which took ~20 ms of host time per call and
    made a packed step 25× slower than HF's on an H200 (bench/gpu/profile_step.py, 2026-12-04)."""
    if query.device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _varlen_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask where there is no padding: causality (per example) is the attention function's job."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_varlen_sdpa(config) -> str | None:
    """Register ftclip_sdpa_varlen with transformers and return its name, or None where the architecture's
    mask is more than causal-per-example (sliding windows, chunked attention), which the dense path keeps."""
    if getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None):
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
    AttentionMaskInterface.register(VARLEN_SDPA, _varlen_sdpa_mask)
    return VARLEN_SDPA
