"""Preference records: every supported layout read into one of two shapes, before any tokenizer is involved.

- Pair (rl: dpo, ipo, orpo, simpo; reward_model): a prompt and two answers, the chosen and the rejected one.
- Labelled (rl: kto): a prompt, one answer, and whether it is desirable.

Each part is either text (TRL's "standard" layout: the prompt and answers are concatenated as they are) or a list
of {role, content} messages (TRL's "conversational" layout: rendered by the recipe's chat template). The layouts:

- type preference: {prompt?, chosen, rejected} as TRL reads them; without a prompt, the prompt is the longest common
  beginning of chosen and rejected (TRL's implicit-prompt layout, `extract_prompt`).
- type kto: {prompt, completion, label}.
- Axolotl's preference formats (src/axolotl/prompt_strategies/dpo/*.py, kto/*.py, orpo/, bradley_terry/): chatml.* and
  llama3.* build the prompt text with that fixed markup and end each answer with its end-of-turn marker, exactly as
  Axolotl's transforms write the strings it hands to TRL; chat_template.* and bradley_terry.chat_template become
  conversational pairs rendered with the recipe's chat template.

Nothing here imports torch, transformers or datasets: `validate` checks records with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftclip.recipe import DatasetSpec

Text = str | list[dict[str, Any]]


@dataclass(frozen=True)
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class Labelled:
    prompt: Text
    completion: Text
    desirable: bool

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


# Axolotl's fixed markup: (system turn, user turn + assistant header, end of an answer).
_MARKUP = {
    "chatml": ("<|im_start|>system\n{system}<|im_end|>\n",
               "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}
# Where each Axolotl pair format reads the prompt ("default" and "argilla" take the first column present, as
# Axolotl's default transform does; argilla_chat and ultra read the answers out of message lists).
_FIRST_PRESENT = ("prompt", "input", "question", "instruction")
_PAIR_PROMPT = {"default": _FIRST_PRESENT, "argilla": _FIRST_PRESENT, "icr": ("input",),
                "intel": ("question",), "prompt_pairs": ("prompt",), "ultra": ("prompt",)}
_KTO_PROMPT = {"argilla": "instruction", "intel": "question", "prompt_pairs": "prompt", "ultra": "prompt"}


def _missing(record: dict, key: str) -> bool:
    # Read through Arrow a record has every column of its file: an absent field is None.
    return record.get(key) is None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def _messages(value: Any, where: str, spec: DatasetSpec) -> list[dict[str, Any]] | str:
    """A list of {role, content} in the chat template's role names (the dataset's roles and
    message_property_mappings applied, as for chat data), or what is wrong with it."""
    from ftclip.data.chat import _role_names

    if isinstance(value, dict):
        value = [value]
    if not _is_messages(value):
        return f"{where} must be a non-empty list of messages"
    mapping = {"role": "role", "content": "content", **(spec.message_property_mappings or {})}
    names = _role_names(spec)
    messages = []
    for index, message in enumerate(value):
        role, content = message.get(mapping["role"]), message.get(mapping["content"])
        if not isinstance(role, str) or not isinstance(content, str):
            return f"{where}[{index}] needs string {mapping['role']!r} and {mapping['content']!r}"
        if role not in names:
            return f"{where}[{index}].{mapping['role']} is {role!r}; allowed: {', '.join(names)}"
        if spec.drop_system_message and names[role] == "system":
            continue
        messages.append({"role": names[role], "content": content})
    return messages


def extract_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's `extract_prompt`: the longest common beginning of chosen and rejected (turns, or characters without a
    trailing space) is the prompt."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":  # remove space before the prompt
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


# ---------------------------------------------------------------- pairs


def pair_from_record(record: Any, spec: DatasetSpec) -> Pair | str:
    """The record as a Pair, or what is wrong with it (naming the columns the format reads)."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, not {type(record).__name__}"
    kind = spec.type
    if kind == "preference":
        return _native_pair(record, spec)
    if kind in ("chat_template.default", "chat_template.argilla_chat", "chat_template.argilla"):
        return _chat_template_pair(record, spec)
    if kind == "bradley_terry.chat_template":
        for key in ("input", "chosen", "rejected"):
            if not isinstance(record.get(key), str):
                return f"a bradley_terry.chat_template record needs string {key!r} (and optional system)"
        prompt = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": record["input"]}]
        return Pair(prompt, [{"role": "assistant", "content": record["chosen"]}],
                    [{"role": "assistant", "content": record["rejected"]}])
    family, _, name = kind.partition(".")
    return _axolotl_pair(record, family, name or "default")


