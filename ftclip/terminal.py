"""Printing through rich without reading user text as markup.

ftclip's own lines carry rich markup ("[yellow]warning:[/] ..."). Anything that came from the user — a recipe
value, a path, a record's or a chat template's text, a regex, an error message that quotes one — goes through
`user()` before it joins such a line, so `[/INST]`, `[bold]` or `[link=https://x]` print as they are: they can
neither crash rich (MarkupError: closing tag '[/INST]' ... doesn't match any open tag) nor restyle the line.
Strings given to a rich Table (titles, cells) are markup too. The consoles ftclip prints through come from
`make_console()`, which also leaves emoji codes (":smile:") as they are."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape


def user(value: Any) -> str:
    """User-provided text, made safe to put inside ftclip's rich markup: it prints exactly as given."""
    return escape(str(value))


def make_console(stderr: bool = False, **options: Any) -> Console:
    """A console for ftclip's output: rich markup on (for ftclip's own styling), emoji codes off."""
    return Console(stderr=stderr, emoji=False, **options)
