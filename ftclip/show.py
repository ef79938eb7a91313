"""`preprocess --show N`: what the model is trained on, token by token.

Trained tokens are printed in green, masked ones dimmed; `--json` prints one {"input_ids", "labels"} object
per line instead (labels -100 = not trained), for scripts and CI."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from rich.console import Console
from rich.text import Text

IGNORE_INDEX = -100
TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


def example_text(tokenizer, input_ids: Sequence[int], labels: Sequence[int]) -> Text:
    """The example's tokens, each decoded on its own and styled by whether it is trained; newlines inside
    tokens are shown as ↵ followed by the line break, so the turn structure stays readable."""
    text = Text()
    for token, label in zip(input_ids, labels):
        piece = tokenizer.decode([token]).replace("\n", "↵\n")
        text.append(piece, style=MASKED_STYLE if label == IGNORE_INDEX else TRAINED_STYLE)
    return text


def show_examples(console: Console, tokenizer, examples: Iterable[tuple[Sequence[int], Sequence[int]]],
                  as_json: bool = False) -> None:
    """Print each (input_ids, labels) example: coloured by rich, or as one JSON object per line."""
    for number, (input_ids, labels) in enumerate(examples, start=1):
        if as_json:
            line = json.dumps({"input_ids": list(input_ids), "labels": list(labels)})
            console.print(line, soft_wrap=True, markup=False, highlight=False, emoji=False)
            continue
        trained = sum(1 for label in labels if label != IGNORE_INDEX)
        console.rule(f"example {number}: {len(input_ids)} tokens, {trained} trained", style="cyan")
        console.print(example_text(tokenizer, input_ids, labels), soft_wrap=True)
    if not as_json:
        legend = Text.assemble(("trained", TRAINED_STYLE), "  ", ("masked (label -100)", MASKED_STYLE))
        console.print(legend)
