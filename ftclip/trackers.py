"""Weights & Biases and MLflow as sinks of the same per-window record metrics.jsonl and TensorBoard get
(STYLE.md principle 8: the loop emits one record, each sink consumes it; nothing in the loop knows which).

Each tracker logs the record's scalars at the record's step, every step of the window from its `per_step`
lists (so a chart holds each pre-clip norm whatever logging_steps is), spikes as markers (W&B also raises
an alert), the resolved recipe as the run's config, and at the end the `ftclip report` numbers and picture.
Rank 0 only: train() gives other ranks a NullLog. Importing this module imports neither package;
`tracker_problems` checks they are installed without importing them (validate stays light)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ftclip.errors import FtclipError, TrackerError
from ftclip.recipe import Recipe, dump_recipe

WANDB_KEYS = ("wandb_project", "wandb_entity", "wandb_name", "wandb_mode", "wandb_run_id")
MLFLOW_KEYS = ("mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name")
# Per-step series from the record's `per_step` lists, under names that say they are per optimizer step.
PER_STEP_NAMES = {"loss": "step/loss", "grad_norm": "step/grad_norm", "clip_coef": "step/clip_coef",
                  "threshold": "step/clip_threshold"}
NOT_SCALARS = {"step", "total_steps", "per_step", "spike_steps"}


def wants_wandb(recipe: Recipe) -> bool:
    return bool(recipe.wandb_project) and recipe.wandb_mode != "disabled"


def wants_mlflow(recipe: Recipe) -> bool:
    return bool(recipe.mlflow_tracking_uri or recipe.mlflow_experiment_name)


def tracker_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, message) for trackers the recipe names but cannot use. find_spec looks for the package on
    disk without importing it: validate must not pay wandb's or mlflow's import time."""
    problems = []
    if not recipe.wandb_project:
        stray = [key for key in WANDB_KEYS if getattr(recipe, key) is not None and key != "wandb_mode"]
        if stray:
            problems.append((stray[0], "is set but wandb_project is not; set wandb_project to log to Weights & Biases"))
    elif wants_wandb(recipe) and importlib.util.find_spec("wandb") is None:
        problems.append(("wandb_project", "logging to Weights & Biases needs the wandb package: "
                                          "pip install 'ftclip[wandb]' (or remove the wandb_* keys)"))
    if recipe.mlflow_run_name is not None and not wants_mlflow(recipe):
        problems.append(("mlflow_run_name", "is set but neither mlflow_tracking_uri nor mlflow_experiment_name is; "
                                            "set one to log to MLflow"))
    elif wants_mlflow(recipe) and importlib.util.find_spec("mlflow") is None:
        key = "mlflow_tracking_uri" if recipe.mlflow_tracking_uri else "mlflow_experiment_name"
        problems.append((key, "logging to MLflow needs the mlflow package: pip install 'ftclip[mlflow]' "
                              "(or remove the mlflow_* keys)"))
    return problems


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def window_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers and flags (as 0/1) under the metrics.jsonl names."""
    scalars = {}
    for name, value in record.items():
        number = _number(value) if name not in NOT_SCALARS else None
        if number is not None:
            scalars[name] = number
    return scalars


def per_step_rows(record: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """(step, {step/loss, step/grad_norm, step/clip_coef, step/clip_threshold}) for each step of the window."""
    per_step = record.get("per_step") or {}
    rows = []
    for index, step in enumerate(per_step.get("step", [])):
        values = {PER_STEP_NAMES[name]: _number(series[index]) for name, series in per_step.items() if name in PER_STEP_NAMES}
        rows.append((step, {name: value for name, value in values.items() if value is not None}))
    return rows


def rows_by_step(record: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Everything one record holds, by optimizer step: each step's own values, a spike marker
    (spike/grad_norm) at each spike's step, and the window's scalars at the record's step."""
    rows = dict(per_step_rows(record))
    for step in record.get("spike_steps") or []:
        norm = rows.get(step, {}).get("step/grad_norm", _number(record.get("grad_norm")))
        if norm is not None:
            rows.setdefault(step, {})["spike/grad_norm"] = norm
    rows.setdefault(record["step"], {}).update(window_scalars(record))
    return dict(sorted(rows.items()))


def _recipe_config(recipe: Recipe) -> dict[str, Any]:
    config = recipe.model_dump(mode="json", exclude_none=True)
    if recipe._overrides:
        config["overrides"] = [override.text for override in recipe._overrides]
    return config


def _report(output_dir: Path) -> tuple[dict[str, float], Path | None]:
    """`ftclip report`'s numbers and picture (report.png, if matplotlib is installed) for the finished run."""
    from ftclip.report import PLOT_FILE, analyze, read_history, write_plot

    try:
        history = read_history(output_dir)
        result = analyze(history)
    except FtclipError:  # nothing logged (e.g. resumed at the last step)
        return {}, None
    numbers = {"report/suggested_max_norm": result.suggested, "report/clipped_steps": result.clipped_steps,
               "report/skipped_steps": result.skipped_steps, "report/spikes": len(result.spikes)}
    numbers.update({f"report/grad_norm_{name}": value for name, value in result.percentiles.items()})
    return numbers, write_plot(history, result, output_dir / PLOT_FILE)


