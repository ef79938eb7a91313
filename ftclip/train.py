"""The training loop: forward → backward (× accumulation) → clip → optimizer step → scheduler → zero grad.

Setup builds components in dependency order: output folder (fail before anything heavy) → tokenizer →
data (the step count depends on it) → model → optimizer → scheduler (needs the step count) → clipper
(owns the gradient buffers of the trainable parameters the optimizer holds).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ftclip.checkpoint import prepare_output_dir, save_artifact
from ftclip.clip import ClipOutcome, GradientClipper
from ftclip.data import Example, collate, load_examples, micro_batches
from ftclip.errors import DataError
from ftclip.modeling import load_model, load_tokenizer, pick_device
from ftclip.optim import build_optimizer, build_scheduler
from ftclip.progress import MetricsLog, TrainingView, summary_table
from ftclip.recipe import Recipe

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    output_dir: Path
    artifact: Path
    steps: int
    first_loss: float
    last_loss: float
    eval_loss: float | None
    clipped_steps: int
    skipped_steps: int
    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Window:
    """Per-step device tensors since the last log, read back to the host in one go."""

    losses: list[torch.Tensor] = field(default_factory=list)
    outcomes: list[ClipOutcome] = field(default_factory=list)
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def read_back(self) -> dict[str, list[float]]:
        stacked = torch.stack(
            [torch.stack(self.losses).float()]
            + [torch.stack([getattr(o, name) for o in self.outcomes]) for name in ("pre_clip_norm", "clip_coef", "nonfinite")]
        )
        losses, norms, coefs, nonfinite = stacked.tolist()  # the one host sync per logging window
        return {"loss": losses, "norm": norms, "coef": coefs, "nonfinite": nonfinite}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def micro_batch_stream(examples: list[Example], recipe: Recipe) -> Iterator[tuple[int, list[Example]]]:
    """(epoch, micro-batch) forever, reshuffled each epoch; the loop stops it by counting optimizer steps."""
    epoch = 0
    while True:
        for batch in micro_batches(examples, recipe.micro_batch_size, recipe.seed, epoch):
            yield epoch, batch
        epoch += 1


def count_steps(recipe: Recipe, train_examples: int) -> int:
    if recipe.max_steps:
        return recipe.max_steps
    micro_batches_per_epoch = math.ceil(train_examples / recipe.micro_batch_size)
    return max(1, math.ceil(recipe.num_epochs * micro_batches_per_epoch / recipe.gradient_accumulation_steps))


def _on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def forward_backward(model, group: list[list[Example]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Accumulate gradients over the micro-batches of one optimizer step. Each micro-batch's summed token
    loss is divided by the token count of the *whole* group, so accumulation gives the same gradient (and
    grad norm) as one big batch: the loss is a mean over tokens, not a mean of micro-batch means."""
    trained_tokens = sum(example.trained_tokens for batch in group for example in batch)
    step_loss = torch.zeros((), device=device)
    for batch in group:
        inputs = _on_device(collate(batch, pad_id), device)
        loss = model(**inputs, num_items_in_batch=trained_tokens).loss
        loss.backward()
        step_loss += loss.detach()
    return step_loss


@torch.no_grad()
def evaluate(model, examples: list[Example], recipe: Recipe, pad_id: int, device: torch.device) -> float:
    model.eval()
    total_loss, total_tokens = torch.zeros((), device=device), 0
    for start in range(0, len(examples), recipe.micro_batch_size):
        batch = examples[start : start + recipe.micro_batch_size]
        tokens = sum(example.trained_tokens for example in batch)
        inputs = _on_device(collate(batch, pad_id), device)
        total_loss += model(**inputs, num_items_in_batch=tokens).loss * tokens
        total_tokens += tokens
    model.train()
    return float(total_loss) / max(total_tokens, 1)


def _log_record(step: int, total: int, epoch: int, window: _Window, lr: float, totals: dict, config) -> dict:
    """One metrics line; `totals` holds the run's clipped/skipped step counts before this window."""
    values = window.read_back()
    norms, coefs = values["norm"], values["coef"]
    clipped = [c < 1.0 for c in coefs]
    elapsed = time.perf_counter() - window.started
    return {
        "step": step,
        "total_steps": total,
        "epoch": epoch,
        "loss": sum(values["loss"]) / len(values["loss"]),
        "grad_norm": norms[-1],  # pre-clip, the last step of the window
        "grad_norm_min": min(norms),
        "grad_norm_mean": sum(norms) / len(norms),
        "grad_norm_max": max(norms),
        "post_clip_norm": norms[-1] * coefs[-1],
        "clip_coef": coefs[-1],
        "clipped": clipped[-1],
        "clip_rate": sum(clipped) / len(clipped),
        "clipped_steps": totals["clipped_steps"] + sum(clipped),
        "clip_threshold": config.max_norm if config.mode == "norm" else None,
        "skipped_steps": totals["skipped_steps"] + int(sum(values["nonfinite"])),
        "lr": lr,
        "tokens_per_s": window.tokens / elapsed if elapsed > 0 else 0.0,
    }


