"""Dataset options Axolotl configs use: test_datasets (evaluated on, never trained on), data_seed, split slices on
single files, the completion text field, and prompt formats of the recipe's own (Axolotl's user-defined type and
the built-in instruction strategies written out as such)."""

from __future__ import annotations

import pytest
from conftest import ALPACA, QUICKSTART_MODEL, write_jsonl
from transformers import AutoTokenizer

from ftclip.axolotl.formats import BUILTIN_FORMATS
from ftclip.data import IGNORE_INDEX, check_datasets, prepare
from ftclip.data.tokenize import TokenizeSettings, tokenize_batch
from ftclip.errors import DataError, RecipeError
from ftclip.recipe import DatasetSpec, PromptFormat, Recipe, parse_recipe
from ftclip.train import micro_batch_stream


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def recipe_for(tmp_path, datasets, **changes) -> Recipe:
    return Recipe(**{"base_model": "x", "datasets": datasets, "dataset_cache_dir": str(tmp_path / "cache"), **changes})


def token_rows(examples, indices) -> set[tuple[int, ...]]:
    return {tuple(examples.input_ids(int(i))) for i in indices}


# ---------------------------------------------------------------- test_datasets


def test_test_datasets_are_evaluated_and_never_trained(tmp_path, tokenizer):
    train_file = write_jsonl(tmp_path / "train.jsonl", ALPACA[:6])
    test_file = write_jsonl(tmp_path / "test.jsonl", ALPACA[6:] + [ALPACA[0]])  # one repeats a training record
    recipe = recipe_for(tmp_path, [{"path": str(train_file), "type": "alpaca"}],
                        test_datasets=[{"path": str(test_file), "type": "alpaca"}])
    data = prepare(recipe, tokenizer)
    assert len(data.train.members) == 6 and len(data.val) == 3 and data.held_out == "from test_datasets"
    alone = prepare(recipe_for(tmp_path, [{"path": str(test_file), "type": "alpaca"}]), tokenizer)
    assert token_rows(data.val.examples, data.val.members) == token_rows(alone.examples, range(3))
    deduplicated = prepare(recipe.model_copy(update={"dataset_exact_deduplication": True}), tokenizer)
    assert len(deduplicated.val) == 2  # the repeat of a training record is not evaluated on
    assert "dropped 0 repeated training and 1 repeated test_datasets examples" in deduplicated.notes[-1]


def test_test_datasets_with_val_set_size_is_an_error_and_validate_checks_their_files(tmp_path):
    base = "base_model: m\ndatasets:\n  - {path: d.jsonl, type: alpaca}\ntest_datasets:\n  - {path: t.jsonl, type: alpaca}\n"
    with pytest.raises(RecipeError, match="test_datasets: given with val_set_size"):
        parse_recipe(base + "val_set_size: 0.1\n")
    recipe = parse_recipe(base + "eval_steps: 5\n", folder=tmp_path)  # eval_steps has a held-out set to use
    write_jsonl(tmp_path / "d.jsonl", ALPACA)
    problems, _ = check_datasets(recipe)
    assert [key for key, _ in problems] == ["test_datasets.0.path"]


# ---------------------------------------------------------------- data_seed, split slices, completion field


def test_data_seed_orders_the_training_data_and_seed_still_holds_out(tmp_path, tokenizer, alpaca_file):
    spec = [{"path": str(alpaca_file), "type": "alpaca"}]

    def order(**changes):
        recipe = recipe_for(tmp_path, spec, micro_batch_size=1, **changes)
        stream = micro_batch_stream(prepare(recipe, tokenizer).train, recipe)
        return [next(stream)[2][0][0][0].tobytes() for _ in range(8)]

    def held_out(**changes):
        return prepare(recipe_for(tmp_path, spec, val_set_size=2, **changes), tokenizer).val.members.tolist()

    seeded = order(seed=1, data_seed=7)
    assert order(seed=2, data_seed=7) == seeded  # data_seed alone decides the order
    assert order(seed=1, data_seed=8) != seeded and order(seed=7) == seeded  # without it, seed does
    assert held_out(seed=1, data_seed=7) == held_out(seed=1, data_seed=8) == held_out(seed=1)  # seed holds out


def test_split_slices_of_a_single_file(tmp_path, tokenizer, alpaca_file):
    def count(split: str) -> int:
        return len(prepare(recipe_for(tmp_path, [{"path": str(alpaca_file), "type": "alpaca", "split": split}]),
                           tokenizer).examples)

    assert (count("train"), count("train[:50%]"), count("train[2:5]"), count("train[:2]+train[-1:]")) == (8, 4, 3, 3)
    with pytest.raises(DataError, match="a single file is one split, train"):
        count("test")  # was: silently the whole file
    recipe = recipe_for(tmp_path, [{"path": str(alpaca_file), "type": "alpaca", "split": "validation"}])
    assert "a single file is one split" in check_datasets(recipe)[0][0][1]


