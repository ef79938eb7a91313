"""Writing artifacts so that a crash never leaves a half-written one: everything goes to a temporary
folder beside the destination, is fsynced, and is renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ftclip.errors import OutputError
from ftclip.recipe import Recipe, dump_recipe

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


def save_artifact(model, tokenizer, recipe: Recipe, destination: Path) -> Path:
    """The trained adapter (peft) or full model, its tokenizer and the resolved recipe, as safetensors."""
    try:
        with atomic_directory(destination) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / RECIPE_FILE).write_text(dump_recipe(recipe))
    except OSError as error:
        raise OutputError(f"cannot write {destination}: {error.strerror or error}") from None
    return destination
