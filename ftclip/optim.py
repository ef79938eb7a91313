"""Optimizer and learning-rate schedule, built from the recipe for the trainable parameters."""

from __future__ import annotations

import torch

from ftclip.errors import ModelError
from ftclip.recipe import Recipe, schedule_steps

# transformers' scheduler names; "constant" still honours warmup_steps.
_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_optimizer(recipe: Recipe, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lr, decay = recipe.learning_rate, recipe.weight_decay
    adam = {"betas": (recipe.adam_beta1, recipe.adam_beta2), "eps": recipe.adam_epsilon}
    if recipe.optimizer == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay, **adam)
    if recipe.optimizer == "adamw_torch_fused":
        # Fused: one kernel per step, and it applies ftclip's clip scale and non-finite skip itself.
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay, fused=True, **adam)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, weight_decay=decay, fused=True)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ModelError(f"optimizer: {recipe.optimizer} needs bitsandbytes ({error})") from None
    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return optimizers[recipe.optimizer](parameters, lr=lr, weight_decay=decay, **adam)


PAGED_NEEDS_CUDA = (
    "{name} pages optimizer state between GPU and CPU memory through CUDA unified memory, so it needs a CUDA "
    "device ({why}); use adamw_8bit (the same 8-bit AdamW, unpaged) or run on a GPU"
)


def optimizer_device_problem(recipe: Recipe, cuda_available: bool) -> str | None:
    """Why the recipe's optimizer cannot run on the device it will get, or None. bitsandbytes itself only
    warns and silently drops the paging on the CPU; a recipe asking for paging should hear that it is moot."""
    if not recipe.optimizer.startswith("paged_"):
        return None
    if recipe.device == "cpu":
        return PAGED_NEEDS_CUDA.format(name=recipe.optimizer, why="the recipe sets device: cpu")
    if not cuda_available:
        return PAGED_NEEDS_CUDA.format(name=recipe.optimizer, why="this machine has none")
    return None


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name, options = _SCHEDULES[recipe.lr_scheduler], None
    if recipe.lr_scheduler == "cosine" and recipe.min_lr_ratio:
        name, options = "cosine_with_min_lr", {"min_lr_rate": recipe.min_lr_ratio}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=schedule_steps(recipe, total_steps).warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=options,
    )
