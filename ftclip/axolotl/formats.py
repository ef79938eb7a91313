"""Axolotl's prompt formats as ftclip prompt formats (a dataset `type` given as a mapping, ftclip.recipe.PromptFormat).

A user-defined type (Axolotl's `type:` mapping) carries over key for key. Some of Axolotl's built-in instruction
strategies are the same thing with fixed strings, and are written out as prompt formats here: each is an
AlpacaPrompter style (src/axolotl/prompters.py: the turn formats and system_format of the instruct and chat
styles) with a strategy's system texts and record keys (src/axolotl/prompt_strategies/alpaca_chat.py,
alpaca_instruct.py). Axolotl writes a system text for prompts with an input and another for prompts without one,
so both are written into `format` and `no_input_format` themselves, and system_format is left empty (a record's
own `system` key is not read by these strategies)."""

from __future__ import annotations

from typing import Any

from ftclip.recipe import PromptFormat

# AlpacaPrompter's styles: (turn_format, turn_no_input_format, system_format).
_STYLES = {
    "instruct": ("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
                 "### Instruction:\n{instruction}\n\n### Response:\n", "{system}\n\n"),
    "chat": ("USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:", "SYSTEM: {system}\n"),
}
_ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
           "response that appropriately completes the request.",
           "Below is an instruction that describes a task. Write a response that appropriately completes the request.")
_ALPACA_CHAT = ("Below is an instruction from a USER that describes a task, paired with an input that provides further "
                "context. The ASSISTANT writes a response that concisely and appropriately completes the request.\n\n",
                "Below is an instruction from a USER that describes a task. The ASSISTANT writes a response that "
                "appropriately and concisely completes the request.\n\n")
_NO_SYSTEM = ("", "")


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _alpaca_style(style: str, systems: tuple[str, str], *, without_input: bool = False, **fields: str) -> dict[str, Any]:
    """A prompt format writing what AlpacaPrompter(style) writes with these system texts (with an input, without).
    without_input: the strategy never reads an input, so both prompts are the no-input one."""
    turn, turn_no_input, system_format = _STYLES[style]
    with_input = (_literal(system_format.format(system=systems[0])) if systems[0] else "") + turn
    no_input = (_literal(system_format.format(system=systems[1])) if systems[1] else "") + turn_no_input
    return {"system_format": "", "format": no_input if without_input else with_input, "no_input_format": no_input,
            **fields}


# Axolotl type name → the prompt format that writes the same prompts (and which record keys it reads).
BUILTIN_FORMATS: dict[str, dict[str, Any]] = {
    "alpaca_chat": _alpaca_style("chat", _ALPACA),
    "alpaca_chat.load_qa": _alpaca_style("chat", _ALPACA_CHAT, without_input=True, field_instruction="question",
                                         field_output="answer"),
    "alpaca_chat.load_camel_ai": _alpaca_style("chat", _ALPACA_CHAT, without_input=True, field_instruction="message_1",
                                               field_output="message_2"),
    "alpaca_chat.load_no_prompt": _alpaca_style("chat", _NO_SYSTEM),
    "alpaca_instruct.load_no_prompt": _alpaca_style("instruct", _NO_SYSTEM),
}


def user_defined_format(mapping: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the prompt format's keys, the keys Axolotl's user-defined type does not have: its schema discards them)."""
    known = {key: value for key, value in mapping.items() if key in PromptFormat.model_fields and value is not None}
    return known, [str(key) for key in mapping if key not in PromptFormat.model_fields]
