"""What a run shows and records: a rich live view while training, one JSON line per logged step in
`metrics.jsonl`, and a summary table at the end."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console, ConsoleOptions
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ftclip.checkpoint import write_text_atomically
from ftclip.terminal import user


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


def _clock(seconds: float | None) -> str:
    """h:mm:ss, as rich's time columns write it; -:--:-- while unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    return str(timedelta(seconds=max(0, int(seconds))))


def _fit_fields(fields: list[tuple[int, Text]], width: int, separator: str = "  ") -> list[Text]:
    """The fields, in their order, after dropping the least important (lowest `keep`) until they fit `width`."""
    kept = list(fields)
    while len(kept) > 1 and sum(t.cell_len for _, t in kept) + len(separator) * (len(kept) - 1) > width:
        kept.remove(min(kept, key=lambda field: field[0]))  # the first of equals goes first
    return [text for _, text in kept]


def _clip_state(record: dict[str, Any] | None, with_post_clip: bool) -> Text:
    """The last step's pre-clip norm and whether it was clipped (to what, with `with_post_clip`)."""
    if record is None:
        return Text("grad-norm -")
    norm = Text(f"grad-norm {_number(record['grad_norm'])} ")
    if not record["clipped"]:
        return norm.append("not clipped")
    return norm.append(f"clipped to {_number(record['post_clip_norm'])}" if with_post_clip else "clipped", "yellow")


def _preference_fields(record: dict[str, Any], wide: bool = False) -> list[tuple[int, Text]]:
    """A preference run's rewards (rl, reward_model): the reward accuracy (how often the chosen answer out-scores
    the rejected one), the margin, then the rewards and log-probabilities of each side, and the eval accuracy;
    none for SFT. Priorities as in TrainingView.step_line: accuracy right after the loss and the clip state."""
    if "rewards/margins" not in record:
        return []
    fields = []
    if "rewards/accuracy" in record:
        fields.append((88, Text(f"acc {record['rewards/accuracy']:.0%}")))
    fields.append((70, Text(f"margin {_number(record['rewards/margins'])}")))
    if "eval_rewards/accuracy" in record:
        fields.append((86, Text(f"eval-acc {record['eval_rewards/accuracy']:.0%}")))
    fields.append((45, Text(f"rewards {_number(record['rewards/chosen'])}/{_number(record['rewards/rejected'])}")))
    if "logps/chosen" in record:
        fields.append((35, Text(f"logps {_number(record['logps/chosen'])}/{_number(record['logps/rejected'])}")))
    if "kl" in record:
        fields.append((50, Text(f"kl {_number(record['kl'])}")))
    if wide:  # every name spelled out: the wide line has the room
        return [(0, Text(text.plain.replace("rewards ", "rewards chosen/rejected ").replace(
            "logps ", "logps chosen/rejected "))) for _, text in fields]
    return fields


class _LiveLine:
    """The redrawn progress line, laid out for the width it is drawn at: step N/M, ETA, the pre-clip norm and
    whether it clipped, loss and the bar always; the label, elapsed time, lr and tok/s only while there is room."""

    BAR_MIN, BAR_MAX = 10, 40

    def __init__(self, view: TrainingView):
        self.view = view

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        view, record, width = self.view, self.view.last_record, options.max_width
        steps = f"{view.completed}/{view.total_steps}"
        bar_slot = Text(" " * self.BAR_MIN)  # stands in for the bar while the fields are chosen
        fields = [
            (40, Text("train", "bold")),
            (100, Text(steps)),
            (60, bar_slot),
            (70, Text(f"loss {_number(record['loss'])}" if record else "loss -")),
            (80, _clip_state(record, with_post_clip=False)),
            (20, Text(f"lr {record['lr']:.2e}" if record else "lr -")),
            (10, Text(f"{record['tokens_per_s']:.0f} tok/s" if record else "- tok/s")),
            (30, Text(_clock(view.elapsed()))),
            (90, Text(f"eta {_clock(view.eta())}")),
        ]
        kept = _fit_fields(fields, width, separator=" ")
        spare = width - (sum(t.cell_len for t in kept) + len(kept) - 1)
        grid = Table.grid(padding=(0, 1))
        cells = []
        for text in kept:
            if text is bar_slot:
                bar_width = min(self.BAR_MAX, self.BAR_MIN + max(0, spare))
                cells.append(ProgressBar(total=view.total_steps, completed=view.completed, width=bar_width))
                grid.add_column(width=bar_width, no_wrap=True)
            else:
                cells.append(text)
                grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(*cells)
        yield grid


