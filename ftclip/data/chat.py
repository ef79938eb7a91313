"""Chat records → token ids and labels, on any real chat template.

A conversation is rendered ONCE by the tokenizer's chat template and the whole text is tokenized ONCE with
character offsets; a token is trained when its characters fall inside a trained turn's span of the render.
The spans are found by locating each turn's content in the render, in order. Nothing requires the render
of a prefix of the conversation to be a prefix of the render of the whole (Qwen3 drops the <think> block of
earlier assistant turns, so that requirement fails on real templates), and the ids are exactly the ids of the
full text, as the model sees them at inference.

What a trained assistant turn covers: everything the model generates after the template's generation prompt
(e.g. `<|im_start|>assistant\\n`) up to and including the end-of-turn marker the template writes after it
(`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`, ...): the content, a <think> block the template keeps,
tool-call markup. Separators after the marker (a newline) and the next turn's header are not trained.
A template may end turns with several markers (gpt-oss: <|end|>, <|return|> last, <|call|> after a tool call); a
turn that only calls tools ends at the first of them before the next turn's content, or where the next turn starts
when the template writes none (Command R+). A turn whose tool_calls the template does not write is skipped, not
trained as an empty answer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from ftclip.data.labels import IGNORE_INDEX
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec

# Axolotl's default role names (template role -> names the data may use); a dataset's `roles` overrides
# the template roles it names and keeps these for the others.
DEFAULT_ROLES: dict[str, list[str]] = {
    "system": ["system"],
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt"],
    "tool": ["tool"],
}
# Turn keys copied to the template as they are when present (OpenAI tool use, reasoning traces).
PASSTHROUGH_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")

SKIP_LIMIT = 0.1  # more skipped records than this share means the template does not fit the data
_PROBE = "FtclipProbe7Q"  # a text no template changes, to see what a template writes around a turn


@dataclass
class Conversation:
    """The turns in the template's vocabulary ({role, content, and tool_calls/reasoning_content/... when given})
    and the record's tool definitions."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Skip:
    """A record left out, and why."""

    reason: str


# ---------------------------------------------------------------- records → conversations


def _role_names(spec: DatasetSpec) -> dict[str, str]:
    """Data role name -> template role, template role names first (they read best in error messages)."""
    roles = {**DEFAULT_ROLES, **(spec.roles or {})}
    names = {role: role for role in roles}
    for role, data_names in roles.items():
        for name in data_names:
            names.setdefault(name, role)
    for role, data_names in (spec.roles or {}).items():  # the dataset's own names win over the defaults
        names.update({name: role for name in data_names})
    return names


def _messages_field(record: dict, spec: DatasetSpec) -> str | None:
    # Read through Arrow, a record has every column of its file: an absent field is None, not missing.
    if spec.field_messages:
        return spec.field_messages if record.get(spec.field_messages) is not None else None
    return next((key for key in ("messages", "conversations") if record.get(key) is not None), None)


def _tools(record: dict) -> list[dict] | None | str:
    tools = record.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # many datasets keep the tool list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            return "'tools' is a string but not JSON"
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        return "'tools' must be a list of tool definitions (objects)"
    return tools or None


def record_turns(record: dict, spec: DatasetSpec, kind: str = "a chat record") -> tuple[str, list, dict[str, str]] | str:
    """The field holding the record's turns, the list of turns and which turn keys hold the role and the content
    (ShareGPT's from/value for a `conversations` list unless mapped), or what is wrong with the record."""
    key = _messages_field(record, spec)
    if key is None:
        if spec.field_messages:
            return f"the record has no {spec.field_messages!r} (field_messages)"
        return f"{kind} needs 'messages' (OpenAI style) or 'conversations' (ShareGPT style)"
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        return f"{key} must be a non-empty list"
    sharegpt = key == "conversations" and spec.message_property_mappings is None
    mapping = {"role": "from", "content": "value"} if sharegpt else {"role": "role", "content": "content"}
    mapping.update(spec.message_property_mappings or {})
    return key, turns, mapping


