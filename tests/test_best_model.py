"""Early stopping and load_best_model_at_end (ftclip/best_model.py): the same decisions as Hugging Face's
EarlyStoppingCallback and Trainer, and real runs on the tiny model that stop, keep and save the right weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ALPACA, write_jsonl
from rich.console import Console
from safetensors.torch import load_file

from ftclip.best_model import BestModel
from ftclip.errors import RecipeError
from ftclip.recipe import load_recipe, parse_recipe
from ftclip.train import train

BASE = "base_model: m\ndatasets:\n  - {path: d.jsonl, type: alpaca}\n"


def run(recipe_path, **options):
    return train(load_recipe(recipe_path), Console(quiet=True), **options)


def hugging_face_stop(values: list[float], patience: int, greater_is_better: bool) -> int | None:
    """The evaluation (1-based) after which transformers' EarlyStoppingCallback stops a run: its own
    check_metric_value against the TrainerState, whose best_metric Trainer._determine_best_metric then updates."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import EarlyStoppingCallback

    args = TrainingArguments(output_dir="unused", metric_for_best_model="loss", greater_is_better=greater_is_better,
                             report_to=[])
    state, control = TrainerState(), TrainerControl()
    callback = EarlyStoppingCallback(early_stopping_patience=patience)
    operator = np.greater if greater_is_better else np.less
    for number, value in enumerate(values, start=1):
        callback.on_evaluate(args, state, control, metrics={"eval_loss": value})
        if state.best_metric is None:  # Trainer._determine_best_metric
            state.best_metric = float("-inf") if greater_is_better else float("inf")
        if operator(value, state.best_metric):
            state.best_metric = value
        if control.should_training_stop:
            return number
    return None


@pytest.mark.parametrize("greater_is_better", [False, True])
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_decides_as_hugging_face(patience, greater_is_better):
    sequences = [[3.0, 2.5, 2.6, 2.7, 2.4, 2.4, 2.45, 2.5, 2.6, 2.1],
                 [1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 2.5, 2.5, 2.5, 2.5], [float("nan"), 2.0, 2.0]]
    for values in sequences:
        best = BestModel("eval_loss", greater_is_better, patience)
        ours = next((n for n, v in enumerate(values, start=1) if best.observe(n, {"eval_loss": v}, False)), None)
        assert ours == hugging_face_stop(values, patience, greater_is_better), values


def test_the_best_checkpoint_is_the_best_checkpointed_evaluation():
    best = BestModel("eval_loss", greater_is_better=False, patience=None)
    for step, value, saved in [(1, 2.0, False), (2, 2.5, True), (3, 1.5, False), (4, 1.8, True), (5, 1.9, True)]:
        best.observe(step, {"eval_loss": value}, saved)
    assert (best.best, best.best_checkpoint_step, best.best_checkpoint_value) == (1.5, 4, 1.8)
    again = BestModel("eval_loss", False, None)
    again.load_state_dict(best.state_dict())
    assert again == best


def test_recipe_rules():
    def problems(extra: str) -> str:
        with pytest.raises(RecipeError) as raised:
            parse_recipe(BASE + extra)
        return str(raised.value)

    assert "compares evaluations: set val_set_size or test_datasets" in problems("early_stopping_patience: 2\n")
    assert "set eval_steps or evals_per_epoch" in problems("val_set_size: 0.1\nearly_stopping_patience: 2\n")
    assert "not a multiple of eval_steps 4" in problems(
        "val_set_size: 0.1\neval_steps: 4\nsave_steps: 6\nload_best_model_at_end: true\n")
    assert "picks among the run's checkpoints" in problems("val_set_size: 0.1\neval_steps: 4\nload_best_model_at_end: true\n")
    assert "set one of them" in problems("metric_for_best_model: loss\n")
    recipe = parse_recipe(BASE + "val_set_size: 0.1\neval_steps: 2\nsave_steps: 4\nload_best_model_at_end: true\n"
                          "early_stopping_patience: 2\nmetric_for_best_model: eval_rewards/accuracy\n")
    best = BestModel.for_recipe(recipe)
    assert (best.metric, best.greater_is_better, best.patience) == ("eval_rewards/accuracy", True, 2)  # HF's default
    assert BestModel.for_recipe(parse_recipe(BASE + "val_set_size: 0.1\neval_steps: 2\nearly_stopping_patience: 1\n"
                                                    "metric_for_best_model: loss\n")).metric == "eval_loss"


