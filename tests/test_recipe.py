"""The recipe schema: every shipped recipe is accepted, and a corpus of bad ones is rejected with a
message naming the line, the key and what is allowed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ftclip.errors import RecipeError
from ftclip.recipe import Recipe, load_recipe, parse_recipe
from ftclip.reference import recipe_reference, regenerate

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
BASE = "base_model: org/model\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"


def test_there_are_shipped_recipes():
    names = {path.name for path in SHIPPED}
    assert {"quickstart.yaml", "llama-3.1-8b-lora.yaml", "llama-3.1-8b-qlora.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.datasets


def test_defaults_clip_by_norm_at_one():
    recipe = parse_recipe(BASE)
    assert recipe.gradient_clipping.mode == "norm"
    assert recipe.gradient_clipping.max_norm == 1.0
    assert recipe.gradient_clipping.norm_type == 2.0


@pytest.mark.parametrize(
    "extra, mode, max_norm",
    [
        ("gradient_clipping: 0.5\n", "norm", 0.5),
        ("max_grad_norm: 0.3\n", "norm", 0.3),
        ("max_grad_norm: 0\n", "off", 1.0),
        ("gradient_clipping: false\n", "off", 1.0),
        ("gradient_clipping: off\n", "off", 1.0),
        ("gradient_clipping: {mode: value, max_value: 0.1}\n", "value", 1.0),
    ],
)
def test_clipping_shorthands(extra, mode, max_norm):
    clipping = parse_recipe(BASE + extra).gradient_clipping
    assert (clipping.mode, clipping.max_norm) == (mode, max_norm)


def test_norm_type_inf_round_trips():
    recipe = parse_recipe(BASE + "gradient_clipping: {norm_type: inf}\n")
    assert math.isinf(recipe.gradient_clipping.norm_type)
    dumped = recipe.model_dump(mode="json")
    assert dumped["gradient_clipping"]["norm_type"] == "inf"
    assert math.isinf(Recipe.model_validate(dumped).gradient_clipping.norm_type)


def test_axolotl_lora_target_linear():
    recipe = parse_recipe(BASE + "adapter: lora\nlora_target_modules: [q_proj]\nlora_target_linear: true\n")
    assert recipe.target_modules == "all-linear"


BAD = [
    # (extra YAML, line, key, text the message must contain)
    ("max_grad_nrom: 0.5\n", 5, "max_grad_nrom", "did you mean 'max_grad_norm'"),
    ("lr: 0.001\n", 5, "lr", "did you mean 'learning_rate'"),
    ("gradient_clipping:\n  max_nrom: 2\n", 6, "gradient_clipping.max_nrom", "did you mean 'max_norm'"),
    ("max_grad_norm: 0.5\ngradient_clipping: 1.0\n", 5, "max_grad_norm", "both given"),
    ("learning_rate: -1\n", 5, "learning_rate", "greater than 0"),
    ("lora_r: 0\n", 5, "lora_r", "greater than 0"),
    ("micro_batch_size: 0\n", 5, "micro_batch_size", "greater than 0"),
    ("optimizer: adam\n", 5, "optimizer", "'adamw_8bit', 'paged_adamw_8bit', 'paged_adamw_32bit', 'sgd' or 'adamw_torch_4bit'"),
    ("lr_scheduler: step\n", 5, "lr_scheduler", "'constant', 'linear' or 'cosine'"),
    ("gradient_clipping: {mode: clamp}\n", 5, "gradient_clipping.mode", "'norm', 'value', 'off', 'auto' or 'zscore'"),
    ("gradient_clipping: {mode: value}\n", 5, "gradient_clipping", "needs max_value"),
    ("gradient_clipping: {norm_type: 3}\n", 5, "gradient_clipping.norm_type", "1, 2 or inf"),
    ("gradient_clipping: {max_norm: -1}\n", 5, "gradient_clipping.max_norm", "greater than 0"),
    ("lora_target_modules: 5\n", 5, "lora_target_modules", "list of module names"),
    ("fp16: true\nbf16: true\n", 5, "fp16", "choose one precision"),
    ("load_in_4bit: true\n", None, "adapter", "cannot be fully fine-tuned"),
    ("adapter: qlora\nload_in_8bit: true\n", 5, "adapter", "qlora means a 4-bit base"),
    ("num_epochs: zero\n", 5, "num_epochs", "valid number"),
    ("learning_rate: 1e-3\nlearning_rate: 2e-3\n", 6, "learning_rate", "given twice"),
]


@pytest.mark.parametrize("extra, line, key, text", BAD, ids=[b[2] + ":" + b[3][:12] for b in BAD])
def test_bad_recipe_is_rejected_with_location(extra, line, key, text):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(BASE + extra, "bad.yaml")
    matching = [p for p in caught.value.problems if p.key == key]
    assert matching, caught.value.problems
    problem = matching[0]
    assert text in problem.message
    assert problem.line == line
    assert str(problem).startswith("bad.yaml")


def test_all_problems_are_reported_together():
    with pytest.raises(RecipeError) as caught:
        parse_recipe(BASE + "lr: 1\nlora_r: 0\noptimizer: adam\n", "bad.yaml")
    assert {p.key for p in caught.value.problems} == {"lr", "lora_r", "optimizer"}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("base_model: [x\n", "malformed YAML"),
        ("!!python/object/apply:os.system ['echo hi']\n", "no Python tags"),
        ("- a\n- b\n", "must be a mapping"),
        ("", "empty"),
        ("datasets: []\n", "required key is missing"),
    ],
)
def test_malformed_documents(text, fragment):
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, "bad.yaml")
    assert fragment in str(caught.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_json_schema_describes_every_field():
    schema = Recipe.model_json_schema()
    assert schema["additionalProperties"] is False
    for name, spec in schema["properties"].items():
        assert spec.get("description"), name
    json.dumps(schema)


def test_docs_key_reference_matches_schema():
    page = (REPO / "docs" / "recipes.md").read_text()
    assert regenerate(page, recipe_reference(), "docs/recipes.md") == page, (
        "docs/recipes.md is stale: run `python -m ftclip.reference` (or `make docs`) and commit the result"
    )
