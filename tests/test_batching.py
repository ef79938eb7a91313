"""Sample packing: several examples per row, no attention across them, the same per-example loss; best-fit
decreasing packs as full as first-fit and scales as N log N."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ALPACA, write_jsonl
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftclip.data import IGNORE_INDEX, prepare
from ftclip.data.batches import collate, trained_tokens
from ftclip.data.pack import pack_best_fit
from ftclip.recipe import Recipe, load_recipe
from ftclip.train import train


@pytest.fixture(scope="module")
def model_and_data(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packing")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    data_file = write_jsonl(folder / "alpaca.jsonl", ALPACA)
    recipe = Recipe(base_model="x", datasets=[{"path": str(data_file), "type": "alpaca"}], sequence_len=128,
                    sample_packing=True, dataset_cache_dir=str(folder / "cache"))
    return model, tokenizer, prepare(recipe, tokenizer)


def test_packing_puts_several_examples_in_a_row_and_masks_boundaries(model_and_data):
    _, _, data = model_and_data
    packed, examples = data.train, data.examples
    assert len(packed) < len(examples) and max(len(packed.example_indices(r)) for r in range(len(packed))) >= 2
    assert sorted(packed.members.tolist()) == list(range(len(examples)))
    rows = packed.rows(range(len(packed)))
    assert all(sum(len(ids) for ids, _ in row) <= 128 for row in rows)
    assert data.packing.efficiency == examples.tokens / (len(packed) * 128)
    assert trained_tokens(rows) == int(examples.trained.sum())
    for row in rows:  # every example's first position is not a target
        assert all(labels[0] == IGNORE_INDEX for _, labels in row)


def per_token_losses(logits, labels):
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_packed_logits_and_losses_equal_unpacked(model_and_data):
    model, tokenizer, data = model_and_data
    rows = data.train.rows(range(len(data.train)))
    batch = collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"][0, 0] == 0
    logits = model(**batch).logits
    checked = 0
    for row_index, row in enumerate(rows):
        start = 0
        for example in data.train.example_indices(row_index).tolist():
            alone_ids = data.examples.input_ids(example).astype(np.int64)
            size = len(alone_ids)
            alone_logits = model(input_ids=torch.from_numpy(alone_ids)[None]).logits[0]
            packed_logits = logits[row_index, start:start + size]
            torch.testing.assert_close(packed_logits, alone_logits, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(
                per_token_losses(packed_logits, batch["labels"][row_index, start:start + size]),
                per_token_losses(alone_logits, torch.from_numpy(data.examples.labels(example).astype(np.int64))),
                atol=2e-5, rtol=1e-4,
            )
            start += size
            checked += 1
    assert checked == len(data.examples)


def test_best_fit_fills_rows_and_keeps_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 900, size=5000)
    offsets, members = pack_best_fit(lengths, 2048)
    assert sorted(members.tolist()) == list(range(5000))
    sums = np.add.reduceat(lengths[members], offsets[:-1])
    assert sums.max() <= 2048
    assert lengths.sum() / (len(sums) * 2048) > 0.99
    again = pack_best_fit(lengths, 2048)  # deterministic
    assert np.array_equal(again[0], offsets) and np.array_equal(again[1], members)


def test_best_fit_takes_the_tightest_row():
    # Longest first: 10 fills a row; 7 opens one (room 3); 5 opens one (room 5); the first 3 goes where it fits
    # exactly (room 3), not into the first row with room; the second 3 and the 2 fill the last row.
    offsets, members = pack_best_fit(np.array([5, 3, 2, 10, 7, 3]), 10)
    rows = [members[offsets[r]:offsets[r + 1]].tolist() for r in range(len(offsets) - 1)]
    assert rows == [[3], [4, 1], [0, 5, 2]]


def test_packed_training_step_matches_unpacked(make_recipe, tmp_path):
    # One optimizer step over the whole data set, packed or not: same token-mean loss, same gradient norm.
    common = dict(max_steps=1, learning_rate=1e-3, micro_batch_size=8)
    plain = train(load_recipe(make_recipe("plain.yaml", output_dir=str(tmp_path / "plain"), **common)),
                  Console(quiet=True))
    packed = train(load_recipe(make_recipe("packed.yaml", output_dir=str(tmp_path / "packed"), sample_packing=True,
                                           **common)), Console(quiet=True))
    assert packed.records[0]["loss"] == pytest.approx(plain.records[0]["loss"], rel=1e-5)
    assert packed.records[0]["grad_norm"] == pytest.approx(plain.records[0]["grad_norm"], rel=1e-4)
