"""The data stage: records are checked and masked, sources load through `datasets` (files, folders laid out like
hub repos, save_to_disk folders, hub ids from the local cache), the Arrow cache is keyed by what decides the
tokens and is never trusted half-written, splits are deterministic, and the new path gives exactly the old
tokens."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ALPACA, QUICKSTART_MODEL, REPO, write_jsonl
from transformers import AutoTokenizer

from ftclip.data import IGNORE_INDEX, check_datasets, prepare
from ftclip.data.batches import collate
from ftclip.data.cache import BUILD_LOG, MANIFEST
from ftclip.data.sources import check_source
from ftclip.data.tokenize import TokenizeSettings, tokenize_batch
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec, Recipe


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_record(record, kind, tokenizer, sequence_len, train_on_inputs):
    out = tokenize_batch({key: [value] for key, value in record.items()}, tokenizer,
                         TokenizeSettings(DatasetSpec(path="x", type=kind), sequence_len, train_on_inputs))
    assert out["problem"] == [None], out["problem"]
    return out["input_ids"][0], out["labels"][0]


def decode_trained(tokenizer, ids, labels):
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def recipe_for(tmp_path, datasets, **changes) -> Recipe:
    fields = dict(base_model="x", datasets=datasets, dataset_cache_dir=str(tmp_path / "cache"))
    return Recipe(**{**fields, **changes})


def all_tokens(data) -> list[tuple[list[int], list[int]]]:
    examples = data.examples
    return [(examples.input_ids(i).tolist(), examples.labels(i).tolist()) for i in range(len(examples))]


# ---------------------------------------------------------------- masking


def test_alpaca_masks_the_prompt(tokenizer):
    ids, labels = tokenize_record(ALPACA[1], "alpaca", tokenizer, 512, train_on_inputs=False)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert decode_trained(tokenizer, ids, labels).strip() == "cold</s>"
    prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert "### Response:" in tokenizer.decode(ids[:prompt_length])


def test_train_on_inputs_trains_everything(tokenizer):
    ids, labels = tokenize_record(ALPACA[1], "alpaca", tokenizer, 512, train_on_inputs=True)
    assert labels == ids


def test_completion_trains_all_text(tokenizer):
    ids, labels = tokenize_record({"text": "One cat, two cats."}, "completion", tokenizer, 512, False)
    assert labels == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "One cat, two cats."


CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Peru?"},
    {"role": "assistant", "content": "Lima."},
    {"role": "user", "content": "And Chile?"},
    {"role": "assistant", "content": "Santiago."},
]}


def test_chat_trains_only_assistant_turns(tokenizer):
    ids, labels = tokenize_record(CHAT, "chat", tokenizer, 512, train_on_inputs=False)
    trained = decode_trained(tokenizer, ids, labels)
    assert "Lima." in trained and "Santiago." in trained
    assert "Capital" not in trained and "Be brief" not in trained and "Chile" not in trained
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)


def test_sharegpt_conversations_match_openai_messages(tokenizer):
    sharegpt = {"conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of Peru?"},
        {"from": "gpt", "value": "Lima."}, {"from": "human", "value": "And Chile?"}, {"from": "gpt", "value": "Santiago."},
    ]}
    assert tokenize_record(sharegpt, "chat", tokenizer, 512, False) == tokenize_record(CHAT, "chat", tokenizer, 512, False)


def test_truncation_to_sequence_len(tokenizer):
    ids, labels = tokenize_record(ALPACA[0], "alpaca", tokenizer, 10, False)
    assert len(ids) == len(labels) == 10


# ---------------------------------------------------------------- golden: the datasets path gives the old tokens


GOLDEN = json.loads((REPO / "tests" / "fixtures" / "golden_tokens.json").read_text())


@pytest.mark.parametrize("case", sorted(GOLDEN["cases"]))
def test_same_tokens_as_before_the_datasets_layer(tmp_path, tokenizer, case):
    path, kind, sequence_len, train_on_inputs = case.split("|")
    recipe = recipe_for(tmp_path, [{"path": str(REPO / path), "type": kind}], sequence_len=int(sequence_len),
                        train_on_inputs=train_on_inputs == "True")
    tokens = all_tokens(prepare(recipe, tokenizer))
    expected = GOLDEN["cases"][case]
    assert len(tokens) == expected["count"]
    if kind != "chat" or train_on_inputs == "True":
        assert list(tokens[0]) == expected["first"]
        assert hashlib.sha256(json.dumps([list(t) for t in tokens]).encode()).hexdigest() == expected["sha256"]
        return
    # Chat: the same ids. The old prefix method also trained the newline the template writes after each
    # assistant's </s>, which the model never generates (it stops at </s>); that newline is the only change.
    total_changed = 0
    for (ids, labels), (old_ids, old_labels) in zip(tokens, expected["examples"]):
        assert ids == old_ids
        changed = [i for i, (new, old) in enumerate(zip(labels, old_labels)) if new != old]
        assert all(labels[i] == IGNORE_INDEX and tokenizer.decode([old_labels[i]]) == "\n"
                   and tokenizer.decode([ids[i - 1]]) == "</s>" for i in changed)
        assert len(changed) <= tokenizer.decode(ids).count("<|assistant|>")  # at most one per assistant turn
        total_changed += len(changed)
    assert total_changed > 0 or int(sequence_len) < 128  # short rows may cut every reply before its </s>


# ---------------------------------------------------------------- record checks: validate and train name the record


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
def test_malformed_record_names_file_and_record(tmp_path, tokenizer, kind, record, fragment):
    first = {"alpaca": ALPACA[0], "completion": {"text": "ok"}, "chat": CHAT}[kind]
    path = write_jsonl(tmp_path / "data.jsonl", [first, record])
    spec = {"path": str(path), "type": kind}
    with pytest.raises(DataError) as at_validate:
        check_source(DatasetSpec(**spec), None)
    with pytest.raises(DataError) as at_train:
        prepare(recipe_for(tmp_path, [spec]), tokenizer)
    for caught in (at_validate, at_train):
        assert f"{path}: record 2: " in str(caught.value) and fragment in str(caught.value)
    assert not any((tmp_path / "cache").glob(f"*/{MANIFEST}"))  # nothing cached for bad data


def test_invalid_json_line_is_located(tmp_path, tokenizer):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        check_source(DatasetSpec(path=str(path), type="completion"), None)
    with pytest.raises(DataError, match=r"data.jsonl:2: not valid JSON"):
        prepare(recipe_for(tmp_path, [{"path": str(path), "type": "completion"}]), tokenizer)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(DataError, match="no such dataset file"):
        check_source(DatasetSpec(path=str(tmp_path / "nope.jsonl"), type="alpaca"), None)
    (tmp_path / "data.txt").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        check_source(DatasetSpec(path=str(tmp_path / "data.txt"), type="alpaca"), None)


# ---------------------------------------------------------------- sources through `datasets`


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    path.parent.mkdir(parents=True, exist_ok=True)
    parquet.write_table(pa.Table.from_pylist(records), path)
    return path


def reference_tokens(tmp_path, tokenizer, records) -> list:
    path = write_jsonl(tmp_path / "reference.jsonl", records)
    return all_tokens(prepare(recipe_for(tmp_path, [{"path": str(path), "type": "alpaca"}],
                                         dataset_cache_dir=str(tmp_path / "reference-cache")), tokenizer))


def test_folder_laid_out_like_a_hub_repo_with_splits(tmp_path, tokenizer):
    repo = tmp_path / "my-dataset"
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", [{"input": "", **r} for r in ALPACA[:6]])
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", [{"input": "", **r} for r in ALPACA[6:]])
    for split, records in (("train", ALPACA[:6]), ("test", ALPACA[6:])):
        recipe = recipe_for(tmp_path, [{"path": str(repo), "type": "alpaca", "split": split}])
        assert check_datasets(recipe) == ([], [])
        assert all_tokens(prepare(recipe, tokenizer)) == reference_tokens(tmp_path, tokenizer, records)


def test_data_files_selects_files_of_a_folder(tmp_path, tokenizer):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-a.jsonl", ALPACA[:3])
    write_jsonl(folder / "part-b.jsonl", ALPACA[3:])
    recipe = recipe_for(tmp_path, [{"path": str(folder), "type": "alpaca", "data_files": "part-b.jsonl"}])
    assert all_tokens(prepare(recipe, tokenizer)) == reference_tokens(tmp_path, tokenizer, ALPACA[3:])


def test_save_to_disk_folder_csv_and_arrow_files(tmp_path, tokenizer):
    import csv

    import datasets

    expected = reference_tokens(tmp_path, tokenizer, ALPACA)
    rows = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in ALPACA]
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    arrow = next(saved.glob("*.arrow"))
    for path in (saved, tmp_path / "data.csv", arrow):
        recipe = recipe_for(tmp_path, [{"path": str(path), "type": "alpaca"}])
        assert check_datasets(recipe) == ([], []), path
        assert all_tokens(prepare(recipe, tokenizer)) == expected, path


def test_save_to_disk_dataset_dict_picks_the_split(tmp_path, tokenizer):
    import datasets

    rows = [{"text": f"record number {i}"} for i in range(6)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "validation": datasets.Dataset.from_list(rows[4:])}).save_to_disk(str(tmp_path / "dd"))
    data = prepare(recipe_for(tmp_path, [{"path": str(tmp_path / "dd"), "type": "completion", "split": "validation"}]),
                   tokenizer)
    assert len(data.examples) == 2
    assert "record number 5" in tokenizer.decode(data.examples.input_ids(1))


def test_hub_id_offline_and_uncached_is_a_clear_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {"path": "someorg/some-sft-mix", "type": "chat"}
    problems, notices = check_datasets(recipe_for(tmp_path, [spec]))
    assert problems == [] and notices[0][0] == "datasets.0.path"
    assert "someorg/some-sft-mix looks like a hub dataset id" in notices[0][1]
    with pytest.raises(DataError) as caught:
        prepare(recipe_for(tmp_path, [spec]), tokenizer)
    message = str(caught.value)
    assert "someorg/some-sft-mix" in message and "offline" in message and "hf download" in message


def test_uncached_hub_dataset_exits_2_from_the_cli(tmp_path, tiny_model_dir):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path, tiny_model_dir, tmp_path / "unused.jsonl", max_steps=1)
    text = recipe.read_text().replace(str(tmp_path / "unused.jsonl"), "someorg/some-sft-mix")
    recipe.write_text(text)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    validate = subprocess.run([sys.executable, "-m", "ftclip", "validate", str(recipe)], capture_output=True, text=True,
                              env=env)
    assert validate.returncode == 0 and "not in the local Hugging Face cache" in validate.stdout
    done = subprocess.run([sys.executable, "-m", "ftclip", "train", str(recipe)], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "someorg/some-sft-mix" in done.stderr
    assert not (tmp_path / "out" / "adapter").exists()


# ---------------------------------------------------------------- the cache


def test_cache_is_keyed_by_what_decides_the_tokens(tmp_path, tokenizer, alpaca_file):
    spec = [{"path": str(alpaca_file), "type": "alpaca"}]
    first = prepare(recipe_for(tmp_path, spec), tokenizer)
    again = prepare(recipe_for(tmp_path, spec, learning_rate=1e-5, seed=7, val_set_size=0.25), tokenizer)
    assert (first.hit, again.hit) == (False, True) and again.cache == first.cache
    assert all_tokens(again) == all_tokens(first)
    for change in ({"sequence_len": 64}, {"train_on_inputs": True}):
        assert prepare(recipe_for(tmp_path, spec, **change), tokenizer).cache != first.cache
    write_jsonl(alpaca_file, ALPACA[:-1])  # new bytes, new key
    changed = prepare(recipe_for(tmp_path, spec), tokenizer)
    assert not changed.hit and len(changed.examples) == len(ALPACA) - 1


def test_a_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, tokenizer, alpaca_file):
    recipe = recipe_for(tmp_path, [{"path": str(alpaca_file), "type": "alpaca"}])
    expected = all_tokens(prepare(recipe, tokenizer))
    shard = next(prepare(recipe, tokenizer).cache.glob("*.arrow"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated file
    rebuilt = prepare(recipe, tokenizer)
    assert not rebuilt.hit and all_tokens(rebuilt) == expected


@pytest.mark.slow
def test_a_preprocess_killed_mid_write_leaves_nothing_trusted(tmp_path):
    """A real kill -9 while `ftclip preprocess` tokenizes: no entry with a manifest, and the next run builds
    the full data."""
    from conftest import write_recipe

    records = [{"instruction": f"Repeat the number {i} in words, slowly and twice.", "output": f"{i} " * 40}
               for i in range(20000)]
    data = write_jsonl(tmp_path / "big.jsonl", records)
    recipe = write_recipe(tmp_path, QUICKSTART_MODEL, data, dataset_processes=2)
    # Its own process group: the kill takes the tokenizing workers too, as a kill of the job would.
    process = subprocess.Popen([sys.executable, "-m", "ftclip", "preprocess", str(recipe)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    cache = tmp_path / "token-cache"
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.glob(".*.tmp-*/d0-tokens*.arrow")):
        time.sleep(0.05)
    assert list(cache.glob(".*.tmp-*/d0-tokens*.arrow")), "tokenization never started writing"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not list(cache.glob(f"*/{MANIFEST}"))
    done = subprocess.run([sys.executable, "-m", "ftclip", "preprocess", str(recipe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "20,000 examples" in done.stdout and "tokenized 20,000 records" in done.stdout
    assert len(list(cache.glob(f"*/{MANIFEST}"))) == 1
    assert not list(cache.glob(".*.tmp-*"))  # the killed run's staging folder is cleared
    assert len((cache / BUILD_LOG).read_text().splitlines()) == 1


# ---------------------------------------------------------------- split, packing and collation


def test_validation_split_is_deterministic_by_seed(tmp_path, tokenizer, alpaca_file):
    def split(seed):
        data = prepare(recipe_for(tmp_path, [{"path": str(alpaca_file), "type": "alpaca"}], val_set_size=0.25, seed=seed),
                       tokenizer)
        return data.train.members.tolist(), data.val.members.tolist()

    train, val = split(1)
    assert len(val) == 2 and len(train) == 6 and sorted(train + val) == list(range(8))
    assert split(1) == (train, val)
    assert split(2)[1] != val or split(3)[1] != val


@pytest.mark.parametrize("packing", [False, True])
def test_exact_deduplication_drops_repeats_in_train_and_train_repeats_in_val(tmp_path, tokenizer, packing):
    # 5 distinct records, 12 in all; one differs from another only in its output (not a repeat).
    first, second, third = ALPACA[0], ALPACA[1], ALPACA[2]
    near = {**ALPACA[0], "output": "Paris."}
    records = [first, second, first, third, first, near, second, ALPACA[3], first, third, second, first]
    path = write_jsonl(tmp_path / "repeats.jsonl", records)
    spec = [{"path": str(path), "type": "alpaca"}]

    def tokens(data, members):
        return [(tuple(data.examples.input_ids(i)), tuple(data.examples.labels(i))) for i in members]

    plain = prepare(recipe_for(tmp_path, spec, val_set_size=0.5, seed=3, sample_packing=packing), tokenizer)
    assert len(tokens(plain, plain.train.members)) + len(tokens(plain, plain.val.members)) == 12
    data = prepare(recipe_for(tmp_path, spec, val_set_size=0.5, seed=3, sample_packing=packing,
                              dataset_exact_deduplication=True), tokenizer)
    train, val = tokens(data, data.train.members), tokens(data, data.val.members)
    assert len(set(train)) == len(train) and len(set(val)) == len(val)  # no repeats within either
    assert not set(train) & set(val)  # nothing held out that also trains
    assert set(train) | set(val) == set(tokens(plain, range(12)))  # every distinct example is still there, once
    assert len(train) + len(val) == 5
    dropped_train, dropped_val = len(plain.train.members) - len(train), len(plain.val.members) - len(val)
    assert dropped_train + dropped_val == 7
    assert (f"dataset_exact_deduplication: dropped {dropped_train} repeated training and {dropped_val} repeated "
            "held-out examples") in data.notes


def first_fit_rows(lengths, capacity) -> int:
    """The packing ftclip used before (first-fit decreasing), as the efficiency reference."""
    rooms: list[int] = []
    for size in sorted(lengths, reverse=True):
        for index, room in enumerate(rooms):
            if room >= size:
                rooms[index] -= size
                break
        else:
            rooms.append(capacity - size)
    return len(rooms)


def test_packing_is_at_least_as_full_as_first_fit(tmp_path, tokenizer):
    recipe = recipe_for(tmp_path, [{"path": str(REPO / "recipes/quickstart/data.jsonl"), "type": "alpaca"}],
                        sample_packing=True, sequence_len=128, val_set_size=0.1)
    data = prepare(recipe, tokenizer)
    lengths = data.examples.lengths[np.sort(data.train.members)].tolist()
    assert data.packing.rows <= first_fit_rows(lengths, 128)
    assert sorted(data.train.members.tolist()) == sorted(set(range(len(data.examples))) - set(data.val.members.tolist()))
    for row in range(len(data.train)):
        assert data.examples.lengths[data.train.example_indices(row)].sum() <= 128
    again = prepare(recipe, tokenizer)  # the packing is cached beside the tokens and identical
    assert np.array_equal(again.train.members, data.train.members) and list(data.cache.glob("packing-*.npz"))


def test_collate_pads_right_and_masks_padding(tmp_path, tokenizer, alpaca_file):
    data = prepare(recipe_for(tmp_path, [{"path": str(alpaca_file), "type": "alpaca"}]), tokenizer)
    rows = data.train.rows(range(3))
    batch = collate(rows, pad_token_id=tokenizer.pad_token_id)
    longest = max(len(row[0][0]) for row in rows)
    assert batch["input_ids"].shape == (3, longest)
    for index, row in enumerate(rows):
        n = len(row[0][0])
        assert batch["attention_mask"][index].sum().item() == n
        assert (batch["labels"][index, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][index, n:] == tokenizer.pad_token_id).all()


def test_chat_records_a_template_cannot_mask_are_counted_then_refused(tmp_path, tokenizer):
    """One record whose assistant content the template drops is skipped with a note; when most are, the
    run stops: the template does not fit the data."""
    def dropping(count_bad):
        records = [CHAT] * 20 + [{"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "DROPPED"}]}] * count_bad
        return write_jsonl(tmp_path / f"chat-{count_bad}.jsonl", records)

    template = ("{% for m in messages %}{{ m['role'] }}: {{ '' if m['content'] == 'DROPPED' else m['content'] }}</s>\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    spec = lambda path: [{"path": str(path), "type": "chat"}]  # noqa: E731
    few = prepare(recipe_for(tmp_path, spec(dropping(1)), chat_template="jinja", chat_template_jinja=template),
                  _with_template(tokenizer, template))
    assert len(few.examples) == 20 and few.notes and "skipped 1 of 21 chat records" in few.notes[0]
    with pytest.raises(DataError, match="wrong template"):
        prepare(recipe_for(tmp_path, spec(dropping(10)), chat_template="jinja", chat_template_jinja=template),
                _with_template(tokenizer, template))


def _with_template(tokenizer, template):
    import copy

    copied = copy.deepcopy(tokenizer)
    copied.chat_template = template
    return copied


def test_token_digest_ignores_how_the_tables_are_chunked_and_sees_one_changed_token():
    """Two nodes compare this digest (ftclip.data.pipeline): datasets may split the same tokens into other files
    and chunks on a machine with another core count, and that must not read as other data."""
    import pyarrow as pa

    from ftclip.data.examples import TokenizedExamples

    ids = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    labels = [[-100, 2, 3], [-100, 5], [6], [-100, -100, 9, 10]]

    def examples(ids, chunks):
        table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": pa.array(labels, pa.list_(pa.int32())),
                          "trained": pa.array([2, 1, 1, 2], pa.int32())})
        pieces = [table.slice(start, end - start) for start, end in zip(chunks, chunks[1:])]
        return TokenizedExamples([pa.concat_tables(pieces)], [np.arange(4)])

    whole = examples(ids, [0, 4])
    assert whole.digest() == examples(ids, [0, 1, 3, 4]).digest()
    assert whole.digest() != examples([[1, 2, 3], [4, 5], [6], [7, 8, 9, 11]], [0, 4]).digest()
    assert whole.digest() != TokenizedExamples(whole._tables, [np.arange(3)]).digest()  # another kept row set


def test_abandoned_staging_folders_are_cleared_only_for_this_host(tmp_path):
    """On a shared cache folder another node's process id says nothing about this machine's processes."""
    import socket

    from ftclip.data.cache import staging_folder

    dead = 2**22 + 12345  # above Linux's largest possible pid (2**22): no process has it here
    mine, legacy, theirs = (tmp_path / f".k.tmp-{socket.gethostname()}-{dead}", tmp_path / f".k.tmp-{dead}",
                            tmp_path / f".k.tmp-another-node-{dead}")
    for folder in (mine, legacy, theirs):
        folder.mkdir()
    fresh = staging_folder(tmp_path, "new")
    assert not mine.exists() and not legacy.exists()
    assert theirs.exists()
    assert fresh.name == f".new.tmp-{socket.gethostname()}-{os.getpid()}"
