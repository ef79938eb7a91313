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
    result = train(load_recipe(path), path, Console(quiet=True))
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
