"""Built-in chat templates (recipe key `chat_template`), kept as .jinja files beside this module.

ftclip's own: chatml, llama3, mistral and gemma are the plain forms of those families' formats (no tools); qwen3
is Qwen3's own template (tools, <think> handling), the same file as
tests/fixtures/chat_templates/Qwen-Qwen3-0.6B.jinja (source in SOURCES.md there).

Axolotl's: the other names are Axolotl's built-in templates under Axolotl's names, the files copied unchanged
from axolotl-ai-cloud/axolotl (src/axolotl/utils/chat_templates/templates/; repository, path and commit of each in
SOURCES.md here), so that an imported Axolotl config renders its conversations as Axolotl does. Where the two
share a name (chatml, llama3, gemma, qwen3) ftclip's file is kept; see SOURCES.md for how they differ.

`tokenizer_default_fallback_<name>` (Axolotl's meaning): the tokenizer's own template, or the built-in <name>
when the tokenizer has none."""

from __future__ import annotations

from importlib import resources

FTCLIP_TEMPLATES = ("chatml", "llama3", "qwen3", "mistral", "gemma")
AXOLOTL_TEMPLATES = (
    "alpaca", "aya", "cohere", "command_a", "command_a_rag", "command_a_tool_use", "deepseek_v2", "deepseek_v3",
    "exaone", "exaone4", "falcon_h1", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "granite", "granitemoe",
    "jamba", "llama3_2_vision", "llama4", "llava", "metharme", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken",
    "mistral_v7_tekken", "nemotron", "nemotron_h", "phi_3", "phi_35", "phi_4", "pixtral", "qwen2_vl", "qwen3_5",
    "qwen_25",
)
BUILTIN_TEMPLATES = FTCLIP_TEMPLATES + AXOLOTL_TEMPLATES
FALLBACK_PREFIX = "tokenizer_default_fallback_"
CHAT_TEMPLATE_CHOICES = ("tokenizer_default", "jinja", *BUILTIN_TEMPLATES,
                         *(FALLBACK_PREFIX + name for name in BUILTIN_TEMPLATES))


def builtin_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"no built-in chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
    return resources.files(__package__).joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(chat_template: str, chat_template_jinja: str | None,
                          tokenizer_template: str | dict | None = None) -> str | None:
    """The template text the recipe asks for, or None to keep the tokenizer's own (`tokenizer_template`). A literal
    chat_template_jinja wins over tokenizer_default (setting it says which template to use); a
    tokenizer_default_fallback_<name> keeps the tokenizer's template when it has one and gives <name> otherwise."""
    if chat_template == "jinja" or (chat_template == "tokenizer_default" and chat_template_jinja):
        return chat_template_jinja
    if chat_template == "tokenizer_default":
        return None
    if chat_template.startswith(FALLBACK_PREFIX):
        return None if tokenizer_template else builtin_template(chat_template.removeprefix(FALLBACK_PREFIX))
    return builtin_template(chat_template)
