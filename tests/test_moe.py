"""MoE models: LoRA on the fused experts (peft target_parameters) with and without 4-bit experts
(quantize_moe_experts), all-linear on an MoE model, the router's auxiliary loss, the clip over every trainable
tensor, and runs that train, resume exactly and merge. Tiny Qwen3-MoE, Mixtral and gpt-oss models built from
a config, on the CPU (bitsandbytes 0.50 quantizes there)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import ALPACA, QUICKSTART_MODEL, TOKENIZER_FILES, write_jsonl, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.errors import RecipeError
from ftclip.recipe import load_recipe, parse_recipe
from ftclip.train import train

BASE = "base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"


def _tiny(kind: str, folder):
    """A tiny MoE model of the given architecture with the quickstart's tokenizer, saved to folder."""
    from transformers import (
        AutoTokenizer,
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    for name in TOKENIZER_FILES:
        shutil.copy(QUICKSTART_MODEL / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_experts_per_tok=2,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                                   decoder_sparse_step=1, **common))
    elif kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=32, num_local_experts=4, **common))
    else:
        model = GptOssForCausalLM(GptOssConfig(intermediate_size=32, num_local_experts=4, sliding_window=32,
                                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                               **common))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory):
    return _tiny("qwen3_moe", tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture(scope="session")
def gpt_oss_dir(tmp_path_factory):
    return _tiny("gpt_oss", tmp_path_factory.mktemp("tiny-gpt-oss"))


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return _tiny("mixtral", tmp_path_factory.mktemp("tiny-mixtral"))


def _recipe(tmp_path, model_dir, **overrides):
    data = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    settings = dict(lora_target_linear=True, lora_r=4, lora_alpha=8, max_steps=6, learning_rate=1e-2,
                    overrides_of_model_config={"output_router_logits": True, "router_aux_loss_coef": 0.01})
    settings.update(overrides)
    return write_recipe(tmp_path, model_dir, data, **settings)


def _load(path):
    from ftclip.modeling import load_model, load_tokenizer

    recipe = load_recipe(path)
    return load_model(recipe, torch.device("cpu"), load_tokenizer(recipe))


# ---------------------------------------------------------------- LoRA targets


def test_all_linear_on_an_moe_model_adapts_attention_and_experts_not_the_router(qwen3_moe_dir, tmp_path):
    model = _load(_recipe(tmp_path, qwen3_moe_dir))
    config = model.peft_config["default"]
    assert sorted(config.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any(".mlp.experts.lora_A." in name for name in trainable)
    assert any(".mlp.experts.base_layer.lora_A." in name for name in trainable)  # both expert weights (nested)
    assert not any(".mlp.gate." in name for name in trainable)  # the router stays frozen


@pytest.mark.parametrize("kind", ["gpt_oss", "mixtral"])
def test_all_linear_reaches_the_experts_of_other_architectures(kind, gpt_oss_dir, mixtral_dir, tmp_path):
    # peft's own all-linear adapts no gpt-oss expert at all (and Mixtral's router too): ftclip names them itself.
    model = _load(_recipe(tmp_path, gpt_oss_dir if kind == "gpt_oss" else mixtral_dir))
    assert sorted(model.peft_config["default"].target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert not any(".router." in name or ".mlp.gate." in name for name in trainable)


def test_peft_name_conversion_is_reported_not_silent(tmp_path):
    # GLM-4.5's dense first layer and shared experts have gate_proj/up_proj/down_proj linears, names peft 0.21 reads
    # as the experts' transformers-4 names on this architecture: ftclip keeps the experts at rank r and says which
    # linear layers peft leaves out.
    from transformers import AutoTokenizer, Glm4MoeConfig, Glm4MoeForCausalLM

    from ftclip.modeling import load_model

    folder = tmp_path / "glm"
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(QUICKSTART_MODEL / name, folder / name)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    Glm4MoeForCausalLM(Glm4MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                                     topk_group=1, first_k_dense_replace=1)).save_pretrained(folder)
    notes = []
    model = load_model(load_recipe(_recipe(tmp_path, folder)), torch.device("cpu"), note=notes.append)
    experts = model.get_base_model().model.layers[1].mlp.experts
    assert experts.r["default"] == 4 and experts.base_layer.r["default"] == 4  # both nested wrappers
    assert any("model.layers.0.mlp.gate_proj" in line and "get no LoRA" in line for line in notes), notes


def test_a_dense_model_keeps_peft_all_linear(make_recipe):
    model = _load(make_recipe(lora_target_linear=True))
    assert model.peft_config["default"].target_parameters in (None, [], set())


def test_lora_dropout_goes_to_the_linear_layers_and_not_the_experts(qwen3_moe_dir, tmp_path):
    # peft refuses dropout on a ParamWrapper ("does not work with lora_dropout != 0"): the load must not stop.
    from peft.tuners.lora import ParamWrapper

    model = _load(_recipe(tmp_path, qwen3_moe_dir, lora_dropout=0.05))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.lora_dropout["default"], torch.nn.Dropout) and q_proj.lora_dropout["default"].p == 0.05
    experts = model.get_base_model().model.layers[0].mlp.experts
    assert isinstance(experts, ParamWrapper) and isinstance(experts.lora_dropout["default"], torch.nn.Identity)


# ---------------------------------------------------------------- 4-bit experts


def _dequantized_twin(quantized_model, model_dir):
    """The same model unquantized, its expert weights set to the 4-bit ones dequantized, its LoRA weights
    copied by name: what the quantized model must compute."""
    import bitsandbytes
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    quantized_base = quantized_model.get_base_model()
    for layer, twin in zip(quantized_base.model.layers, base.model.layers):
        experts = layer.mlp.experts.get_base_layer()
        for name in ("gate_up_proj", "down_proj"):
            getattr(twin.mlp.experts, name).data.copy_(getattr(experts, name))  # the dequantized weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # load_in_4bit's Linear4bit layers
            weight = getattr(layer.self_attn, name).get_base_layer().weight
            dequantized = bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)
            getattr(twin.self_attn, name).weight.data.copy_(dequantized)
    config = quantized_model.peft_config["default"]
    twin = get_peft_model(base, LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                                           target_parameters=config.target_parameters))
    quantized_lora = {name: p for name, p in quantized_model.named_parameters() if "lora_" in name}
    twin_lora = {name: p for name, p in twin.named_parameters() if "lora_" in name}
    assert quantized_lora.keys() == twin_lora.keys()  # the adapter's names are the unquantized model's
    with torch.no_grad():
        for name, parameter in quantized_lora.items():
            parameter.normal_(0, 0.2)  # lora_B starts at zero: make every update count
            twin_lora[name].copy_(parameter)
    return twin


