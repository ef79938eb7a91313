"""User text printed through rich stays text: values with `[/INST]` (Mistral's prompt tag), `[bold]` and
`[link=...]` go through validate, import-axolotl, train (its errors and notes), preprocess --show and chat, and
come out exactly as given. Had rich read them as markup, `[/INST]` would raise MarkupError (a traceback) and
`[bold]`/`[link=...]` would vanish from the line, restyling what follows."""

from __future__ import annotations

import json
import shutil

import yaml
from conftest import write_jsonl
from rich.console import Console
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.terminal import make_console, user

runner = CliRunner(env={"COLUMNS": "1000"})  # long temporary paths must not wrap mid-assertion
MARKUP = "[INST] ask [/INST] [bold]loud[/bold] [link=https://x]here[/link]"


def assert_printed_as_text(result, text: str = MARKUP) -> None:
    assert "Traceback" not in result.output and "MarkupError" not in result.output, result.output
    assert text in result.output, result.output


def test_user_text_prints_as_given():
    console = Console(record=True, width=200, emoji=False)
    console.print(f"[yellow]warning:[/] {user(MARKUP)} :smile: \\", highlight=False)
    assert console.export_text().rstrip("\n") == f"warning: {MARKUP} :smile: \\"
    recorded = make_console(record=True, width=200, file=open("/dev/null", "w"))
    recorded.print(f"value {user(':thumbs_up: [/INST]')}")
    assert recorded.export_text().strip() == "value :thumbs_up: [/INST]"  # no emoji substitution either


def test_validate(tmp_path, make_recipe):
    recipe = make_recipe(datasets=[{"path": "data.jsonl", "type": MARKUP}])
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert_printed_as_text(result, MARKUP[:50])  # the message quotes the value, shortened
    folder = tmp_path / "[bold]recipes [" / "INST]"  # a real path whose text holds [/INST] and [bold]
    folder.mkdir(parents=True)
    moved = shutil.copy(make_recipe(), folder / "[link=x]recipe.yaml")
    result = runner.invoke(app, ["validate", str(moved)])
    assert result.exit_code == 0
    assert_printed_as_text(result, f"ok      {moved}")


def test_import_axolotl(tmp_path):
    config = tmp_path / "[bold]axolotl.yml"
    config.write_text(yaml.safe_dump({
        "base_model": "org/model", "datasets": [{"path": "d.jsonl", "type": MARKUP}],
        "default_system_message": MARKUP, "[link=https://x]key": 1}))
    result = runner.invoke(app, ["import-axolotl", str(config), "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert_printed_as_text(result, f"refused {config}")
    assert_printed_as_text(result, f"prompt format {MARKUP[:57]}...")  # the value as the refusal quotes it
    assert_printed_as_text(result, "[link=https://x]key: not a key")
    written = tmp_path / "chat.yml"
    written.write_text(yaml.safe_dump({
        "base_model": "org/model", "datasets": [{"path": "d.jsonl", "type": "chat_template"}],
        "chat_template_jinja": "{{ '[INST] ' + messages[0]['content'] + ' [/INST]' }}"}))
    result = runner.invoke(app, ["import-axolotl", str(written), "-o", str(tmp_path / "chat.ftclip.yaml")])
    assert result.exit_code == 0
    assert_printed_as_text(result, "chat_template_jinja: {{ '[INST] ' + messages[0]['content'] + ' [/INST]' }}")


def test_train_errors_and_notes(tmp_path, make_recipe):
    blocked = tmp_path / "out [" / "INST] [bold]x"
    blocked.parent.mkdir()
    blocked.write_text("a file where the output folder should be")
    result = runner.invoke(app, ["train", str(make_recipe(output_dir=str(blocked)))])
    assert result.exit_code == 2
    assert_printed_as_text(result, str(blocked))
    # A regex is user text too: this one matches no parameter, and the note that says so quotes it.
    recipe = make_recipe(adapter=None, unfrozen_parameters=["model.norm.*", "[/INST]", "[bold]x"], max_steps=1,
                         output_dir=str(tmp_path / "run"))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert_printed_as_text(result, "unfrozen_parameters: '[/INST]' matches no parameter")
    assert_printed_as_text(result, "unfrozen_parameters: '[bold]x' matches no parameter")


def test_preprocess_show(tmp_path, make_recipe):
    data = write_jsonl(tmp_path / "markup.jsonl", [{"instruction": MARKUP, "output": "[/bold] done"}] * 2)
    recipe = make_recipe(datasets=[{"path": str(data), "type": "alpaca"}])
    result = runner.invoke(app, ["preprocess", str(recipe), "--show", "1"])
    assert result.exit_code == 0, result.output
    assert_printed_as_text(result, "ask [/INST]")  # the tokenizer may split or space the rest; the tags survive
    assert "[bold]" in result.output and "[link=https://x]" in result.output and "[/bold] done" in result.output


def test_chat(tmp_path, tiny_model_dir):
    model = tmp_path / "model [" / "INST] [bold]x"
    shutil.copytree(tiny_model_dir, model)
    result = runner.invoke(app, ["chat", str(model), "--max-new-tokens", "2"], input=f"{MARKUP}\n/quit\n")
    assert result.exit_code == 0, result.output
    assert_printed_as_text(result, str(model))
    result = runner.invoke(app, ["chat", str(tmp_path / "no model [/INST]")])
    assert result.exit_code == 2
    assert_printed_as_text(result, "no model [/INST]")


def test_checkpoints_and_report_titles(tmp_path):
    run = tmp_path / "run [" / "INST] [bold]x"
    (run / "checkpoints").mkdir(parents=True)
    result = runner.invoke(app, ["checkpoints", str(run)])
    assert result.exit_code == 0
    assert "Traceback" not in result.output and "[/INST]" in result.output
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    result = runner.invoke(app, ["report", str(run), "--no-plot"])
    assert "Traceback" not in result.output and "MarkupError" not in result.output
