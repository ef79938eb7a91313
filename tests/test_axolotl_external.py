"""The Axolotl importer on configs it was not built on: 53 real configs committed in other public repositories
(tests/fixtures/axolotl_external, sources in SOURCES.md), and the odd forms such configs take (numbers written as
strings, fractions of the run's steps, a dataset type given as a mapping, inline DeepSpeed settings, ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftclip.axolotl import AXOLOTL_KEYS, DATASET_KEYS, import_config
from ftclip.recipe import parse_recipe

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO / "tests" / "fixtures" / "axolotl_external"
CORPUS = sorted(path for path in CORPUS_DIR.iterdir() if path.suffix in (".yml", ".yaml"))
GENERIC = "not a key ftclip's importer knows"


def convert(tmp_path: Path, config: dict):
    path = tmp_path / "axolotl.yml"
    path.write_text(yaml.safe_dump({"base_model": "org/model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
                                    **config}, sort_keys=False))
    return import_config(path)


def recipe_of(tmp_path: Path, config: dict):
    result = convert(tmp_path, config)
    assert result.ok, (result.refused, result.problems)
    return parse_recipe(result.text), result


# ---------------------------------------------------------------- the corpus


def test_corpus_is_real_and_sourced():
    sources = (CORPUS_DIR / "SOURCES.md").read_text()
    assert 40 <= len(CORPUS) <= 80
    for path in CORPUS:
        assert f"`{path.name}`" in sources, f"{path.name} has no row in SOURCES.md"
    assert sources.count("\n| `") == len(CORPUS)
    assert "axolotl-ai-cloud/axolotl |" not in sources  # other repositories only


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_every_external_config_is_written_valid_or_refused_with_reasons(path):
    result = import_config(path)
    if result.ok:
        recipe = parse_recipe(result.text, "imported.yaml")
        assert recipe.datasets
    else:
        assert result.text is None
        assert result.refused or result.problems
        for key, why in result.refused:
            assert key and len(why) > 10
            assert GENERIC not in why, f"{key}: a vague reason"


def test_external_corpus_outcomes():
    results = {path.name: import_config(path) for path in CORPUS}
    written = {name for name, result in results.items() if result.ok}
    assert len(written) >= 32  # 21 before ShareGPT, prompt formats, test_datasets, early stopping... were read
    refused = {name: {key for key, _ in result.refused} for name, result in results.items()}
    assert "DEITA__qlora.yml" in written  # a user-defined prompt format (type: {...}): a prompt format now
    assert "datasets[0].type" not in refused["Medilora__train_medilora_medqa.yml"]  # sharegpt: read as chat now
    assert "datasets[0].type" in refused["util-llm-script__qlora_dpo.yml"]  # alpaca under rl: dpo (no such DPO format)
    # The two that are neither: an inference config without datasets, and a template with empty values.
    invalid = {name for name, result in results.items() if not result.ok and not result.refused}
    assert invalid == {"ADL_HW3__test.yml", "CML_AMP_LLM_Fine_Tuning_Studio__ft_config_axolotl_training_config_template.yaml"}


def test_external_values_are_preserved():
    for path in CORPUS:
        result = import_config(path)
        if not result.ok:
            continue
        config, recipe = yaml.safe_load(path.read_text()), parse_recipe(result.text)
        for key in ("learning_rate", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "lora_r",
                    "lora_alpha", "lora_dropout", "sequence_len", "sample_packing", "weight_decay", "val_set_size"):
            if config.get(key) not in (None, ""):
                assert getattr(recipe, key) == float(config[key]), (path.name, key)
        if config.get("flash_attention") is False:
            assert recipe.attn_implementation != "flash_attention_2", path.name


def test_cli_imports_the_external_corpus_in_one_process(tmp_path):
    command = [sys.executable, "-m", "ftclip", "import-axolotl", *map(str, CORPUS), "--output-dir", str(tmp_path),
               "--json"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=environment)
    assert "Traceback" not in done.stdout + done.stderr
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert len(report) == len(CORPUS)
    for entry in report:
        if entry["written"]:
            parse_recipe(Path(entry["output"]).read_text(), entry["output"])
        else:
            assert entry["refused"] or entry["problems"]


# ---------------------------------------------------------------- odd values never make a traceback

ODD_VALUES = ["abc", "2e-4", 0.5, True, [1, "a"], {"a": 1}]


@pytest.mark.parametrize("key", sorted(AXOLOTL_KEYS) + ["datasets"])
def test_any_value_of_any_key_is_an_outcome_not_a_traceback(tmp_path, key):
    for value in ODD_VALUES:
        result = convert(tmp_path, {key: value})
        assert result.ok or result.refused or result.problems


def test_any_value_of_any_dataset_key_is_an_outcome_not_a_traceback(tmp_path):
    for key in DATASET_KEYS:
        for value in ODD_VALUES:
            path = tmp_path / "axolotl.yml"
            path.write_text(yaml.safe_dump({"base_model": "org/model",
                                            "datasets": [{"path": "d.jsonl", "type": "alpaca", key: value}]}))
            result = import_config(path)
            assert result.ok or result.refused or result.problems, key


# ---------------------------------------------------------------- one test per bug the external corpus showed


def test_dataset_type_as_a_mapping_is_a_prompt_format():
    result = import_config(CORPUS_DIR / "DEITA__qlora.yml")  # was: TypeError: unhashable type: 'dict'; then refused
    assert result.ok, (result.refused, result.problems)
    config = yaml.safe_load((CORPUS_DIR / "DEITA__qlora.yml").read_text())
    written = parse_recipe(result.text).datasets[0].type
    assert all(getattr(written, key) == value for key, value in config["datasets"][0]["type"].items())
    # A format with a placeholder Axolotl's str.format has no value for fails in Axolotl: refused with that reason.
    result = import_config(CORPUS_DIR / "simon-benigeri-sharding_cot_private__axolotl_config.yml")
    assert "{output} is not a placeholder" in dict(result.refused)["datasets[0].type"]


def test_flash_attention_false_is_off(tmp_path):
    recipe, result = recipe_of(tmp_path, {"flash_attention": False})  # was: attn_implementation: flash_attention_2
    assert recipe.attn_implementation != "flash_attention_2"
    assert ("flash_attention", "false: this attention is off (the model's default attention applies)") in result.dropped


def test_numbers_written_as_strings(tmp_path):
    recipe, _ = recipe_of(tmp_path, {"learning_rate": "2e-4", "max_grad_norm": "0.5", "warmup_steps": "10",
                                     "micro_batch_size": "4", "batch_size": "16", "lora_r": "8"})
    assert recipe.learning_rate == 2e-4 and recipe.warmup_steps == 10 and recipe.lora_r == 8
    assert recipe.gradient_clipping.max_norm == 0.5
    assert recipe.micro_batch_size == 4 and recipe.gradient_accumulation_steps == 4


def test_fractional_steps_follow_hugging_face(tmp_path):
    # was: "Input should be a valid integer, got a number with a fractional part"
    recipe, result = recipe_of(tmp_path, {"num_epochs": 4, "val_set_size": 0.05, "eval_steps": 0.05,
                                          "save_steps": 0.25, "logging_steps": 0.2})
    assert recipe.evals_per_epoch == 5 and recipe.eval_steps is None  # every 5% of the run: 20 in 4 epochs
    assert recipe.saves_per_epoch == 1  # every 25% of the run: 4 in 4 epochs
    assert recipe.logging_steps == 1 and "logging_steps" in dict(result.dropped)
    recipe, _ = recipe_of(tmp_path, {"max_steps": 90, "val_set_size": 0.05, "eval_steps": 0.05, "save_steps": 0.5})
    assert recipe.eval_steps == 5 and recipe.save_steps == 45  # ceil(0.05 × 90), ceil(0.5 × 90)


def test_empty_string_means_not_set(tmp_path):
    recipe, result = recipe_of(tmp_path, {"save_steps": "", "xformers_attention": ""})
    assert recipe.save_steps is None
    assert ("save_steps", "empty: not set, the default applies") in result.dropped


def test_datasets_as_a_single_mapping(tmp_path):
    path = tmp_path / "axolotl.yml"
    path.write_text("base_model: org/model\ndatasets:\n  path: data.jsonl\n  type: alpaca\n")
    result = import_config(path)
    assert result.ok
    assert [(d.path, d.type) for d in parse_recipe(result.text).datasets] == [("data.jsonl", "alpaca")]


def test_deepspeed_inline_settings_and_odd_values(tmp_path):
    recipe, _ = recipe_of(tmp_path, {"deepspeed": {"zero_optimization": {"stage": 3}}})
    assert recipe.distributed.strategy == "fsdp"
    result = convert(tmp_path, {"deepspeed": True})  # was: TypeError from Path(True)
    assert "deepspeed" in dict(result.refused)


def test_plugins_as_one_string_or_a_wrong_form(tmp_path):
    recipe, _ = recipe_of(tmp_path, {"plugins": "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"})
    assert recipe.chunked_cross_entropy is True
    assert "plugins" in dict(convert(tmp_path, {"plugins": 3}).refused)  # was: 'int' object is not iterable


def test_dataset_field_and_column_keys(tmp_path):
    path = tmp_path / "axolotl.yml"
    path.write_text("base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"
                    "    field: conversations\n    field_instruction: instruction\n    field_output: output\n")
    result = import_config(path)  # was: refused, "reads records from field 'conversations'"
    assert result.ok and {"datasets[0].field", "datasets[0].field_instruction"} <= set(dict(result.dropped))
    path.write_text("base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"
                    "    field_instruction: question\n")
    assert "rename the columns" in dict(import_config(path).refused)["datasets[0].field_instruction"]
    path.write_text("base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: completion\n"
                    "    field_prompt: prompt\n")
    assert "datasets[0].field_prompt" in dict(import_config(path).refused)


def test_sharegpt_is_read_as_chat_in_the_conversations_template():
    result = import_config(CORPUS_DIR / "Medilora__train_medilora_medqa.yml")  # was: refused (type: sharegpt)
    assert result.ok, (result.refused, result.problems)
    recipe = parse_recipe(result.text)
    assert recipe.chat_template == "chatml" and recipe.datasets[0].field_messages == "conversations"
    assert recipe.datasets[0].roles == {"user": ["user"], "assistant": ["assistant"]}  # field_human/field_model


def test_base_model_config(tmp_path):
    recipe, result = recipe_of(tmp_path, {"base_model_config": "org/model"})
    assert "base_model_config" in dict(result.dropped)
    assert "base_model_config" in dict(convert(tmp_path, {"base_model_config": "org/other"}).refused)


def test_trainer_arguments_outside_axolotl(tmp_path):
    recipe, result = recipe_of(tmp_path, {"report_to": "none", "dataloader_num_workers": 2, "push_to_hub": True,
                                          "logging_dir": "./logs", "load_best_model_at_end": False,
                                          "bos_token": "<s>"})
    assert {"report_to", "dataloader_num_workers", "push_to_hub", "logging_dir", "load_best_model_at_end",
            "bos_token"} <= set(dict(result.dropped))
    # Axolotl turns it on only with a held-out set and aligned save/eval steps; without them it is off there too.
    assert "load_best_model_at_end" in dict(convert(tmp_path, {"load_best_model_at_end": True}).dropped)
    recipe, _ = recipe_of(tmp_path, {"load_best_model_at_end": True, "val_set_size": 0.1, "eval_steps": 5,
                                     "save_steps": 10, "metric_for_best_model": "loss"})
    assert recipe.load_best_model_at_end and recipe.metric_for_best_model == "loss"


def test_device_map_on_one_device_and_on_several(tmp_path):
    _, result = recipe_of(tmp_path, {"device_map": {"": 0}})  # was: refused as model parallel
    assert "device_map" in dict(result.dropped)
    assert "device_map" in dict(convert(tmp_path, {"device_map": "auto"}).refused)
    assert "device_map" in dict(convert(tmp_path, {"device_map": {"model.layers.0": 0, "lm_head": 1}}).refused)


def test_optim_args_that_repeat_the_adam_settings(tmp_path):
    _, result = recipe_of(tmp_path, {"optim_args": {"eps": "1e-8"}, "adam_beta1": 0.9})  # was: refused
    assert "optim_args" in dict(result.dropped)
    why = dict(convert(tmp_path, {"optim_args": {"eps": 1e-6, "amsgrad": True}}).refused)["optim_args"]
    assert "eps: 1e-06" in why and "amsgrad" in why


def test_model_type_as_an_architecture_name(tmp_path):
    _, result = recipe_of(tmp_path, {"model_type": "llama"})  # was: "ftclip trains causal language models only"
    assert "LlamaForCausalLM" in dict(result.dropped)["model_type"]
    assert "model_type" in dict(convert(tmp_path, {"model_type": "LlamaForSequenceClassification"}).refused)


def test_eval_steps_without_a_held_out_set(tmp_path):
    recipe, result = recipe_of(tmp_path, {"val_set_size": 0, "eval_steps": 50})  # was: invalid, needs val_set_size
    assert recipe.eval_steps is None and "eval_steps" in dict(result.dropped)
    recipe, _ = recipe_of(tmp_path, {"val_set_size": 0.05, "eval_steps": 50})
    assert recipe.eval_steps == 50


def test_yaml_anchors_and_a_deepspeed_file_that_is_not_here(tmp_path):
    path = tmp_path / "axolotl.yml"
    path.write_text("base_model: org/model\nlr: &rate 0.0002\nlearning_rate: *rate\n"
                    "datasets:\n  - &data {path: data.jsonl, type: alpaca}\n  - <<: *data\n    split: test\n"
                    "deepspeed: deepspeed_configs/zero2.json\n")
    result = import_config(path)
    assert dict(result.refused).keys() == {"lr"}  # not an Axolotl key: named, not guessed
    path.write_text(path.read_text().replace("lr: &rate 0.0002\nlearning_rate: *rate", "learning_rate: &rate 0.0002"))
    result = import_config(path)
    assert result.ok, result.refused
    recipe = parse_recipe(result.text)
    assert recipe.learning_rate == 2e-4 and [d.split for d in recipe.datasets] == ["train", "test"]
    assert recipe.distributed.strategy == "ddp"  # ZeRO-2, read from the file name
    path.write_text("base_model: org/model\ndatasets:\n  - {path: data.jsonl, type: alpaca}\ndeepspeed: ds.json\n")
    assert "cannot tell the ZeRO stage" in dict(import_config(path).refused)["deepspeed"]
