"""The CLI through typer's runner, and once through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from ftclip.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_validate_shipped_recipes_exit_0():
    result = runner.invoke(app, ["validate", *map(str, sorted((REPO / "recipes").glob("*.yaml")))])
    assert result.exit_code == 0, result.output
    assert result.output.count("ok") == len(list((REPO / "recipes").glob("*.yaml")))


def test_validate_reports_bad_recipe_with_exit_2(tmp_path, make_recipe):
    good = make_recipe("good.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text() + "max_grad_nrom: 0.5\n")
    result = runner.invoke(app, ["validate", str(good), str(bad)])
    assert result.exit_code == 2
    assert "max_grad_nrom: unknown key; did you mean 'max_grad_norm'?" in result.output
    assert "Traceback" not in result.output


def test_validate_checks_data_and_model_paths(tmp_path, make_recipe):
    path = make_recipe(datasets=[{"path": str(tmp_path / "missing.jsonl"), "type": "alpaca"}],
                       base_model=str(tmp_path / "no-model"), sequence_len=100000)
    result = runner.invoke(app, ["validate", "--json", str(path)])
    assert result.exit_code == 2
    [report] = json.loads(result.output)
    keys = {problem["key"] for problem in report["problems"]}
    assert keys == {"datasets.0.path", "base_model"}
    assert any("no such dataset file" in p["message"] for p in report["problems"])
    assert all(p["line"] for p in report["problems"])


def test_validate_catches_sequence_len_beyond_the_model(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe(sequence_len=4096))])
    assert result.exit_code == 2 and "max_position_embeddings (256)" in result.output


def test_validate_warns_on_trust_remote_code(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe(trust_remote_code=True))])
    assert result.exit_code == 0 and "trust_remote_code" in result.output


def test_schema_is_json():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert "gradient_clipping" in json.loads(result.output)["properties"]


def test_train_bad_data_exits_2_without_traceback(tmp_path, make_recipe):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 5}\n')
    result = runner.invoke(app, ["train", str(make_recipe(datasets=[{"path": str(data), "type": "alpaca"}]))])
    assert result.exit_code == 2
    assert "record 2" in result.output and "Traceback" not in result.output


def test_train_into_a_file_as_output_dir_exits_2(tmp_path, make_recipe):
    blocker = tmp_path / "occupied"
    blocker.write_text("")
    result = runner.invoke(app, ["train", str(make_recipe()), "--output-dir", str(blocker)])
    assert result.exit_code == 2 and "is a file" in result.output


def test_quickstart_through_a_real_subprocess(tmp_path):
    out = tmp_path / "quick"
    completed = subprocess.run(
        [sys.executable, "-m", "ftclip", "train", str(REPO / "recipes" / "quickstart.yaml"),
         "--max-steps", "3", "--set", "warmup_steps=0", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert "ftclip run summary" in completed.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # logging_steps 10: only the last step


def test_paged_optimizer_on_cpu_is_refused_at_validate_and_train(make_recipe, tmp_path):
    cpu = make_recipe("cpu.yaml", optimizer="paged_adamw_8bit", device="cpu")
    checked = CliRunner().invoke(app, ["validate", str(cpu)])
    assert checked.exit_code == 2 and "paged_adamw_8bit needs CUDA" in checked.output
    auto = make_recipe("auto.yaml", optimizer="paged_adamw_32bit")
    checked = CliRunner().invoke(app, ["validate", str(auto)])
    if torch.cuda.is_available():
        assert checked.exit_code == 0 and "warning" not in checked.output
        return
    assert checked.exit_code == 0 and "paged_adamw_32bit pages optimizer state" in checked.output
    trained = CliRunner().invoke(app, ["train", str(auto)])
    assert trained.exit_code == 2 and "this machine has none" in trained.output
    assert not (tmp_path / "out" / "adapter").exists()


def test_preprocess_caches_then_hits(make_recipe):
    path = make_recipe(sample_packing=True)
    first = CliRunner().invoke(app, ["preprocess", str(path)])
    assert first.exit_code == 0, first.output
    assert "8 examples" in first.output and "packing: 8 examples in" in first.output and "cached:" in first.output
    second = CliRunner().invoke(app, ["preprocess", str(path)])
    assert "cache hit:" in second.output


def test_resume_flags_are_checked(make_recipe, tmp_path):
    path = make_recipe()
    bad = runner.invoke(app, ["train", str(path), "--resume", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "not a complete ftclip checkpoint" in bad.output
    both = runner.invoke(app, ["train", str(path), "--resume", str(tmp_path), "--no-resume"])
    assert both.exit_code == 2 and "contradict" in both.output
