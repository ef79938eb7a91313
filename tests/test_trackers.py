"""W&B (offline: its files appear under the run dir, nothing goes to the network) and MLflow (a local file
store, read back) get the same per-step values as metrics.jsonl, the recipe as config, spikes and the report."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftclip.cli import app
from ftclip.recipe import load_recipe

runner = CliRunner()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file: W&B's 7-byte header, then LevelDB log blocks
    (32 KiB; each chunk: crc32, length, type 1=full 2=first 3=middle 4=last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # ftclip's default: the run dir
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.mark.slow  # wandb's service process takes ~10 s to start and stop
def test_wandb_offline_run_gets_every_step_the_config_and_the_report(make_recipe, offline_wandb, tmp_path):
    path = make_recipe(max_steps=4, logging_steps=2, wandb_project="ftclip-tests", wandb_name="tiny")
    result = runner.invoke(app, ["train", str(path), "--set", "gradient_clipping.max_norm=0.5"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "out"
    [run_file] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert config["gradient_clipping"]["max_norm"] == 0.5
    assert config["overrides"] == ["gradient_clipping.max_norm=0.5"]
    lines = _metrics(run_dir)
    assert sorted(history) == [1, 2, 3, 4]
    # Every step's pre-clip norm, though metrics.jsonl has a line every 2 steps; the window values at its step.
    assert [history[s]["step/grad_norm"] for s in (1, 2, 3, 4)] == pytest.approx(
        [norm for line in lines for norm in line["per_step"]["grad_norm"]])
    for line in lines:
        for name in ("grad_norm", "clip_coef", "clip_rate", "clip_threshold", "skipped_steps", "loss", "lr", "tokens_per_s"):
            assert history[line["step"]][name] == pytest.approx(line[name]), name
    assert any(name.startswith("ftclip_report") for name in history[4])  # the report picture, logged at the end
    assert list(run_file.parent.glob("files/media/images/ftclip_report_*.png"))


SPIKY_RECORD = {"step": 3, "loss": 1.0, "grad_norm": 2.0, "clipped": True, "clip_threshold": None, "spike_steps": [2],
                "per_step": {"step": [1, 2, 3], "loss": [1, 1, 1], "grad_norm": [1.0, 90.0, 2.0],
                             "clip_coef": [1, 0.01, 0.5], "threshold": [1, 1, 1]}}


@pytest.mark.slow  # wandb's service process
def test_wandb_spike_is_a_point_at_its_step_and_an_alert(make_recipe, offline_wandb, tmp_path):
    from ftclip.trackers import WandbLog

    sink = WandbLog(load_recipe(make_recipe(wandb_project="ftclip-tests")), tmp_path)
    sink.write(SPIKY_RECORD)
    sink.close()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    spikes, alerts = {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "spike/grad_norm" in row:
                spikes[row["_step"]] = row["spike/grad_norm"]
        elif kind == "alert":
            alerts.append(record.alert.text)
    assert spikes == {2: 90.0}
    assert alerts == [f"step 2: pre-clip gradient norm 90 (run {tmp_path})"]


def test_wandb_disabled_mode_starts_nothing(make_recipe, offline_wandb, tmp_path):
    path = make_recipe(max_steps=1, wandb_project="ftclip-tests", wandb_mode="disabled")
    assert runner.invoke(app, ["train", str(path)]).exit_code == 0
    assert not (tmp_path / "out" / "wandb").exists()


@pytest.fixture
def file_store(monkeypatch, tmp_path) -> Path:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ otherwise wants a database store
    return tmp_path / "mlruns"


def test_mlflow_file_store_gets_the_metrics_params_and_report(make_recipe, file_store, tmp_path):
    from mlflow.tracking import MlflowClient

    path = make_recipe(max_steps=4, logging_steps=2, mlflow_tracking_uri=str(file_store),
                       mlflow_experiment_name="ftclip-tests", mlflow_run_name="tiny")
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(str(file_store))
    experiment = client.get_experiment_by_name("ftclip-tests")
    [run] = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("tiny", "FINISHED")
    assert run.data.params["gradient_clipping.max_norm"] == "1.0" and run.data.params["max_steps"] == "4"
    lines = _metrics(tmp_path / "out")
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "step/grad_norm")}
    assert [history[s] for s in (1, 2, 3, 4)] == pytest.approx([n for line in lines for n in line["per_step"]["grad_norm"]])
    for name in ("grad_norm", "clip_coef", "clip_rate", "clipped", "loss", "lr"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == pytest.approx({line["step"]: float(line[name]) for line in lines}), name
    assert "report/suggested_max_norm" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.png", "ftclip_recipe.yaml"}


def test_spikes_become_markers_and_a_tag(make_recipe, file_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from ftclip.trackers import MlflowLog

    recipe = load_recipe(make_recipe(mlflow_tracking_uri=str(file_store)))
    sink = MlflowLog(recipe, tmp_path)
    sink.write(SPIKY_RECORD)
    client = MlflowClient(str(file_store))
    assert [(m.step, m.value) for m in client.get_metric_history(sink.run_id, "spike/grad_norm")] == [(2, 90.0)]
    assert client.get_run(sink.run_id).data.tags["ftclip.spike_steps"] == "2"
    assert "clip_threshold" not in client.get_run(sink.run_id).data.metrics  # None is not a number to chart
    sink.close()
    assert client.get_run(sink.run_id).info.status == "FINISHED"


def test_a_tracker_that_cannot_start_exits_2(make_recipe, file_store, tmp_path):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    path = make_recipe(max_steps=1, mlflow_tracking_uri=str(not_a_folder))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "mlflow_tracking_uri: cannot start an MLflow run at" in result.output and "Traceback" not in result.output


def test_missing_tracker_package_fails_validate_naming_the_key_and_the_extra(make_recipe, monkeypatch):
    # None in sys.modules is Python's own "this module cannot be imported" (find_spec then returns None).
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    path = make_recipe(wandb_project="p", mlflow_experiment_name="e")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "wandb_project: logging to Weights & Biases needs the wandb package: pip install 'ftclip[wandb]'" in text
    assert "mlflow_experiment_name: logging to MLflow needs the mlflow package: pip install 'ftclip[mlflow]'" in text


def test_tracker_keys_without_the_key_that_turns_it_on_are_reported(make_recipe):
    result = runner.invoke(app, ["validate", str(make_recipe(wandb_entity="team", mlflow_run_name="r"))])
    assert result.exit_code == 2
    assert "wandb_entity: is set but wandb_project is not" in " ".join(result.output.split())
    assert "mlflow_run_name: is set but neither mlflow_tracking_uri nor mlflow_experiment_name is" in " ".join(
        result.output.split())


def test_validate_does_not_import_the_tracker_packages(make_recipe):
    path = make_recipe(wandb_project="p", mlflow_experiment_name="e")
    program = ("import sys; from typer.testing import CliRunner; from ftclip.cli import app; "
               f"result = CliRunner().invoke(app, ['validate', {str(path)!r}]); "
               "print(result.exit_code, 'wandb' in sys.modules, 'mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[-3:] == ["0", "False", "False"], done.stdout + done.stderr
