"""qat: quantization-aware training through torchao: the fake-quantized forward (from its step), the quantized
model saved at the end computing what the training simulated, exact resume, and the settings refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from ftclip.errors import RecipeError
from ftclip.modeling import load_model
from ftclip.recipe import QATSettings, load_recipe, parse_recipe
from ftclip.train import train

pytest.importorskip("torchao")

# The tiny Llama's widths (64 hidden, 128 intermediate) split into groups of 8.
QAT = {"weight_dtype": "int4", "activation_dtype": "int8", "group_size": 8}
BASE = "base_model: org/model\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n"


def _qat_recipe(make_recipe, name: str = "recipe.yaml", **overrides):
    settings = dict(adapter=None, qat=QAT, learning_rate=1e-3, max_steps=6, micro_batch_size=2)
    settings.update(overrides)
    return make_recipe(name, **settings)


def test_prepare_fake_quantizes_the_decoder_linears_not_lm_head(make_recipe):
    notes = []
    model = load_model(load_recipe(_qat_recipe(make_recipe)), torch.device("cpu"), note=notes.append)
    fake = {name for name, module in model.named_modules() if type(module).__name__ == "FakeQuantizedLinear"}
    assert len(fake) == 2 * 7 and "lm_head" not in fake  # q, k, v, o, gate, up, down in each of the 2 layers
    assert any("14 layers fake-quantized to weights int4, activations int8" in line for line in notes)


def test_the_saved_quantized_model_computes_what_training_simulated(make_recipe, tmp_path):
    from ftclip.qat import save_quantized

    model = load_model(load_recipe(_qat_recipe(make_recipe)), torch.device("cpu")).eval()
    model.save_pretrained(tmp_path / "model")  # model/: plain weights (fake quantization is not stored)
    saved = save_quantized(tmp_path / "model", QATSettings(**QAT), tmp_path / "quantized")
    quantized = AutoModelForCausalLM.from_pretrained(saved).eval()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(quantized.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        simulated, real, full = model(tokens).logits, quantized(tokens).logits, plain(tokens).logits
    # The fake quantization rounds exactly as the int4/int8 kernels do (same scales, same integer grid); only the
    # order of the float accumulations may differ.
    torch.testing.assert_close(real, simulated, rtol=1e-4, atol=1e-5)
    assert (simulated - full).abs().max() > 1e-2  # and the rounding is not nothing


def test_fake_quantization_starts_after_its_step(make_recipe):
    from ftclip.qat import FakeQuantSchedule

    recipe = load_recipe(_qat_recipe(make_recipe, qat={**QAT, "fake_quant_after_n_steps": 2}))
    model = load_model(recipe, torch.device("cpu")).eval()
    plain = AutoModelForCausalLM.from_pretrained(recipe.base_model).eval()
    schedule = FakeQuantSchedule(model, recipe.qat)
    tokens = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        for step, rounded in ((1, False), (2, False), (3, True), (4, True)):
            schedule.before_step(step)
            differs = (model(tokens).logits - plain(tokens).logits).abs().max() > 1e-3
            assert bool(differs) == rounded, step


@pytest.mark.slow
def test_a_qat_run_resumes_exactly_and_saves_model_and_quantized(make_recipe, tmp_path):
    run = dict(qat={**QAT, "fake_quant_after_n_steps": 2}, save_steps=2, save_total_limit=0, max_steps=6)
    reference = train(load_recipe(_qat_recipe(make_recipe, output_dir=str(tmp_path / "reference"), **run)),
                      Console(quiet=True))
    assert reference.last_loss < reference.first_loss
    assert (reference.output_dir / "model" / "model.safetensors").is_file()
    assert (reference.output_dir / "quantized" / "model.safetensors").is_file()

    path = _qat_recipe(make_recipe, "resumed.yaml", output_dir=str(tmp_path / "resumed"), **run)
    train(load_recipe(path), Console(quiet=True))
    for step in (4, 6):  # back to step 2: fake quantization was still off there
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / f"step-{step}")
    (tmp_path / "resumed" / "checkpoints" / "latest").write_text("step-2")
    resumed = train(load_recipe(path), Console(quiet=True))
    assert resumed.resumed_from is not None
    assert [r["loss"] for r in resumed.records] == [r["loss"] for r in reference.records]


@pytest.mark.skipif(torch.cuda.is_available(), reason="float8 quantization kernels exist on CUDA")
def test_a_scheme_this_machine_cannot_quantize_to_keeps_model_and_says_so(make_recipe):
    from io import StringIO

    text = StringIO()
    recipe = load_recipe(_qat_recipe(make_recipe, max_steps=2, qat={"weight_dtype": "float8_e4m3fn",
                                                                      "activation_dtype": "float8_e4m3fn"}))
    result = train(recipe, Console(file=text, width=200))
    assert (result.output_dir / "model" / "model.safetensors").is_file()
    assert not (result.output_dir / "quantized").exists()
    assert "quantizing them to float8_e4m3fn here failed" in text.getvalue()


@pytest.mark.parametrize("extra, key", [
    ("qat: {weight_dtype: int8}\n", "qat"),  # torchao has no int8 weight-only QAT
    ("qat: {weight_dtype: int4, activation_dtype: int4}\n", "qat"),
    ("qat: {weight_dtype: int4}\nadapter: lora\n", "qat"),
    ("qat: {weight_dtype: nvfp4, group_size: 32}\n", "qat.group_size"),
    ("qat: {weight_dtype: float8_e4m3fn, activation_dtype: float8_e4m3fn, quantize_embedding: true}\n",
     "qat.quantize_embedding"),
])
def test_qat_settings_torchao_cannot_train_are_refused(extra, key):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(BASE + extra)
    assert key in {problem.key for problem in caught.value.problems}
