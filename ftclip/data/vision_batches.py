"""Batches of image chats: each row's images are opened and run through the processor in DataLoader worker
processes (dataset_processes of them), never held for the whole set; a micro-batch then carries what the processor
gives (pixel_values, image_grid_thw, pixel_attention_mask, aspect_ratio_ids, ...) beside the token ids.

Under data parallelism a worker loads only this rank's share of a global micro-batch (the rows
`Distributed.local_slice` will hand this rank); the other rows stay token ids and labels, which is all the step's
trained-token count needs.

Each row is processed on its own (one sample for the processor), and collation merges the rows' tensors: a tensor
whose first dimension counts images (Qwen2-VL's patches and grids, LLaVA's and Gemma 3's pixel_values) is
concatenated; one whose first dimension is the sample (Idefics3's and Mllama's [sample, image, ...] layouts) is
padded with zeros to the largest row, as the processors pad a batch themselves, then stacked. Which is which is
read off the processor once, from a probe of two images in one sample."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ftclip.data.batches import Row, Rows
from ftclip.data.vision import (
    IMAGE_MODEL_INPUTS,
    TEXT_DERIVED_INPUTS,
    ImageProblem,
    ImageSettings,
    describe_image,
    open_image,
    process_images,
)
from ftclip.errors import DataError


class ImageRow(list):
    """A row's segments (as any row) and, once loaded, the processor's tensors for its images:
    `image_inputs` (merged across rows by collation) and `token_inputs` (one value per token, padded like the ids)."""

    image_inputs: dict
    token_inputs: dict
    batch_first: frozenset  # which image_inputs are [sample, ...] (padded and stacked) rather than [image, ...]


@dataclass
class _LoadFailure:
    message: str


class ImageLoader:
    """Opens a row's images and runs the processor on them."""

    def __init__(self, processor, settings: ImageSettings):
        self.processor = processor
        self.settings = settings
        self.image_inputs = [name for name in processor.model_input_names
                             if name not in ("input_ids", "attention_mask", *TEXT_DERIVED_INPUTS)]
        self.token_names = [name for name in processor.model_input_names if name in TEXT_DERIVED_INPUTS]
        unknown = [name for name in self.image_inputs if name not in IMAGE_MODEL_INPUTS]
        if unknown:
            raise DataError(f"{type(processor).__name__} gives model inputs ftclip does not batch yet: {', '.join(unknown)}")
        tokens = processor.tokenizer.convert_ids_to_tokens(list(processor.image_token_ids))
        self.image_tokens = [token for token in tokens if token]
        self.image_token_ids = np.asarray(list(processor.image_token_ids), dtype=np.int64)
        self.batch_first = self._batch_first_inputs()

    def _batch_first_inputs(self) -> frozenset[str]:
        from PIL import Image

        probe, _ = process_images(self.processor, [Image.new("RGB", (48, 32)), Image.new("RGB", (32, 48))])
        return frozenset(name for name, value in probe.items()
                         if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == 1)

    def load(self, row: list, references: list[dict], example: int) -> ImageRow:
        loaded = ImageRow(row)
        loaded.image_inputs, loaded.token_inputs, loaded.batch_first = {}, {}, self.batch_first
        ids = np.concatenate([ids for ids, _ in row])
        if references:
            images = []
            for reference in references:
                try:
                    images.append(open_image(reference, self.settings))
                except ImageProblem as problem:
                    raise DataError(f"training example {example + 1}: {problem}; it was readable when the data was "
                                    "prepared: restore it, or remove the dataset_cache_dir entry to prepare again") from None
            processed, replacements = process_images(self.processor, images)
            expected = sum(text.count(token) for text in replacements for token in self.image_tokens)
            found = int(np.isin(ids, self.image_token_ids).sum())
            if expected != found:
                names = ", ".join(describe_image(reference) for reference in references)
                raise DataError(f"training example {example + 1}: its images ({names}) now need {expected} placeholder "
                                f"tokens, the prepared data has {found}: an image changed since the data was prepared; "
                                "remove the dataset_cache_dir entry to prepare again")
            loaded.image_inputs = {name: processed[name] for name in self.image_inputs if name in processed}
            if "cross_attention_mask" in self.token_names:
                loaded.token_inputs["cross_attention_mask"] = _cross_attention_mask(ids, self.processor, processed)
        for name in self.token_names:
            if name in ("mm_token_type_ids", "token_type_ids"):
                loaded.token_inputs[name] = np.asarray(self.processor.create_mm_token_type_ids([ids.tolist()])[0],
                                                       dtype=np.int64)
        return loaded


