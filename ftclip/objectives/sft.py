"""Supervised fine-tuning: the causal-LM loss on the trained tokens, a mean over every trained token of the
step (not a mean of per-micro-batch means), through ftclip.loss (chunked by default)."""

from __future__ import annotations

from typing import Any

import torch

from ftclip.data.batches import Row, collate, row_tokens, trained_tokens
from ftclip.loss import loss_function
from ftclip.objectives.base import MicroBatchLoss
from ftclip.padding_free import collate_flattened


class SupervisedObjective:
    name = "sft"

    def __init__(self, recipe):
        self.compute_loss = loss_function(recipe)
        # Packed rows go to the model padding-free: one flattened row with per-example positions and cu_seq_lens.
        self.flatten_packed = recipe.sample_packing

    def step_items(self, group: list[list[Row]]) -> int:
        return sum(trained_tokens(batch) for batch in group)

    def batch_tokens(self, batch: list[Row]) -> int:
        return row_tokens(batch)

    def collate(self, batch: list[Row], pad_token_id: int, training: bool = True) -> dict[str, Any]:
        if training and self.flatten_packed:
            return collate_flattened(batch, pad_token_id)
        return collate(batch, pad_token_id)

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], items: float) -> MicroBatchLoss:
        result = self.compute_loss(model, inputs, items)
        # An MoE model with output_router_logits: the load-balancing loss is in `loss` (× router_aux_loss_coef)
        # and logged on its own.
        metrics = {"router_aux_loss": result.router_aux_loss} if result.router_aux_loss is not None else {}
        return MicroBatchLoss(result.loss, metrics)

    def prepare(self, model, data, context) -> None:
        return None
