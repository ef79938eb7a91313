"""Training objectives: what one method (SFT today; preference methods and reward models beside it) does
with a micro-batch. The loop in ftclip/train.py is the same for every method: forward → backward
(× accumulation) → clip → optimizer step → scheduler; an objective only says

- how a micro-batch of rows becomes model inputs (`collate`),
- what the step's loss is a mean over (`step_items`: trained tokens for SFT, pairs for DPO, ...),
- how one micro-batch's share of that mean is computed, with the metrics the method reports (`loss`).

So the clip engine, the non-finite skip, gradient accumulation, checkpoints, resume and DDP/FSDP2 apply to
every method unchanged. `objective_for(recipe)` picks the recipe's."""

from __future__ import annotations

from ftclip.objectives.base import MicroBatchLoss, Objective, SetupContext
from ftclip.objectives.sft import SupervisedObjective


def objective_for(recipe) -> Objective:
    """The recipe's training objective: SFT, a preference method (rl) or a reward model (reward_model)."""
    if recipe.rl or recipe.reward_model:
        from ftclip.objectives.preference import KTOObjective, PairObjective, RewardObjective

        if recipe.reward_model:
            return RewardObjective(recipe)
        return KTOObjective(recipe) if recipe.rl == "kto" else PairObjective(recipe)
    return SupervisedObjective(recipe)


__all__ = ["MicroBatchLoss", "Objective", "SetupContext", "SupervisedObjective", "objective_for"]
