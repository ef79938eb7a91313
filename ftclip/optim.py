"""Optimizer and learning-rate schedule, built from the recipe for the trainable parameters."""

from __future__ import annotations

import torch

from ftclip.errors import ModelError
from ftclip.recipe import Recipe

# transformers' scheduler names; "constant" still honours warmup_steps.
_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_optimizer(recipe: Recipe, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lr, decay = recipe.learning_rate, recipe.weight_decay
    if recipe.optimizer == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay)
    if recipe.optimizer == "adamw_torch_fused":
        # Fused: one kernel per step, and it applies ftclip's clip scale and non-finite skip itself.
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay, fused=True)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=decay, fused=True)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ModelError(f"optimizer: adamw_8bit needs bitsandbytes ({error})") from None
    return bnb.optim.AdamW8bit(parameters, lr=lr, weight_decay=decay)


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        _SCHEDULES[recipe.lr_scheduler],
        optimizer,
        num_warmup_steps=recipe.warmup_steps,
        num_training_steps=total_steps,
    )
