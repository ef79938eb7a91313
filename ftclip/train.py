"""The training loop: forward → backward (× accumulation) → clip → optimizer step → scheduler → zero grad.

Setup builds components in dependency order: output folder (fail before anything heavy) → tokenizer →
data (the step count depends on it) → model → optimizer → scheduler (needs the step count) → clipper
(owns the gradient buffers of the trainable parameters the optimizer holds) → resume (needs all of them).
Logging, evaluation and checkpoints are driven by optimizer steps, never by micro-batches.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from safetensors import SafetensorError

from ftclip.best_model import BestModel
from ftclip.checkpoint import (
    TrainingState,
    choose_checkpoint,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    load_error,
    load_sharded_checkpoint,
    low_space_warning,
    prepare_output_dir,
    read_training_state,
    recipe_differences,
    remove_partial_checkpoints,
    restore_rng_states,
    rng_states,
    save_artifact,
    save_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from ftclip.clip import ClipOutcome, GradientClipper
from ftclip.data.batches import Row, Rows, micro_batches
from ftclip.data.pipeline import prepare
from ftclip.distributed import Distributed, gather_objects
from ftclip.errors import DataError, FtclipError, ModelError, PeerLost, ResumeError, RunStopped, StorageError
from ftclip.interrupt import EXIT_CODES, StopRequests
from ftclip.modeling import load_model, load_tokenizer, pick_device, weight_dtype
from ftclip.monitor import ClipMonitor, StepStats
from ftclip.nodes import check_shared_output_dir
from ftclip.objectives import MicroBatchLoss, Objective, SetupContext, objective_for
from ftclip.optim import build_optimizer, build_scheduler, optimizer_device_problem
from ftclip.progress import MetricsLog, NullLog, TensorBoardLog, TrainingView, summary_table
from ftclip.qat import FakeQuantSchedule
from ftclip.recipe import Recipe, best_model_alignment, resolve_schedule, warmup_warning
from ftclip.terminal import make_console, user
from ftclip.trackers import open_trackers

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
    resumed_from: Path | None = None
    stopped_early: bool = False  # early_stopping_patience ended the run at `steps`
    chosen: str | None = None  # load_best_model_at_end: which weights were saved, and why


@dataclass
class _Window:
    """Per-step device tensors since the last log, read back to the host in one go."""

    first_step: int
    losses: list[torch.Tensor] = field(default_factory=list)
    outcomes: list[ClipOutcome] = field(default_factory=list)
    metrics: list[dict[str, torch.Tensor]] = field(default_factory=list)  # the objective's, per step
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def read_back(self, dist: Distributed | None = None) -> tuple[list[StepStats], dict[str, list[float]]]:
        """The window's per-step values on the host, and the objective's metrics per step. Under data
        parallelism each rank's loss (and metric) covers its own share of the batch (divided by the global item
        count over the world size), so the step's value is the mean over ranks; norms and coefficients are
        global already."""
        names = sorted(self.metrics[0]) if self.metrics else []
        per_rank = torch.stack([torch.stack(self.losses).float()]
                               + [torch.stack([step[name].float() for step in self.metrics]) for name in names])
        if dist is not None and dist.enabled:
            per_rank = dist.mean(per_rank)
        stacked = torch.cat([
            per_rank,
            torch.stack([torch.stack([getattr(o, name).float() for o in self.outcomes])
                         for name in ("pre_clip_norm", "clip_coef", "threshold", "nonfinite")]),
        ])
        values = stacked.tolist()  # the one host sync per logging window
        losses, metrics = values[0], dict(zip(names, values[1:1 + len(names)]))
        norms, coefs, thresholds, nonfinite = values[1 + len(names):]
        steps = [StepStats(self.first_step + i, losses[i], norms[i], coefs[i], thresholds[i], bool(nonfinite[i]))
                 for i in range(len(losses))]
        return steps, metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_stream(rows: Rows, recipe: Recipe, world_size: int = 1, epoch: int = 0, skip: int = 0
                       ) -> Iterator[tuple[int, int, list[Row]]]:
    """(epoch, global micro-batches consumed in that epoch, global micro-batch) forever, reshuffled each
    epoch, starting `skip` micro-batches into `epoch` (a resumed run). A global micro-batch holds
    micro_batch_size examples per rank; the loop stops the stream by counting optimizer steps."""
    while True:
        batches = micro_batches(rows, recipe.micro_batch_size * world_size, recipe.data_order_seed, epoch, world_size,
                                skip)
        for index, batch in enumerate(batches, start=skip):
            yield epoch, index + 1, batch
        epoch, skip = epoch + 1, 0


def count_steps(recipe: Recipe, train_rows: int, world_size: int = 1) -> int:
    if recipe.max_steps:
        return recipe.max_steps
    padded = math.ceil(train_rows / world_size) * world_size  # every rank gets a share of the last batch
    micro_batches_per_epoch = math.ceil(padded / (recipe.micro_batch_size * world_size))
    return max(1, math.ceil(recipe.num_epochs * micro_batches_per_epoch / recipe.gradient_accumulation_steps))


def describe_data(data) -> str:
    """One line on where the tokens came from and, with packing, how full the rows are."""
    source = "cache hit" if data.hit else f"tokenized {data.records:,} records in {data.seconds:.1f} s"
    line = "".join(f"warning: {note}\n" for note in data.notes)
    unit = getattr(data.examples, "unit", "examples")  # preference data counts pairs (or KTO examples)
    line += f"data: {len(data.examples):,} {unit}, {data.examples.tokens:,} tokens ({source}: {data.cache})"
    if data.detail:
        line += f"; {data.detail}"
    if data.packing:
        packing = data.packing
        line += (f"\npacking: {packing.examples} examples in {packing.rows} rows of {packing.capacity} tokens, "
                 f"{packing.efficiency:.0%} of the slots hold real tokens")
    return line


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}


def forward_backward(model, group: list[list[Row]], objective: Objective, pad_id: int, device: torch.device,
                     dist: Distributed | None = None) -> MicroBatchLoss:
    """Accumulate gradients over the micro-batches of one optimizer step. Each micro-batch's loss is its sum
    divided by the item count of the *whole* step (all micro-batches, all ranks: trained tokens for SFT), so
    accumulation and data parallelism give the gradient of one big batch: a mean over items, not a mean of
    means. (DDP and FSDP average gradients over ranks, hence the count divided by the world size.) Gradients
    are reduced across ranks once, on the last micro-batch. Returns the step's loss and metrics (detached)."""
    dist = dist or Distributed()
    step_items = objective.step_items(group)
    items = step_items / dist.world_size if dist.enabled else step_items
    step = MicroBatchLoss(torch.zeros((), device=device), {})
    for index, global_batch in enumerate(group):
        batch = dist.local_slice(global_batch)
        with dist.gradient_sync(model, sync=index == len(group) - 1):
            inputs = _on_device(objective.collate(batch, pad_id), device)
            share = objective.loss(model, inputs, items)
            share.loss.backward()
        step.loss += share.loss.detach()
        for name, value in share.metrics.items():
            step.metrics[name] = step.metrics.get(name, 0) + value.detach()
    return step


