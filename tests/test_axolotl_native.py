"""Axolotl keys the recipe takes natively (issue 13, second round): unfrozen_parameters, model_config,
revision_of_model, the peft options, bnb_config_kwargs and eta_min, each checked on a real config from the
corpus (tests/fixtures/axolotl, sources in SOURCES.md) and on the tiny model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ftclip.axolotl import import_config
from ftclip.errors import ModelError, RecipeError
from ftclip.modeling import check_model_source, kernel_problems, load_model
from ftclip.recipe import load_recipe, parse_recipe, parse_unfrozen_pattern

CORPUS_DIR = Path(__file__).resolve().parent / "fixtures" / "axolotl"
BASE = "base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"
CPU = torch.device("cpu")


def imported(name: str):
    result = import_config(CORPUS_DIR / name)
    assert result.ok, (result.refused, result.problems)
    return result, parse_recipe(result.text)


def problem_keys(text: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text)
    return [problem.key for problem in caught.value.problems]


# ---------------------------------------------------------------- unfrozen_parameters


@pytest.mark.parametrize("pattern, name, matches", [
    ("^lm_head.weight$", "lm_head.weight", True),
    ("^lm_head.weight$", "lm_headXweight", False),  # '.' is a literal dot, as in Axolotl
    ("model.layers.[0-9]+.mlp.*", "model.layers.12.mlp.up_proj.weight", True),
    ("model.layers.[0-9]+.mlp.*", "base_model.model.model.layers.1.mlp.up_proj.weight", False),  # from the start
    ("layers.1", "model.layers.1.mlp.up_proj.weight", False),
    ("transformer.blocks.[0-7].", "transformer.blocks.3.ffn.weight", True),
])
def test_unfrozen_patterns_match_as_axolotl_matches(pattern, name, matches):
    regex, rows = parse_unfrozen_pattern(pattern)
    assert bool(regex.match(name)) is matches and rows is None


def test_unfrozen_pattern_row_ranges():
    assert parse_unfrozen_pattern("^model.embed_tokens.weight$[:32000]")[1] == (0, 32000)
    assert parse_unfrozen_pattern("embed_tokens.weight[5:]")[1] == (5, None)
    assert parse_unfrozen_pattern("embed_tokens.weight[7]")[1] == (7, 8)
    assert "unfrozen_parameters" in problem_keys(BASE + "unfrozen_parameters: ['embed[9:3]']")
    assert "unfrozen_parameters" in problem_keys(BASE + "unfrozen_parameters: ['(unclosed']")


def test_unfrozen_parameters_train_only_the_matching_parameters(make_recipe):
    recipe = load_recipe(make_recipe(adapter=None, unfrozen_parameters=["^lm_head.weight$", "model.layers.1.mlp",
                                                                        "model.language_model.*"]))
    notes = []
    model = load_model(recipe, CPU, note=notes.append)
    trained = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    assert trained == ["lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                       "model.layers.1.mlp.up_proj.weight"]
    assert "parameters train" in notes[0]
    assert notes[1:] == ["warning: unfrozen_parameters: 'model.language_model.*' matches no parameter of this model"]


def test_unfrozen_row_range_zeroes_the_other_rows_gradient(make_recipe):
    recipe = load_recipe(make_recipe(adapter=None, unfrozen_parameters=["^model.embed_tokens.weight$[:10]"]))
    model = load_model(recipe, CPU)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.requires_grad
    ids = torch.arange(0, 40).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert embeddings.grad[:10].abs().sum() > 0
    assert torch.all(embeddings.grad[10:] == 0)


def test_unfrozen_parameters_that_match_nothing_are_refused(make_recipe):
    recipe = load_recipe(make_recipe(adapter=None, unfrozen_parameters=["^transformer.h.0"]))
    with pytest.raises(ModelError, match="no parameter name matches"):
        load_model(recipe, CPU)


def test_unfrozen_parameters_with_an_adapter_are_refused():
    assert "unfrozen_parameters" in problem_keys(BASE + "adapter: lora\nunfrozen_parameters: ['^lm_head.weight$']")
    assert "gradient_checkpointing_kwargs" in problem_keys(
        BASE + "unfrozen_parameters: [lm_head]\ngradient_checkpointing_kwargs: {use_reentrant: true}")
    # The real config: gemma-3 QLoRA with unfrozen_parameters stays refused, with the reason.
    result = import_config(CORPUS_DIR / "gemma3__gemma-3-1b-qlora.yml")
    assert [key for key, _ in result.refused] == ["unfrozen_parameters"]
    assert "LoRA-wrapped names" in result.refused[0][1]


def test_real_full_finetune_keeps_its_unfrozen_parameters():
    _, recipe = imported("qwen3.5__27b-fft.yaml")
    assert recipe.adapter is None
    assert recipe.unfrozen_parameters == ["model.language_model.*", "lm_head.*"]
    _, mixtral = imported("mistral__mixtral__mixtral_22.yml")
    assert mixtral.unfrozen_parameters[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    assert mixtral.overrides_of_model_config == {"output_router_logits": True}
    assert mixtral.tokens == ["<|im_start|>"]


# ---------------------------------------------------------------- model_config and revision_of_model


def test_model_config_overrides_reach_the_loaded_model(make_recipe, tiny_model_dir):
    recipe = load_recipe(make_recipe(model_config={"max_position_embeddings": 512, "rms_norm_eps": 1e-3}))
    assert recipe.overrides_of_model_config == {"max_position_embeddings": 512, "rms_norm_eps": 1e-3}
    model = load_model(recipe, CPU)
    assert model.config.max_position_embeddings == 512 and model.config.rms_norm_eps == 1e-3
    # validate reads the overridden limit: the tiny model's own is 256
    longer = load_recipe(make_recipe("long.yaml", sequence_len=400, model_config={"max_position_embeddings": 512}))
    assert check_model_source(longer) == []
    assert [key for key, _ in check_model_source(load_recipe(make_recipe("short.yaml", sequence_len=400)))] == [
        "sequence_len"]
    assert "overrides_of_model_config" in problem_keys(BASE + "model_config: {a: 1}\noverrides_of_model_config: {a: 2}")


def test_real_mixtral_qlora_keeps_its_model_config():
    result, recipe = imported("mistral__mixtral__mixtral.yml")
    assert recipe.overrides_of_model_config == {"output_router_logits": True}
    assert ("model_config", "overrides_of_model_config: {\"output_router_logits\": true}") in [
        (old, new) for old, new, _ in result.mapped]


def test_revision_of_model(make_recipe):
    _, recipe = imported("mimo__mimo-7b-qlora.yaml")
    assert recipe.revision_of_model == "6299b5a"
    assert check_model_source(recipe) == []  # a hub id: validate stays offline
    assert parse_recipe(BASE + "model_revision: v1").revision_of_model == "v1"  # Axolotl's alias
    local = load_recipe(make_recipe(revision_of_model="abc1234"))
    assert [key for key, _ in check_model_source(local)] == ["revision_of_model"]
    # The revision is recorded in the adapter's config, so the adapter names the base it was trained on.
    model = load_model(local, CPU)
    assert model.peft_config["default"].revision == "abc1234"


# ---------------------------------------------------------------- peft options


def test_rslora_dora_and_fan_in_fan_out_reach_peft(make_recipe):
    model = load_model(load_recipe(make_recipe(peft_use_rslora=True, lora_r=4, lora_alpha=16)), CPU)
    config = model.peft_config["default"]
    assert config.use_rslora and not config.use_dora
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(16 / math.sqrt(4))  # not 16 / 4
    dora = load_model(load_recipe(make_recipe("dora.yaml", peft_use_dora=True)), CPU)
    assert dora.peft_config["default"].use_dora
    assert any("lora_magnitude_vector" in name for name, _ in dora.named_parameters())
    fan = load_model(load_recipe(make_recipe("fan.yaml", lora_fan_in_fan_out=True)), CPU)
    assert fan.peft_config["default"].fan_in_fan_out is False  # peft turns it off for nn.Linear, as in Axolotl


def test_lora_target_parameters_reach_peft(make_recipe):
    recipe = load_recipe(make_recipe(lora_target_modules=["q_proj"], lora_target_parameters=["mlp.up_proj.weight"]))
    model = load_model(recipe, CPU)
    assert model.peft_config["default"].target_parameters == ["mlp.up_proj.weight"]
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any(".mlp.up_proj.lora_A." in name for name in trained)
    # With dropout: peft's parameter LoRA has none, so the dropout goes to the linear targets (tests/test_moe.py).
    assert parse_recipe(BASE + "adapter: lora\nlora_target_parameters: [x.weight]\nlora_dropout: 0.1").lora_dropout == 0.1


def test_real_configs_with_peft_options():
    _, rslora = imported("deepseek-v2__qlora-fsdp-2_5.yaml")
    assert rslora.peft_use_rslora is True
    _, pythia = imported("archived__pythia__lora.yml")
    assert pythia.lora_fan_in_fan_out is True
    _, loftq = imported("llama-2__loftq.yml")
    assert loftq.peft.loftq_config.loftq_bits == 4 and loftq.adapter == "lora" and not loftq.quantized
    # peft's LoftQ initialization runs on CUDA only: said before anything loads
    assert "peft" in [key for key, _ in kernel_problems(loftq, cuda_available=False)]
    assert "peft" not in [key for key, _ in kernel_problems(loftq, cuda_available=True)]
    assert "peft" in problem_keys(BASE + "adapter: qlora\npeft: {loftq_config: {loftq_bits: 4}}")


def test_lora_options_need_an_adapter():
    assert set(problem_keys(BASE + "peft_use_rslora: true\npeft_use_dora: true")) == {"peft_use_rslora", "peft_use_dora"}


# ---------------------------------------------------------------- bnb_config_kwargs, eta_min


def test_bnb_config_kwargs_carry_over_what_ftclip_has(tmp_path):
    result, recipe = imported("gemma4__31b-qlora.yaml")
    assert recipe.bnb_4bit_use_double_quant is True
    config = tmp_path / "bnb.yml"
    config.write_text(BASE + "adapter: qlora\nlora_target_linear: true\nbnb_config_kwargs:\n  bnb_4bit_quant_type: fp4\n"
                      "  bnb_4bit_use_double_quant: false\n  bnb_4bit_quant_storage: bfloat16\n")
    recipe = parse_recipe(import_config(config).text)
    assert (recipe.bnb_4bit_quant_type, recipe.bnb_4bit_use_double_quant) == ("fp4", False)
    config.write_text(BASE + "adapter: qlora\nlora_target_linear: true\nbnb_config_kwargs: {llm_int8_threshold: 4.0}\n")
    assert [key for key, _ in import_config(config).refused] == ["bnb_config_kwargs"]


def test_eta_min_is_dropped_because_axolotl_discards_it():
    result, recipe = imported("qat_nvfp4__Math-Qwen2.5-72B_baseline.yml")
    assert "eta_min" in dict(result.dropped)
    assert recipe.lr_scheduler == "cosine" and recipe.min_lr_ratio == 0.0  # the schedule Axolotl runs


# ---------------------------------------------------------------- adamw_torch_4bit (torchao)


def test_adamw_torch_4bit_is_imported_and_validate_names_torchao():
    result, recipe = imported("qwen3.5__27b-qlora.yaml")
    assert recipe.optimizer == "adamw_torch_4bit"
    installed = importlib.util.find_spec("torchao") is not None
    problems = [message for key, message in kernel_problems(recipe, cuda_available=True) if key == "optimizer"]
    assert bool(problems) is not installed
    if problems:
        assert "ftclip[torchao]" in problems[0]


def test_adamw_torch_4bit_steps_on_the_cpu():
    pytest.importorskip("torchao")
    from ftclip.optim import build_optimizer

    recipe = parse_recipe(BASE + "optimizer: adamw_torch_4bit\nadam_beta2: 0.95\nweight_decay: 0.01\n")
    weight = torch.nn.Parameter(torch.randn(256, 256))
    optimizer = build_optimizer(recipe, [weight])
    assert type(optimizer).__name__ == "AdamW4bit" and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    before = weight.detach().clone()
    (weight ** 2).sum().backward()
    optimizer.step()
    assert not torch.equal(before, weight.detach())


@pytest.mark.slow
def test_a_run_with_unfrozen_parameters_changes_only_those(make_recipe, tiny_model_dir):
    from safetensors.torch import load_file

    from ftclip.train import train

    recipe_path = make_recipe(adapter=None, max_steps=3, unfrozen_parameters=["^lm_head.weight$", "model.layers.1.mlp"],
                              optimizer="adamw_torch")
    result = train(load_recipe(recipe_path))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(result.artifact / "model.safetensors")
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == ["lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.gate_proj.weight",
                       "model.layers.1.mlp.up_proj.weight"]


def test_keys_axolotl_itself_rejects_are_refused_with_that_reason(tmp_path):
    config = tmp_path / "stop.yml"
    config.write_text(BASE + "val_set_size: 0.05\nevals_per_epoch: 4\nsaves_per_epoch: 1\nearly_stopping_patience: 3\n")
    assert "Axolotl itself rejects" in dict(import_config(config).refused)["early_stopping_patience"]
    config.write_text(BASE + "val_set_size: 0.05\neval_steps: 10\nsave_steps: 25\nearly_stopping_patience: 3\n")
    assert "eval_steps dividing save_steps" in dict(import_config(config).refused)["early_stopping_patience"]
    config.write_text(BASE + "eval_steps: 10\nsave_steps: 20\nearly_stopping_patience: 3\n")  # nothing held out
    assert "held-out set" in dict(import_config(config).refused)["early_stopping_patience"]


@pytest.mark.slow
def test_a_run_with_unfrozen_parameters_resumes_to_the_same_weights(make_recipe, tmp_path):
    from safetensors.torch import load_file

    from ftclip.train import train

    settings = dict(adapter=None, max_steps=4, save_steps=2, unfrozen_parameters=["^lm_head.weight$"],
                    optimizer="adamw_torch")
    straight = make_recipe(**settings)
    first = train(load_recipe(straight))
    again = make_recipe("again.yaml", **settings, output_dir=str(tmp_path / "again"))
    resumed = train(load_recipe(again), resume=first.output_dir / "checkpoints" / "step-2")
    assert resumed.resumed_from is not None
    one, two = load_file(first.artifact / "model.safetensors"), load_file(resumed.artifact / "model.safetensors")
    assert all(torch.equal(one[name], two[name]) for name in one)
