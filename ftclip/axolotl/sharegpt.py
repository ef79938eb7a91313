"""Axolotl's ShareGPT dataset type (`type: sharegpt`, deprecated there, still everywhere in committed configs) as
ftclip's chat type, the way Axolotl's own migration says (docs/dataset-formats/conversation.qmd, "Migrating from
sharegpt"): `type: chat_template` with `field_messages: conversations` and `message_property_mappings
{role: from, content: value}`, and the chat template the `conversation:` named.

What the old type did (src/axolotl/prompt_strategies/sharegpt.py, prompters.py ShareGPTPrompterV2): each record's
turns, read by the loader the type names, were written in a fastchat conversation template — the dataset's
`conversation:`, else fastchat's vicuna_v1.1 — with the human turns masked and the model's turns trained;
`field_human`/`field_model` name the roles the data uses for them."""

from __future__ import annotations

from typing import Any

# Loader (the part after `sharegpt.` or `sharegpt:`) → where the turns are and how a turn spells its role and text.
_FROM_VALUE = ("conversations", {"role": "from", "content": "value"}, {"user": ["human"], "assistant": ["gpt"]})
LOADERS: dict[str, tuple[str, dict[str, str], dict[str, list[str]]]] = {
    "": _FROM_VALUE, "chat": _FROM_VALUE, "load": _FROM_VALUE,
    "load_role": ("conversations", {"role": "role", "content": "value"}, {"user": ["human"], "assistant": ["gpt"]}),
    "load_guanaco": ("conversations", {"role": "role", "content": "text"},
                     {"user": ["prompter"], "assistant": ["assistant"]}),
    "load_ultrachat": ("messages", {"role": "role", "content": "content"}, {"user": ["user"], "assistant": ["assistant"]}),
}

# fastchat conversation name → ftclip's chat template that writes the same turns. Axolotl registers its own
# chatml and llama3 conversations, each with a default system prompt for records that have none.
CONVERSATIONS = {"chatml": "chatml", "llama3": "llama3", "llama-3": "llama3", "mistral": "mistral", "gemma": "gemma"}
_DEFAULT_SYSTEM = {"chatml", "llama3"}


def sharegpt_loader(type_name: Any) -> str | None:
    """The loader a sharegpt type names ("" for plain `sharegpt`), or None when the type is not a ShareGPT one."""
    if not isinstance(type_name, str) or not type_name.startswith("sharegpt"):
        return None
    rest = type_name[len("sharegpt"):]
    return rest[1:] if rest[:1] in (".", ":") else (None if rest else "")


def sharegpt_fields(entry: dict, loader: str) -> dict | str:
    """The chat dataset fields for a ShareGPT entry, or why it cannot be read as one."""
    if loader not in LOADERS:
        return (f"sharegpt.{loader}: a ShareGPT loader ftclip does not read (it reads {', '.join(sorted(filter(None, LOADERS)))} "
                "and plain sharegpt)")
    messages, mappings, roles = LOADERS[loader]
    roles = dict(roles)
    for key, role in (("field_human", "user"), ("field_model", "assistant")):
        name = entry.get(key)
        if name is not None:
            if not isinstance(name, str):
                return f"{key} {name!r} must be the role name the data uses"
            roles[role] = [name]
    return {"type": "chat", "field_messages": messages, "message_property_mappings": dict(mappings), "roles": roles}


def conversation_template(conversation: Any) -> tuple[str | None, str]:
    """(ftclip chat template, note) for a fastchat conversation name; (None, why) when ftclip has none."""
    if conversation is None:
        return None, ("no conversation: Axolotl's ShareGPT format wrote fastchat's vicuna_v1.1 prompts then (its "
                      "default), and ftclip has no vicuna chat template; name the format in conversation "
                      f"({', '.join(CONVERSATIONS)}) or convert the data to type: chat_template with a chat_template")
    template = CONVERSATIONS.get(conversation) if isinstance(conversation, str) else None
    if template is None:
        return None, (f"fastchat conversation {conversation!r}: ftclip has no chat template that writes it (it maps "
                      f"{', '.join(CONVERSATIONS)}); give the template as chat_template_jinja with type: chat_template")
    note = "the same turn format, as Axolotl's migration from sharegpt maps it"
    if conversation in _DEFAULT_SYSTEM:
        note += ("; the fastchat conversation also put the system prompt 'You are a helpful assistant.' before "
                 "records without a system turn, the chat template does not")
    return template, note