@torch.no_grad()
def evaluate(model, held_out: Rows, objective: Objective, micro_batch_size: int, pad_id: int,
             device: torch.device) -> dict[str, float]:
    """The objective's loss and metrics over the held-out set, as means over all of its items (tokens for SFT),
    as {"eval_loss": ..., "eval_<metric>": ...}. Every rank evaluates all of it: FSDP needs each forward on every
    rank anyway, and the answer is then the same everywhere with no reduction."""
    model.eval()
    total = MicroBatchLoss(torch.zeros((), device=device), {})
    total_items = 0
    for start in range(0, len(held_out), micro_batch_size):
        batch = held_out.rows(range(start, min(start + micro_batch_size, len(held_out))))
        items = objective.step_items([batch])
        inputs = _on_device(objective.collate(batch, pad_id, training=False), device)
        share = objective.loss(model, inputs, items)
        total.loss += share.loss * items
        for name, value in share.metrics.items():
            total.metrics[name] = total.metrics.get(name, 0) + value * items
        total_items += items
    model.train()
    scale = 1 / max(total_items, 1)
    result = {"eval_loss": float(total.loss) * scale}
    result.update({f"eval_{name}": float(value) * scale for name, value in total.metrics.items()})
    return result


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _log_record(step: int, total: int, epoch: int, window: _Window, steps: list[StepStats], lr: float,
                counters: dict[str, int], metrics: dict[str, list[float]] | None = None) -> dict:
    """One metrics line for the window; `counters` are the run's clipped/skipped totals including it;
    `metrics` the objective's per-step values (their window mean is logged, under their own names)."""
    norms = [s.norm for s in steps]
    clipped = [s.clipped for s in steps]
    last = steps[-1]
    elapsed = time.perf_counter() - window.started
    return {
        "step": step,
        "total_steps": total,
        "epoch": epoch,
        "loss": sum(s.loss for s in steps) / len(steps),
        "grad_norm": last.norm,  # pre-clip, the last step of the window
        "grad_norm_min": min(norms),
        "grad_norm_mean": sum(norms) / len(norms),
        "grad_norm_max": max(norms),
        "post_clip_norm": last.norm * last.coef,
        "clip_coef": last.coef,
        "clipped": last.clipped,
        "clip_rate": sum(clipped) / len(clipped),
        "clipped_steps": counters["clipped_steps"],
        "clip_threshold": _finite_or_none(last.threshold),
        "skipped_steps": counters["skipped_steps"],
        "lr": lr,
        "tokens_per_s": window.tokens / elapsed if elapsed > 0 else 0.0,
        **{name: sum(values) / len(values) for name, values in (metrics or {}).items()},
        # Every step of the window, so `ftclip report` sees each norm whatever logging_steps is.
        "per_step": {
            "step": [s.step for s in steps],
            "loss": [s.loss for s in steps],
            "grad_norm": norms,
            "clip_coef": [s.coef for s in steps],
            "threshold": [_finite_or_none(s.threshold) for s in steps],
        },
    }


