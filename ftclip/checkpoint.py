"""Artifacts and checkpoints, written so that a crash never leaves a half-written one: everything goes to a
temporary folder beside the destination, is fsynced, and is renamed into place only when complete.

A checkpoint (`output_dir/checkpoints/step-N/`) holds the trainable weights (a peft adapter or the full
model, safetensors), `trainer_state.pt` (optimizer, scheduler, clip statistics, RNG states; read back with
`torch.load(weights_only=True)`), `trainer_state.json` (step, data position, counters: readable by people)
and the resolved recipe. `checkpoints/latest` names the newest complete one and is replaced atomically.

`trainer_state.json`, written last, also lists the size and SHA-256 of every other file of the checkpoint and
carries a checksum of its own content. Resume verifies a checkpoint before it trusts it (`verify_checkpoint`)
and falls back to the newest intact one (`choose_checkpoint`). A write that fails for lack of space or
permission raises `StorageError`, naming the folder and the bytes a checkpoint needs."""

from __future__ import annotations

import errno
import hashlib
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
from safetensors import SafetensorError

from ftclip.errors import OutputError, ResumeError, StorageError
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

FILES_KEY = "files"  # in trainer_state.json: {relative path: {"size": bytes, "sha256": hex}} of every other file
CHECKSUM_KEY = "state_sha256"  # in trainer_state.json: SHA-256 of its own content without this key
VERIFY_MODES = ("auto", "full")
# `--verify auto` hashes files up to this size and checks the size of larger ones: hashing runs at ~1.2 GB/s
# here, about as fast as loading the checkpoint, so hashing multi-GB weights would double the resume time.
FULL_HASH_LIMIT = 64 * 2**20


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


# ---------------------------------------------------------------- storage failures


def _tensor_bytes(value) -> int:
    """Bytes of every tensor in a nested state (dicts, lists): about what torch.save and safetensors write."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} TB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


# How a failed write surfaces: Python raises OSError; safetensors' Rust writer a SafetensorError such as
# "I/O error: No space left on device (os error 28)"; torch's zip writer, given a path, a RuntimeError.
WRITE_FAILURES = (OSError, RuntimeError, SafetensorError)


def as_os_error(error: Exception) -> OSError | None:
    """The OSError behind a failed write, or None when the failure was not the storage's."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"os error (\d+)", str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def storage_error(error: OSError, what: str, folder: Path, needed: int, kept: str) -> StorageError:
    """A person-readable StorageError for a failed write: which folder, why, how many bytes it needs."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(folder)
        room = f"; {human_bytes(free)} free there" if free is not None else ""
        advice = "Free some space (or point output_dir at a larger disk)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        room = ""
        advice = "Make the folder writable (or point output_dir elsewhere)"
    else:
        room = ""
        advice = "Fix the storage"
    return StorageError(f"cannot write {what} in {folder}: {reason} (it needs about {human_bytes(needed)}{room}). "
                        f"The partial write was removed. {kept} {advice}, then run the same command again.")


def save_artifact(model, tokenizer, recipe: Recipe, destination: Path, state_dict=None) -> Path:
    """The trained adapter (peft) or full model, its tokenizer and the resolved recipe, as safetensors.
    `state_dict`: the full weights when the model itself is sharded (FSDP)."""
    try:
        with atomic_directory(destination) as staging:
            model.save_pretrained(staging, **({"state_dict": state_dict} if state_dict is not None else {}))
            if getattr(tokenizer, "ftclip_processor", None) is not None:  # a vision-language run: the processor
                from ftclip.vlm import save_processor

                save_processor(tokenizer.ftclip_processor, staging)
            else:
                tokenizer.save_pretrained(staging)
            (staging / RECIPE_FILE).write_text(dump_recipe(recipe))
    except WRITE_FAILURES as failure:
        error = as_os_error(failure)
        if error is None:
            raise
        raise storage_error(error, f"the {destination.name} folder", destination.parent,
                            _tensor_bytes(trainable_state_dict(model)) if state_dict is None else _tensor_bytes(state_dict),
                            _kept_message(destination.parent)) from None
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


@dataclass
class CheckpointCheck:
    """What verifying one checkpoint found. `problems` name each damaged file with expected vs found."""

    path: Path
    step: int
    size: int  # bytes on disk
    problems: list[str]
    hashed: int = 0  # files whose SHA-256 was compared
    size_checked: int = 0  # files whose size alone was compared (larger than FULL_HASH_LIMIT, --verify auto)
    legacy: bool = False  # written before checkpoints recorded their files: nothing to verify against

    @property
    def intact(self) -> bool:
        return not self.problems


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def verify_checkpoint(checkpoint: Path, mode: str = "auto") -> CheckpointCheck:
    """Compare a checkpoint's files with the sizes and SHA-256 that trainer_state.json recorded when it was
    written. mode "auto" hashes files up to FULL_HASH_LIMIT and checks the size of larger ones; "full" hashes all."""
    checkpoint = Path(checkpoint)
    check = CheckpointCheck(checkpoint, _step_of(checkpoint) or 0, _folder_bytes(checkpoint), [])
    state_file = checkpoint / STATE_JSON
    if not state_file.is_file() or not (checkpoint / STATE_TENSORS).is_file():
        missing = [name for name in (STATE_TENSORS, STATE_JSON) if not (checkpoint / name).is_file()]
        check.problems.append(f"{' and '.join(missing)} missing: the checkpoint is incomplete")
        return check
    try:
        readable = json.loads(state_file.read_text(encoding="utf-8"))
        if not isinstance(readable, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        check.problems.append(f"{STATE_JSON}: expected a JSON object, found unreadable text ({error}): cut short or damaged")
        return check
    if FILES_KEY not in readable:
        check.legacy = True  # from an ftclip that recorded no checksums
        return check
    if readable.get(CHECKSUM_KEY) != _content_checksum(readable):
        check.problems.append(f"{STATE_JSON}: expected content SHA-256 {str(readable.get(CHECKSUM_KEY))[:16]}…, "
                              f"found {_content_checksum(readable)[:16]}…")
        return check
    for relative, expected in readable[FILES_KEY].items():
        path = checkpoint / relative
        if not path.is_file():
            check.problems.append(f"{relative}: missing (expected {expected['size']:,} bytes)")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            check.problems.append(f"{relative}: expected {expected['size']:,} bytes, found {size:,}")
        elif mode == "full" or size <= FULL_HASH_LIMIT:
            check.hashed += 1
            found = sha256_of_file(path)
            if found != expected["sha256"]:
                check.problems.append(f"{relative}: expected SHA-256 {expected['sha256'][:16]}…, found {found[:16]}…")
        else:
            check.size_checked += 1
    return check


def step_folders(output_dir: Path) -> list[Path]:
    """Every checkpoints/step-N folder, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((path for path in root.iterdir() if path.is_dir() and _step_of(path) is not None), key=_step_of)


