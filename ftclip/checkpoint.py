"""Artifacts and checkpoints, written so that a crash never leaves a half-written one: everything goes to a
temporary folder beside the destination, is fsynced, and is renamed into place only when complete.

A checkpoint (`output_dir/checkpoints/step-N/`) holds the trainable weights (a peft adapter or the full
model, safetensors), `trainer_state.pt` (optimizer, scheduler, clip statistics, RNG states; read back with
`torch.load(weights_only=True)`), `trainer_state.json` (step, data position, counters: readable by people)
and the resolved recipe. `checkpoints/latest` names the newest complete one and is replaced atomically."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ftclip.errors import OutputError
from ftclip.recipe import Recipe, dump_recipe

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_TENSORS = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
SHARDED = "sharded"  # torch.distributed.checkpoint folder of an FSDP run
# Recipe keys that do not change what the run computes; everything else must match to resume.
RESUME_IGNORES = {"output_dir", "logging_steps", "save_steps", "save_total_limit", "max_skipped_steps", "eval_steps",
                  "dataset_cache_dir", "saves_per_epoch", "evals_per_epoch", "resume_from_checkpoint"}

RECIPE_FILE = "ftclip_recipe.yaml"


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output folder, or say clearly why it cannot be used — before any model loads."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output_dir: {path} exists and is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ftclip-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"output_dir: {path} is not writable: {error.strerror or error}") from None
    return path


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` whole, on failure it is removed and any
    earlier `final` is left untouched."""
    final = Path(final)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        retired = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, retired)
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync_dir(final.parent)


