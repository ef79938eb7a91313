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


def _number(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return f"{value:.{digits}g}"


class MetricsLog:
    """Append-only JSON lines, flushed per record so a crash keeps everything logged so far."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # json writes non-finite floats as NaN/Infinity; keep the line parseable by strict readers too.
        clean = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TrainingView:
    """Live progress: step/total, loss, pre-clip grad norm, whether it clipped, lr, tokens/s, ETA."""

    def __init__(self, console: Console, total_steps: int):
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
            "train", total=total_steps, loss="-", grad_norm="-", clipped="", lr="-", tokens_per_s="-"
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
        self.progress.console.print(
            f"step {record['step']:>5}/{record['total_steps']}  loss {_number(record['loss'])}  "
            f"grad-norm pre-clip {_number(record['grad_norm'])} "
            f"(min {_number(record['grad_norm_min'])} max {_number(record['grad_norm_max'])})  "
            f"post-clip {_number(record['post_clip_norm'])}  clip-rate {record['clip_rate']:.0%}  "
            f"lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s",
            highlight=False,
        )

    def warn(self, message: str) -> None:
        self.progress.console.print(f"[yellow]warning:[/] {message}", highlight=False)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="ftclip run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, _number(value) if isinstance(value, float) else str(value))
    return table