def _cross_attention_mask(ids: np.ndarray, processor, processed: dict) -> np.ndarray:
    """Mllama: which images each token attends to, from ftclip's ids (the processor builds it from its own)."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    num_tiles = [processed["aspect_ratio_mask"][0].sum(-1).tolist()]
    sparse = [get_cross_attention_token_mask(ids.tolist(), processor.image_token_id)]
    dense = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles=num_tiles,
                                                         max_num_tiles=processor.image_processor.max_image_tiles,
                                                         length=len(ids))
    return np.asarray(dense[0])


@dataclass
class ImageRows(Rows):
    """Rows of image chats: the same rows, loaded with their images when a batch is built."""

    loader: ImageLoader | None = None
    workers: int = 1
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, rows: Rows, loader: ImageLoader, workers: int, rank: int = 0, world_size: int = 1) -> ImageRows:
        return cls(rows.examples, rows.offsets, rows.members, rows.packed, loader, workers, rank, world_size)

    def loaded_row(self, index: int) -> ImageRow:
        example = int(self.example_indices(index)[0])  # image rows are never packed: one example each
        return self.loader.load(self.row(index), self.examples.images(example), example)

    def rows(self, indices) -> list[Row]:
        """Every row loaded (evaluation: each rank evaluates all of the held-out set)."""
        return [self.loaded_row(int(index)) for index in indices]

    def local_batch(self, chunk: list[int]) -> list[Row] | _LoadFailure:
        """A global micro-batch whose rows for this rank are loaded (the same split as Distributed.local_slice)."""
        size, extra = divmod(len(chunk), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        end = start + size + (self.rank < extra)
        try:
            return [self.loaded_row(index) if start <= position < end else self.row(index)
                    for position, index in enumerate(chunk)]
        except DataError as error:  # raised again, as it is, by the training process
            return _LoadFailure(str(error))

    def micro_batches(self, chunks: list[list[int]]) -> Iterator[list[Row]]:
        from torch.utils.data import DataLoader

        if not chunks:
            return
        loader = DataLoader(_Chunks(self, chunks), batch_size=None, shuffle=False, num_workers=self.workers,
                            collate_fn=_as_is, worker_init_fn=_quiet_worker, prefetch_factor=2,
                            multiprocessing_context="fork",
                            # its own generator: creating the iterator must not draw from the global RNG, or a
                            # resumed run's dropout would differ from the uninterrupted run's
                            generator=torch.Generator().manual_seed(0))
        for batch in loader:
            if isinstance(batch, _LoadFailure):
                raise DataError(batch.message)
            yield batch


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, rows: ImageRows, chunks: list[list[int]]):
        self.rows, self.chunks = rows, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int):
        return self.rows.local_batch(self.chunks[index])


def _as_is(batch):
    return batch


def _quiet_worker(_: int) -> None:
    """Signals are the training process's: it finishes the step and saves on Ctrl-C or SIGTERM; a worker killed
    by the same signal would end the run before that. One thread each: the workers are the parallelism."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)


def loader_workers(recipe) -> int:
    return recipe.dataset_processes or max(1, min(os.cpu_count() or 1, 4))


def image_rows(recipe, tokenizer, train: Rows, held_out: Rows, dist=None) -> tuple[ImageRows, ImageRows]:
    """The training and held-out rows of an image-chat run, loading their images per batch."""
    loader = ImageLoader(tokenizer.ftclip_processor, ImageSettings.from_recipe(recipe))
    rank, world_size = (dist.rank, dist.world_size) if dist is not None and dist.enabled else (0, 1)
    workers = loader_workers(recipe)
    return (ImageRows.of(train, loader, workers, rank, world_size),
            ImageRows.of(held_out, loader, workers, rank, world_size))