def conversation_from_record(record: dict, spec: DatasetSpec) -> Conversation | str:
    """The record's conversation, or a description of what is wrong with the record."""
    found = record_turns(record, spec)
    if isinstance(found, str):
        return found
    key, turns, mapping = found
    role_key, content_key = mapping["role"], mapping["content"]
    role_names = _role_names(spec)
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str):
            return f"{key}[{index}] needs string {role_key!r} and {content_key!r}"
        content = turn.get(content_key)
        if content is None and turn.get("tool_calls"):
            # OpenAI style: an assistant turn that only calls tools has no content. transformers drops a None
            # content before rendering (so a template's `content is none` never holds); "" keeps the key.
            content = ""
        if not isinstance(content, str):
            return f"{key}[{index}] needs string {role_key!r} and {content_key!r}"
        if turn[role_key] not in role_names:
            return f"{key}[{index}].{role_key} is {turn[role_key]!r}; allowed: {', '.join(role_names)}"
        if spec.drop_system_message and role_names[turn[role_key]] == "system":
            continue
        message = {"role": role_names[turn[role_key]], "content": content}
        for name, source in mapping.items():
            if name not in ("role", "content") and turn.get(source) is not None:
                message[name] = turn[source]
        for name in PASSTHROUGH_KEYS:
            if turn.get(name) is not None:
                message.setdefault(name, turn[name])
        if "tool_calls" in message and not isinstance(message["tool_calls"], list):
            return f"{key}[{index}].tool_calls must be a list"
        messages.append(message)
    if not any(message["role"] in spec.roles_to_train for message in messages):
        return f"no {' or '.join(spec.roles_to_train)} turn: nothing to train on"
    tools = _tools(record)
    if isinstance(tools, str):
        return tools
    return Conversation(messages, tools)


# ---------------------------------------------------------------- what the template writes around a turn


@dataclass(frozen=True)
class TemplateMarks:
    """Found once per template by rendering probe conversations."""

    headers: tuple[str, ...]  # written before an assistant turn: the generation prompt, then shorter forms
    end_of_turn: str | None  # written right after a turn's content, e.g. <|im_end|>
    # Every marker seen right after a turn's content: the last turn's, an earlier turn's (gpt-oss ends earlier
    # turns with <|end|> and the last with <|return|>).
    turn_ends: tuple[str, ...] = ()
    call_ends: tuple[str, ...] = ()  # what ends a tool call when no turn marker does (gpt-oss' <|call|>)
    needs_tools: bool = False  # the template renders nothing without a tool list (a tool_use template)
    # The special token the assistant header starts with; where it also starts other turns (Command R's
    # <|START_OF_TURN_TOKEN|>), it marks the end of a tool call the template closes with nothing else.
    turn_opener: str | None = None


