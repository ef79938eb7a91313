"""ftclip's own exception types. Library code raises these with a message for a person;
only cli.py turns them into text and exit codes."""

from __future__ import annotations

from dataclasses import dataclass


class FtclipError(Exception):
    """An error the user can fix (bad recipe, missing file, impossible combination)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe, located as precisely as the YAML allows."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class RecipeError(FtclipError):
    """A recipe is invalid; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DataError(FtclipError):
    """A dataset file is missing, unreadable or holds a malformed record."""


class ModelError(FtclipError):
    """The model or tokenizer cannot be loaded as the recipe asks."""


class OutputError(FtclipError):
    """The output directory cannot be written."""


class ResumeError(FtclipError):
    """A checkpoint exists but cannot continue this recipe (the run-changing settings differ)."""


class TrackerError(FtclipError):
    """A tracker the recipe names (W&B, MLflow) cannot start."""


class PeerLost(FtclipError):
    """Under torchrun, another process of the run died or became unreachable mid-run (a node killed, a network
    failure): this one stops too. Not bad input: the CLI gives it exit 1; the last checkpoint is intact."""


class RunStopped(Exception):
    """Training stopped early after saving a checkpoint: a signal (exit 130/143) or too many non-finite
    steps in a row (exit 1). Not an FtclipError: the input was fine."""

    def __init__(self, message: str, exit_code: int, checkpoint=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


class StorageError(FtclipError):
    """Writing a checkpoint or the final artifact failed: the disk is full or the folder refuses writes. The
    input was fine, so the CLI gives it an exit code of its own (3); earlier checkpoints are intact."""