def _earlier_records(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The metrics lines a resumed run keeps: those at or before its checkpoint."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill
        if record.get("step", math.inf) > up_to_step:
            break
        records.append(record)
    return records


def _find_resume_point(recipe: Recipe, output_dir: Path, resume: bool | str | Path | None, console: Console,
                       clean: bool = True, verify: str = "auto") -> Path | None:
    """The checkpoint to continue from, verified against the sizes and SHA-256 it recorded: `--resume PATH`
    must be intact; otherwise the newest intact one is used and each damaged one passed over is reported."""
    removed = remove_partial_checkpoints(output_dir) if clean else []
    if removed:
        console.print(f"removed {len(removed)} partial checkpoint folder(s) left by an interrupted save")
    if resume is False:
        return None
    if resume in (None, True):
        chosen, damaged = choose_checkpoint(output_dir, verify)
        checkpoint = chosen.path if chosen else None
        if chosen and chosen.legacy:
            console.print(f"[yellow]warning:[/] {user(checkpoint)} was written without checksums (an older ftclip): "
                          "resuming from it unverified", highlight=False)
        for check in damaged:
            console.print(f"[yellow]warning:[/] checkpoint {user(check.path)} is damaged, not used: "
                          + user("; ".join(check.problems)), highlight=False, soft_wrap=True)
        if checkpoint is None and damaged:
            raise ResumeError(
                f"no intact checkpoint in {output_dir / 'checkpoints'} to resume from (each one above is damaged). "
                "Restore one from a copy, or pass --no-resume to start over (the damaged ones are then replaced "
                "or pruned as the new run saves its own)."
            )
        if checkpoint is not None and damaged:
            console.print(f"[yellow]warning:[/] resuming from {user(checkpoint)}, the newest intact checkpoint",
                          highlight=False)
    else:
        checkpoint = Path(resume)
        if not is_complete(checkpoint):
            raise ResumeError(f"--resume {checkpoint}: not a complete ftclip checkpoint (no trainer_state files)")
        problems = verify_checkpoint(checkpoint, verify).problems
        if problems:
            raise ResumeError(f"--resume {checkpoint}: the checkpoint is damaged: " + "; ".join(problems)
                              + ". `ftclip checkpoints` on its run folder lists the intact ones.")
    if checkpoint is not None:
        differences = recipe_differences(checkpoint, recipe)
        if differences:
            raise ResumeError(
                f"cannot resume from {checkpoint}: the recipe changed in settings that change the run:\n  "
                + "\n  ".join(differences)
                + "\nRestore them, use another output_dir, or pass --no-resume to start over (the old "
                "checkpoints are then replaced as the new run saves its own)."
            )
    return checkpoint


def _agreed_resume_point(recipe: Recipe, output_dir: Path, resume, console: Console, dist: Distributed,
                         verify: str) -> Path | None:
    """The checkpoint every rank resumes from, chosen by rank 0 and sent to the others (a collective): ranks that
    listed output_dir themselves could see different folders (a save that finished between two listings, a
    network filesystem's cached listing) and mix states."""
    if not dist.enabled:
        return _find_resume_point(recipe, output_dir, resume, console, verify=verify)
    checkpoint, failure = None, None
    if dist.is_main:
        try:
            checkpoint = _find_resume_point(recipe, output_dir, resume, console, verify=verify)
        except Exception as error:  # whatever it is, the other ranks must hear of it, not wait
            failure = error
    checkpoint, message = dist.from_rank0((checkpoint, None if failure is None else str(failure) or repr(failure)))
    if failure is not None:
        raise failure
    if message is not None:
        raise ResumeError(message)
    return checkpoint


def _lost_peer(error: RuntimeError) -> bool:
    """A collective failed because another process of the run is gone or unreachable (gloo raises a plain
    RuntimeError naming its transport; newer torch a DistError)."""
    import torch.distributed as torch_dist

    text = str(error)
    return isinstance(error, getattr(torch_dist, "DistError", ())) or any(
        sign in text for sign in ("gloo/transport", "Connection closed by peer", "Connection reset by peer"))


def _peer_lost_message(dist: Distributed, error: RuntimeError, output_dir: Path) -> str:
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = cause.split("] ", 1)[-1].split(" This is typically", 1)[0].rstrip(".")  # gloo's file:line, its advice
    latest = latest_checkpoint(output_dir)
    resume = (f"the last checkpoint is {latest}: start the same command on every node to resume from it"
              if latest else "no checkpoint was saved yet: start the same command on every node to begin again")
    return (f"{dist.node}, rank {dist.rank}: lost contact with the other processes of this run ({cause}). A process "
            f"on another node died, hung or was killed, or the network between the nodes failed; torchrun's log on "
            f"each node says which. {resume[0].upper()}{resume[1:]}.")


def _load_trainable_model(recipe: Recipe, device: torch.device, dist: Distributed, tokenizer=None, note=None):
    """The model, wrapped for data parallelism, with its trainable parameters (after wrapping: FSDP2
    replaces them with DTensor shards)."""
    if dist.enabled and dist.strategy == "fsdp" and not recipe.quantized:  # bitsandbytes quantizes while loading
        model = dist.wrap_from_rank0(
            lambda placement: load_model(recipe, device, tokenizer, note, placement=placement), device)
    else:
        model = dist.wrap(load_model(recipe, device, tokenizer, note))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise DataError("the model has no trainable parameters")
    return model, trainable


def _restore(checkpoint: Path, model, optimizer, scheduler, clipper: GradientClipper, recipe: Recipe,
             dist: Distributed) -> TrainingState:
    """Put a fresh run's components back where the checkpoint left them; the world size must match."""
    try:
        written_by = read_training_state(checkpoint).world_size
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise load_error(checkpoint, error) from None
    if written_by != dist.world_size:
        raise ResumeError(f"{checkpoint} was written by a run of {written_by} process(es), this one has "
                          f"{dist.world_size}; the data order differs, so resume with the same number of processes "
                          "or pass --no-resume")
    try:
        if clipper.sharded:
            state = load_sharded_checkpoint(checkpoint, model, optimizer)
        else:
            state = load_checkpoint(checkpoint, dist.unwrap(model), recipe)
            optimizer.load_state_dict(state.tensors["optimizer"])
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, SafetensorError) as error:
        raise load_error(checkpoint, error) from None
    scheduler.load_state_dict(state.tensors["scheduler"])
    clipper.load_state_dict(state.tensors["clipper"])
    rng = state.tensors["rng"]
    restore_rng_states(rng[dist.rank] if isinstance(rng, list) else rng)
    return state