def _render(tokenizer, messages: list[dict], tools=None, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


# A tool list for templates that cannot render without one (Hermes' tool_use template).
_PROBE_TOOLS = [{"type": "function", "function": {"name": "probe", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]
_RENDER_ERRORS = (TemplateError, TypeError, ValueError, AttributeError, KeyError, IndexError)


def template_marks(tokenizer) -> TemplateMarks:
    """The assistant header and the end-of-turn marker, from renders of a one-exchange probe conversation."""
    errors = []
    for tools in (None, _PROBE_TOOLS):
        try:
            return _template_marks(tokenizer, tools)
        except _RENDER_ERRORS as error:
            errors.append(error)
    raise DataError(f"the chat template cannot render a plain user/assistant exchange: {errors[0]}")


def _special_tokens(tokenizer) -> list[str]:
    tokens = [token for token in tokenizer.get_added_vocab() if token]
    return tokens + [tokenizer.eos_token] if tokenizer.eos_token and tokenizer.eos_token not in tokens else tokens


def _template_marks(tokenizer, tools) -> TemplateMarks:
    user = {"role": "user", "content": "Hello"}
    assistant = {"role": "assistant", "content": _PROBE}
    with_prompt = _render(tokenizer, [user], tools, generation_prompt=True)
    without_prompt = _render(tokenizer, [user], tools)
    specials = _special_tokens(tokenizer)
    # Some templates end a conversation with eos unless a generation prompt follows (Phi-3.5): compare the
    # two renders from where they part.
    parted = len(os.path.commonprefix([with_prompt, without_prompt]))
    for token in specials:  # never cut a special token in two (<|assistant|> vs <|endoftext|>)
        for offset in range(1, len(token)):
            if parted - offset >= 0 and with_prompt.startswith(token, parted - offset):
                parted -= offset
                break
    header = with_prompt[parted:]
    full = _render(tokenizer, [user, assistant], tools)
    user_part = full[: full.find("Hello") + len("Hello")]
    if not header.strip():
        # Templates without a generation prompt (Mistral's [INST]...[/INST]answer</s>), or one that always ends
        # with the assistant header (Command R7B): the text between the user's content and the assistant's.
        start = len(user_part)
        header = full[start:full.find(_PROBE)] if full.find(_PROBE) >= start else ""
        eos = tokenizer.eos_token
        if eos and header.startswith(eos) and header != eos:  # the user turn's end, not the assistant's start
            header = header[len(eos):]
    after = full[full.find(_PROBE) + len(_PROBE):]
    end_of_turn = _end_of_turn(tokenizer, after)
    # QwQ's generation prompt opens a <think> block that its rendered turns do not all have: also try the
    # prompt's first line, and the prompt cut after each special token in it (Command R7B writes
    # <|START_RESPONSE|> only before an answer, not before tool calls), as long as the cut does not also
    # start a user turn.
    first_line = header[: header.find("\n") + 1] if "\n" in header.rstrip("\n") else ""
    cuts = sorted({header[: header.find(token) + len(token)] for token in specials if token in header}, key=len, reverse=True)
    shorter = [cut for cut in cuts if cut != header and cut not in user_part]
    headers = tuple(dict.fromkeys(text for text in (header, first_line, *shorter) if text))
    turn_ends = [end_of_turn]
    try:
        again = {"role": "user", "content": "Again"}
        two_turns = _render(tokenizer, [user, assistant, again, {"role": "assistant", "content": "Done"}], tools)
        turn_ends.append(_end_of_turn(tokenizer, two_turns[two_turns.find(_PROBE) + len(_PROBE):]))
    except _RENDER_ERRORS:
        pass  # a template that takes one exchange only
    return TemplateMarks(headers=headers, end_of_turn=end_of_turn,
                         turn_ends=tuple(dict.fromkeys(marker for marker in turn_ends if marker)),
                         call_ends=_call_ends(tokenizer, headers, specials), needs_tools=tools is not None,
                         turn_opener=max((token for token in specials if header.startswith(token)), key=len, default=None))


def _call_ends(tokenizer, headers: tuple[str, ...], specials: list[str]) -> tuple[str, ...]:
    """The special token a template writes right after a tool call's arguments, unless it starts a turn."""
    for arguments in ({"value": _PROBE}, json.dumps({"value": _PROBE})):  # an object, or a JSON string (DeepSeek)
        call = {"id": "call0", "type": "function", "function": {"name": "probe", "arguments": arguments}}
        messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "content": "ProbeResult", "tool_call_id": "call0", "name": "probe"}]
        try:
            render = _render(tokenizer, messages, _PROBE_TOOLS)
        except _RENDER_ERRORS:
            continue
        at, result_at = render.find(_PROBE), render.find("ProbeResult")
        if at < 0 or result_at < at:
            return ()
        # The first special token after the arguments ends the call, unless it starts the next turn (Command R+
        # writes no end marker, the results turn follows) or also comes before them, a delimiter inside the call
        # (Gemma 4 quotes strings with <|"|>).
        call_start = max([render.rfind(header, 0, at) for header in headers] + [0])
        found = sorted((render.find(token, at, result_at), token) for token in specials if 0 <= render.find(token, at, result_at))
        for _, token in found:
            if any(token in header for header in headers):
                return ()
            if token not in render[call_start:at]:
                return (token,)
        return ()
    return ()


def _end_of_turn(tokenizer, after: str) -> str | None:
    """The marker at the start of what the template writes after a turn's content: the longest special or
    added token it starts with (and eos when it comes right after: Command R7B's <|END_RESPONSE|> then
    <|END_OF_TURN_TOKEN|>), else the eos token, else a blank line (RWKV), else its first word."""
    stripped = after.lstrip(" ")
    eos = tokenizer.eos_token
    special = [token for token in tokenizer.get_added_vocab() if token and stripped.startswith(token)]
    if special:
        marker = max(special, key=len)
        return marker + eos if eos and marker != eos and stripped[len(marker):].startswith(eos) else marker
    if eos and stripped.startswith(eos):
        return eos
    if stripped.startswith("\n\n"):  # a template without markers ends a turn with a blank line
        return "\n\n"
    words = stripped.split()
    return words[0] if words else None


# ---------------------------------------------------------------- conversations → ids and labels


def _content_candidates(content: str) -> list[str]:
    """How a template may write a turn's content: as is, without a <think> block it strips (Qwen3, QwQ,
    DeepSeek-R1), trimmed (Llama 3, Gemma)."""
    answer = content.split("</think>")[-1].lstrip("\n")
    candidates = [content, answer, content.strip(), answer.strip()]
    return [text for index, text in enumerate(candidates) if text and text not in candidates[:index]]


def _locate(render: str, content: str, cursor: int) -> tuple[int, int] | None:
    for text in _content_candidates(content):
        position = render.find(text, cursor)
        if position >= 0:
            return position, position + len(text)
    return None


def _next_content_start(render: str, following: list[dict], cursor: int) -> int:
    """Where the next turn with locatable content starts: no turn's span reaches into it."""
    for message in following:
        located = _locate(render, message["content"], cursor)
        if located:
            return located[0]
    return len(render)


def _call_names(calls: list) -> list[str]:
    names = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else call.get("name") if isinstance(call, dict) else None
        if isinstance(name, str) and name:
            names.append(name)
    return names


@dataclass
class _Spans:
    content: list[tuple[int, int]] = field(default_factory=list)  # trained turns, marker excluded
    markers: list[tuple[int, int, bool]] = field(default_factory=list)  # (start, end, after a trained turn)


def _turn_marker(render: str, end: int, bound: int, calls: bool, marks: TemplateMarks) -> tuple[int, int] | None:
    """The end-of-turn marker of a trained turn whose content ends at `end`: right after the content for a
    plain turn; after the calls, before the next turn's content and header, for a tool-calling turn."""
    for group in (marks.turn_ends, marks.call_ends if calls else ()):
        found = []
        for marker in group:
            # a call marker closes each of several calls (Gemma 4's <tool_call|>): the turn ends at the last one
            at = render.rfind(marker, end, bound) if group is marks.call_ends else render.find(marker, end)
            between = render[end:at]
            fits = (not between.strip() if not calls
                    else at + len(marker) <= bound and not any(header in between for header in marks.headers))
            if at >= 0 and fits:
                found.append((at, at + len(marker)))
        if found:
            return min(found, key=lambda span: (span[0], -span[1]))
    return None


def _turn_spans(render: str, conversation: Conversation, marks: TemplateMarks, roles_to_train: list[str]) -> _Spans | Skip:
    spans = _Spans()
    cursor = 0
    messages = conversation.messages
    for index, message in enumerate(messages):
        trained = message["role"] in roles_to_train
        located = _locate(render, message["content"], cursor) if message["content"] else None
        if not trained:
            if located:
                cursor = located[1]
            continue
        calls = message.get("tool_calls") or []
        # A turn that only calls tools has no content to anchor on: the next turn's content bounds it, so its
        # header search and its marker never reach into a later turn.
        bound = _next_content_start(render, messages[index + 1:], located[1] if located else cursor)
        content_after_results = None
        if calls and located and located[0] >= _next_content_start(render, messages[index + 1:], cursor):
            # Gemma 4 writes the calls, then the tool results, then this turn's content, all in one model turn:
            # the calls and the content are trained, the results between them are not.
            content_after_results, located = located, None
            bound = _next_content_start(render, messages[index + 1:], cursor)
        # Where the model's output starts: after the assistant header nearest before the content.
        window_end = located[0] if located else bound
        header_end = -1
        for header in marks.headers if message["role"] == "assistant" else ():
            header_at = (render.rfind if located else render.find)(header, cursor, window_end)
            if header_at >= 0:
                header_end = header_at + len(header)
                break
        if located is None and (header_end < 0 or not calls):
            return Skip(f"{message['role']} turn {index}: its content is not in the rendered conversation")
        start = header_end if header_end >= 0 else located[0]
        end = located[1] if located else start
        marker = _turn_marker(render, end, bound, bool(calls), marks)
        if marker:
            end = marker[0]
            spans.markers.append((marker[0], marker[1], True))
        elif calls:
            # No marker after the calls (Command R+ goes straight to the results turn): they end where the
            # next turn's header starts.
            opened = render.find(marks.turn_opener, end, bound) if marks.turn_opener else -1
            if opened < 0:
                return Skip(f"{message['role']} turn {index}: the chat template writes no end-of-turn marker after "
                            f"its tool_calls and no turn header, so where they end is unknown")
            end = opened
        names = _call_names(calls)
        if calls and not all(render.count(name, start, end) >= names.count(name) for name in names):
            # gpt-oss writes only the first of several calls; Granite, SmolLM3 and LFM2.5 write none
            return Skip(f"{message['role']} turn {index}: the chat template does not write (all of) its "
                        f"tool_calls, so they cannot be trained")
        spans.content.append((start, end))
        cursor = end
        if content_after_results:
            start, end = content_after_results
            marker = _turn_marker(render, end, len(render), False, marks)
            if marker:
                end = marker[0]
                spans.markers.append((marker[0], marker[1], True))
            spans.content.append((start, end))
            cursor = end
    return spans



def _trained_chars(render: str, spans: _Spans, turn_ends: tuple[str, ...], train_on_eos: str) -> bytearray:
    flags = bytearray(len(render))
    for start, end in spans.content:
        flags[start:end] = b"\x01" * (end - start)
    markers = [(start, end) for start, end, _ in spans.markers]
    if train_on_eos == "last":
        markers = markers[-1:]
    elif train_on_eos == "none":
        markers = []
    elif train_on_eos == "all":
        markers = []
        for marker in turn_ends:
            position = render.find(marker)
            while position >= 0:
                markers.append((position, position + len(marker)))
                position = render.find(marker, position + len(marker))
    for start, end in markers:
        flags[start:end] = b"\x01" * (end - start)
    return flags


def _refusal(error: Exception, conversation: Conversation, marks: TemplateMarks) -> str:
    """Why the template would not render a conversation, with what the record can change."""
    if marks.needs_tools and not conversation.tools:
        return f"the chat template renders only conversations with tools (a tool-use template) and this one has none: {error}"
    reason = f"the chat template refused it: {error}"
    calls = [call for message in conversation.messages for call in message.get("tool_calls") or []]
    arguments = [(call.get("function") or {}).get("arguments") for call in calls if isinstance(call, dict)]
    if any(isinstance(value, dict) for value in arguments):
        reason += " (tool_calls give arguments as an object; this template may want them as a JSON string, OpenAI style)"
    elif any(isinstance(value, str) for value in arguments):
        reason += " (tool_calls give arguments as a JSON string; this template may want them as an object)"
    return reason


def tokenize_conversations(conversations: list[Conversation], tokenizer, *, roles_to_train: list[str],
                           train_on_eos: str, train_on_inputs: bool, sequence_len: int
                           ) -> list[tuple[list[int], list[int]] | Skip]:
    """(input_ids, labels) per conversation, or a Skip saying why it could not be masked. One render per
    conversation and one batched fast-tokenizer call for all of them."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; chat datasets need one (set chat_template:)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat masking needs a fast tokenizer (character offsets); this one is a slow one")
    marks = template_marks(tokenizer)
    renders: list[str | Skip] = []
    for conversation in conversations:
        try:
            renders.append(_render(tokenizer, conversation.messages, tools=conversation.tools))
        except _RENDER_ERRORS as error:  # raise_exception: roles must alternate, ...
            renders.append(Skip(_refusal(error, conversation, marks)))
    texts = [text for text in renders if isinstance(text, str)]
    # The template writes the special tokens (bos and the turn markers) itself.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
    results: list[tuple[list[int], list[int]] | Skip] = []
    row = 0
    for conversation, text in zip(conversations, renders):
        if isinstance(text, Skip):
            results.append(text)
            continue
        input_ids, offsets = encoded["input_ids"][row], encoded["offset_mapping"][row]
        row += 1
        if train_on_inputs:
            results.append((input_ids[:sequence_len], list(input_ids[:sequence_len])))
            continue
        spans = _turn_spans(text, conversation, marks, roles_to_train)
        if isinstance(spans, Skip):
            results.append(spans)
            continue
        flags = _trained_chars(text, spans, marks.turn_ends, train_on_eos)
        labels = [token if any(flags[start:end]) else IGNORE_INDEX
                  for token, (start, end) in zip(input_ids, offsets)]
        results.append((input_ids[:sequence_len], labels[:sequence_len]))
    return results


def trained_flags(render: str, conversation: Conversation, marks: TemplateMarks, roles_to_train: list[str],
                  train_on_eos: str) -> bytearray | Skip:
    """One flag per character of a rendered conversation: 1 where it is trained. For renders ftclip changes
    after the template (image chats expand their placeholders, ftclip/data/vision.py): the turns are found in
    the render as tokenize_conversations finds them."""
    spans = _turn_spans(render, conversation, marks, roles_to_train)
    if isinstance(spans, Skip):
        return spans
    return _trained_chars(render, spans, marks.turn_ends, train_on_eos)


def check_skipped(skipped: int, total: int, first_reasons: list[str], source: str = "") -> str | None:
    """Stop when too many records were skipped (the template does not fit the data); otherwise a line to
    print when some were, or None."""
    if not skipped:
        return None
    where = f"{source}: " if source else ""
    reasons = "; ".join(first_reasons[:3])
    if skipped > SKIP_LIMIT * total:
        raise DataError(
            f"{where}{skipped} of {total} chat records could not be masked (more than {SKIP_LIMIT:.0%}): this looks "
            f"like the wrong template for this data; set chat_template: (e.g. chatml, llama3) or check roles and "
            f"message_property_mappings. First reasons: {reasons}"
        )
    return f"{where}skipped {skipped} of {total} chat records that could not be masked: {reasons}"
