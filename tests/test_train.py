"""End-to-end training on tiny saved models, through the same loading path users hit."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from ftclip.modeling import load_model
from ftclip.recipe import load_recipe
from ftclip.train import train


def run(recipe_path):
    return train(load_recipe(recipe_path), Console(quiet=True))


def test_lora_run_lowers_loss_and_writes_adapter_and_metrics(make_recipe, tiny_model_dir, tmp_path):
    # micro_batch_size 8 = the whole set each step, so each logged loss is measured on the same data.
    path = make_recipe(max_steps=12, learning_rate=1e-2, logging_steps=2, micro_batch_size=8)
    result = run(path)
    assert result.last_loss < result.first_loss - 0.25  # a random 2-layer model: ~7.0 -> ~6.5 in 12 steps
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 8, 10, 12]
    assert result.clipped_steps == lines[-1]["clipped_steps"] == round(sum(line["clip_rate"] * 2 for line in lines))
    for line in lines:
        assert {"step", "loss", "grad_norm", "clip_coef", "lr", "post_clip_norm", "clip_rate"} <= set(line)
        assert line["grad_norm_min"] <= line["grad_norm"] <= line["grad_norm_max"]
        assert line["post_clip_norm"] <= 1.0 + 1e-5
        assert 0 < line["clip_coef"] <= 1
    adapter = result.artifact
    assert {"adapter_model.safetensors", "adapter_config.json", "ftclip_recipe.yaml", "tokenizer.json"} <= {
        p.name for p in adapter.iterdir()
    }
    assert not list(result.output_dir.glob(".*tmp*")), "no staging folder may be left behind"


def test_saved_adapter_loads_with_plain_transformers_and_peft(make_recipe, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run(make_recipe(max_steps=10, learning_rate=1e-2))
    tokenizer = AutoTokenizer.from_pretrained(result.artifact)
    batch = tokenizer(["### Response:\nThe capital of France is Paris."], return_tensors="pt")

    def loss_of(model):
        with torch.no_grad():
            return model(**batch, labels=batch["input_ids"]).loss.item()

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_loss = loss_of(base)
    tuned = PeftModel.from_pretrained(base, result.artifact)
    assert loss_of(tuned) < base_loss
    weights = load_file(result.artifact / "adapter_model.safetensors")
    assert any("lora_B" in name and value.abs().sum() > 0 for name, value in weights.items())


def test_accumulation_gives_the_same_gradient_as_one_big_batch(make_recipe, tmp_path):
    """micro_batch_size 1 × 4 accumulation steps == micro_batch_size 4 × 1: same loss, same pre-clip
    norm, same weights after the step (the loss is normalized over all tokens of the step)."""
    runs = []
    for name, (micro, accumulation) in {"small": (1, 4), "big": (4, 1)}.items():
        path = make_recipe(
            f"{name}.yaml", micro_batch_size=micro, gradient_accumulation_steps=accumulation, max_steps=1,
            output_dir=str(tmp_path / name), gradient_clipping={"mode": "norm", "max_norm": 1e-3},
        )
        runs.append(run(path))
    small, big = runs
    assert small.records[0]["grad_norm"] == pytest.approx(big.records[0]["grad_norm"], rel=1e-5)
    assert small.records[0]["loss"] == pytest.approx(big.records[0]["loss"], rel=1e-5)
    assert small.records[0]["clip_coef"] < 1
    a = load_file(small.artifact / "adapter_model.safetensors")
    b = load_file(big.artifact / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_full_fine_tune_saves_a_loadable_model(make_recipe, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result = run(make_recipe(adapter=None, max_steps=3, optimizer="sgd", learning_rate=0.1))
    assert result.artifact.name == "model"
    tuned = AutoModelForCausalLM.from_pretrained(result.artifact)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [not torch.equal(a, b) for a, b in zip(tuned.parameters(), base.parameters())]
    assert any(changed)


def test_value_clipping_and_off_modes_train(make_recipe, tmp_path):
    for mode in ({"mode": "value", "max_value": 0.01}, {"mode": "off"}):
        result = run(make_recipe(gradient_clipping=mode, max_steps=3, output_dir=str(tmp_path / mode["mode"])))
        assert all(record["clip_coef"] == 1.0 for record in result.records)


def test_qlora_uses_4bit_linear_layers_and_8bit_adamw(make_recipe, tmp_path):
    import bitsandbytes as bnb

    path = make_recipe(adapter="qlora", load_in_4bit=True, optimizer="adamw_8bit", max_steps=10, learning_rate=3e-3,
                       micro_batch_size=8)
    recipe = load_recipe(path)
    model = load_model(recipe, torch.device("cpu"))
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    result = run(path)
    assert result.last_loss < result.first_loss - 0.25
    assert (result.artifact / "adapter_model.safetensors").is_file()


def test_rerun_replaces_the_artifact_whole(make_recipe):
    path = make_recipe(max_steps=2)
    first = run(path).artifact
    second = run(path).artifact
    assert first == second and (second / "adapter_model.safetensors").is_file()
    assert not list(second.parent.glob(".adapter*"))


def test_tensorboard_scalars_use_the_metrics_names(make_recipe):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(make_recipe(max_steps=4, logging_steps=2))
    events = EventAccumulator(str(result.output_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "grad_norm", "grad_norm_max", "post_clip_norm", "clip_coef", "clip_rate", "lr", "skipped_steps"} <= tags
    assert [e.step for e in events.Scalars("grad_norm")] == [2, 4]
    assert events.Scalars("grad_norm")[-1].value == pytest.approx(result.records[-1]["grad_norm"], rel=1e-6)


def test_eval_loss_every_eval_steps(make_recipe):
    result = run(make_recipe(max_steps=5, eval_steps=2, val_set_size=2))
    evaluated = {r["step"]: r["eval_loss"] for r in result.records if "eval_loss" in r}
    assert sorted(evaluated) == [2, 4, 5]  # every 2 steps, and at the end
    assert result.eval_loss == evaluated[5] and all(0 < loss < 20 for loss in evaluated.values())