class TrainingView:
    """What the person at the terminal sees while training.

    A terminal gets a redrawn line (`_LiveLine`) that fits its width, plus one line per logging step: the wide,
    full-detail form when it fits, else a compact form with the most useful fields. Anything else (CI logs,
    `| tee`, a file) gets no redrawn line and no control sequences: one plain line per logging step, with the ETA
    in it. rich decides which is which (`Console.is_interactive`: a TTY, not TERM=dumb; TTY_INTERACTIVE=0/1
    overrides) and drops colour under NO_COLOR. Everything stays in metrics.jsonl whatever is shown here."""

    RECENT_STEPS = 50  # the ETA follows the speed of the last this many steps

    def __init__(self, console: Console, total_steps: int, completed: int = 0, clock=time.monotonic):
        self.console = console
        self.total_steps = total_steps
        self.completed = completed
        self.last_record: dict[str, Any] | None = None
        self.interactive = console.is_interactive
        self.status_line = _LiveLine(self)  # what the terminal redraws; a renderable, so tests can print it
        self._clock = clock
        self._started = clock()
        self._step_times: deque[float] = deque([self._started], maxlen=self.RECENT_STEPS + 1)
        self._live = Live(self.status_line, console=console, refresh_per_second=4) if self.interactive else None

    def __enter__(self) -> TrainingView:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def advance(self) -> None:
        self.completed += 1
        self._step_times.append(self._clock())

    def elapsed(self) -> float:
        return self._clock() - self._started

    def eta(self) -> float | None:
        """Seconds left at the recent pace, counting down between steps; None before the first step."""
        if len(self._step_times) < 2:
            return None
        seconds_per_step = (self._step_times[-1] - self._step_times[0]) / (len(self._step_times) - 1)
        since_last = self._clock() - self._step_times[-1]
        return max(0.0, (self.total_steps - self.completed) * seconds_per_step - since_last)

    def logged(self, record: dict[str, Any]) -> None:
        self.last_record = record
        self.console.print(self.step_line(record, self.console.width), highlight=False, soft_wrap=True)

    def step_line(self, record: dict[str, Any], width: int) -> Text:
        """One logged step as one line of at most `width` columns."""
        wide = self._wide_step_line(record)
        if wide.cell_len <= width:
            return wide
        digits = len(str(record["total_steps"]))
        fields = [
            (100, Text(f"step {record['step']:>{digits}}/{record['total_steps']}")),
            (90, Text(f"loss {_number(record['loss'])}")),
            (95, _clip_state(record, with_post_clip=True)),
            (60, Text(f"clip-rate {record['clip_rate']:.0%}")),
            (30, Text(f"window {_number(record['grad_norm_min'])}–{_number(record['grad_norm_max'])}")),
            (20, Text(f"lr {record['lr']:.2e}")),
            (10, Text(f"{record['tokens_per_s']:.0f} tok/s")),
        ]
        if record.get("clip_threshold") is not None:
            fields.insert(4, (40, Text(f"threshold {_number(record['clip_threshold'])}")))
        if record["skipped_steps"]:
            # cumulative, so on the next line again if an eval-loss crowds it out of this one
            fields.insert(3, (84, Text(f"skipped {record['skipped_steps']}", "red")))
        if "eval_loss" in record:
            fields.insert(2, (85, Text(f"eval-loss {_number(record['eval_loss'])}")))
        if not self.interactive:  # no redrawn line shows it: worth more than the window's clip rate
            fields.append((80, Text(f"eta {_clock(self.eta())}")))
        after_clip_state = next(index for index, (keep, _) in enumerate(fields) if keep == 95) + 1
        fields[after_clip_state:after_clip_state] = _preference_fields(record)
        return Text("  ").join(_fit_fields(fields, width))

    def _wide_step_line(self, record: dict[str, Any]) -> Text:
        clip_state = f"clipped, coef {record['clip_coef']:.3g}" if record["clipped"] else "not clipped"
        return Text(
            f"step {record['step']:>5}/{record['total_steps']}  loss {_number(record['loss'])}  "
            f"grad-norm pre-clip {_number(record['grad_norm'])} "
            f"(window min {_number(record['grad_norm_min'])} mean {_number(record['grad_norm_mean'])} "
            f"max {_number(record['grad_norm_max'])})  "
            f"post-clip {_number(record['post_clip_norm'])} ({clip_state})  "
            + (f"threshold {_number(record['clip_threshold'])}  " if record.get("clip_threshold") is not None else "")
            + f"clip-rate {record['clip_rate']:.0%}  "
            + (f"skipped {record['skipped_steps']}  " if record["skipped_steps"] else "")
            + f"lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
            + (f"  eval-loss {_number(record['eval_loss'])}" if "eval_loss" in record else "")
            + ("" if self.interactive else f"  eta {_clock(self.eta())}")
            + "".join(f"  {text}" for _, text in _preference_fields(record, wide=True))
        )

    def warn(self, message: str, loud: bool = False) -> None:
        label = "[bold red]WARNING:[/]" if loud else "[yellow]warning:[/]"
        # A log keeps each warning on one line (greppable); a terminal wraps it at words.
        self.console.print(f"{label} {user(message)}", highlight=False, soft_wrap=not self.interactive)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="ftclip run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in summary.items():
        table.add_row(key, _number(value) if isinstance(value, float) else user(value))
    return table
