"""`ftclip merge`: the merged model, loaded with plain transformers, computes what base + adapter computes."""

from __future__ import annotations

import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.recipe import load_recipe
from ftclip.train import train


def test_merge_matches_base_plus_adapter(make_recipe, tiny_model_dir, tmp_path):
    path = make_recipe(max_steps=4, learning_rate=2e-2)
    result = train(load_recipe(path), Console(quiet=True))
    merged_dir = tmp_path / "merged-model"
    done = CliRunner().invoke(app, ["merge", str(result.output_dir), "--output", str(merged_dir)])
    assert done.exit_code == 0, done.output

    tokens = torch.randint(0, 200, (2, 24))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(tokens).logits
        with_adapter = PeftModel.from_pretrained(base, result.artifact).eval()(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        merged_logits = merged(tokens).logits
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (with_adapter - base_logits).abs().max() > 1e-3  # the adapter changed something worth merging
    torch.testing.assert_close(merged_logits, with_adapter, atol=1e-5, rtol=1e-4)


def test_merge_without_an_adapter_exits_2(tmp_path):
    done = CliRunner().invoke(app, ["merge", str(tmp_path)])
    assert done.exit_code == 2 and "no LoRA adapter here" in done.output


def _saved_dtypes(folder) -> tuple[str, set]:
    import json

    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    tensors = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            tensors |= {weights.get_tensor(name).dtype for name in weights.keys()}
    return config.get("dtype") or config.get("torch_dtype"), tensors


def test_merge_saves_in_the_precision_the_run_trained_in(make_recipe, tmp_path):
    path = make_recipe(max_steps=2, bf16=True)
    result = train(load_recipe(path), Console(quiet=True))
    done = CliRunner().invoke(app, ["merge", str(result.output_dir)])
    assert done.exit_code == 0, done.output
    assert "saving in bfloat16 (the run trained with bf16: true)" in done.output
    assert _saved_dtypes(result.output_dir / "merged") == ("bfloat16", {torch.bfloat16})


def test_bf16_auto_merges_as_it_resolved_in_training_and_dtype_chooses(make_recipe, tmp_path):
    from ftclip.checkpoint import RECIPE_FILE

    path = make_recipe(max_steps=2, bf16="auto")
    result = train(load_recipe(path), Console(quiet=True))
    saved_recipe = result.artifact / RECIPE_FILE
    assert "# bf16: auto resolved to float32 on the training device" in saved_recipe.read_text()  # CPU: no bf16
    done = CliRunner().invoke(app, ["merge", str(result.output_dir), "--output", str(tmp_path / "auto")])
    assert done.exit_code == 0 and _saved_dtypes(tmp_path / "auto") == ("float32", {torch.float32})

    # What a bf16-capable GPU run writes: the merge follows the record, not this CPU machine.
    saved_recipe.write_text(saved_recipe.read_text().replace("resolved to float32", "resolved to bfloat16"))
    done = CliRunner().invoke(app, ["merge", str(result.output_dir), "--output", str(tmp_path / "gpu-run")])
    assert done.exit_code == 0 and _saved_dtypes(tmp_path / "gpu-run") == ("bfloat16", {torch.bfloat16})

    done = CliRunner().invoke(app, ["merge", str(result.output_dir), "--output", str(tmp_path / "fp16"), "--dtype", "fp16"])
    assert done.exit_code == 0 and _saved_dtypes(tmp_path / "fp16") == ("float16", {torch.float16})
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16")
    assert merged.dtype == torch.float16

    bad = CliRunner().invoke(app, ["merge", str(result.output_dir), "--dtype", "int8"])
    assert bad.exit_code == 2 and "--dtype int8: choose auto, bf16, fp16, fp32" in bad.output
