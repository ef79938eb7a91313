"""tokenizer_use_mistral_common: Mistral's own tokenizer through transformers' MistralCommonBackend, with chat
masking on mistral-common's encoding (the assistant turns only). A tiny tekken.json is written here (every byte
plus a few merges, Mistral's v7 special tokens), nothing is downloaded."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from ftclip.data.pipeline import prepare
from ftclip.errors import RecipeError
from ftclip.modeling import load_tokenizer
from ftclip.recipe import load_recipe, parse_recipe
from ftclip.train import train

pytest.importorskip("mistral_common")

# tiktoken's pattern in Mistral's tekken files.
PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
SPECIALS = 32
MERGES = ("th", "he", "in", " t", " a", "er", "an", "re", "on", " the", "is", "ou")


def write_tekken(folder: Path) -> int:
    """A tekken.json (v7: [SYSTEM_PROMPT] blocks) of every byte and a few merges; returns the vocabulary size."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    pieces = [bytes([value]) for value in range(256)] + [merge.encode() for merge in MERGES]
    vocab = [{"rank": rank, "token_bytes": base64.b64encode(piece).decode(), "token_str": None}
             for rank, piece in enumerate(pieces)]
    size = len(vocab) + SPECIALS
    (folder / "tekken.json").write_text(json.dumps({
        "config": {"pattern": PATTERN, "num_vocab_tokens": len(vocab), "default_vocab_size": size,
                   "default_num_special_tokens": SPECIALS, "version": "v7"},
        "vocab": vocab, "special_tokens": [dict(token) for token in Tekkenizer.DEPRECATED_SPECIAL_TOKENS],
        "version": 1, "type": "Tekken"}))
    return size


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny-mistral")
    size = write_tekken(folder)
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(vocab_size=size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=11)).save_pretrained(folder)
    return folder


def conversation(a: int, b: int) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"{a + b}."},
                         {"role": "user", "content": "Sure?"},
                         {"role": "assistant", "content": "Yes, sure."}]}


def _recipe(tmp_path: Path, model_dir: Path, records: list[dict], kind: str = "chat_template", **overrides) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    recipe = {"base_model": str(model_dir), "tokenizer_use_mistral_common": True, "adapter": "lora", "lora_r": 4,
              "lora_alpha": 8, "datasets": [{"path": str(data), "type": kind}], "sequence_len": 256,
              "micro_batch_size": 3, "max_steps": 6, "learning_rate": 1e-2, "lr_scheduler": "constant",
              "output_dir": str(tmp_path / "out"), "dataset_cache_dir": str(tmp_path / "cache"), **overrides}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _trained_and_all(recipe_path: Path) -> tuple[str, str]:
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe)
    examples = prepare(recipe, tokenizer).examples
    ids, labels = [int(t) for t in examples.input_ids(0)], [int(t) for t in examples.labels(0)]
    trained = [token if label != -100 else None for token, label in zip(ids, labels)]
    # Trained runs joined with "|" so that a span boundary shows.
    runs, current = [], []
    for token in trained + [None]:
        if token is None and current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
        elif token is not None:
            current.append(token)
    return "|".join(runs), tokenizer.decode(ids, skip_special_tokens=False)


def test_the_tokenizer_is_mistral_commons(mistral_dir, tmp_path):
    tokenizer = load_tokenizer(load_recipe(_recipe(tmp_path, mistral_dir, [conversation(1, 2)])))
    assert type(tokenizer).__name__ == "MistralCommonBackend"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 11)


def test_chat_masking_trains_the_assistant_turns_and_their_eos_only(mistral_dir, tmp_path):
    trained, everything = _trained_and_all(_recipe(tmp_path, mistral_dir, [conversation(1, 2)]))
    assert everything == ("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]What is 1 plus 2?[/INST]3.</s>"
                          "[INST]Sure?[/INST]Yes, sure.</s>")
    assert trained == "3.</s>|Yes, sure.</s>"


def test_train_on_eos_none_and_last(mistral_dir, tmp_path):
    records = [conversation(1, 2)]
    spec = {"path": str(tmp_path / "data.jsonl"), "type": "chat_template", "train_on_eos": "none"}
    trained, _ = _trained_and_all(_recipe(tmp_path, mistral_dir, records, datasets=[spec]))
    assert trained == "3.|Yes, sure."
    trained, _ = _trained_and_all(_recipe(tmp_path, mistral_dir, records,
                                          datasets=[{**spec, "train_on_eos": "last"}]))
    assert trained == "3.|Yes, sure.</s>"


def test_a_conversation_mistral_common_refuses_is_skipped_with_its_reason(mistral_dir, tmp_path):
    bad = {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                        {"role": "user", "content": "Bye"}]}  # mistral-common's finetuning mode: it must end with a reply
    path = _recipe(tmp_path, mistral_dir, [conversation(a, 1) for a in range(12)] + [bad])
    recipe = load_recipe(path)
    data = prepare(recipe, load_tokenizer(recipe))
    assert len(data.examples) == 12
    assert any("mistral-common does not encode this conversation" in note and "Expected last role Assistant" in note
               for note in data.notes), data.notes


def test_alpaca_prompts_get_bos_and_one_eos_at_the_end(mistral_dir, tmp_path):
    records = [{"instruction": "Say hi.", "output": "hi"}]
    trained, everything = _trained_and_all(_recipe(tmp_path, mistral_dir, records, kind="alpaca"))
    assert everything.startswith("<s>") and everything.count("</s>") == 1 and everything.endswith("hi</s>")
    assert trained == "hi</s>"


@pytest.mark.slow
def test_a_mistral_common_run_trains_and_chat_prompts_end_at_inst(mistral_dir, tmp_path):
    from ftclip.inference import Conversation, find_chat_source, load_for_chat, prompt_style

    result = train(load_recipe(_recipe(tmp_path, mistral_dir, [conversation(a, b) for a in range(3) for b in range(3)])),
                   Console(quiet=True))
    assert result.last_loss < result.first_loss
    assert (result.artifact / "tekken.json").is_file()  # saved with the adapter: merge and chat load it
    source = find_chat_source(result.output_dir)
    _, tokenizer = load_for_chat(source)
    style = prompt_style(source.recipe, tokenizer)
    ids = Conversation(tokenizer, style).prompt_ids("What is 2 plus 2?")
    assert style == "chat"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>[INST]What is 2 plus 2?[/INST]"


@pytest.mark.parametrize("extra, key", [
    ("chat_template: chatml\n", "chat_template"),
    ("special_tokens: {pad_token: '<pad>'}\n", "special_tokens"),
    ("tokens: ['<x>']\n", "tokens"),
])
def test_template_and_vocabulary_settings_are_refused(extra, key):
    with pytest.raises(RecipeError) as caught:
        parse_recipe("base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: chat\n"
                     "tokenizer_use_mistral_common: true\n" + extra)
    assert key in {problem.key for problem in caught.value.problems}
