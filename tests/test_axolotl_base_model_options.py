"""`ftclip merge` and `ftclip chat` load an adapter's base as training loaded it: with the recipe's
overrides_of_model_config (Axolotl's model_config) and the revision adapter_config.json records (revision_of_model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.inference import find_chat_source, load_for_chat
from ftclip.recipe import load_recipe
from ftclip.train import train

REPO = Path(__file__).resolve().parent.parent
OVERRIDE = {"rms_norm_eps": 0.5}  # far from the tiny model's 1e-6: every layer's output moves visibly
TOKENS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def run_with_overrides(tmp_path_factory, tiny_model_dir):
    from tests.conftest import ALPACA, write_jsonl, write_recipe

    folder = tmp_path_factory.mktemp("overrides")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA)
    path = write_recipe(folder, tiny_model_dir, data, model_config=OVERRIDE, max_steps=4, learning_rate=2e-2)
    return train(load_recipe(path), Console(quiet=True)).output_dir


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def _trained_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    """What the run trained: the base with the override, plus the adapter."""
    config = AutoConfig.from_pretrained(base_dir)
    config.rms_norm_eps = OVERRIDE["rms_norm_eps"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, config=config)
    return _logits(PeftModel.from_pretrained(base, adapter))


def test_merge_applies_the_recipes_model_config(run_with_overrides, tiny_model_dir, tmp_path):
    merged_dir = tmp_path / "merged"
    done = CliRunner().invoke(app, ["merge", str(run_with_overrides), "--output", str(merged_dir)])
    assert done.exit_code == 0, done.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.config.rms_norm_eps == OVERRIDE["rms_norm_eps"]
    expected = _trained_logits(tiny_model_dir, run_with_overrides / "adapter")
    without_override = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                         run_with_overrides / "adapter"))
    assert (expected - without_override).abs().max() > 1e-2  # the override matters to what the model computes
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-4)


def test_chat_applies_the_recipes_model_config(run_with_overrides, tiny_model_dir):
    source = find_chat_source(run_with_overrides)
    model, _ = load_for_chat(source)
    assert model.config.rms_norm_eps == OVERRIDE["rms_norm_eps"]
    torch.testing.assert_close(_logits(model), _trained_logits(tiny_model_dir, source.folder), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the base's revision, from a hub cache (offline)

MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture
def hub_with_two_revisions(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """A Hugging Face cache holding org/tiny at two revisions: main (the tiny model) and v2 (other weights)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / MAIN)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / V2)
    torch.manual_seed(1)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    LlamaForCausalLM(config).save_pretrained(repo / "snapshots" / V2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    return cache, repo / "snapshots"


def _offline(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _embeddings(folder: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight.detach()


def test_merge_and_chat_load_the_revision_the_adapter_records(make_recipe, hub_with_two_revisions, tmp_path):
    cache, snapshots = hub_with_two_revisions
    run = train(load_recipe(make_recipe(max_steps=2)), Console(quiet=True)).output_dir
    adapter_config = run / "adapter" / "adapter_config.json"
    # As peft writes it for a run on org/tiny with revision_of_model: v2.
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()),
                                          "base_model_name_or_path": "org/tiny", "revision": "v2"}))
    merged_dir = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "ftclip", "merge", str(run), "--output", str(merged_dir)],
                          capture_output=True, text=True, timeout=120, env=_offline(cache))
    assert done.returncode == 0, done.stdout + done.stderr
    merged, v2, main = _embeddings(merged_dir), _embeddings(snapshots / V2), _embeddings(snapshots / MAIN)
    assert torch.equal(merged, v2) and not torch.equal(merged, main)  # LoRA leaves the embeddings as they are

    probe = ("from pathlib import Path; from ftclip.inference import find_chat_source, load_for_chat; "
             f"model, _ = load_for_chat(find_chat_source(Path({str(run)!r}))); "
             "print(float(model.get_input_embeddings().weight.double().sum()))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=_offline(cache))
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) == pytest.approx(float(v2.double().sum()), abs=1e-6)
