"""The CLI through typer's runner, and once through a real subprocess."""

from __future__ import annotations

import json
import os
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
    assert "\x1b" not in completed.stdout and "━" not in completed.stdout  # a pipe: no redrawn bar, plain lines
    assert [line.split("  ")[0] for line in completed.stdout.splitlines() if line.startswith("step ")] == ["step 3/3"]
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
    assert "records/s" in first.output and "tokens/s" in first.output and "peak memory:" in first.output


def test_preprocess_show_json_is_the_trained_labels(make_recipe):
    path = make_recipe()
    shown = subprocess.run([sys.executable, "-m", "ftclip", "preprocess", str(path), "--show", "3", "--json"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 3  # nothing but the examples on stdout
    for line in lines:
        example = json.loads(line)
        assert len(example["input_ids"]) == len(example["labels"])
        trained = [i for i, label in enumerate(example["labels"]) if label != -100]
        assert trained and all(example["labels"][i] == example["input_ids"][i] for i in trained)
        assert trained[0] > 0  # the alpaca prompt is masked
    coloured = CliRunner().invoke(app, ["preprocess", str(path), "--show", "1"])
    assert coloured.exit_code == 0 and "example 1:" in coloured.output


def test_resume_flags_are_checked(make_recipe, tmp_path):
    path = make_recipe()
    bad = runner.invoke(app, ["train", str(path), "--resume", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "not a complete ftclip checkpoint" in bad.output
    both = runner.invoke(app, ["train", str(path), "--resume", str(tmp_path), "--no-resume"])
    assert both.exit_code == 2 and "contradict" in both.output


# ---------------------------------------------------------------- light commands, CI annotations (issue 17)

HEAVY_LIBRARIES = {"torch", "transformers", "datasets", "peft", "bitsandbytes"}


def _imported_top_level_packages(*arguments: str, cwd: Path) -> tuple[set[str], subprocess.CompletedProcess]:
    """Run the real `python -X importtime -m ftclip ...` and collect every package it imported."""
    completed = subprocess.run([sys.executable, "-X", "importtime", "-m", "ftclip", *arguments],
                               capture_output=True, text=True, timeout=60, cwd=cwd)
    names = {line.rsplit("|", 1)[1].strip().split(".")[0]
             for line in completed.stderr.splitlines() if line.startswith("import time:") and "|" in line}
    return names, completed


def test_light_commands_import_no_heavy_library(tmp_path):
    """validate (shipped recipes, and a chat dataset), schema and --help must not pay for torch & co. New commands:
    import heavy libraries inside the command function that needs them, never at cli.py's top."""
    chat = tmp_path / "chat.yaml"
    chat.write_text(f"base_model: org/some-model\ndatasets:\n  - path: {REPO / 'recipes/data/chat-sample.jsonl'}\n"
                    "    type: chat_template\n  - path: ../chat-copy.jsonl\n    type: chat\n"
                    "optimizer: paged_adamw_32bit\n")
    (tmp_path.parent / "chat-copy.jsonl").write_text((REPO / "recipes/data/chat-sample.jsonl").read_text())
    recipes = [str(p) for p in sorted((REPO / "recipes").glob("*.yaml"))] + [str(chat)]
    for arguments in (["validate", *recipes], ["validate", "--json", *recipes], ["schema"], ["--help"]):
        imported, completed = _imported_top_level_packages(*arguments, cwd=tmp_path)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert "ftclip" in imported and "pydantic" in imported  # the probe sees the real imports
        assert not imported & HEAVY_LIBRARIES, f"{arguments[0]} imported {sorted(imported & HEAVY_LIBRARIES)}"


def test_cuda_probe_without_torch_agrees_with_torch():
    """The paged-optimizer check answers from torch/version.py and the driver files; torch, asked afterwards,
    must agree on this machine (CPU-only build here; a GPU runner checks the other side)."""
    probe = ("import sys; from ftclip.optim import why_no_cuda_without_torch; why = why_no_cuda_without_torch(); "
             "assert 'torch' not in sys.modules; import torch; print(why is None, torch.cuda.is_available(), why)")
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    probe_says, torch_says, why = completed.stdout.split(" ", 2)
    assert probe_says == torch_says, why
    hidden = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert hidden.stdout.startswith("False False")


def test_github_annotation_escapes_per_workflow_command_rules():
    from ftclip.cli import github_annotation

    line = github_annotation("error", "recipes/a,b:c.yaml", 7, "datasets.0.path", "50% bad\r\nsecond line")
    assert line == "::error file=recipes/a%2Cb%3Ac.yaml,line=7,title=datasets.0.path::50%25 bad%0D%0Asecond line"
    assert github_annotation("warning", "r.yaml", None, "", "m") == "::warning file=r.yaml::m"


def test_validate_prints_annotations_under_github_actions(tmp_path, monkeypatch):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("base_model: org/model\ndatasets:\n  - path: missing.jsonl\n    type: alpaca\n"
                      "max_grad_nrom: 0.5\ntrust_remote_code: true\n")
    good = tmp_path / "good.yaml"
    good.write_text("base_model: org/model\ndatasets:\n  - path: bad.yaml\n    type: completion\n"
                    "trust_remote_code: true\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    plain = CliRunner().invoke(app, ["validate", "bad.yaml"])
    assert plain.exit_code == 2 and "::error" not in plain.output
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = CliRunner().invoke(app, ["validate", "bad.yaml", str(tmp_path / "good.yaml")])
    assert result.exit_code == 2
    annotations = [line for line in result.output.splitlines() if line.startswith("::")]
    assert "::error file=bad.yaml,line=5,title=max_grad_nrom::unknown key; did you mean 'max_grad_norm'?" in annotations
    # good.yaml's dataset is not JSON lines: an error on its line; the absolute path is made relative to the checkout
    assert any(a.startswith("::error file=good.yaml,line=3,title=datasets.0.path::") for a in annotations), annotations
    assert "::warning file=good.yaml,line=5,title=trust_remote_code::true runs code shipped with the model" in annotations
    as_json = CliRunner().invoke(app, ["validate", "--json", "bad.yaml"])
    assert json.loads(as_json.stdout)[0]["valid"] is False  # annotations go to stderr with --json
    assert "::error file=bad.yaml,line=5" in as_json.stderr


def test_validate_output_is_one_line_per_problem_in_ci(make_recipe):
    """Not a terminal: no escape sequences, and a long warning is not wrapped into pieces a log search misses."""
    auto = make_recipe(optimizer="paged_adamw_8bit", trust_remote_code=True)
    completed = subprocess.run([sys.executable, "-m", "ftclip", "validate", str(auto)], capture_output=True, text=True,
                               timeout=60, env={k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")})
    assert "\x1b" not in completed.stdout
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("ok") and lines[1].startswith("  warning: trust_remote_code: true runs code")
    if len(lines) > 2:  # no CUDA here: the paged optimizer's warning, on one line however long
        assert lines[2].startswith("  warning: optimizer: paged_adamw_8bit") and lines[2].endswith("will refuse it here")


def test_cuda_probe_reads_a_cuda_build_without_running_it(tmp_path):
    """A CUDA build of torch (as torch/version.py spells it) on a machine whose driver is absent or hidden: the
    probe reads the file, never imports the package (its __init__ here would fail), and names the reason."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise SystemExit('torch was imported')\n")
    (fake / "version.py").write_text("from typing import Optional\n__version__ = '2.13.0+cu128'\n"
                                     "cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n")
    probe = "from ftclip.optim import why_no_cuda_without_torch as why; print(why())"
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "CUDA_VISIBLE_DEVICES": "-1"}
    hidden = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=environment)
    assert hidden.stdout.strip() == "CUDA_VISIBLE_DEVICES hides every GPU", hidden.stderr
    environment.pop("CUDA_VISIBLE_DEVICES")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=environment)
    assert shown.returncode == 0 and "CPU-only" not in shown.stdout, shown.stderr  # None on a GPU machine
    (fake / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda = None\nhip = None\n")
    cpu = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=environment)
    assert cpu.stdout.strip() == "the installed torch 2.13.0+cpu is a CPU-only build", cpu.stderr
