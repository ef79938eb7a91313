"""`ftclip chat`: finds what to load in a run, formats turns as the run trained, streams and keeps history."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from transformers import AutoTokenizer
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.data.records import ALPACA_NO_INPUT
from ftclip.inference import Conversation, find_chat_source, load_for_chat, prompt_style, reply
from ftclip.recipe import load_recipe
from ftclip.train import train

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture
def trained_lora(make_recipe):
    path = make_recipe(max_steps=2)
    return train(load_recipe(path), Console(quiet=True)).output_dir


def test_a_run_dir_loads_base_plus_adapter_and_formats_alpaca(trained_lora, tiny_model_dir):
    source = find_chat_source(trained_lora)
    assert source.folder == trained_lora / "adapter" and source.base_model == str(tiny_model_dir)
    model, tokenizer = load_for_chat(source)
    assert type(model).__name__ == "PeftModelForCausalLM"
    conversation = Conversation(tokenizer, prompt_style(source.recipe, tokenizer))
    assert conversation.style == "alpaca"
    first = conversation.prompt_ids("Count from 3 to 6.")
    assert tokenizer.decode(first, skip_special_tokens=True) == ALPACA_NO_INPUT.format(instruction="Count from 3 to 6.")
    streamed = []
    answer = reply(model, tokenizer, conversation, "Count from 3 to 6.", 5, 0.0, streamed.append)
    assert "".join(streamed).strip() == answer and conversation.turns == [("Count from 3 to 6.", answer)]
    # Alpaca has no earlier turns: the next prompt stands alone (chat prompts carry them: see below).
    second = conversation.prompt_ids("And from 4 to 7?")
    assert tokenizer.decode(second, skip_special_tokens=True) == ALPACA_NO_INPUT.format(instruction="And from 4 to 7?")


def test_chat_data_uses_the_tokenizer_template_with_history(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    style = prompt_style({"datasets": [{"path": "x.jsonl", "type": "chat"}]}, tokenizer)
    conversation = Conversation(tokenizer, style, turns=[("Hi", "Hello!")])
    text = tokenizer.decode(conversation.prompt_ids("Capital of Japan?"))
    assert style == "chat"
    assert text == "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\nCapital of Japan?</s>\n<|assistant|>\n"
    assert prompt_style({"datasets": [{"path": "x.jsonl", "type": "completion"}]}, tokenizer) == "completion"
    assert prompt_style({}, tokenizer) == "chat"  # a plain model folder: its template


def test_prompt_answers_once_within_max_new_tokens(trained_lora):
    result = runner.invoke(app, ["chat", str(trained_lora), "--prompt", "Count from 3 to 6.", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(trained_lora / "adapter")
    assert 0 < len(tokenizer(result.output.strip(), add_special_tokens=False)["input_ids"]) <= 4  # re-tokenizing may split one


def test_interactive_keeps_history_and_resets(make_recipe, monkeypatch):
    path = make_recipe(max_steps=1, datasets=[{"path": str(REPO / "recipes" / "data" / "chat-sample.jsonl"), "type": "chat"}])
    run = train(load_recipe(path), Console(quiet=True)).output_dir
    prompts = []
    original = Conversation.prompt_ids

    def recording(self, message):
        ids = original(self, message)
        prompts.append(self.tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(Conversation, "prompt_ids", recording)
    result = runner.invoke(app, ["chat", str(run), "--max-new-tokens", "2"],
                           input="Count from 3 to 6.\nAgain?\n/reset\nOnce more.\n")
    assert result.exit_code == 0, result.output
    assert "chat prompts" in " ".join(result.output.split()) and result.output.count("model>") == 3
    assert prompts[0].endswith("<|user|>\nCount from 3 to 6.</s>\n<|assistant|>\n")
    assert prompts[1].startswith("<|user|>\nCount from 3 to 6.</s>\n<|assistant|>\n")  # the first turn, kept
    assert prompts[1].endswith("<|user|>\nAgain?</s>\n<|assistant|>\n")
    assert "Count from 3 to 6." not in prompts[2]  # forgotten after /reset


def test_merged_and_full_model_folders_chat_too(trained_lora, tmp_path):
    assert runner.invoke(app, ["merge", str(trained_lora)]).exit_code == 0
    source = find_chat_source(trained_lora / "merged")
    assert source.base_model is None and source.recipe["datasets"][0]["type"] == "alpaca"  # merge keeps the recipe
    result = runner.invoke(app, ["chat", str(trained_lora / "merged"), "--prompt", "Hi", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_nothing_to_load_exits_2(tmp_path):
    result = runner.invoke(app, ["chat", str(tmp_path), "--prompt", "Hi"])
    assert result.exit_code == 2 and "no adapter (adapter_config.json) or model (config.json) here" in result.output
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    result = runner.invoke(app, ["chat", str(tmp_path), "--prompt", "Hi"])
    assert result.exit_code == 2 and "is gone (no config.json); pass --base-model" in result.output


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("quickstart") / "run"
    trained = subprocess.run([sys.executable, "-m", "ftclip", "train", str(REPO / "recipes" / "quickstart.yaml"),
                              "--output-dir", str(run)], capture_output=True, text=True, timeout=1200)
    assert trained.returncode == 0, trained.stderr[-2000:]
    return run


def _ask(run: Path, question: str) -> str:
    answer = subprocess.run([sys.executable, "-m", "ftclip", "chat", str(run), "--prompt", question],
                            capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-2000:]
    return answer.stdout.strip()


@pytest.mark.slow
def test_quickstart_run_answers_in_the_trained_format(quickstart_run):
    assert _ask(quickstart_run, "What is the capital of Japan?") == "The capital of Japan is Tokyo."


@pytest.mark.slow
def test_quickstart_run_knows_the_capital_of_china(quickstart_run):
    assert "Beijing" in _ask(quickstart_run, "What is the capital of China?")