def _describe_clip(recipe: Recipe, trainable: list, clipper: GradientClipper) -> str:
    clip = recipe.gradient_clipping
    values = sum(p.numel() for p in trainable)
    if clipper.sharded:
        layout = f"{values:,} trainable values as FSDP shards (global norm: one all-reduce of local powers)"
    elif clipper.flat_grads is not None:
        layout = f"{values:,} trainable values in {len(clipper.flat_grads.buffers)} flat buffer(s)"
    else:
        layout = f"{values:,} trainable values"
    scale = ("folded into the fused optimizer step" if clipper.folds_into_optimizer
             else "applied by one multiply per buffer")
    return f"clip: {clip.mode} (max_norm {clip.max_norm}, norm_type {clip.norm_type}); {layout}; scale {scale}"


def train(recipe: Recipe, console: Console | None = None,
          resume: bool | str | Path | None = None, verify: str = "auto") -> TrainResult:
    """Run the recipe. resume: None/True = continue from output_dir's newest intact checkpoint if any,
    False = start over, a path = that checkpoint. verify: "auto" (hash files up to 64 MiB, size of larger
    ones) or "full" (hash every file). Under torchrun every rank calls this; rank 0 alone prints and writes."""
    dist = Distributed.from_environment(recipe.distributed.strategy, recipe.distributed.timeout)
    every_rank_here = False
    try:
        result = _train(recipe, console or make_console(), resume, dist, verify)
        every_rank_here = True
        return result
    except RunStopped:
        every_rank_here = True  # the ranks agreed on the step to stop at
        raise
    except RuntimeError as error:
        if dist.enabled and _lost_peer(error):
            raise PeerLost(_peer_lost_message(dist, error, Path(recipe.output_dir))) from None
        raise
    finally:
        # Wait for the peers only when they are known to be here too: one rank's error must not hang the others.
        dist.close(wait_for_peers=every_rank_here)


