"""The generated reference (ftclip/reference.py): every key of every model reachable from the recipe, with its
type, default and meaning, and new fields or nested models picked up without editing the generator. That the
committed pages are current is checked beside the models they come from (tests/test_recipe.py for
docs/recipes.md, tests/test_axolotl.py for docs/axolotl.md)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ftclip.recipe import DatasetSpec, GradientClipping, Recipe
from ftclip.reference import BEGIN, END, GENERATED, main, recipe_reference, regenerate, sections

REPO = Path(__file__).resolve().parent.parent


def row(page: str, key: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith(f"| `{key}` |"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def test_every_model_reachable_from_the_recipe_has_a_section():
    found = dict(sections())
    assert found[""] is Recipe
    assert found["datasets[]"] is DatasetSpec
    assert found["gradient_clipping"] is GradientClipping
    assert {"distributed", "special_tokens", "peft", "peft.loftq_config"} <= set(found)


def test_every_key_has_a_type_a_default_and_a_description():
    page = recipe_reference()
    for path, model in sections():
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            key = f"{path}.{name}" if path else name
            kind, default, meaning = row(page, key)[1:]
            assert kind and default and meaning == field.description.replace("|", "\\|"), key


def test_types_defaults_and_bounds_read_as_written_in_a_recipe():
    page = recipe_reference()
    assert row(page, "lora_r")[1:3] == ["`integer`, > 0", "`8`"]
    assert row(page, "lora_dropout")[1:3] == ["`number`, ≥ 0, < 1", "`0.05`"]
    assert row(page, "bf16")[1:3] == ["`bool` or `auto`", "`false`"]
    assert row(page, "adapter")[1:3] == ["one of `lora`, `qlora`", "—"]
    assert row(page, "base_model")[2] == "required"
    assert row(page, "adam_epsilon")[2] == "`1.0e-08`"
    assert row(page, "datasets")[1] == "list of mapping ([`datasets[]`](#datasets)), at least 1"
    assert row(page, "datasets[].roles_to_train")[2] == "`[assistant]`"
    assert row(page, "gradient_clipping")[2] == "see [`gradient_clipping`](#gradient_clipping)"
    assert row(page, "datasets[].data_files")[1] == (
        "`string` or list of `string` or mapping of `string` to (`string` or list of `string`)"
    )
    # A `|` inside a description would split the table cell.
    assert "(q\\|v)_proj" in row(page, "lora_target_modules")[3]


def test_a_new_field_and_a_new_nested_model_appear_without_editing_the_generator():
    class Scheduler(BaseModel):
        """A made-up nested block."""

        model_config = ConfigDict(extra="forbid")
        kind: Literal["step", "plateau"] = Field("step", description="Which schedule.")

    extended = create_model(
        "Extended", __base__=Recipe,
        schedulers=(list[Scheduler] | None, Field(None, description="Made-up schedulers.")),
        by_name=(dict[str, GradientClipping], Field(default_factory=dict, description="Made-up clips by name.")),
    )
    page = recipe_reference(extended)
    assert row(page, "schedulers")[1:] == ["list of mapping ([`schedulers[]`](#schedulers))", "—", "Made-up schedulers."]
    assert row(page, "schedulers[].kind")[1:] == ["one of `step`, `plateau`", "`step`", "Which schedule."]
    assert "## `schedulers[]`\n\nA made-up nested block." in page
    assert row(page, "by_name.*.max_norm")[2] == "`1.0`"
    assert row(page, "base_model")[2] == "required"  # the recipe's own keys are all still there


def test_regenerate_replaces_only_the_marked_region():
    page = f"# Title\n\nhand-written\n\n{BEGIN}\n\nold table\n{END}\n\nmore hand-written\n"
    new = regenerate(page, "new table\n")
    assert new == f"# Title\n\nhand-written\n\n{BEGIN}\n\nnew table\n\n{END}\n\nmore hand-written\n"
    assert regenerate(new, "new table\n") == new


def test_the_command_writes_stale_pages_and_check_says_which(tmp_path, capsys):
    for page in GENERATED:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / page, tmp_path / page)
    assert main(["--check", "--root", str(tmp_path)]) == 0
    recipes = tmp_path / "docs" / "recipes.md"
    recipes.write_text(recipes.read_text().replace("| `lora_r` |", "| `lora_rank` |"))
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert "stale: docs/recipes.md (run `python -m ftclip.reference`" in capsys.readouterr().out
    assert main(["--root", str(tmp_path)]) == 0
    assert recipes.read_text() == (REPO / "docs" / "recipes.md").read_text()
    recipes.write_text("no markers\n")
    assert main(["--root", str(tmp_path)]) == 2
    assert "docs/recipes.md: needs exactly one region" in capsys.readouterr().err