def _native_pair(record: dict, spec: DatasetSpec) -> Pair | str:
    chosen_key, rejected_key = spec.field_chosen or "chosen", spec.field_rejected or "rejected"
    parts = {}
    for key in ("prompt", chosen_key, rejected_key):
        value = record.get(key)
        if value is None:
            if key == "prompt":
                continue
            return f"a preference record needs {chosen_key!r} and {rejected_key!r} (and optionally 'prompt')"
        if isinstance(value, str):
            parts[key] = value
        else:
            messages = _messages(value, key, spec)
            if isinstance(messages, str):
                return f"{messages} (or a string)"
            parts[key] = messages
    kinds = {isinstance(value, str) for value in parts.values()}
    if len(kinds) > 1:
        return "prompt, chosen and rejected must all be strings or all be message lists"
    chosen, rejected = parts[chosen_key], parts[rejected_key]
    prompt = parts.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not chosen or not rejected:
            return "without a 'prompt', chosen and rejected must differ after their common beginning"
    if isinstance(chosen, list) and not prompt:
        return "a conversational pair needs a prompt: the turns before the answers"
    return Pair(prompt, chosen, rejected)


def _chat_template_pair(record: dict, spec: DatasetSpec) -> Pair | str:
    chosen_key, rejected_key = spec.field_chosen or "chosen", spec.field_rejected or "rejected"
    if spec.type == "chat_template.default":
        field = spec.field_messages or "messages"
        turns = record.get(field)
        if isinstance(turns, str):  # Axolotl: a string is the user's message
            mapping = {"role": "role", "content": "content", **(spec.message_property_mappings or {})}
            turns = [{mapping["role"]: "user", mapping["content"]: turns}]
        prompt = _messages(turns, field, spec)
        if isinstance(prompt, str):
            return f"{prompt} (field_messages: {field})"
        answers = []
        for key in (chosen_key, rejected_key):
            value = record.get(key)
            if isinstance(value, str):
                answers.append([{"role": "assistant", "content": value}])
                continue
            message = value[-1] if _is_messages(value) else value
            answer = _messages(message, key, spec)
            if isinstance(answer, str):
                return f"{key} must be a string, a message or a list of messages"
            answers.append(answer)
        return Pair(prompt, *answers)
    chosen, rejected = record.get(chosen_key), record.get(rejected_key)
    if not (_is_messages(chosen) and _is_messages(rejected)) or len(chosen) < 2:
        return f"a {spec.type} record needs {chosen_key!r} and {rejected_key!r} as conversations (user, assistant, ...)"
    conversation = _messages(chosen, chosen_key, spec)
    last_rejected = _messages(rejected[-1:], rejected_key, spec)
    for checked in (conversation, last_rejected):
        if isinstance(checked, str):
            return checked
    prompt = conversation[:-1]
    if spec.type == "chat_template.argilla":  # ORPO's format: an optional system turn, a 'prompt' as the user turn
        if record.get("system") and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": record["system"]}] + prompt
        if isinstance(record.get("prompt"), str) and len(prompt) and prompt[-1]["role"] == "user" and len(chosen) == 2:
            prompt = prompt[:-1] + [{"role": "user", "content": record["prompt"]}]
    return Pair(prompt, conversation[-1:], last_rejected)


def _axolotl_prompt(record: dict, family: str, prompt: str) -> str:
    system, user, _ = _MARKUP[family]
    text = system.format(system=record["system"]) if record.get("system") else ""
    return text + user.format(prompt=prompt)


