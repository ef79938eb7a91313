"""Datasets: record checks name the file and record, prompts are masked, splits are deterministic."""

from __future__ import annotations

import pytest
from conftest import ALPACA, QUICKSTART_MODEL, write_jsonl
from transformers import AutoTokenizer

from ftclip.batching import collate
from ftclip.data import IGNORE_INDEX, load_dataset_records, load_examples, tokenize_record
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec, Recipe


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(QUICKSTART_MODEL)


def decode_trained(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_alpaca_masks_the_prompt(tokenizer):
    example = tokenize_record(ALPACA[1], "alpaca", tokenizer, 512, train_on_inputs=False)
    assert example.input_ids[0] == tokenizer.bos_token_id
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert decode_trained(tokenizer, example).strip() == "cold</s>"
    prompt_length = example.labels.index(next(label for label in example.labels if label != IGNORE_INDEX))
    assert "### Response:" in tokenizer.decode(example.input_ids[:prompt_length])
    assert all(label == IGNORE_INDEX for label in example.labels[:prompt_length])


def test_train_on_inputs_trains_everything(tokenizer):
    example = tokenize_record(ALPACA[1], "alpaca", tokenizer, 512, train_on_inputs=True)
    assert example.labels == example.input_ids


def test_completion_trains_all_text(tokenizer):
    example = tokenize_record({"text": "One cat, two cats."}, "completion", tokenizer, 512, False)
    assert example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids, skip_special_tokens=True) == "One cat, two cats."


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And Chile?"},
    {"role": "assistant", "content": "Santiago."},
]}


def test_chat_trains_only_assistant_turns(tokenizer):
    example = tokenize_record(CHAT, "chat", tokenizer, 512, train_on_inputs=False)
    trained = decode_trained(tokenizer, example)
    assert "Lima." in trained and "Santiago." in trained
    assert "Capital" not in trained and "Be brief" not in trained and "Chile" not in trained
    rendered = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_sharegpt_conversations_match_openai_messages(tokenizer):
    sharegpt = {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of Peru?"},
        {"from": "gpt", "value": "Lima."}, {"from": "human", "value": "And Chile?"}, {"from": "gpt", "value": "Santiago."},
    ]}
    assert tokenize_record(sharegpt, "chat", tokenizer, 512, False) == tokenize_record(CHAT, "chat", tokenizer, 512, False)


def test_truncation_to_sequence_len(tokenizer):
    example = tokenize_record(ALPACA[0], "alpaca", tokenizer, 10, False)
    assert len(example.input_ids) == len(example.labels) == 10


@pytest.mark.parametrize(
    "kind, record, fragment",
    [
        ("alpaca", {"instruction": "x"}, "needs a string 'output'"),
        ("alpaca", {"instruction": "x", "output": "y", "input": 3}, "'input' must be a string"),
        ("completion", {"content": "x"}, "non-empty string 'text'"),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "allowed: system, user, assistant"),
        ("chat", {"turns": []}, "needs 'messages'"),
        ("alpaca", ["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_malformed_record_names_file_and_record(tmp_path, kind, record, fragment):
    path = write_jsonl(tmp_path / "data.jsonl", [ALPACA[0] if kind == "alpaca" else {"text": "ok"}, record])
    if kind == "chat":
        path = write_jsonl(tmp_path / "data.jsonl", [CHAT, record])
    with pytest.raises(DataError) as caught:
        load_dataset_records(DatasetSpec(path=str(path), type=kind), None)
    assert f"{path}: record 2: " in str(caught.value) and fragment in str(caught.value)


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        load_dataset_records(DatasetSpec(path=str(path), type="completion"), None)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match="no such dataset file"):
        load_dataset_records(DatasetSpec(path=str(tmp_path / "nope.jsonl"), type="alpaca"), None)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="use .jsonl, .json or .parquet"):
        load_dataset_records(DatasetSpec(path=str(tmp_path / "data.csv"), type="alpaca"), None)


def test_json_list_file(tmp_path):
    import json

    path = tmp_path / "data.json"
    path.write_text(json.dumps(ALPACA))
    assert load_dataset_records(DatasetSpec(path=str(path), type="alpaca"), None) == ALPACA


def test_validation_split_is_deterministic_by_seed(tmp_path, tokenizer, alpaca_file):
    def split(seed):
        recipe = Recipe(base_model="x", datasets=[{"path": str(alpaca_file), "type": "alpaca"}], val_set_size=0.25, seed=seed,
                        dataset_cache_dir=str(tmp_path / "cache"))
        return load_examples(recipe, None, tokenizer)

    train, val = split(1)
    assert len(val) == 2 and len(train) == 6
    assert split(1) == (train, val)
    assert split(2)[1] != val or split(3)[1] != val


def test_collate_pads_right_and_masks_padding(tokenizer):
    examples = [tokenize_record(r, "alpaca", tokenizer, 512, False) for r in ALPACA[:3]]
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    longest = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (3, longest)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch["attention_mask"][row].sum().item() == n
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()


# ---------------------------------------------------------------- parquet and the tokenization cache


def test_parquet_reads_like_jsonl_and_names_bad_records(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "data.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([{"input": "", **r} for r in ALPACA]), path)
    records = load_dataset_records(DatasetSpec(path=str(path), type="alpaca"), None)
    assert [r["instruction"] for r in records] == [r["instruction"] for r in ALPACA]
    parquet.write_table(pyarrow.Table.from_pylist([{"text": "fine"}, {"text": None}]), path)
    with pytest.raises(DataError, match=r"data.parquet: record 2: "):
        load_dataset_records(DatasetSpec(path=str(path), type="completion"), None)


def test_tokenization_is_cached_and_keyed_by_what_decides_it(tmp_path, tokenizer, alpaca_file):
    from ftclip.data_cache import cache_path, cached_examples

    def recipe(**changes):
        fields = dict(base_model="x", datasets=[{"path": str(alpaca_file), "type": "alpaca"}],
                      dataset_cache_dir=str(tmp_path / "cache"))
        return Recipe(**{**fields, **changes})

    seen = []
    first = cached_examples(recipe(), None, tokenizer, report=lambda path, hit: seen.append(hit))
    again = cached_examples(recipe(learning_rate=1e-5, seed=7), None, tokenizer, report=lambda p, hit: seen.append(hit))
    assert seen == [False, True] and again == first
    assert cache_path(recipe(sequence_len=64), None, tokenizer) != cache_path(recipe(), None, tokenizer)
    assert cache_path(recipe(train_on_inputs=True), None, tokenizer) != cache_path(recipe(), None, tokenizer)
    write_jsonl(alpaca_file, ALPACA[:-1])
    assert not cache_path(recipe(), None, tokenizer).exists()  # new data bytes, new key
    # A damaged cache file is a miss, not an error.
    path = cache_path(recipe(), None, tokenizer)
    cached_examples(recipe(), None, tokenizer)
    path.write_bytes(b"not a torch file")
    seen.clear()
    assert cached_examples(recipe(), None, tokenizer, report=lambda p, hit: seen.append(hit)) == first[:-1]
    assert seen == [False]