def test_a_run_stops_after_patience_evaluations_without_improvement(make_recipe):
    # A learning rate of 1e-30 moves the LoRA weights by ~1e-30: every evaluation returns the same float, and an
    # equal value is not an improvement (Hugging Face compares strictly), so the run stops after 1 + patience.
    path = make_recipe(val_set_size=2, eval_steps=1, max_steps=10, learning_rate=1e-30, early_stopping_patience=2)
    result = run(path)
    evaluations = [r["eval_loss"] for r in result.records if "eval_loss" in r]
    assert len(set(evaluations)) == 1 and len(evaluations) == 3
    assert result.steps == 3 and result.stopped_early
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_patience_count_survives_a_resume(make_recipe, tmp_path):
    settings = dict(val_set_size=2, eval_steps=1, save_steps=2, max_steps=10, learning_rate=1e-30,
                    early_stopping_patience=3)
    first = run(make_recipe(**settings))
    assert first.steps == 4  # evaluation 1 is the best, 2-4 are not: stop after step 4
    resumed = run(make_recipe("again.yaml", **settings, output_dir=str(tmp_path / "again")),
                  resume=first.output_dir / "checkpoints" / "step-2")
    assert resumed.resumed_from is not None and resumed.steps == 4  # not 5: two bad evaluations came with step-2


def test_load_best_model_at_end_saves_the_best_checkpoint_and_keeps_it(make_recipe, tmp_path, alpaca_file):
    # The evaluation set is the training set, whose loss falls as the model learns it; asking for the *greatest*
    # loss makes the earliest checkpoint the best one, so the result must be step-2's weights, not the last.
    settings = dict(test_datasets=[{"path": str(alpaca_file), "type": "alpaca"}], eval_steps=2, save_steps=2,
                    save_total_limit=1, max_steps=6, load_best_model_at_end=True, metric_for_best_model="loss",
                    greater_is_better=True)
    result = run(make_recipe(**settings))
    evaluations = {r["step"]: r["eval_loss"] for r in result.records if "eval_loss" in r}
    assert evaluations[2] > evaluations[6], evaluations  # the premise: learning lowers the training set's loss
    assert sorted(p.name for p in (result.output_dir / "checkpoints").glob("step-*")) == ["step-2", "step-6"]
    saved = load_file(result.artifact / "adapter_model.safetensors")
    best = load_file(result.output_dir / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors")
    last = load_file(result.output_dir / "checkpoints" / "step-6" / "adapter" / "adapter_model.safetensors")
    assert all((saved[name] == best[name]).all() for name in saved)
    assert any((saved[name] != last[name]).any() for name in saved)
    assert result.chosen.startswith("the best checkpoint, step-2")
    # Without it, the result is the last step's weights.
    plain = run(make_recipe("plain.yaml", **{**settings, "load_best_model_at_end": False, "metric_for_best_model": None,
                                            "greater_is_better": None, "output_dir": str(tmp_path / "plain")}))
    plain_saved = load_file(plain.artifact / "adapter_model.safetensors")
    assert all((plain_saved[name] == last[name]).all() for name in plain_saved) and plain.chosen is None


def test_an_unknown_metric_is_named(make_recipe):
    from ftclip.errors import FtclipError

    path = make_recipe(val_set_size=2, eval_steps=1, max_steps=2, early_stopping_patience=1,
                       metric_for_best_model="accuracy")
    with pytest.raises(FtclipError, match=r"eval_accuracy is not among the evaluation's values \(eval_loss\)"):
        run(path)


def test_evaluations_run_at_eval_steps_that_are_not_logging_steps(make_recipe):
    result = run(make_recipe(val_set_size=2, eval_steps=3, logging_steps=4, max_steps=8))
    assert [r["step"] for r in result.records if "eval_loss" in r] == [3, 6, 8]


def test_a_different_data_file_for_evaluation(make_recipe, tmp_path):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", ALPACA[:3])
    result = run(make_recipe(test_datasets=[{"path": str(held_out), "type": "alpaca"}], eval_steps=2, max_steps=2))
    assert "eval_loss" in result.records[-1]
