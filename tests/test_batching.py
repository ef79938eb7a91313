"""Sample packing: several examples per row, no attention across them, the same per-example loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ALPACA
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftclip.batching import collate, pack_examples
from ftclip.data import IGNORE_INDEX, tokenize_record
from ftclip.recipe import load_recipe
from ftclip.train import train


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    examples = [tokenize_record(r, "alpaca", tokenizer, 128, False) for r in ALPACA]
    return model, tokenizer, examples


def test_packing_puts_several_examples_in_a_row_and_masks_boundaries(model_and_examples):
    _, _, examples = model_and_examples
    packed, stats = pack_examples(examples, 128)
    assert len(packed) < len(examples) and max(len(row.segments) for row in packed) >= 2
    assert sorted(n for row in packed for n in row.segments) == sorted(len(e.input_ids) for e in examples)
    assert all(len(row.input_ids) <= 128 for row in packed)
    assert stats.efficiency == sum(len(e.input_ids) for e in examples) / (len(packed) * 128)
    assert sum(row.trained_tokens for row in packed) == sum(e.trained_tokens for e in examples)
    for row in packed:  # every example's first position is not a target
        start = 0
        for size in row.segments:
            assert row.labels[start] == IGNORE_INDEX
            start += size


def per_token_losses(logits, labels):
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_packed_logits_and_losses_equal_unpacked(model_and_examples):
    model, tokenizer, examples = model_and_examples
    packed, _ = pack_examples(examples, 128)
    batch = collate(packed, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"][0, 0] == 0
    logits = model(**batch).logits
    by_content = {tuple(e.input_ids): e for e in examples}
    checked = 0
    for row_index, row in enumerate(packed):
        start = 0
        for size in row.segments:
            ids = row.input_ids[start:start + size]
            alone = by_content[tuple(ids)]
            alone_logits = model(input_ids=torch.tensor([alone.input_ids])).logits[0]
            packed_logits = logits[row_index, start:start + size]
            torch.testing.assert_close(packed_logits, alone_logits, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(
                per_token_losses(packed_logits, batch["labels"][row_index, start:start + size]),
                per_token_losses(alone_logits, torch.tensor(alone.labels)),
                atol=2e-5, rtol=1e-4,
            )
            start += size
            checked += 1
    assert checked == len(examples)


def test_packed_training_step_matches_unpacked(make_recipe, tmp_path):
    # One optimizer step over the whole data set, packed or not: same token-mean loss, same gradient norm.
    common = dict(max_steps=1, learning_rate=1e-3, micro_batch_size=8)
    plain = train(load_recipe(p := make_recipe("plain.yaml", output_dir=str(tmp_path / "plain"), **common)), p,
                  Console(quiet=True))
    packed = train(load_recipe(q := make_recipe("packed.yaml", output_dir=str(tmp_path / "packed"), sample_packing=True,
                                                **common)), q, Console(quiet=True))
    assert packed.records[0]["loss"] == pytest.approx(plain.records[0]["loss"], rel=1e-5)
    assert packed.records[0]["grad_norm"] == pytest.approx(plain.records[0]["grad_norm"], rel=1e-4)
