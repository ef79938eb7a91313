"""`--set KEY=VALUE`: dotted keys and YAML values applied before validation; problems name their override;
the saved recipe records them; a resume with other overrides is refused like a changed recipe."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from ftclip.checkpoint import RECIPE_FILE
from ftclip.cli import app
from ftclip.errors import RecipeError
from ftclip.recipe_files import read_recipe

runner = CliRunner()


def test_values_are_yaml_typed_and_keys_dotted(make_recipe, tmp_path):
    second = tmp_path / "more.jsonl"
    second.write_text('{"text": "hello"}\n')
    recipe = read_recipe(make_recipe(), [
        "learning_rate=1.0e-4", "bf16=true", "lora_target_modules=[q_proj, v_proj]", "gradient_clipping.max_norm=0.5",
        f"datasets.1.path={second}", "datasets.1.type=completion", "eval_steps=null",
    ])
    assert recipe.learning_rate == 1e-4 and recipe.bf16 is True
    assert recipe.lora_target_modules == ["q_proj", "v_proj"]
    assert recipe.gradient_clipping.mode == "norm" and recipe.gradient_clipping.max_norm == 0.5
    assert [d.type for d in recipe.datasets] == ["alpaca", "completion"] and recipe.datasets[1].path == str(second)


def test_clip_override_works_on_the_number_shorthand_and_the_hf_alias(make_recipe):
    shorthand = read_recipe(make_recipe(gradient_clipping=2.0), ["gradient_clipping.max_norm=0.3"])
    assert (shorthand.gradient_clipping.mode, shorthand.gradient_clipping.max_norm) == ("norm", 0.3)
    alias = read_recipe(make_recipe("alias.yaml", max_grad_norm=2.0), ["gradient_clipping.mode=auto"])
    assert alias.gradient_clipping.mode == "auto"
    replaced = read_recipe(make_recipe("both.yaml", gradient_clipping={"mode": "off"}), ["max_grad_norm=0.7"])
    assert replaced.gradient_clipping.max_norm == 0.7


@pytest.mark.parametrize(("override", "expected"), [
    ("learning_rate=-1", "learning_rate: Input should be greater than 0 (got -1) (from --set learning_rate=-1)"),
    ("lr=1", "lr: unknown key; did you mean 'learning_rate'? (from --set lr=1)"),
    ("datasets.4.path=x.jsonl", "datasets.4.path: --set datasets.4.path=x.jsonl: datasets has indices 0 to 0; "
                                "index 1 adds an entry"),
    ("datasets.first.path=x", "--set datasets.first.path=x: datasets is a list; index it with a number"),
    ("lora_r.value=3", "lora_r.value: --set lora_r.value=3: lora_r is 8, not a mapping or a list"),
    ("learning_rate", "--set learning_rate: expected KEY=VALUE"),
    ("wandb_name=[oops", "--set wandb_name=[oops: the value is not valid YAML"),
    ("datasets.0.path=missing.jsonl", "no such dataset file (from --set datasets.0.path=missing.jsonl)"),
])
def test_problems_name_the_override_and_exit_2(make_recipe, override, expected):
    result = runner.invoke(app, ["validate", str(make_recipe()), "--set", override])
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_problems_elsewhere_keep_their_line_in_the_file(make_recipe):
    path = make_recipe(lora_r=0)
    with pytest.raises(RecipeError) as caught:
        read_recipe(path, ["learning_rate=0.1"])
    [problem] = caught.value.problems
    line = next(number for number, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("lora_r:"))
    assert (problem.key, problem.line) == ("lora_r", line)
    assert "from --set" not in problem.message


def test_an_override_can_fix_the_file(make_recipe):
    assert read_recipe(make_recipe(warmup_steps=10), ["warmup_steps=2"]).warmup_steps == 2


def test_train_records_overrides_and_refuses_a_resume_with_other_ones(make_recipe, tmp_path):
    path = make_recipe(max_steps=4, save_steps=2)
    output = tmp_path / "run"
    first = runner.invoke(app, ["train", str(path), "--output-dir", str(output), "--set", "learning_rate=0.01",
                                "--set", "gradient_clipping.max_norm=0.5"])
    assert first.exit_code == 0, first.output
    saved = (output / "adapter" / RECIPE_FILE).read_text()
    assert "# --set learning_rate=0.01\n# --set gradient_clipping.max_norm=0.5\n" in saved
    assert yaml.safe_load(saved)["learning_rate"] == 0.01
    assert yaml.safe_load(saved)["gradient_clipping"]["max_norm"] == 0.5

    again = runner.invoke(app, ["train", str(path), "--output-dir", str(output), "--set", "learning_rate=0.02"])
    assert again.exit_code == 2
    assert "learning_rate: 0.01 in the checkpoint, 0.02 now" in again.output


def test_max_steps_and_output_dir_flags_still_work_and_are_validated(make_recipe, tmp_path):
    path = make_recipe()
    result = runner.invoke(app, ["train", str(path), "--max-steps", "2", "--output-dir", str(tmp_path / "short")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "short" / "metrics.jsonl").read_text().splitlines()) == 2
    # --set comes after the shorthands, so it wins; the result is validated like the file.
    clash = runner.invoke(app, ["train", str(path), "--max-steps", "2", "--set", "max_steps=0"])
    assert clash.exit_code == 2 and "max_steps: Input should be greater than 0" in clash.output



@pytest.mark.parametrize("flags", [["--max-steps", "3"], ["--set", "max_steps=3"]], ids=["max-steps", "set"])
def test_a_run_shorter_than_its_warmup_runs_with_one_warning(make_recipe, tmp_path, flags):
    # A smoke run of a few steps is the commonest use of max_steps: it runs (as in HF Trainer and Axolotl),
    # saying once that the learning rate will not reach its peak.
    warm = make_recipe("warm.yaml", warmup_steps=5, output_dir=str(tmp_path / "warm"))
    short = runner.invoke(app, ["train", str(warm), *flags])
    assert short.exit_code == 0, short.output
    text = " ".join(short.output.split())
    assert text.count("will not reach its peak") == 1
    assert "warmup_steps: 5 warmup steps but the run has 3 optimizer steps" in text
    assert len((tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()) == 3
    validated = runner.invoke(app, ["validate", str(warm), "--set", "max_steps=3"])
    assert validated.exit_code == 0 and "will not reach its peak" in " ".join(validated.output.split())


def test_preprocess_takes_set(make_recipe):
    result = runner.invoke(app, ["preprocess", str(make_recipe()), "--set", "sequence_len=64"])
    assert result.exit_code == 0, result.output
    assert "of sequence_len 64" in result.output


def test_every_override_that_cannot_apply_is_reported_together(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe()), "--set", "datasets.3.path=x", "--set", "lora_r.value=3"])
    assert result.exit_code == 2
    assert "--set datasets.3.path=x:" in result.output and "--set lora_r.value=3:" in result.output