def _train(recipe: Recipe, console: Console, resume, dist: Distributed, verify: str = "auto") -> TrainResult:
    if not dist.is_main:
        console = Console(quiet=True)
    output_dir = prepare_output_dir(recipe.output_dir) if dist.is_main else Path(recipe.output_dir)
    check_shared_output_dir(dist, output_dir)  # several nodes: each must see the folder rank 0 writes checkpoints to
    checkpoint = _agreed_resume_point(recipe, output_dir, resume, console, dist, verify)
    seed_everything(recipe.seed)
    device = dist.device(pick_device(recipe))
    if recipe.precision == "auto":  # the saved recipe records what auto meant here, so merge saves the same
        recipe = recipe.model_copy()
        recipe._trained_dtype = str(weight_dtype(recipe, device)).removeprefix("torch.")
    problem = optimizer_device_problem(recipe, torch.cuda.is_available())
    if problem:
        raise ModelError(f"optimizer: {problem}")

    tokenizer = load_tokenizer(recipe)
    data = prepare(recipe, tokenizer, dist)
    console.print(user(describe_data(data)), highlight=False)
    train_rows, held_out = data.train, data.val
    example_count = len(train_rows.members)
    total_steps = count_steps(recipe, len(train_rows), dist.world_size)
    recipe = resolve_schedule(recipe, total_steps)  # saves/evals per epoch become step counts
    misaligned = best_model_alignment(recipe)
    if misaligned:
        raise FtclipError(f"load_best_model_at_end: {misaligned} (saves_per_epoch and evals_per_epoch resolve to "
                          "those steps in this run)")
    short_warmup = warmup_warning(recipe, total_steps)
    if short_warmup:
        console.print(f"[yellow]warning:[/] {user(short_warmup)}", highlight=False)
    ranks = f" × {dist.world_size} ranks ({dist.strategy})" if dist.enabled else ""
    unit = getattr(data.examples, "unit", "examples")  # preference data: pairs (or KTO examples)
    console.print(
        f"[bold]ftclip[/] {example_count} training {unit}, {len(held_out)} {data.held_out}; "
        f"{total_steps} optimizer steps of {recipe.micro_batch_size}×{recipe.gradient_accumulation_steps}{ranks} "
        f"{'packed rows' if recipe.sample_packing else unit} on {device}"
    )

    model, trainable = _load_trainable_model(recipe, device, dist, tokenizer,
                                             lambda text: console.print(user(text), highlight=False))
    neftune = None
    if recipe.neftune_noise_alpha:  # transformers' own hook: noise on the embeddings in training forwards only
        from transformers.integrations.neftune import activate_neftune

        neftune = activate_neftune(dist.unwrap(model), recipe.neftune_noise_alpha)
    objective = objective_for(recipe)  # what a micro-batch's loss is: SFT's, or a preference method's
    # Before the optimizer and any resume: a preference method's reference comes from the weights as loaded.
    setup_note = objective.prepare(model, data, SetupContext(recipe, device, dist, tokenizer.pad_token_id))
    if setup_note:
        console.print(user(setup_note), highlight=False)
    optimizer = build_optimizer(recipe, trainable)
    scheduler = build_scheduler(recipe, optimizer, total_steps)
    sharded = dist.strategy == "fsdp" and dist.enabled
    clipper = GradientClipper(recipe.gradient_clipping, trainable, optimizer, sharded=sharded)
    console.print(_describe_clip(recipe, trainable, clipper))
    space_warning = low_space_warning(recipe, output_dir, trainable, total_steps) if dist.is_main else None
    if space_warning:
        console.print(f"[yellow]warning:[/] {user(space_warning)}", highlight=False)

    state = TrainingState(step=0, epoch=0, batch_in_epoch=0, counters={"clipped_steps": 0, "skipped_steps": 0}, tensors={})
    best = BestModel.for_recipe(recipe)  # early stopping and load_best_model_at_end
    if checkpoint is not None:
        state = _restore(checkpoint, model, optimizer, scheduler, clipper, recipe, dist)
        if best is not None and "best_model" in state.tensors:
            best.load_state_dict(state.tensors["best_model"])
        console.print(f"[bold]resumed[/] from {user(checkpoint)} (step {state.step} of {total_steps}); "
                      "pass --no-resume to start over")

    fake_quant = FakeQuantSchedule(dist.unwrap(model), recipe.qat) if recipe.qat else None  # qat: from its step
    pad_id = tokenizer.pad_token_id
    batches = micro_batch_stream(train_rows, recipe, dist.world_size, state.epoch, state.batch_in_epoch)
    records = _earlier_records(output_dir / METRICS_FILE, state.step) if checkpoint else []
    metrics = MetricsLog(output_dir / METRICS_FILE, keep=records) if dist.is_main else NullLog()
    tensorboard = TensorBoardLog(output_dir / "tensorboard") if dist.is_main else NullLog()
    trackers = open_trackers(recipe, output_dir) if dist.is_main else NullLog()  # W&B, MLflow: as the recipe says
    monitor = ClipMonitor(recipe.gradient_clipping.mode)
    counters = dict(state.counters)
    eval_loss = None
    epoch, batch_in_epoch = state.epoch, state.batch_in_epoch
    window = _Window(first_step=state.step + 1)
    stop_early = False
    last_step = state.step

    def checkpoint_now(step: int) -> Path:
        # Every rank's RNG: their dropout streams diverge once their batches differ in shape.
        rng = gather_objects(rng_states()) if dist.enabled else rng_states()
        extra = {"best_model": best.state_dict()} if best is not None else {}
        keep = best.best_checkpoint(output_dir) if best is not None and recipe.load_best_model_at_end else None
        if sharded:  # every rank writes its shards
            tensors = {"scheduler": scheduler.state_dict(), "clipper": clipper.state_dict(), "rng": rng, **extra}
            state = TrainingState(step, epoch, batch_in_epoch, dict(counters), tensors, dist.world_size)
            return save_sharded_checkpoint(model, optimizer, dist.unwrap(model), recipe, state, output_dir, dist,
                                           keep=keep)
        saved, failure = None, None
        if dist.is_main:
            tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "clipper": clipper.state_dict(), "rng": rng, **extra}
            try:
                saved = save_checkpoint(dist.unwrap(model), recipe,
                                        TrainingState(step, epoch, batch_in_epoch, dict(counters), tensors,
                                                      dist.world_size), output_dir, keep=keep)
            except StorageError as error:
                failure = error
        # No rank moves on (or exits) before the checkpoint is complete, and all stop if it failed.
        if dist.agree_max(int(failure is not None)):
            raise failure or StorageError(f"rank 0 could not write checkpoint step-{step}; see its message")
        return saved or output_dir / "checkpoints" / f"step-{step}"

    def log_window(step: int, view: TrainingView, checkpointed: bool) -> dict[str, Any]:
        """Read the window back (the one host sync), warn, evaluate if due, write one metrics line; an
        evaluation also goes to early stopping and the best-model choice (`checkpointed`: this step saves)."""
        nonlocal stop_early
        steps, step_metrics = window.read_back(dist)
        counters["clipped_steps"] += sum(s.clipped for s in steps)
        counters["skipped_steps"] += sum(s.nonfinite for s in steps)
        record = _log_record(step, total_steps, epoch, window, steps, scheduler.get_last_lr()[0], counters,
                             step_metrics)
        spikes_before = len(monitor.spike_log)
        for notice in monitor.observe(steps) + (monitor.finish(step) if step == total_steps else []):
            view.warn(notice.message, loud=notice.loud)
        record["spike_steps"] = [spike.step for spike in monitor.spike_log[spikes_before:]]
        if held_out and (step == total_steps or (recipe.eval_steps and step % recipe.eval_steps == 0)):
            record.update(evaluate(model, held_out, objective, recipe.micro_batch_size, pad_id, device))
            if best is not None:  # every rank evaluated all of the held-out set: the same answer everywhere
                stop_early = best.observe(step, record, checkpointed) and step < total_steps
                if stop_early:
                    view.warn(f"early stopping: {best.metric} has not improved for {best.bad_evaluations} "
                              f"evaluations (early_stopping_patience {recipe.early_stopping_patience}; best "
                              f"{best.best:.4g}); stopping after step {step}")
        metrics.write(record)
        tensorboard.write(record)
        trackers.write(record)
        records.append(record)
        view.logged(record)
        return record

    model.train()
    try:
        with TrainingView(console, total_steps, completed=state.step) as view, StopRequests(
            lambda sig: view.warn(f"{sig.name} received: finishing this step and saving a checkpoint "
                                  "(press Ctrl-C again to stop without saving)")
        ) as stop:
            for step in range(state.step + 1, total_steps + 1):
                if fake_quant:
                    fake_quant.before_step(step)
                group = []
                for _ in range(recipe.gradient_accumulation_steps):
                    epoch, batch_in_epoch, batch = next(batches)
                    group.append(batch)
                step_result = forward_backward(model, group, objective, pad_id, device, dist)

                outcome = clipper.clip()
                clipper.optimizer_step(outcome)
                scheduler.step()
                clipper.zero_grad()
                last_step = step

                window.losses.append(step_result.loss)
                window.metrics.append(step_result.metrics)
                window.outcomes.append(outcome)
                window.tokens += sum(objective.batch_tokens(batch) for batch in group)
                view.advance()
                # All ranks stop at the same step, whichever of them got the signal.
                stop_signal = dist.agree_max(int(stop.received or 0))
                stopping = stop_signal > 0
                saving = bool(recipe.save_steps and step % recipe.save_steps == 0)
                due_eval = bool(held_out and recipe.eval_steps and step % recipe.eval_steps == 0)
                if step % recipe.logging_steps == 0 or step == total_steps or saving or stopping or due_eval:
                    eval_loss = log_window(step, view, saving).get("eval_loss", eval_loss)
                    window = _Window(first_step=step + 1)
                    # The norm is global, so every rank counts the same skips and aborts together.
                    if monitor.consecutive_skips >= recipe.max_skipped_steps:
                        saved = checkpoint_now(step)
                        raise RunStopped(
                            f"{monitor.consecutive_skips} optimizer steps in a row had a non-finite gradient "
                            f"(max_skipped_steps: {recipe.max_skipped_steps}); the run is diverging. Checkpoint "
                            f"{saved} holds the last finite weights. Lower learning_rate or max_norm, check the "
                            "data, or use bf16 instead of fp16, then resume.", exit_code=1, checkpoint=saved)
                if saving:
                    saved = checkpoint_now(step)
                if stop_early:
                    break
                if stopping:
                    saved = saved if saving else checkpoint_now(step)
                    received = signal.Signals(stop_signal)
                    raise RunStopped(
                        f"stopped by {received.name} after step {step}; checkpoint {saved}. "
                        "Run the same `ftclip train` command to resume.", exit_code=EXIT_CODES[received],
                        checkpoint=saved)
    finally:
        metrics.close()
        tensorboard.close()
        trackers.close()

    if held_out and eval_loss is None:  # resumed from a checkpoint taken at the very last step
        eval_loss = evaluate(model, held_out, objective, recipe.micro_batch_size, pad_id, device)["eval_loss"]
    chosen = None
    if recipe.load_best_model_at_end and best is not None:
        chosen = _best_weights(best, records, last_step, model, optimizer, recipe, output_dir, dist, sharded)
    if recipe.neftune_noise_alpha:
        from transformers.integrations.neftune import deactivate_neftune

        deactivate_neftune(dist.unwrap(model), neftune)
    destination = output_dir / ("adapter" if recipe.adapter else "model")
    artifact = save_final(model, tokenizer, recipe, destination, dist)
    if recipe.qat and dist.is_main:
        _save_quantized(recipe, artifact, output_dir, console)
    result = TrainResult(
        output_dir=output_dir,
        artifact=artifact,
        steps=last_step,
        first_loss=records[0]["loss"] if records else math.nan,
        last_loss=records[-1]["loss"] if records else math.nan,
        eval_loss=eval_loss,
        clipped_steps=counters["clipped_steps"],
        skipped_steps=counters["skipped_steps"],
        records=records,
        resumed_from=checkpoint,
        stopped_early=stop_early,
        chosen=chosen,
    )
    console.print(summary_table(_summary(result, recipe, monitor)))
    return result


