"""The training view at the widths it meets (80-column terminals, wide ones, CI logs), with NO_COLOR."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from rich.text import Text

from ftclip.progress import TrainingView

# A colour in an SGR sequence: foreground/background 30-49 (38/48 = 256-colour and truecolor), bright 90-107.
COLOUR_SGR = re.compile(r"\x1b\[(?:[0-9;]*;)?(?:3[0-9]|4[0-9]|9[0-7]|10[0-7])(?:;[0-9;]*)?m")
ETA = re.compile(r"eta \d+:\d\d:\d\d")


def record(step: int = 1234, total: int = 10000, clipped: bool = True, **changes) -> dict:
    """A metrics line as train.py writes it, with long-ish numbers (5-digit steps, 4 significant digits)."""
    line = {
        "step": step, "total_steps": total, "epoch": 0, "loss": 0.7916, "grad_norm": 4.1265, "grad_norm_min": 0.4831,
        "grad_norm_mean": 0.6303, "grad_norm_max": 0.8544, "post_clip_norm": 1.0 if clipped else 4.1265,
        "clip_coef": 0.2423 if clipped else 1.0, "clipped": clipped, "clip_rate": 0.9, "clipped_steps": 55,
        "clip_threshold": 1.0, "skipped_steps": 0, "lr": 1.66e-4, "tokens_per_s": 66571.3,
    }
    return {**line, **changes}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def view_at(console: Console, steps: int = 1234, total: int = 10000, seconds_per_step: float = 3.0) -> TrainingView:
    clock = FakeClock()
    view = TrainingView(console, total, clock=clock)
    for _ in range(steps):
        clock.now += seconds_per_step
        view.advance()
    return view


def terminal(width: int, **options) -> Console:
    return Console(width=width, record=True, file=io.StringIO(), force_terminal=True, **options)


@pytest.mark.parametrize("width", [80, 100, 160])
def test_live_line_keeps_steps_bar_loss_clip_state_and_eta_uncut(width):
    console = terminal(width)
    view = view_at(console)
    view.logged(record())
    console.print(view.status_line)
    live = console.export_text().splitlines()[-1]
    assert len(live) <= width
    assert "1234/10000" in live and "loss 0.7916" in live and "grad-norm 4.127 clipped" in live
    assert "eta 7:18:18" in live  # 8766 steps left at 3 s each
    assert "━" in live and "…" not in live
    if width == 80:  # the first to go as the terminal narrows
        assert "tok/s" not in live
    if width == 160:
        assert "66571 tok/s" in live and "lr 1.66e-04" in live


def test_live_line_before_the_first_logged_step():
    console = terminal(80)
    console.print(view_at(console, steps=0).status_line)
    live = console.export_text().splitlines()[-1]
    assert "0/10000" in live and "loss -" in live and "eta -:--:--" in live


@pytest.mark.parametrize("width", [80, 100, 160])
@pytest.mark.parametrize("clipped", [True, False])
def test_logged_step_is_one_line_with_step_and_clip_state(width, clipped):
    console = terminal(width)
    view_at(console).logged(record(clipped=clipped))
    [line] = console.export_text().splitlines()
    assert len(line) <= width
    assert line.startswith("step  1234/10000  loss 0.7916  grad-norm 4.127 ")
    assert ("clipped to 1" if clipped else "not clipped") in line
    assert ("tok/s" in line) == (width == 160)  # dropped first on narrower terminals


def test_logged_step_on_a_wide_terminal_has_every_detail():
    console = terminal(240)
    view_at(console).logged(record(eval_loss=0.9697, skipped_steps=2))
    [line] = console.export_text().splitlines()
    for part in ("grad-norm pre-clip 4.127 (window min 0.4831 mean 0.6303 max 0.8544)", "post-clip 1 (clipped, coef 0.242)",
                 "threshold 1", "clip-rate 90%", "skipped 2", "lr 1.66e-04", "66571 tok/s", "eval-loss 0.9697"):
        assert part in line


def test_rare_fields_stay_in_the_compact_line():
    console = terminal(80)
    view = view_at(console, steps=100, total=116)
    view.logged(record(step=100, total=116, eval_loss=0.9697, skipped_steps=2))
    view.logged(record(step=110, total=116, skipped_steps=2, clipped=False))
    first, second = console.export_text().splitlines()
    assert "eval-loss 0.9697" in first and "clipped to 1" in first  # the eval result before the skip count
    assert "skipped 2" in second and "not clipped" in second  # a running total: back on the next line


@pytest.mark.parametrize("width", [80, 100, 160])
def test_not_a_terminal_gets_plain_lines_with_the_eta(width):
    """CI logs and `| tee`: no redrawn bar, no control sequences, one line per logged step and per warning."""
    output = io.StringIO()
    console = Console(file=output, width=width)
    assert not console.is_terminal
    clock = FakeClock()
    with TrainingView(console, 30, clock=clock) as view:
        for step in range(1, 31):
            clock.now += 2.0
            view.advance()
            if step % 10 == 0:
                view.logged(record(step=step, total=30))
        view.warn("Clipping on 100% of the last 10 steps: the threshold is likely too low " * 3, loud=True)
    text = output.getvalue()
    assert "\x1b" not in text and "\r" not in text and "━" not in text
    lines = text.splitlines()
    assert [line.split("  ")[0] for line in lines[:3]] == ["step 10/30", "step 20/30", "step 30/30"]
    assert all(len(line) <= width for line in lines[:3])
    assert "eta 0:00:40" in lines[0] and "clipped to 1" in lines[0]
    assert len(lines) == 4 and lines[3].startswith("WARNING: Clipping")


def test_terminal_redraws_and_no_color_drops_colour_only(monkeypatch):
    def run() -> str:
        console = Console(file=io.StringIO(), width=80, force_terminal=True)
        with TrainingView(console, 3) as view:
            for _ in range(3):
                view.advance()
            view.logged(record(step=3, total=3))
        return console.file.getvalue()

    monkeypatch.delenv("NO_COLOR", raising=False)
    coloured = run()
    assert COLOUR_SGR.search(coloured) and "\r" in coloured  # a live, colourful line: the check below can fail
    monkeypatch.setenv("NO_COLOR", "1")
    plain = run()
    assert not COLOUR_SGR.search(plain)
    assert "3/3" in plain and "clipped to 1" in plain


def test_eta_follows_the_recent_pace_and_counts_down_between_steps():
    clock = FakeClock()
    view = TrainingView(Console(file=io.StringIO()), 110, completed=100, clock=clock)  # resumed at step 100
    assert view.eta() is None
    for _ in range(2):
        clock.now += 5.0
        view.advance()
    assert view.eta() == 8 * 5.0
    clock.now += 3.0
    assert view.eta() == 8 * 5.0 - 3.0


def test_step_line_is_text_for_other_sinks():
    line = view_at(Console(file=io.StringIO())).step_line(record(), 80)
    assert isinstance(line, Text) and line.cell_len <= 80