def _stopped_by_error() -> bool:
    # close() runs in train()'s `finally`: an exception in flight means the run did not finish.
    return sys.exc_info()[0] is not None


class WandbLog:
    """A W&B run: wandb_project/entity/name/mode; wandb_run_id resumes that run. Its files go under
    output_dir/wandb unless WANDB_DIR says otherwise."""

    def __init__(self, recipe: Recipe, output_dir: Path):
        import wandb

        self.wandb = wandb
        self.output_dir = output_dir
        try:
            self.run = wandb.init(
                project=recipe.wandb_project, entity=recipe.wandb_entity, name=recipe.wandb_name,
                mode=recipe.wandb_mode, id=recipe.wandb_run_id, resume="allow" if recipe.wandb_run_id else None,
                dir=os.environ.get("WANDB_DIR") or str(output_dir), config=_recipe_config(recipe),
                # rich draws the progress view; wandb's console capture would duplicate every line.
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as error:  # wandb raises many types (no API key, bad entity, network)
            raise TrackerError(f"wandb_project: cannot start the Weights & Biases run: {error}") from None

    def write(self, record: dict[str, Any]) -> None:
        rows = rows_by_step(record)
        for step, values in rows.items():  # W&B wants steps in increasing order
            self.run.log(values, step=step)
        for step in record.get("spike_steps") or []:
            norm = rows.get(step, {}).get("spike/grad_norm", math.nan)
            self.run.alert(title="ftclip: gradient spike", level="WARN",
                           text=f"step {step}: pre-clip gradient norm {norm:.4g} (run {self.output_dir})")

    def close(self) -> None:
        if _stopped_by_error():
            self.run.finish(exit_code=1)
            return
        numbers, picture = _report(self.output_dir)
        self.run.summary.update({name: value for name, value in numbers.items() if math.isfinite(value)})
        if picture is not None:
            self.run.log({"ftclip_report": self.wandb.Image(str(picture))})
        self.run.finish()


class MlflowLog:
    """An MLflow run in mlflow_experiment_name (default: ftclip) named mlflow_run_name, at
    mlflow_tracking_uri (default: MLFLOW_TRACKING_URI, else MLflow's own default)."""

    def __init__(self, recipe: Recipe, output_dir: Path):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.output_dir = output_dir
        self.spike_steps: list[int] = []
        try:
            self.client = MlflowClient(tracking_uri=recipe.mlflow_tracking_uri)
            name = recipe.mlflow_experiment_name or "ftclip"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=recipe.mlflow_run_name).info.run_id
            params = [Param(key, str(value)[:6000]) for key, value in _flatten(_recipe_config(recipe)).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])
            self.client.log_text(self.run_id, dump_recipe(recipe), "ftclip_recipe.yaml")
        except (MlflowException, OSError) as error:
            where = recipe.mlflow_tracking_uri or "MLflow's default tracking URI"
            raise TrackerError(f"mlflow_tracking_uri: cannot start an MLflow run at {where}: {error}") from None

    def _metrics(self, values: dict[str, float], step: int) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(name, value, now, step) for name, value in values.items()]

    def write(self, record: dict[str, Any]) -> None:
        metrics = [metric for step, values in rows_by_step(record).items() for metric in self._metrics(values, step)]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])
        if record.get("spike_steps"):
            self.spike_steps += record["spike_steps"]
            self.client.set_tag(self.run_id, "ftclip.spike_steps", ",".join(map(str, self.spike_steps)))

    def close(self) -> None:
        if _stopped_by_error():
            self.client.set_terminated(self.run_id, "FAILED")
            return
        numbers, picture = _report(self.output_dir)
        if numbers:
            self.client.log_batch(self.run_id, metrics=self._metrics(
                {name: value for name, value in numbers.items() if math.isfinite(value)}, 0))
        if picture is not None:
            self.client.log_artifact(self.run_id, str(picture))
        self.client.set_terminated(self.run_id, "FINISHED")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trackers:
    """The trackers the recipe names, fanned out as one sink."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_trackers(recipe: Recipe, output_dir: Path) -> Trackers:
    """The recipe's trackers, started; if one cannot start, those already started end as failed."""
    trackers = Trackers([])
    try:
        if wants_wandb(recipe):
            trackers.sinks.append(WandbLog(recipe, output_dir))
        if wants_mlflow(recipe):
            trackers.sinks.append(MlflowLog(recipe, output_dir))
    except TrackerError:
        trackers.close()  # with the error in flight: each marks its run failed
        raise
    return trackers