def _best_weights(best: BestModel, records: list[dict[str, Any]], last_step: int, model, optimizer, recipe: Recipe,
                  output_dir: Path, dist: Distributed, sharded: bool) -> str:
    """load_best_model_at_end: put the best checkpoint's weights in the model unless the final weights' own
    evaluation is at least as good; say which weights are saved."""
    final = next((record[best.metric] for record in reversed(records) if best.metric in record), None)
    path = best.best_checkpoint(output_dir)
    if path is None or best.best_checkpoint_step == last_step or final is None or not best.better(
            best.best_checkpoint_value, final):
        shown = f", {best.metric} {final:.4g}" if final is not None else ""
        return f"the final weights (step {last_step}{shown}): no checkpoint evaluated better"
    try:
        if sharded:
            load_sharded_checkpoint(path, model, optimizer)
        else:
            load_checkpoint(path, dist.unwrap(model), recipe)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError, SafetensorError) as error:
        raise load_error(path, error) from None
    return (f"the best checkpoint, {path.name} ({best.metric} {best.best_checkpoint_value:.4g}; the final step's "
            f"was {final:.4g})")


def save_final(model, tokenizer, recipe: Recipe, destination: Path, dist: Distributed) -> Path:
    """The trained adapter or model, written by rank 0. Under FSDP every rank first takes part in gathering
    the full (unsharded) state dict; rank 0 then writes it."""
    state_dict = None
    if dist.enabled and dist.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        save_artifact(dist.unwrap(model), tokenizer, recipe, destination, state_dict=state_dict)
    dist.barrier()
    return destination