def _axolotl_pair(record: dict, family: str, name: str) -> Pair | str:
    end = _MARKUP[family][2]
    kind = f"{family}.{name}"
    if name == "argilla_chat":
        chosen, rejected = record.get("chosen"), record.get("rejected")
        if not (_is_messages(chosen) and _is_messages(rejected)) or len(chosen) < 2 or len(rejected) < 2:
            return f"a {kind} record needs 'chosen' and 'rejected' as [user, assistant] message lists"
        user, chosen_text, rejected_text = chosen[0].get("content"), chosen[1].get("content"), rejected[1].get("content")
        if not all(isinstance(text, str) for text in (user, chosen_text, rejected_text)):
            return f"a {kind} record needs string 'content' in its messages"
        return Pair(_MARKUP[family][1].format(prompt=user), chosen_text + end, rejected_text + end)
    prompt_key = next((key for key in _PAIR_PROMPT[name] if not _missing(record, key)), _PAIR_PROMPT[name][-1])
    if name in ("default", "argilla"):
        chosen_key = "chosen" if not _missing(record, "chosen") else "chosen_response"
        rejected_key = "rejected" if not _missing(record, "rejected") else "rejected_response"
    else:
        chosen_key, rejected_key = "chosen", "rejected"
    prompt = record.get(prompt_key)
    if name == "ultra":
        chosen_text, rejected_text = (_second_content(record.get(chosen_key)), _second_content(record.get(rejected_key)))
        wanted = "'prompt' (string) and 'chosen'/'rejected' as [user, assistant] message lists"
    else:
        chosen_text, rejected_text = record.get(chosen_key), record.get(rejected_key)
        wanted = f"string {prompt_key!r}, {chosen_key!r} and {rejected_key!r} (and optional 'system')"
    if not all(isinstance(text, str) for text in (prompt, chosen_text, rejected_text)):
        return f"a {kind} record needs {wanted}"
    return Pair(_axolotl_prompt(record, family, prompt), chosen_text + end, rejected_text + end)


def _second_content(value: Any) -> str | None:
    """Axolotl's ultra format reads `chosen[1]['content']`."""
    if _is_messages(value) and len(value) > 1 and isinstance(value[1].get("content"), str):
        return value[1]["content"]
    return None


# ---------------------------------------------------------------- single labelled completions (KTO)


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    return None


def labelled_from_record(record: Any, spec: DatasetSpec) -> Labelled | str:
    """The record as a Labelled completion, or what is wrong with it."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, not {type(record).__name__}"
    label = _label(record.get("label"))
    if label is None:
        return "a KTO record needs a boolean 'label' (true: desirable, false: undesirable)"
    if spec.type == "kto":
        parts = {}
        for key in ("prompt", "completion"):
            value = record.get(key)
            if isinstance(value, str):
                parts[key] = value
                continue
            messages = _messages(value, key, spec) if value is not None else f"a kto record needs {key!r}"
            if isinstance(messages, str):
                return messages
            parts[key] = messages
        if isinstance(parts["prompt"], str) != isinstance(parts["completion"], str):
            return "prompt and completion must both be strings or both be message lists"
        return Labelled(parts["prompt"], parts["completion"], label)
    family, _, name = spec.type.partition(".")
    name = name or "default"
    kind = f"{family}.{name}"
    end = _MARKUP[family][2]
    if name == "argilla_chat":
        turns = record.get("completion")
        if not _is_messages(turns) or len(turns) < 2 or not all(isinstance(t.get("content"), str) for t in turns[:2]):
            return f"a {kind} KTO record needs 'completion' as a [user, assistant] message list"
        return Labelled(_MARKUP[family][1].format(prompt=turns[0]["content"]), turns[1]["content"] + end, label)
    if name not in _KTO_PROMPT:
        formats = ", ".join(f"{family}.{other}" for other in (*_KTO_PROMPT, "argilla_chat"))
        return f"{kind} is not one of Axolotl's KTO formats ({formats})"
    prompt, completion = record.get(_KTO_PROMPT[name]), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return f"a {kind} KTO record needs string {_KTO_PROMPT[name]!r} and 'completion' (and optional 'system')"
    return Labelled(_axolotl_prompt(record, family, prompt), completion + end, label)


def preference_problem(record: Any, spec: DatasetSpec) -> str | None:
    """Why a record does not fit its preference format, or None."""
    parsed = labelled_from_record(record, spec) if spec.preference_kind == "kto" else pair_from_record(record, spec)
    return parsed if isinstance(parsed, str) else None


def required_columns(spec: DatasetSpec) -> tuple[str, ...] | None:
    """Columns a parquet/Arrow file of this format must have (None: checked record by record)."""
    if spec.type == "preference":
        return (spec.field_chosen or "chosen", spec.field_rejected or "rejected")
    if spec.type == "kto":
        return ("prompt", "completion", "label")
    if spec.type == "chat_template.default":
        return (spec.field_messages or "messages", spec.field_chosen or "chosen", spec.field_rejected or "rejected")
    if spec.preference_kind == "kto":
        return ("completion", "label")
    return ("chosen", "rejected") if spec.type != "bradley_terry.chat_template" else ("input", "chosen", "rejected")
