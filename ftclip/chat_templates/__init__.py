"""Built-in chat templates (recipe key `chat_template`), kept as .jinja files beside this module.

chatml, llama3, mistral and gemma are the plain forms of those families' formats (no tools); qwen3 is Qwen3's
own template (tools, <think> handling), the same file as tests/fixtures/chat_templates/Qwen-Qwen3-0.6B.jinja
(source in SOURCES.md there)."""

from __future__ import annotations

from importlib import resources

BUILTIN_TEMPLATES = ("chatml", "llama3", "qwen3", "mistral", "gemma")
CHAT_TEMPLATE_CHOICES = ("tokenizer_default", "jinja", *BUILTIN_TEMPLATES)


def builtin_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"no built-in chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(chat_template: str, chat_template_jinja: str | None) -> str | None:
    """The template text the recipe asks for, or None to keep the tokenizer's own. A literal
    chat_template_jinja wins over tokenizer_default (setting it says which template to use)."""
    if chat_template == "jinja" or (chat_template == "tokenizer_default" and chat_template_jinja):
        return chat_template_jinja
    if chat_template == "tokenizer_default":
        return None
    return builtin_template(chat_template)
