"""The Axolotl importer on the model-family keys: quantize_moe_experts, model_quantization_config (gpt-oss's
Mxfp4Config), tokenizer_use_mistral_common and qat; and validate's word on what this machine can run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ftclip.axolotl import import_config
from ftclip.modeling import kernel_problems
from ftclip.recipe import parse_recipe

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO / "tests" / "fixtures" / "axolotl"


def convert(tmp_path: Path, config: dict):
    path = tmp_path / "axolotl.yml"
    adapter = {"lora_target_modules": ["q_proj", "v_proj"]} if config.get("adapter") else {}
    path.write_text(yaml.safe_dump({"base_model": "org/model", "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
                                    **adapter, **config}, sort_keys=False))
    return import_config(path)


def recipe_of(tmp_path: Path, config: dict):
    result = convert(tmp_path, config)
    assert result.ok, (result.refused, result.problems)
    return parse_recipe(result.text)


def refusals(tmp_path: Path, config: dict) -> dict[str, str]:
    result = convert(tmp_path, config)
    assert not result.ok
    return dict(result.refused)


def test_glm45_moe_qlora_from_axolotls_examples_is_written():
    result = import_config(CORPUS_DIR / "glm45__glm-45-air-qlora.yaml")
    assert result.ok, (result.refused, result.problems)
    recipe = parse_recipe(result.text)
    assert recipe.quantize_moe_experts and recipe.load_in_4bit and recipe.adapter == "qlora"


def test_quantize_moe_experts_maps_with_4bit_and_is_refused_with_8bit(tmp_path):
    recipe = recipe_of(tmp_path, {"adapter": "qlora", "load_in_4bit": True, "quantize_moe_experts": True,
                                  "lora_target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]})
    assert recipe.quantize_moe_experts and recipe.lora_target_parameters == ["mlp.experts.gate_up_proj",
                                                                             "mlp.experts.down_proj"]
    why = refusals(tmp_path, {"adapter": "lora", "load_in_8bit": True, "quantize_moe_experts": True})
    assert "4 bits only" in why["quantize_moe_experts"]


def test_gpt_oss_mxfp4_needs_dequantize(tmp_path):
    recipe = recipe_of(tmp_path, {"model_quantization_config": "Mxfp4Config",
                                  "model_quantization_config_kwargs": {"dequantize": True}, "adapter": "lora"})
    assert recipe.model_quantization_config == "Mxfp4Config"
    assert recipe.model_quantization_config_kwargs == {"dequantize": True}
    why = refusals(tmp_path, {"model_quantization_config": "Mxfp4Config"})
    assert "do not train" in why["model_quantization_config"]
    why = refusals(tmp_path, {"model_quantization_config": "FineGrainedFP8Config"})
    assert "Mxfp4Config" in why["model_quantization_config"]


def test_mistral_common_and_qat_blocks_map(tmp_path):
    recipe = recipe_of(tmp_path, {"tokenizer_use_mistral_common": True, "adapter": "qlora", "load_in_4bit": True})
    assert recipe.tokenizer_use_mistral_common
    recipe = recipe_of(tmp_path, {"qat": {"activation_dtype": "int8", "weight_dtype": "int4", "group_size": 256,
                                          "fake_quant_after_n_steps": 1000}})
    assert (recipe.qat.weight_dtype, recipe.qat.activation_dtype, recipe.qat.group_size,
            recipe.qat.fake_quant_after_n_steps) == ("int4", "int8", 256, 1000)
    fp8 = recipe_of(tmp_path, {"qat": {"weight_dtype": "fp8", "activation_dtype": "float8"}}).qat
    assert (fp8.weight_dtype, fp8.activation_dtype) == ("float8_e4m3fn", "float8_e4m3fn")
    why = refusals(tmp_path, {"qat": {"weight_dtype": "int4", "fake_quant_method": "x"}})
    assert "fake_quant_method" in why["qat"]


@pytest.mark.parametrize("settings, key, words", [
    ({"qat": {"weight_dtype": "nvfp4", "activation_dtype": "nvfp4", "group_size": 16}}, "qat.weight_dtype", "GPU"),
    ({"qat": {"weight_dtype": "int4", "activation_dtype": "int8"}}, None, None),
])
def test_validate_says_which_qat_dtypes_need_cuda(settings, key, words):
    recipe = parse_recipe("base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n"
                          + yaml.safe_dump(settings))
    problems = dict(kernel_problems(recipe, cuda_available=False))
    problems.pop("qat", None)  # torchao itself may be missing here; that message is tested below
    if key is None:
        assert not problems
    else:
        assert words in problems[key]
    assert not dict(kernel_problems(recipe, cuda_available=True)).get("qat.weight_dtype")


def test_validate_names_the_missing_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("mistral_common", "torchao") else real(name, *args))
    recipe = parse_recipe("base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: chat\n"
                          "tokenizer_use_mistral_common: true\nqat: {weight_dtype: int4}\n")
    problems = dict(kernel_problems(recipe, cuda_available=True))
    assert "pip install 'ftclip[mistral]'" in problems["tokenizer_use_mistral_common"]
    assert "pip install 'ftclip[torchao]'" in problems["qat"]
