"""What a run shows and records: a rich live view while training, one JSON line per logged step in
`metrics.jsonl`, and a summary table at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ftclip.checkpoint import write_text_atomically


def _number(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return f"{value:.{digits}g}"


def _json_line(record: dict[str, Any]) -> str:
    # json writes non-finite floats as NaN/Infinity; keep the line parseable by strict readers too.
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(record)) + "\n"


class MetricsLog:
    """Append-only JSON lines, flushed per record so a crash keeps everything logged so far. A resumed run
    starts from the lines up to its checkpoint (`keep`), written to a temp file and renamed into place."""

    def __init__(self, path: Path, keep: list[dict[str, Any]] | None = None):
        self.path = path
        write_text_atomically(path, "".join(_json_line(record) for record in keep or []))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(_json_line(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLog:
    """What ranks other than 0 write to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLog:
    """The metrics' scalars under the same names, when the optional `tensorboard` package is installed."""

    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional extra is not installed: metrics.jsonl alone
            self.writer = None
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                self.writer.add_scalar(name, value, record["step"])
            elif isinstance(value, bool):
                self.writer.add_scalar(name, float(value), record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TrainingView:
    """Live progress: step/total, loss, pre-clip grad norm, whether it clipped, lr, tokens/s, ETA."""

    def __init__(self, console: Console, total_steps: int, completed: int = 0):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("grad-norm {task.fields[grad_norm]}{task.fields[clipped]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tokens_per_s]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, completed=completed, loss="-", grad_norm="-", clipped="", lr="-", tokens_per_s="-"
        )

    def __enter__(self) -> TrainingView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def advance(self) -> None:
        self.progress.update(self.task, advance=1)

    def logged(self, record: dict[str, Any]) -> None:
        clipped = " [yellow](clipped)" if record["clipped"] else ""
        self.progress.update(
            self.task,
            loss=_number(record["loss"]),
            grad_norm=_number(record["grad_norm"]),
            clipped=clipped,
            lr=f"{record['lr']:.2e}",
            tokens_per_s=f"{record['tokens_per_s']:.0f}",
        )
        clip_state = f"clipped, coef {record['clip_coef']:.3g}" if record["clipped"] else "not clipped"
        self.progress.console.print(
            f"step {record['step']:>5}/{record['total_steps']}  loss {_number(record['loss'])}  "
            f"grad-norm pre-clip {_number(record['grad_norm'])} "
            f"(window min {_number(record['grad_norm_min'])} mean {_number(record['grad_norm_mean'])} "
            f"max {_number(record['grad_norm_max'])})  "
            f"post-clip {_number(record['post_clip_norm'])} ({clip_state})  "
            + (f"threshold {_number(record['clip_threshold'])}  " if record.get("clip_threshold") is not None else "")
            + f"clip-rate {record['clip_rate']:.0%}  "
            + (f"skipped {record['skipped_steps']}  " if record["skipped_steps"] else "")
            + f"lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
            + (f"  eval-loss {_number(record['eval_loss'])}" if "eval_loss" in record else ""),
            highlight=False,
        )

    def warn(self, message: str, loud: bool = False) -> None:
        label = "[bold red]WARNING:[/]" if loud else "[yellow]warning:[/]"
        self.progress.console.print(f"{label} {message}", highlight=False)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="ftclip run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, _number(value) if isinstance(value, float) else str(value))
    return table


def tokenizing_progress(console: Console):
    """A `progress(records, name)` wrapper for data.tokenize_datasets: a rich bar per dataset file."""
    from rich.progress import track

    def wrap(records, name):
        return track(records, description=f"tokenizing {name}", console=console, transient=True)

    return wrap
