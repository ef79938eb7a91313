"""The Axolotl importer on configs as people commit them (tests/fixtures/axolotl_wild, sources in SOURCES.md),
and its in-memory entry point."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from ftclip.axolotl import import_config, import_mapping
from ftclip.cli import app
from ftclip.recipe import parse_recipe

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO / "tests" / "fixtures" / "axolotl_wild"
CORPUS = sorted(path for path in CORPUS_DIR.iterdir() if path.suffix in (".yml", ".yaml"))
runner = CliRunner()


def test_import_mapping_converts_a_parsed_config_in_memory(tmp_path):
    config = {"base_model": "org/model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
              "learning_rate": "2e-4", "adapter": "lora", "lora_target_linear": True}
    before = set(tmp_path.iterdir())
    result = import_mapping(config, tmp_path / "axolotl.yml")
    assert result.ok and set(tmp_path.iterdir()) == before  # nothing written
    assert result.recipe["learning_rate"] == 2e-4 and result.recipe["datasets"] == [{"path": "data.jsonl", "type": "alpaca"}]
    assert parse_recipe(result.text).learning_rate == 2e-4
    assert ("learning_rate", "learning_rate: 0.0002", "") in result.mapped
    # The same answer as importing the file.
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump(config))
    assert import_config(path).text == result.text


def test_import_mapping_reports_refusals_without_a_recipe(tmp_path):
    result = import_mapping({"base_model": "org/model", "datasets": [{"path": "d.jsonl", "type": "alpaca"}],
                             "lr_quadratic_warmup": True}, tmp_path / "axolotl.yml")
    assert not result.ok and result.recipe is None and "lr_quadratic_warmup" in dict(result.refused)
    assert import_mapping(["not", "a", "mapping"]).problems == ["not a mapping of keys (an Axolotl config is one)"]


# ---------------------------------------------------------------- one failing config does not hide the others


def test_an_unexpected_failure_is_reported_for_its_config_and_the_rest_still_run(tmp_path):
    good = "base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"
    (tmp_path / "a.yml").write_text(good)
    # A real file no parser expects: nesting deeper than Python's recursion limit makes PyYAML's constructor
    # raise RecursionError (not a YAMLError), which nothing in the importer anticipates.
    (tmp_path / "b.yml").write_text(good + "model_config: " + "[" * 5000 + "]" * 5000 + "\n")
    (tmp_path / "c.yml").write_text(good)
    sources = [str(tmp_path / name) for name in ("a.yml", "b.yml", "c.yml")]
    out = tmp_path / "out"
    result = runner.invoke(app, ["import-axolotl", *sources, "--output-dir", str(out)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert f"failed {sources[1]}: the importer failed unexpectedly, nothing written: RecursionError" in result.output
    assert result.output.count("written") >= 3 and "2 of 3 configs written, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.ftclip.yaml", "c.ftclip.yaml"]
    report = json.loads(runner.invoke(app, ["import-axolotl", *sources, "--output-dir", str(out), "--json"]).stdout)
    assert [entry["written"] for entry in report] == [True, False, True]
    assert report[1]["failure"].startswith("RecursionError") and report[0]["failure"] is None


def test_a_key_yaml_reads_as_a_boolean_is_refused_by_name(tmp_path):
    path = tmp_path / "axolotl.yml"
    path.write_text("base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: alpaca\non: true\n")
    result = import_config(path)  # was: AttributeError: 'bool' object has no attribute 'startswith'
    assert dict(result.refused)["True"] == "True (bool) is not a key name; quote it if it is one"


# ---------------------------------------------------------------- ShareGPT configs


def sharegpt_config(tmp_path: Path, entry: dict, **top) -> Path:
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump({"base_model": "org/model", "datasets": [{"path": "chats.jsonl", **entry}], **top}))
    return path


def test_sharegpt_reads_as_chat_in_the_conversations_template(tmp_path, tiny_model_dir):
    records = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
                                  {"from": "gpt", "value": "Teal is a colour."}]}] * 4
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt", "conversation": "chatml"}, chat_template="chatml",
                                           sequence_len=128))
    assert result.ok, (result.refused, result.problems)
    recipe = parse_recipe(result.text, str(tmp_path / "axolotl.ftclip.yaml"))
    [dataset] = recipe.datasets
    assert (dataset.type, dataset.field_messages) == ("chat", "conversations")
    assert dataset.message_property_mappings == {"role": "from", "content": "value"}
    assert dataset.roles == {"user": ["human"], "assistant": ["gpt"]} and recipe.chat_template == "chatml"
    assert "You are a helpful assistant." in dict((old, note) for old, _, note in result.mapped)["datasets[0].conversation"]
    # The written recipe reads the ShareGPT records: the gpt turn is trained, the human and system turns are not.
    written = tmp_path / "recipe.yaml"
    written.write_text(result.text)
    shown = runner.invoke(app, ["preprocess", str(written), "--show", "1", "--json", "--set", f"base_model={tiny_model_dir}",
                                "--set", f"dataset_cache_dir={tmp_path / 'cache'}"])
    assert shown.exit_code == 0, shown.output
    from transformers import AutoTokenizer

    example = json.loads(shown.stdout.splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert trained.startswith("Teal is a colour.") and "Name a colour" not in trained and "Be brief" not in trained
    assert "<|im_start|>user\nName a colour.<|im_end|>" in tokenizer.decode(example["input_ids"])


def test_sharegpt_loaders_and_role_names(tmp_path):
    for type_name in ("sharegpt", "sharegpt:chat", "sharegpt.load"):
        recipe = parse_recipe(import_config(sharegpt_config(tmp_path, {"type": type_name, "conversation": "llama3"})).text)
        assert recipe.datasets[0].message_property_mappings == {"role": "from", "content": "value"}
        assert recipe.chat_template == "llama3"
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt.load_guanaco", "conversation": "mistral"}))
    dataset = parse_recipe(result.text).datasets[0]
    assert dataset.message_property_mappings == {"role": "role", "content": "text"}
    assert dataset.roles == {"user": ["prompter"], "assistant": ["assistant"]}
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt", "conversation": "llama-3", "field_human": "user",
                                                      "field_model": "assistant"}))
    recipe = parse_recipe(result.text)
    assert recipe.datasets[0].roles == {"user": ["user"], "assistant": ["assistant"]} and recipe.chat_template == "llama3"
    result = import_config(sharegpt_config(tmp_path, {"type": "alpaca", "conversation": "chatml"}))
    assert "read by Axolotl's sharegpt type only" in dict(result.dropped)["datasets[0].conversation"]


def test_sharegpt_without_a_template_ftclip_has_is_refused_with_the_reason(tmp_path):
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt"}))
    assert "vicuna_v1.1" in dict(result.refused)["datasets[0].conversation"]
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt", "conversation": "vicuna_v1.1"}))
    assert "fastchat conversation 'vicuna_v1.1': ftclip has no chat template" in dict(result.refused)["datasets[0].conversation"]
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt", "conversation": "chatml"}, chat_template="llama3"))
    assert "recipe's chat template is llama3" in dict(result.refused)["datasets[0].conversation"]
    result = import_config(sharegpt_config(tmp_path, {"type": "sharegpt.load_glaive", "conversation": "chatml"}))
    assert "a ShareGPT loader ftclip does not read" in dict(result.refused)["datasets[0].type"]


# ---------------------------------------------------------------- the corpus

GENERIC = "not a key ftclip's importer knows"


def test_corpus_is_real_and_sourced():
    sources = (CORPUS_DIR / "SOURCES.md").read_text()
    assert 80 <= len(CORPUS) <= 150
    for path in CORPUS:
        assert f"`{path.name}`" in sources, f"{path.name} has no row in SOURCES.md"
    assert sources.count("\n| `") == len(CORPUS)
    assert "axolotl-ai-cloud/" not in sources.split("| --- |")[1]  # other repositories only
    external = {path.read_bytes() for path in (REPO / "tests" / "fixtures" / "axolotl_external").glob("*.y*ml")}
    assert not external & {path.read_bytes() for path in CORPUS}


def test_every_wild_config_is_written_valid_or_refused_with_reasons():
    written = 0
    for path in CORPUS:
        result = import_config(path)
        assert result.failure is None and not result.problems, (path.name, result.problems)
        if result.ok:
            written += 1
            assert parse_recipe(result.text, "imported.yaml").datasets
            continue
        assert result.refused, path.name
        # Each refused config names a feature ftclip lacks. (Two DPO keys still get the generic reason besides rl's
        # refusal: preference training's rows come with its own branch.)
        assert any(GENERIC not in why for _, why in result.refused), (path.name, result.refused)
    assert written * 3 >= len(CORPUS) * 2, f"{written} of {len(CORPUS)} written"  # at least two thirds


def test_cli_imports_the_wild_corpus_in_one_process(tmp_path):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "ftclip", "import-axolotl", *map(str, CORPUS), "--output-dir", str(tmp_path)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == 2  # some are refused, none failed (that would be 1)
    assert f"of {len(CORPUS)} configs written" in done.stdout


# ---------------------------------------------------------------- the features the corpus asked for


def wild(tmp_path: Path, text: str):
    path = tmp_path / "axolotl.yml"
    path.write_text("base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n" + text)
    return import_config(path)


def recipe_from(tmp_path: Path, text: str):
    result = wild(tmp_path, text)
    assert result.ok, (result.refused, result.problems)
    return parse_recipe(result.text), result


def test_test_datasets_neftune_and_data_seed(tmp_path):
    recipe, result = recipe_from(tmp_path, "test_datasets:\n  - path: eval.jsonl\n    type: sharegpt\n"
                                           "    conversation: chatml\n    split: train[:10%]\nneftune_noise_alpha: 5\n"
                                           "eval_steps: 10\ndata_seed: 3\n")
    [test] = recipe.test_datasets
    assert (test.path, test.type, test.split, recipe.chat_template) == ("eval.jsonl", "chat", "train[:10%]", "chatml")
    assert recipe.neftune_noise_alpha == 5 and recipe.eval_steps == 10
    assert recipe.data_seed is None and "data_seed" in dict(result.dropped)  # Axolotl has no such key: no effect there
    assert parse_recipe(wild(tmp_path, "noisy_embedding_alpha: 5\n").text).neftune_noise_alpha == 5
    assert "neftune_noise_alpha" in dict(wild(tmp_path, "neftune_noise_alpha: 0\n").dropped)
    invalid = wild(tmp_path, "val_set_size: 0.1\ntest_datasets:\n  - {path: e.jsonl, type: alpaca}\n")
    assert any("test_datasets: given with val_set_size" in problem for problem in invalid.problems)


def test_early_stopping_and_the_best_model_where_axolotl_turns_them_on(tmp_path):
    recipe, result = recipe_from(tmp_path, "val_set_size: 0.1\neval_steps: 5\nsave_steps: 10\n"
                                           "early_stopping_patience: 3\nmetric_for_best_model: loss\n")
    assert (recipe.early_stopping_patience, recipe.load_best_model_at_end, recipe.metric_for_best_model) == (3, True, "loss")
    assert "load_best_model_at_end" in dict((old, note) for old, _, note in result.mapped)["early_stopping_patience"]
    # Off in Axolotl without a held-out set or with misaligned steps: dropped, and so are the options it reads.
    recipe, result = recipe_from(tmp_path, "load_best_model_at_end: true\nmetric_for_best_model: loss\n"
                                           "greater_is_better: false\n")
    assert not recipe.load_best_model_at_end and recipe.metric_for_best_model is None
    assert {"load_best_model_at_end", "metric_for_best_model", "greater_is_better"} <= set(dict(result.dropped))


def test_prompt_formats_fields_and_splits(tmp_path):
    recipe, result = recipe_from(tmp_path, "datasets:\n  - path: q.jsonl\n    type:\n      field_instruction: q\n"
                                           "      format: 'Q: {instruction}'\n      no_input_format: 'Q: {instruction}'\n"
                                           "      field: ignored\n")
    assert recipe.datasets[0].type.field_instruction == "q" and "datasets[0].type.field" in dict(result.dropped)
    recipe, result = recipe_from(tmp_path, "datasets:\n  - path: qa.jsonl\n    type: alpaca_chat.load_qa\n"
                                           "  - path: t.jsonl\n    type: completion\n    field: body\n"
                                           "  - path: s.jsonl\n    type: alpaca\n    train_on_split: validation\n")
    assert recipe.datasets[0].type.field_output == "answer"
    assert recipe.datasets[1].field == "body" and recipe.datasets[2].split == "validation"
    refused = wild(tmp_path, "datasets:\n  - path: qa.jsonl\n    type: alpaca_chat\n    conversation: chatml\n").refused
    assert "an AlpacaPrompter style ftclip does not write out" in dict(refused)["datasets[0].type"]
    refused = wild(tmp_path, "datasets:\n  - {path: a.jsonl, type: alpaca, split: train, train_on_split: test}\n").refused
    assert "datasets[0].train_on_split" in dict(refused)


def test_keys_axolotl_derives_or_rejects(tmp_path):
    _, result = recipe_from(tmp_path, "torch_dtype: float16\nsaves_per_epoch: 0\n")
    assert "Axolotl sets its own torch_dtype" in dict(result.dropped)["torch_dtype"]
    assert "reads it as unset" in dict(result.dropped)["saves_per_epoch"]
    assert "Axolotl itself rejects it" in dict(wild(tmp_path, "resume_from_checkpoint: true\n").refused)["resume_from_checkpoint"]