def test_4bit_experts_compute_what_the_dequantized_base_with_the_same_lora_computes(qwen3_moe_dir, tmp_path):
    model = _load(_recipe(tmp_path, qwen3_moe_dir, load_in_4bit=True, quantize_moe_experts=True, lora_dropout=0.0))
    twin = _dequantized_twin(model, qwen3_moe_dir)
    tokens = torch.randint(0, 200, (2, 16))
    for _ in range(3):  # a LoRA parametrization left behind by one forward would change the next
        model.zero_grad()
        twin.zero_grad()
        loss = model(input_ids=tokens, labels=tokens, output_router_logits=False).loss
        twin_loss = twin(input_ids=tokens, labels=tokens, output_router_logits=False).loss
        loss.backward()
        twin_loss.backward()
        # Same arithmetic on the same fp32 values; only summation order may differ.
        torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    twin_grads = {name: p.grad for name, p in twin.named_parameters() if p.requires_grad}
    for name in grads:
        torch.testing.assert_close(grads[name], twin_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(grads[name].abs().sum() > 0 for name in grads if ".experts." in name)
    experts = model.get_base_model().model.layers[0].mlp.experts.get_base_layer()
    assert [type(p).__name__ for p in experts.parametrizations["gate_up_proj"]] == ["Bnb4bitParametrization"]


def test_4bit_experts_take_about_a_quarter_of_their_bf16_bytes(qwen3_moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from ftclip.expert_quant import ExpertQuantization, quantizing_experts_on_load

    quantization = ExpertQuantization()
    with quantizing_experts_on_load(quantization):
        AutoModelForCausalLM.from_pretrained(qwen3_moe_dir, dtype=torch.bfloat16)
    tensors, values, stored, original = quantization.summary()
    assert tensors == 4 and values == 2 * (4 * 64 * 64 + 4 * 64 * 32)
    assert original == 2 * values  # bf16
    # An expert stack of a real model's size (8 experts × 512 × 256): NF4 is half a byte per value, plus one
    # 8-bit (double-quantized) constant per 64 values and two small lookup tables per tensor (~1 KiB, which
    # is what dominates the tiny model's 24 KiB above).
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(torch.randn(8, 512, 256, dtype=torch.bfloat16), requires_grad=False)
    sized = ExpertQuantization()
    sized.quantize(experts, "gate_up_proj")
    _, values, stored, original = sized.summary()
    assert original == 2 * values
    assert 0.25 < stored / original < 0.26, stored / original  # 0.25 + 1/128 + tables/2 MiB


# ---------------------------------------------------------------- router loss, clip


def test_router_aux_loss_is_added_weighted_by_tokens_and_reported(qwen3_moe_dir, tmp_path):
    from ftclip.loss import causal_lm_loss, language_model_loss

    model = _load(_recipe(tmp_path, qwen3_moe_dir, lora_dropout=0.0))
    tokens = torch.randint(0, 200, (2, 12))
    labels = tokens.clone()
    labels[:, :5] = -100
    inputs = {"input_ids": tokens, "labels": labels, "attention_mask": torch.ones_like(tokens)}
    trained = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        chunked = language_model_loss(model, inputs, 2 * trained)
        plain = language_model_loss(model, inputs, 2 * trained, chunked=False)
        output = model(**inputs)
    # Half the step's tokens are here: half the model's own aux loss, × the coefficient, joins the loss.
    torch.testing.assert_close(chunked.router_aux_loss, output.aux_loss / 2)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
    model.get_base_model().config.output_router_logits = False
    with torch.no_grad():
        without = causal_lm_loss(model, inputs, 2 * trained)
    torch.testing.assert_close(chunked.loss - without, 0.01 * output.aux_loss / 2, rtol=1e-4, atol=1e-7)


def test_the_clip_covers_every_trainable_tensor_expert_lora_included(qwen3_moe_dir, tmp_path):
    from ftclip.clip import GradientClipper
    from ftclip.recipe import GradientClipping

    model = _load(_recipe(tmp_path, qwen3_moe_dir, load_in_4bit=True, quantize_moe_experts=True))
    trainable = [p for p in model.parameters() if p.requires_grad]
    clipper = GradientClipper(GradientClipping(mode="off"), trainable)
    tokens = torch.randint(0, 200, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert clipper.flat_grads.intact()  # every grad, the experts' LoRA too, is a view into the flat buffer
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's is not.
    expert_grads = [p.grad for name, p in model.named_parameters() if p.requires_grad and ".experts." in name
                    and "lora_B" in name]
    assert len(expert_grads) == 4 and all(g.abs().sum() > 0 for g in expert_grads)
    reference = torch.nn.utils.get_total_norm([p.grad for p in trainable])
    # The flat buffer's norm sums per-row partials in float64; torch's is a float32 foreach norm: equal to
    # float32 rounding over a few thousand values.
    torch.testing.assert_close(clipper.clip().pre_clip_norm, reference.to(torch.float32), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- runs: train, resume, merge


def _losses(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [loss for line in lines for loss in json.loads(line)["per_step"]["loss"]]


@pytest.mark.slow
def test_4bit_expert_run_trains_resumes_exactly_and_merges(qwen3_moe_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = dict(load_in_4bit=True, quantize_moe_experts=True, lora_dropout=0.05, max_steps=8, save_steps=4,
               save_total_limit=0, micro_batch_size=2, gradient_accumulation_steps=2)
    reference = train(load_recipe(_recipe(tmp_path, qwen3_moe_dir, output_dir=str(tmp_path / "reference"), **run)),
                      Console(quiet=True))
    losses = _losses(reference.output_dir)
    assert sum(losses[-2:]) < sum(losses[:2])  # it learns
    records = [json.loads(line) for line in (reference.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(record["router_aux_loss"] > 0 for record in records)

    resumed_dir = tmp_path / "resumed"
    path = _recipe(tmp_path, qwen3_moe_dir, output_dir=str(resumed_dir), **run)
    train(load_recipe(path), Console(quiet=True))
    shutil.rmtree(resumed_dir / "checkpoints" / "step-8")
    (resumed_dir / "checkpoints" / "latest").write_text("step-4")
    result = train(load_recipe(path), Console(quiet=True))
    assert result.resumed_from == resumed_dir / "checkpoints" / "step-4"
    assert _losses(resumed_dir) == losses
    weights = load_file(resumed_dir / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference.output_dir / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == expected.keys() and any(".experts." in name for name in weights)
    assert all(torch.equal(weights[name], expected[name]) for name in weights)

    merged_dir = tmp_path / "merged"
    done = CliRunner().invoke(app, ["merge", str(reference.output_dir), "--output", str(merged_dir)])
    assert done.exit_code == 0, done.output
    tokens = torch.randint(0, 200, (2, 16))
    base = AutoModelForCausalLM.from_pretrained(qwen3_moe_dir)
    with torch.no_grad():
        base_logits = base(tokens).logits
        with_adapter = PeftModel.from_pretrained(base, reference.artifact).eval()(tokens).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(tokens).logits
    assert (with_adapter - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(merged_logits, with_adapter, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_gpt_oss_run_with_transposed_experts_trains_and_merges(gpt_oss_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train(load_recipe(_recipe(tmp_path, gpt_oss_dir, lora_dropout=0.0, max_steps=6)), Console(quiet=True))
    losses = _losses(result.output_dir)
    assert losses[-1] < losses[0]
    done = CliRunner().invoke(app, ["merge", str(result.output_dir)])
    assert done.exit_code == 0, done.output
    tokens = torch.randint(0, 200, (2, 16))
    base = AutoModelForCausalLM.from_pretrained(gpt_oss_dir)
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(base, result.artifact).eval()(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "merged").eval()(tokens).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- recipe checks


@pytest.mark.parametrize("extra, message", [
    ("quantize_moe_experts: true\nadapter: lora\n", "needs load_in_4bit"),
    ("quantize_moe_experts: true\nadapter: lora\nload_in_8bit: true\n", "4 bits only"),
    ("quantize_moe_experts: true\nload_in_4bit: true\n", "adapter"),
])
def test_quantize_moe_experts_needs_4bit_and_an_adapter(extra, message):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(BASE + extra)
    assert message in str(caught.value)


def test_lora_target_parameters_with_dropout_is_valid():
    recipe = parse_recipe(BASE + "adapter: lora\nlora_dropout: 0.05\nlora_target_parameters: [mlp.experts.down_proj]\n")
    assert recipe.lora_dropout == 0.05
