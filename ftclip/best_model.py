"""Early stopping and the best model, with Hugging Face Trainer's meaning (EarlyStoppingCallback,
load_best_model_at_end), which Axolotl passes through.

Each evaluation's `metric_for_best_model` (default eval_loss) is compared with the best so far: an
evaluation that is not strictly better counts towards `early_stopping_patience`, and that many in a row stop the
run (after that step's checkpoint, if it saves one). With `load_best_model_at_end` the run's result is the best
checkpointed evaluation: the weights of the checkpoint whose step's evaluation was best (that checkpoint is kept
from pruning), or the final weights when the last evaluation is the best. Only checkpointed evaluations can be
chosen, so save_steps must be a multiple of eval_steps (Hugging Face's rule)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftclip.errors import FtclipError
from ftclip.recipe import Recipe


def metric_name(recipe: Recipe) -> str:
    """The evaluation value compared: metric_for_best_model with eval_ implied (loss → eval_loss)."""
    name = recipe.metric_for_best_model or "loss"
    return name if name.startswith("eval_") else f"eval_{name}"


@dataclass
class BestModel:
    metric: str
    greater_is_better: bool
    patience: int | None
    best: float | None = None  # the best evaluation so far (every evaluation counts; ∓inf while all were NaN)
    bad_evaluations: int = 0  # evaluations in a row that were not better
    best_checkpoint_step: int | None = None  # the step of the best checkpointed evaluation
    best_checkpoint_value: float | None = None

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> BestModel | None:
        if not (recipe.early_stopping_patience or recipe.load_best_model_at_end):
            return None
        metric = metric_name(recipe)
        greater = recipe.greater_is_better
        if greater is None:  # Hugging Face's default: a loss is better lower, anything else higher
            greater = not metric.endswith("loss")
        return cls(metric, greater, recipe.early_stopping_patience)

    def better(self, value: float, than: float | None) -> bool:
        """Strictly better (a NaN never is), as Hugging Face compares with np.greater or np.less; anything that is
        not NaN is better than nothing yet."""
        if than is None:
            return not math.isnan(value)
        return value > than if self.greater_is_better else value < than

    def observe(self, step: int, record: dict[str, Any], checkpointed: bool) -> bool:
        """Take the evaluation in `record` (logged at `step`, saved in a checkpoint or not); True when the run
        should stop early."""
        if self.metric not in record:
            names = ", ".join(sorted(key for key in record if key.startswith("eval_")))
            raise FtclipError(f"metric_for_best_model: {self.metric} is not among the evaluation's values ({names})")
        value = float(record[self.metric])
        # As EarlyStoppingCallback: the first evaluation never counts against the patience; later ones do unless
        # strictly better. Then, as Trainer._determine_best_metric, the best starts at ∓inf (so a NaN is never it).
        if self.best is not None and not self.better(value, self.best):
            self.bad_evaluations += 1
        else:
            self.bad_evaluations = 0
        if self.best is None:
            self.best = -math.inf if self.greater_is_better else math.inf
        if self.better(value, self.best):
            self.best = value
        if checkpointed and self.better(value, self.best_checkpoint_value):
            self.best_checkpoint_step, self.best_checkpoint_value = step, value
        return self.patience is not None and self.bad_evaluations >= self.patience

    def best_checkpoint(self, output_dir: Path) -> Path | None:
        if self.best_checkpoint_step is None:
            return None
        return Path(output_dir) / "checkpoints" / f"step-{self.best_checkpoint_step}"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations,
                "best_checkpoint_step": self.best_checkpoint_step, "best_checkpoint_value": self.best_checkpoint_value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.bad_evaluations = state["bad_evaluations"]
        self.best_checkpoint_step = state["best_checkpoint_step"]
        self.best_checkpoint_value = state["best_checkpoint_value"]
