"""The contract between the training loop and a training objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class MicroBatchLoss:
    """One micro-batch's share of the step: `loss` is what backward runs on, its sum over the step's
    micro-batches is the step's loss (a mean over `step_items`). `metrics` are detached values normalized the
    same way (a sum over the micro-batch divided by the step's items), so the loop sums them over micro-batches
    and averages them over ranks exactly as it does the loss, e.g. {"rewards/accuracy": ...}."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """What a training method does with micro-batches (see ftclip/objectives/__init__.py).

    A micro-batch is whatever the data stage's rows hold (`rows.rows(indices)`): lists of (input_ids, labels)
    segments for SFT. The objective is the only part of the loop that looks inside them."""

    name: str

    def step_items(self, group: list[list[Any]]) -> int:
        """What the step's loss is a mean over, counted over every micro-batch of the step (all ranks)."""

    def batch_tokens(self, batch: list[Any]) -> int:
        """Tokens the model reads for this micro-batch (tokens/s)."""

    def collate(self, batch: list[Any], pad_token_id: int, training: bool = True) -> dict[str, Any]:
        """Model inputs as host tensors; training=False for evaluation batches (never packed)."""

    def loss(self, model: torch.nn.Module, inputs: dict[str, Any], items: float) -> MicroBatchLoss:
        """This micro-batch's share of the step's mean over `items`."""

    def prepare(self, model: torch.nn.Module, data: Any, context: SetupContext) -> str | None:
        """Work before the first step, on the weights as loaded (before a resume puts trained weights back):
        preference methods set up their reference model or precompute its log-probabilities (attached to
        data.train and data.val). Returns a line for the person at the terminal, or None."""


@dataclass(frozen=True)
class SetupContext:
    """What `Objective.prepare` may need besides the model and the data."""

    recipe: Any
    device: torch.device
    dist: Any  # ftclip.distributed.Distributed
    pad_token_id: int