def resume_order(output_dir: Path) -> list[Path]:
    """The step-N folders in the order a resume tries them: the one `latest` names (normally the newest; after a
    kill between the rename and the pointer update, an older one), then the rest newest first."""
    candidates = step_folders(output_dir)[::-1]
    pointer = Path(output_dir) / CHECKPOINTS / LATEST
    named = Path(output_dir) / CHECKPOINTS / pointer.read_text().strip() if pointer.is_file() else None
    if named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    return candidates


def choose_checkpoint(output_dir: Path, mode: str = "auto") -> tuple[CheckpointCheck | None, list[CheckpointCheck]]:
    """The check of the first checkpoint in resume order that verifies (None when none does), and the checks
    of those passed over."""
    rejected = []
    for candidate in resume_order(output_dir):
        check = verify_checkpoint(candidate, mode)
        if check.intact:
            return check, rejected
        rejected.append(check)
    return None, rejected


def load_error(checkpoint: Path, error: Exception) -> ResumeError:
    """A checkpoint that verified but still fails to load (a bit flip in a large file checked by size only)."""
    return ResumeError(f"cannot load checkpoint {checkpoint}: {type(error).__name__}: {error}. Its files larger than "
                       f"{human_bytes(FULL_HASH_LIMIT)} were checked by size only; `ftclip checkpoints "
                       f"{checkpoint.parent.parent} --verify full` hashes them. Resume with --verify full, --resume "
                       "an older checkpoint, or pass --no-resume to start over.")


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