def train(recipe: Recipe, recipe_path: str | Path | None, console: Console | None = None) -> TrainResult:
    console = console or Console()
    output_dir = prepare_output_dir(recipe.output_dir)
    seed_everything(recipe.seed)
    device = pick_device(recipe)

    tokenizer = load_tokenizer(recipe, recipe_path)
    train_examples, val_examples = load_examples(recipe, recipe_path, tokenizer)
    total_steps = count_steps(recipe, len(train_examples))
    console.print(
        f"[bold]ftclip[/] {len(train_examples)} training examples, {len(val_examples)} held out; "
        f"{total_steps} optimizer steps of {recipe.micro_batch_size}×{recipe.gradient_accumulation_steps} on {device}"
    )

    model = load_model(recipe, recipe_path, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise DataError("the model has no trainable parameters")
    optimizer = build_optimizer(recipe, trainable)
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    clipper = GradientClipper(recipe.gradient_clipping, trainable, optimizer)
    console.print(
        f"clip: {recipe.gradient_clipping.mode} (max_norm {recipe.gradient_clipping.max_norm}, "
        f"norm_type {recipe.gradient_clipping.norm_type}); {sum(p.numel() for p in trainable):,} trainable values "
        f"in {len(clipper.flat_grads.buffers)} flat buffer(s); scale "
        + ("folded into the fused optimizer step" if clipper.folds_into_optimizer else "applied by one multiply per buffer")
    )

    pad_id = tokenizer.pad_token_id
    batches = micro_batch_stream(train_examples, recipe)
    metrics = MetricsLog(output_dir / METRICS_FILE)
    records: list[dict[str, Any]] = []
    window, epoch = _Window(), 0
    totals = {"clipped_steps": 0, "skipped_steps": 0}
    model.train()
    try:
        with TrainingView(console, total_steps) as view:
            for step in range(1, total_steps + 1):
                group = []
                for _ in range(recipe.gradient_accumulation_steps):
                    epoch, batch = next(batches)
                    group.append(batch)
                step_loss = forward_backward(model, group, pad_id, device)

                outcome = clipper.clip()
                clipper.optimizer_step(outcome)
                scheduler.step()
                clipper.zero_grad()

                window.losses.append(step_loss)
                window.outcomes.append(outcome)
                window.tokens += sum(len(e.input_ids) for batch in group for e in batch)
                view.advance()
                if step % recipe.logging_steps == 0 or step == total_steps:
                    lr = scheduler.get_last_lr()[0]
                    record = _log_record(step, total_steps, epoch, window, lr, totals, recipe.gradient_clipping)
                    newly_skipped = record["skipped_steps"] - totals["skipped_steps"]
                    if newly_skipped:
                        view.warn(f"non-finite gradient norm: skipped {newly_skipped} step(s) "
                                  f"up to step {step}; weights and optimizer state left unchanged")
                    totals = {name: record[name] for name in totals}
                    metrics.write(record)
                    records.append(record)
                    view.logged(record)
                    window = _Window()
    finally:
        metrics.close()

    eval_loss = evaluate(model, val_examples, recipe, pad_id, device) if val_examples else None
    artifact = save_artifact(model, tokenizer, recipe, output_dir / ("adapter" if recipe.adapter else "model"))
    result = TrainResult(
        output_dir=output_dir,
        artifact=artifact,
        steps=total_steps,
        first_loss=records[0]["loss"],
        last_loss=records[-1]["loss"],
        eval_loss=eval_loss,
        clipped_steps=totals["clipped_steps"],
        skipped_steps=totals["skipped_steps"],
        records=records,
    )
    console.print(summary_table(_summary(result, recipe)))
    return result


def _summary(result: TrainResult, recipe: Recipe) -> dict[str, Any]:
    summary = {
        "optimizer steps": result.steps,
        "loss (first → last logged)": f"{result.first_loss:.4f} → {result.last_loss:.4f}",
        "eval loss": f"{result.eval_loss:.4f}" if result.eval_loss is not None else "— (val_set_size: 0)",
        "clipped steps": f"{result.clipped_steps} of {result.steps} ({result.clipped_steps / result.steps:.0%})",
        "skipped (non-finite) steps": result.skipped_steps,
        "largest pre-clip grad norm": max(r["grad_norm_max"] for r in result.records),
        "clip": f"{recipe.gradient_clipping.mode}, max_norm {recipe.gradient_clipping.max_norm}",
        "metrics": str(result.output_dir / METRICS_FILE),
        "saved": str(result.artifact),
    }
    return summary
