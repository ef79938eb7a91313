"""`preprocess --show N`: what the model is trained on, token by token.

Trained tokens are printed in green, masked ones dimmed; `--json` prints one {"input_ids", "labels"} object
per line instead (labels -100 = not trained), for scripts and CI."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.text import Text

from ftclip.data.records import IGNORE_INDEX

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


def example_text(tokenizer, input_ids: Sequence[int], labels: Sequence[int], bracket_trained: bool = False,
                 placeholders: frozenset[int] = frozenset()) -> Text:
    """The example's tokens, each decoded on its own and styled by whether it is trained; newlines inside
    tokens are shown as ↵ followed by the line break, so the turn structure stays readable. Without colours
    (a pipe, NO_COLOR) `bracket_trained` puts each run of trained tokens between ⟦ and ⟧. A run of one image
    placeholder token (`placeholders`: hundreds of <|image_pad|> per image) is shown once with its count."""
    text = Text()
    in_run = False
    repeats = 0
    for position, (token, label) in enumerate(zip(input_ids, labels)):
        trained = label != IGNORE_INDEX
        if token in placeholders and position + 1 < len(input_ids) and input_ids[position + 1] == token and \
                (labels[position + 1] != IGNORE_INDEX) == trained:
            repeats += 1
            continue
        if bracket_trained and trained != in_run:
            text.append("⟦" if trained else "⟧")
            in_run = trained
        piece = tokenizer.decode([token]).replace("\n", "↵\n") + (f"×{repeats + 1}" if repeats else "")
        repeats = 0
        text.append(piece, style=TRAINED_STYLE if trained else MASKED_STYLE)
    if in_run:
        text.append("⟧")
    return text


def show_examples(console: Console, tokenizer, examples: Iterable[tuple[Sequence[int], Sequence[int]]],
                  as_json: bool = False, placeholders: frozenset[int] = frozenset()) -> None:
    """Print each (input_ids, labels) example: coloured by rich, or as one JSON object per line."""
    for number, (input_ids, labels) in enumerate(examples, start=1):
        if as_json:
            line = json.dumps({"input_ids": list(input_ids), "labels": list(labels)})
            console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)
            continue
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        console.rule(f"example {number}: {len(input_ids)} tokens, {trained} trained", style="cyan")
        plain = console.color_system is None or console.no_color
        console.print(example_text(tokenizer, input_ids, labels, bracket_trained=plain, placeholders=placeholders),
                      soft_wrap=True)
    if not as_json:
        trained_label = "⟦trained⟧" if console.color_system is None or console.no_color else "trained"
        console.print(Text.assemble((trained_label, TRAINED_STYLE), "  ", ("masked (label -100)", MASKED_STYLE)))