class _HashingWriter:
    """A write-only file that hashes what passes through it, so a file is hashed while it is written."""

    def __init__(self, handle):
        self.handle, self.name, self.digest = handle, handle.name, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _content_checksum(readable: dict) -> str:
    """SHA-256 of trainer_state.json's content (without its checksum key), independent of formatting."""
    body = {key: value for key, value in readable.items() if key != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _manifest(folder: Path, known: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` (but trainer_state.json), by relative path. Files written
    through a hashing writer are in `known`; the others (written by save_pretrained, torch.distributed.checkpoint)
    are read back once, from the page cache."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative == STATE_JSON:
            continue
        files[relative] = {"size": path.stat().st_size, "sha256": known.get(relative) or sha256_of_file(path)}
    return files


def _write_state(folder: Path, recipe: Recipe, state: TrainingState, **readable_extra) -> None:
    """The recipe and the training state; written last into a checkpoint, so their presence marks it complete.
    trainer_state.json, the very last file, lists every other file's size and SHA-256."""
    recipe_bytes = dump_recipe(recipe).encode()
    (folder / RECIPE_FILE).write_bytes(recipe_bytes)
    with open(folder / STATE_TENSORS, "wb") as handle:
        writer = _HashingWriter(handle)
        torch.save(state.tensors, writer)
    known = {RECIPE_FILE: hashlib.sha256(recipe_bytes).hexdigest(), STATE_TENSORS: writer.digest.hexdigest()}
    readable = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                "sampler_seed": recipe.seed, "world_size": state.world_size, **readable_extra, **state.counters,
                FILES_KEY: _manifest(folder, known)}
    readable[CHECKSUM_KEY] = _content_checksum(readable)
    (folder / STATE_JSON).write_text(json.dumps(readable, indent=2))


def _prune(output_dir: Path, recipe: Recipe, keep: Path | None = None) -> None:
    """Remove all but the save_total_limit newest checkpoints, and never `keep` (the best one, for
    load_best_model_at_end: as Hugging Face does, it is kept besides the newest ones)."""
    if recipe.save_total_limit:
        for old in complete_checkpoints(output_dir)[: -recipe.save_total_limit]:
            if keep is None or old.resolve() != Path(keep).resolve():
                shutil.rmtree(old, ignore_errors=True)


# Optimizer state written per trainable value: AdamW keeps two fp32 moments, its 8-bit forms two bytes.
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2,
                         "paged_adamw_8bit": 2, "sgd": 0}


def estimated_checkpoint_bytes(recipe: Recipe, trainable: list) -> int:
    """About how many bytes one checkpoint takes: the trainable weights and the optimizer's state for them (an
    FSDP checkpoint holds the weights twice: as shards, and gathered in the usual format)."""
    weights = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = sum(p.numel() for p in trainable) * OPTIMIZER_STATE_BYTES.get(recipe.optimizer, 8)
    return weights * (2 if recipe.distributed.strategy == "fsdp" else 1) + optimizer


def low_space_warning(recipe: Recipe, output_dir: Path, trainable: list, total_steps: int) -> str | None:
    """A warning when output_dir's disk has less free space than the run's checkpoints will take: the
    save_total_limit newest, one more while the next is written (the oldest is pruned after), and the final
    weights, each estimated from the trainable values and the optimizer's state per value."""
    if not recipe.save_steps:
        return None
    weights = sum(p.numel() * p.element_size() for p in trainable)
    per_checkpoint = estimated_checkpoint_bytes(recipe, trainable)
    saves = total_steps // recipe.save_steps
    limit = recipe.save_total_limit
    kept = min(saves, limit + 1) if limit else saves
    needed = per_checkpoint * kept + weights
    free = _free_bytes(Path(output_dir))
    existing = sum(_folder_bytes(folder) for folder in step_folders(output_dir))  # pruned as new ones arrive
    if free is None or free + existing >= needed:
        return None
    limit_text = f"save_total_limit {limit}, plus one while the next is written" if limit else "save_total_limit unset"
    return (f"{output_dir} has {human_bytes(free)} free, but {kept} checkpoint(s) of about {human_bytes(per_checkpoint)} "
            f"({limit_text}) and the final weights need about {human_bytes(needed)}: a save will likely fail "
            "with the disk full (exit 3). Free space, lower save_total_limit, or move output_dir.")


def save_checkpoint(model, recipe: Recipe, state: TrainingState, output_dir: Path, keep: Path | None = None) -> Path:
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
    except WRITE_FAILURES as failure:
        error = as_os_error(failure)
        if error is None:
            raise
        raise storage_error(error, f"checkpoint {destination.name}", root,
                            _tensor_bytes(trainable_state_dict(model)) + _tensor_bytes(state.tensors),
                            _kept_message(output_dir)) from None
    _prune(output_dir, recipe, keep)
    return destination


def _kept_message(output_dir: Path) -> str:
    previous, _ = choose_checkpoint(output_dir)  # verified, so "intact" is a fact, not a hope
    metrics = Path(output_dir) / "metrics.jsonl"
    kept = f"The previous checkpoint {previous.path} is intact" if previous else "No earlier intact checkpoint exists"
    return kept + (f", and {metrics} keeps every logged step." if metrics.is_file() else ".")


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
                            dist, keep: Path | None = None) -> Path:
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
            _prune(output_dir, recipe, keep)
    except WRITE_FAILURES as failure:
        error = as_os_error(failure)
        if dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if error is None:
            raise
        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        raise storage_error(error, f"checkpoint {destination.name}", root, estimated_checkpoint_bytes(recipe, trainable),
                            _kept_message(output_dir)) from None
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