def save_artifact(model, tokenizer, recipe: Recipe, destination: Path, state_dict=None) -> Path:
    """The trained adapter (peft) or full model, its tokenizer and the resolved recipe, as safetensors.
    `state_dict`: the full weights when the model itself is sharded (FSDP)."""
    try:
        with atomic_directory(destination) as staging:
            model.save_pretrained(staging, **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(staging)
            (staging / RECIPE_FILE).write_text(dump_recipe(recipe))
    except OSError as error:
        raise OutputError(f"cannot write {destination}: {error.strerror or error}") from None
    return destination


# ---------------------------------------------------------------- checkpoints


@dataclass
class TrainingState:
    """Everything besides the weights that a resumed run needs to continue exactly where it stopped."""

    step: int  # optimizer steps completed
    epoch: int
    batch_in_epoch: int  # micro-batches of `epoch` already consumed
    counters: dict[str, int]  # clipped_steps, skipped_steps
    tensors: dict[str, Any]  # optimizer, scheduler, clipper, rng
    world_size: int = 1  # the data order depends on it, so a resume must use the same


def rng_states() -> dict[str, Any]:
    version, state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def is_complete(checkpoint: Path) -> bool:
    # The state files are written last, so their presence means the weights are there too; a folder named
    # step-N only ever appears by rename, but a copy made by hand might be partial.
    return (checkpoint / STATE_TENSORS).is_file() and (checkpoint / STATE_JSON).is_file()


def remove_partial_checkpoints(output_dir: Path) -> list[Path]:
    """Staging folders left by a process killed mid-save: never complete, safe to delete."""
    root = Path(output_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def complete_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and _step_of(path) is not None and is_complete(path)]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    root = Path(output_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _step_of(named) is not None and is_complete(named):
            return named
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` whole: readers see the old text or the new, never a mix."""
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    _fsync_dir(path.parent)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def _write_state(folder: Path, recipe: Recipe, state: TrainingState, **readable_extra) -> None:
    """The recipe and the training state; written last into a checkpoint, so their presence marks it complete."""
    (folder / RECIPE_FILE).write_text(dump_recipe(recipe))
    torch.save(state.tensors, folder / STATE_TENSORS)
    readable = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                "sampler_seed": recipe.seed, "world_size": state.world_size, **readable_extra, **state.counters}
    (folder / STATE_JSON).write_text(json.dumps(readable, indent=2))


def _prune(output_dir: Path, recipe: Recipe) -> None:
    if recipe.save_total_limit:
        for old in complete_checkpoints(output_dir)[: -recipe.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(model, recipe: Recipe, state: TrainingState, output_dir: Path) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, then prune beyond save_total_limit.
    A failure (a full disk) removes the partial folder and leaves every earlier checkpoint as it was."""
    root = Path(output_dir) / CHECKPOINTS
    destination = root / f"step-{state.step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with atomic_directory(destination) as staging:
            model.save_pretrained(staging / ("adapter" if recipe.adapter else "model"))
            _write_state(staging, recipe, state)
        write_text_atomically(root / LATEST, destination.name)
    except OSError as error:
        previous = latest_checkpoint(output_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise OutputError(f"cannot write checkpoint {destination}: {error.strerror or error}{kept}") from None
    _prune(output_dir, recipe)
    return destination


def read_training_state(checkpoint: Path) -> TrainingState:
    """Step, data position, counters, and the scheduler/clip/RNG (and, unsharded, optimizer) state."""
    readable = json.loads((checkpoint / STATE_JSON).read_text())
    tensors = torch.load(checkpoint / STATE_TENSORS, map_location="cpu", weights_only=True)
    counters = {name: readable[name] for name in ("clipped_steps", "skipped_steps")}
    return TrainingState(readable["step"], readable["epoch"], readable["batch_in_epoch"], counters, tensors,
                         readable.get("world_size", 1))


def load_checkpoint(checkpoint: Path, model, recipe: Recipe) -> TrainingState:
    """Load the trainable weights into `model` (built exactly as for a fresh run) and return the state."""
    from safetensors.torch import load_file

    weights = checkpoint / ("adapter" if recipe.adapter else "model")
    files = sorted(weights.glob("*.safetensors"))
    if not files:
        raise OutputError(f"checkpoint {checkpoint} has no safetensors weights in {weights}")
    loaded: dict[str, torch.Tensor] = {}
    for file in files:
        loaded.update(load_file(file))
    if recipe.adapter:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, loaded)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise OutputError(f"checkpoint {checkpoint} does not fit this model: unexpected {unexpected[:3]}")
    else:
        missing = set(trainable_state_dict(model)) - set(loaded)
        tied = {name for name in missing if name.endswith("lm_head.weight")}  # saved once when tied
        model.load_state_dict(loaded, strict=False)
        if missing - tied:
            raise OutputError(f"checkpoint {checkpoint} lacks weights: {sorted(missing - tied)[:3]}")
    return read_training_state(checkpoint)


# ---------------------------------------------------------------- sharded (FSDP2) checkpoints


def save_sharded_checkpoint(model, optimizer, unwrapped, recipe: Recipe, state: TrainingState, output_dir: Path,
                            dist) -> Path:
    """FSDP: every rank writes its own shards of the weights and optimizer state with
    torch.distributed.checkpoint (nothing is gathered for them); rank 0 adds the rest, and a gathered copy
    of the trainable weights in the usual adapter/model format so any checkpoint can be used on its own.
    The staging folder has a fixed name, shared by all ranks, and is renamed by rank 0 when complete."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    root = Path(output_dir) / CHECKPOINTS
    destination = root / f"step-{state.step}"
    staging = root / f".{destination.name}.tmp-sharded"
    try:
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / SHARDED)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.is_main:
            unwrapped.save_pretrained(staging / ("adapter" if recipe.adapter else "model"), state_dict=full)
            _write_state(staging, recipe, state, sharded=True)
            _fsync_tree(staging)
            if destination.exists():
                shutil.rmtree(destination)
            os.rename(staging, destination)
            _fsync_dir(root)
            write_text_atomically(root / LATEST, destination.name)
            _prune(output_dir, recipe)
    except OSError as error:
        raise OutputError(f"cannot write checkpoint {destination}: {error.strerror or error}") from None
    finally:
        dist.barrier()
    return destination


def load_sharded_checkpoint(checkpoint: Path, model, optimizer) -> TrainingState:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (checkpoint / SHARDED).is_dir():
        raise OutputError(f"{checkpoint} was not written by an FSDP run (no {SHARDED}/); resume it with strategy: ddp")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    wanted = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(wanted, checkpoint_id=checkpoint / SHARDED)
    set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optimizer"])
    return read_training_state(checkpoint)


def recipe_differences(checkpoint: Path, recipe: Recipe) -> list[str]:
    """Keys whose value differs between the checkpoint's recipe and this one (those that change the run)."""
    saved = yaml.safe_load((checkpoint / RECIPE_FILE).read_text()) or {}
    current = yaml.safe_load(dump_recipe(recipe)) or {}
    differences = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_IGNORES or saved.get(key) == current.get(key):
            continue
        differences.append(f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now")
    return differences