def _save_quantized(recipe: Recipe, model_dir: Path, output_dir: Path, console: Console) -> None:
    """qat: the trained model quantized as the training simulated, beside model/ (ftclip/qat.py). A scheme whose
    quantized tensors need kernels this machine lacks leaves model/ only, with a word saying so."""
    from ftclip.qat import QUANTIZED_DIR, save_quantized

    try:
        saved = save_quantized(model_dir, recipe.qat, output_dir / QUANTIZED_DIR)
    except (ImportError, AssertionError, RuntimeError, NotImplementedError, ValueError) as error:
        console.print(f"[yellow]warning:[/] qat: {user(model_dir)} holds the trained weights; quantizing them to "
                      f"{recipe.qat.weight_dtype} here failed ({user(str(error))}); quantize them where torchao's "
                      "kernels for it run", highlight=False)
        return
    console.print(f"qat: quantized model ({recipe.qat.weight_dtype} weights, torchao) saved to {saved}", highlight=False)


def _summary(result: TrainResult, recipe: Recipe, monitor: ClipMonitor) -> dict[str, Any]:
    clip = recipe.gradient_clipping
    threshold = {"norm": f"max_norm {clip.max_norm}", "value": f"max_value {clip.max_value}", "off": "no threshold",
                 "auto": f"p{clip.percentile:g} of the last {clip.history_size} norms",
                 "zscore": f"EMA mean + {clip.z_threshold:g} std"}[clip.mode]
    summary = {
        "optimizer steps": result.steps,
        "loss (first → last logged)": f"{result.first_loss:.4f} → {result.last_loss:.4f}",
        "eval loss": f"{result.eval_loss:.4f}" if result.eval_loss is not None else "— (val_set_size: 0)",
        "clipped steps": f"{result.clipped_steps} of {result.steps} ({result.clipped_steps / result.steps:.0%})",
        "skipped (non-finite) steps": result.skipped_steps,
        "gradient spikes": len(monitor.spike_log),
        "largest pre-clip grad norm": max((r["grad_norm_max"] for r in result.records), default=math.nan),
        "clip": f"{clip.mode}, {threshold}",
        "metrics": str(result.output_dir / METRICS_FILE),
        "saved": str(result.artifact),
    }
    if result.stopped_early:
        summary["stopped early"] = (f"after step {result.steps}: early_stopping_patience {recipe.early_stopping_patience} "
                                    "evaluations without improvement")
    if result.chosen:
        summary["saved weights"] = result.chosen
    if result.resumed_from:
        summary["resumed from"] = str(result.resumed_from)
    return summary
