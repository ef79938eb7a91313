"""gpt-oss: a checkpoint stored in MXFP4 (model_quantization_config: Mxfp4Config, {dequantize: true}) loads
through transformers' Mxfp4Config dequantized, trains LoRA on its attention and experts with its harmony chat
template masked to the assistant's final-channel reply, and merges. The MXFP4 checkpoint is written here from a
tiny gpt-oss model by an encoder of the format (blocks of 32 FP4 values sharing a power-of-two scale), so the
weights transformers dequantizes can be compared with the values the encoder meant."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICKSTART_MODEL, TOKENIZER_FILES
from rich.console import Console
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.data.pipeline import prepare
from ftclip.errors import RecipeError
from ftclip.modeling import load_model, load_tokenizer
from ftclip.recipe import load_recipe, parse_recipe
from ftclip.train import train

REPO = Path(__file__).resolve().parent.parent
GPT_OSS_TEMPLATE = REPO / "tests" / "fixtures" / "chat_templates" / "openai-gpt-oss-120b.jinja"
# The FP4 (e2m1) values, in the order of their 4-bit codes (OCP microscaling formats spec).
FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def encode_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A gpt-oss expert weight [experts, in, out] as its checkpoint stores it: blocks [experts, out, in/32, 16]
    (two FP4 codes a byte, low nibble first) and scales [experts, out, in/32] (power-of-two exponents + 127),
    and the weight those encode."""
    rows = weight.transpose(1, 2).float()
    experts, out, width = rows.shape
    groups = rows.reshape(experts, out, width // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=2**-126) / 6.0))  # max 6
    codes = ((groups / torch.exp2(exponent)).unsqueeze(-1) - FP4).abs().argmin(-1)
    pairs = codes.reshape(experts, out, width // 32, 16, 2).to(torch.uint8)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    scales = (exponent.squeeze(-1) + 127).to(torch.uint8)
    encoded = (FP4[codes] * torch.exp2(exponent)).reshape(experts, out, width).transpose(1, 2).contiguous()
    return blocks, scales, encoded


@pytest.fixture(scope="session")
def mxfp4_gpt_oss(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(the MXFP4 checkpoint, the same model unquantized with the encoded expert weights, those weights)."""
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    plain = tmp_path_factory.mktemp("gpt-oss")
    for name in TOKENIZER_FILES:
        shutil.copy(QUICKSTART_MODEL / name, plain / name)
    tokenizer = AutoTokenizer.from_pretrained(plain)
    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=32, max_position_embeddings=512,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GptOssForCausalLM(config).save_pretrained(plain)
    quantized = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    shutil.copytree(plain, quantized, dirs_exist_ok=True)
    weights, stored, encoded = load_file(plain / "model.safetensors"), {}, {}
    for name, tensor in weights.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[f"{name}_blocks"], stored[f"{name}_scales"], encoded[name] = encode_mxfp4(tensor)
        else:
            stored[name] = tensor
    save_file(stored, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    config_file = quantized / "config.json"
    saved = json.loads(config_file.read_text())
    saved["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [  # as openai/gpt-oss-20b's
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    config_file.write_text(json.dumps(saved))
    # The reference: the plain model with the weights the MXFP4 checkpoint encodes.
    save_file({**weights, **encoded}, str(plain / "model.safetensors"), metadata={"format": "pt"})
    return quantized, plain, encoded


def _recipe(tmp_path, model_dir, **overrides) -> Path:
    records = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                             {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
               for a in range(3) for b in range(3)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    recipe = {"base_model": str(model_dir), "model_quantization_config": "Mxfp4Config",
              "model_quantization_config_kwargs": {"dequantize": True}, "adapter": "lora", "lora_target_linear": True,
              "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "datasets": [{"path": str(tmp_path / "chat.jsonl"), "type": "chat_template"}],
              "chat_template": "jinja", "chat_template_jinja": GPT_OSS_TEMPLATE.read_text(), "sequence_len": 512,
              "micro_batch_size": 3, "max_steps": 6, "learning_rate": 1e-2, "lr_scheduler": "constant",
              "output_dir": str(tmp_path / "out"), "dataset_cache_dir": str(tmp_path / "cache"), **overrides}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_mxfp4_checkpoint_is_dequantized_to_the_encoded_weights(mxfp4_gpt_oss, tmp_path):
    quantized, _, encoded = mxfp4_gpt_oss
    model = load_model(load_recipe(_recipe(tmp_path, quantized)), torch.device("cpu")).get_base_model()
    for name, expected in encoded.items():
        module_name, _, parameter = name.rpartition(".")
        loaded = getattr(model.get_submodule(module_name).get_base_layer(), parameter)
        assert torch.equal(loaded, expected), name  # FP4 × 2^k is exact in fp32
    assert not getattr(model, "is_quantized", False)  # plain weights: LoRA trains on them


def test_harmony_turns_train_the_assistants_final_channel_only(mxfp4_gpt_oss, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, mxfp4_gpt_oss[0]))
    tokenizer = load_tokenizer(recipe)
    examples = prepare(recipe, tokenizer).examples
    ids, labels = examples.input_ids(0), examples.labels(0)
    trained = tokenizer.decode([int(token) for token, label in zip(ids, labels) if label != -100])
    assert trained == "<|channel|>final<|message|>0 plus 0 is 0.<|return|>"


@pytest.mark.slow
def test_gpt_oss_from_mxfp4_trains_and_merges(mxfp4_gpt_oss, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized, plain, _ = mxfp4_gpt_oss
    result = train(load_recipe(_recipe(tmp_path, quantized)), Console(quiet=True))
    assert result.last_loss < result.first_loss
    done = CliRunner().invoke(app, ["merge", str(result.output_dir)])
    assert done.exit_code == 0, done.output
    merged_dir = result.output_dir / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())  # plain weights
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plain), result.artifact)
        expected = with_adapter.eval()(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(tokens).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra, key", [
    ("model_quantization_config: Mxfp4Config\n", "model_quantization_config_kwargs"),
    ("model_quantization_config: Mxfp4Config\nmodel_quantization_config_kwargs: {dequantize: true}\n"
     "load_in_4bit: true\nadapter: qlora\n", "model_quantization_config"),
    ("model_quantization_config_kwargs: {dequantize: true}\n", "model_quantization_config_kwargs"),
    ("model_quantization_config: FineGrainedFP8Config\n", "model_quantization_config"),
])
def test_mxfp4_settings_that_cannot_train_are_refused(extra, key):
    with pytest.raises(RecipeError) as caught:
        parse_recipe("base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: chat\n" + extra)
    assert key in {problem.key for problem in caught.value.problems}