def test_completion_reads_the_field_it_is_given(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "articles.jsonl", [{"body": "Paris is in France.", "text": 3}] * 2)
    data = prepare(recipe_for(tmp_path, [{"path": str(path), "type": "completion", "field": "body"}]), tokenizer)
    assert tokenizer.decode(data.examples.input_ids(0), skip_special_tokens=True) == "Paris is in France."
    with pytest.raises(RecipeError, match="datasets.0.field: names the text key of completion records"):
        parse_recipe("base_model: m\ndatasets:\n  - {path: d.jsonl, type: alpaca, field: body}\n")


# ---------------------------------------------------------------- prompt formats


def tokenize(record: dict, prompt_format: dict, tokenizer, train_on_inputs: bool = False):
    spec = DatasetSpec(path="x", type=prompt_format)
    out = tokenize_batch({key: [value] for key, value in record.items()}, tokenizer,
                         TokenizeSettings(spec, 256, train_on_inputs))
    return out


def test_a_prompt_format_writes_axolotls_user_defined_prompt(tokenizer):
    # Axolotl's user_defined.py: system_format with the record's system (else system_prompt), then format with
    # {instruction} and {input}, or no_input_format when the input is empty; the output and EOS are trained.
    form = {"system_prompt": "Be brief.", "system_format": "<s>{system}</s>\n", "field_instruction": "q",
            "field_input": "ctx", "field_output": "a", "format": "Q: {instruction}\nC: {input}\nA: ",
            "no_input_format": "Q: {instruction}\nA: "}
    prompt_format = PromptFormat.model_validate(form)
    assert prompt_format.prompt({"q": "Why?", "ctx": "sky"}) == "<s>Be brief.</s>\nQ: Why?\nC: sky\nA: "
    assert prompt_format.prompt({"q": "Why?", "system": "Own."}) == "<s>Own.</s>\nQ: Why?\nA: "
    assert PromptFormat(system_format="").prompt({"instruction": "x", "system": "s"}) == "x "
    out = tokenize({"q": "Why?", "ctx": "sky", "a": "Because."}, form, tokenizer)
    ids, labels = out["input_ids"][0], out["labels"][0]
    prompt_ids = tokenizer("<s>Be brief.</s>\nQ: Why?\nC: sky\nA: ")["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and all(label == IGNORE_INDEX for label in labels[:len(prompt_ids)])
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == \
        tokenizer.decode(tokenizer("Because.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    # No output: nothing at all is trained (Axolotl tokenizes no text, not even the EOS), so the example is dropped.
    assert tokenize({"q": "Why?"}, form, tokenizer)["trained"] == [0]
    assert tokenize({"a": "x"}, form, tokenizer)["problem"] == ["the prompt format needs a string 'q' (field_instruction)"]


def test_prompt_format_placeholders_are_checked():
    def problem(**form):
        with pytest.raises(RecipeError) as raised:
            parse_recipe("base_model: m\ndatasets:\n  - path: d.jsonl\n    type: " + str(form).replace("'", '"') + "\n")
        return str(raised.value)

    assert "{output} is not a placeholder it takes (input, instruction)" in problem(format="{instruction} {output}")
    assert "{input} is not a placeholder it takes (instruction)" in problem(no_input_format="{input}")
    assert "Single '}' encountered" in problem(format="JSON: {}}")
    assert "unknown key; did you mean 'format'?" in problem(formt="x")
    assert PromptFormat(format="JSON {{a}}: {instruction}").prompt({"instruction": "x", "input": "y"}) == "JSON {a}: x"


AXOLOTL_CHAT = ("SYSTEM: Below is an instruction from a USER that describes a task. The ASSISTANT writes a response "
                "that appropriately and concisely completes the request.\n\n\n")


def test_axolotls_built_in_strategies_written_as_prompt_formats():
    # The strings of src/axolotl/prompters.py (AlpacaPrompter's chat and instruct styles) and
    # prompt_strategies/alpaca_chat.py (AlpacaChatPrompter's system texts), as Axolotl joins them.
    qa = PromptFormat.model_validate(BUILTIN_FORMATS["alpaca_chat.load_qa"])
    assert qa.prompt({"question": "2+2?", "input": "ignored", "system": "ignored"}) == AXOLOTL_CHAT + "USER: 2+2?\nASSISTANT:"
    assert qa.field_output == "answer"
    chat = PromptFormat.model_validate(BUILTIN_FORMATS["alpaca_chat"])
    assert chat.prompt({"instruction": "Add.", "input": "2, 2"}) == (
        "SYSTEM: Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\nUSER: Add.\n2, 2\nASSISTANT:")
    bare = PromptFormat.model_validate(BUILTIN_FORMATS["alpaca_instruct.load_no_prompt"])
    assert bare.prompt({"instruction": "Add."}) == "### Instruction:\nAdd.\n\n### Response:\n"


def test_chat_prompts_as_the_prompt_format_trained(tokenizer):
    from ftclip.inference import Conversation, prompt_format_of, prompt_style

    form = {"format": "Q: {instruction}\nA: ", "no_input_format": "Q: {instruction}\nA: "}
    recipe = {"datasets": [{"path": "d.jsonl", "type": form}]}
    conversation = Conversation(tokenizer, prompt_style(recipe, tokenizer), prompt_format=prompt_format_of(recipe))
    assert conversation.style == "prompt_format"
    assert conversation.prompt_ids("Hi?") == tokenizer("Q: Hi?\nA: ")["input_ids"]
