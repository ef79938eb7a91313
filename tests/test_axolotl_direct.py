"""`ftclip train`, `validate` and `preprocess` take an Axolotl config as it is (issue 21, item 4): the importer
converts it in memory, a short report says what was mapped and dropped, and training runs. Axolotl's own example
configs (tests/fixtures/axolotl, unchanged) are run with only their model and data swapped for local ones
through `--set`, spelled as the Axolotl file spells its keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ALPACA, write_jsonl
from typer.testing import CliRunner

from ftclip.cli import app

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "axolotl"
runner = CliRunner()

CHATS = [{"messages": [{"role": "user", "content": record["instruction"]},
                       {"role": "assistant", "content": record["output"]}]} for record in ALPACA] * 3


def local_run(tmp_path: Path, model: Path, data: Path) -> list[str]:
    """What swaps an Axolotl example onto this machine: a local model and data, a few steps, local folders."""
    return ["--set", f"base_model={model}", "--set", f"datasets.0.path={data}", "--set", "flash_attention=false",
            "--set", "max_steps=2", "--set", "sequence_len=128", "--set", "micro_batch_size=2",
            "--set", "gradient_accumulation_steps=1", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"dataset_prepared_path={tmp_path / 'cache'}"]


@pytest.mark.slow
@pytest.mark.parametrize("config, records", [
    ("llama-3__lora-1b.yml", ALPACA * 3),  # LoRA, sample packing, special_tokens, evals/saves per epoch
    ("llama-3__qlora-1b.yml", ALPACA * 3),  # QLoRA: NF4 base through bitsandbytes on the CPU
    ("llama-3__instruct-lora-8b.yml", CHATS),  # chat_template llama3, Axolotl's older message_field_* spelling
])
def test_train_runs_an_unchanged_axolotl_example(tmp_path, tiny_model_dir, config, records):
    source = tmp_path / config
    shutil.copy(FIXTURES / config, source)  # unchanged: the test only adds --set
    data = write_jsonl(tmp_path / "data.jsonl", records)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    result = runner.invoke(app, ["train", str(source), *local_run(tmp_path, model, data)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "an Axolotl config, read through the importer in memory" in text
    assert "dropped" in text and "strict" in text  # the short report: what was dropped
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_validate_and_preprocess_take_an_axolotl_config(tmp_path, tiny_model_dir):
    source = tmp_path / "lora-1b.yml"
    shutil.copy(FIXTURES / "llama-3__lora-1b.yml", source)
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA)
    flags = local_run(tmp_path, tiny_model_dir, data)
    validated = runner.invoke(app, ["validate", str(source), *flags])
    assert validated.exit_code == 0, validated.output
    assert "eval_sample_packing" in validated.output and "loss_watchdog_threshold" in validated.output
    as_json = runner.invoke(app, ["validate", str(source), "--json", *flags])
    [report] = json.loads(as_json.stdout)
    assert report["valid"] and "eval_sample_packing" in [d["key"] for d in report["axolotl_import"]["dropped"]]
    shown = runner.invoke(app, ["preprocess", str(source), "--show", "1", "--json", *flags])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout.splitlines()[0])["input_ids"]  # stdout stays JSON; the report went to stderr


def test_a_refused_axolotl_key_is_a_clear_error(tmp_path):
    source = tmp_path / "relora.yml"
    shutil.copy(FIXTURES / "llama-2__relora.yml", source)
    result = runner.invoke(app, ["train", str(source)])
    assert result.exit_code == 2
    assert "Axolotl key `relora_steps`: not supported" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_native_recipe_with_a_typo_is_still_an_error(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe(max_grad_nrom=0.5))])
    assert result.exit_code == 2 and "did you mean 'max_grad_norm'" in result.output


def test_a_native_recipe_with_one_axolotl_key_keeps_ftclips_defaults(make_recipe, tmp_path):
    from ftclip.recipe_files import read_recipe

    recipe = read_recipe(make_recipe(gradient_clipping=0.5, eval_sample_packing=False, lora_dropout=None))
    assert recipe._imported.dropped[0][0] == "eval_sample_packing"
    assert recipe.lora_dropout == 0.05 and recipe.bf16 is False  # not Axolotl's 0.0 and auto
    assert recipe.gradient_clipping.max_norm == 0.5


def test_a_misspelled_dataset_type_is_a_native_error_with_the_others(make_recipe):
    # Only the dataset types Axolotl has send a file through the importer; a typo gets ftclip's own errors, all of them.
    result = runner.invoke(app, ["validate", str(make_recipe(datasets=[{"path": "x.jsonl", "type": "alpacca"}],
                                                            learning_rate=-1))])
    assert result.exit_code == 2
    assert "got 'alpacca'" in result.output and "learning_rate: Input should be greater than 0" in result.output


@pytest.mark.parametrize("kind", ["sharegpt", "sharegpt:chat", "zephyr.nectar", "alpaca_chat.load_qa"])
def test_axolotl_dataset_types_send_the_file_through_the_importer(kind):
    from ftclip.recipe_files import axolotl_keys

    assert axolotl_keys({"base_model": "m", "datasets": [{"path": "d.jsonl", "type": kind}]}) == ["datasets.0.type"]


def test_axolotl_preference_formats_ftclip_reads_natively_stay_native():
    from ftclip.recipe_files import axolotl_keys

    for kind in ("chatml.intel", "llama3.ultra", "chat_template.default", "bradley_terry.chat_template"):
        assert axolotl_keys({"base_model": "m", "rl": "dpo", "datasets": [{"path": "d.jsonl", "type": kind}]}) == []


def test_a_prompt_format_mapping_is_ftclips_own_type_too():
    # A dataset type given as a mapping (Axolotl's user-defined type) is a native prompt format now: by itself it
    # does not make a file an Axolotl config (whose Axolotl defaults would then apply).
    from ftclip.recipe_files import axolotl_keys

    form = {"field_instruction": "q", "format": "{instruction}"}
    assert axolotl_keys({"base_model": "m", "datasets": [{"path": "d.jsonl", "type": form}]}) == []
