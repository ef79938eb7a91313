"""Axolotl's built-in chat templates under Axolotl's names (ftclip/chat_templates, sources in SOURCES.md there):
each resolves and renders a conversation, chat masking trains exactly the assistant turns on them, and
`tokenizer_default_fallback_<name>` keeps the tokenizer's template or falls back to <name>."""

from __future__ import annotations

import copy
import json
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import QUICKSTART_MODEL
from jinja2 import TemplateError
from test_chat_masking import trained_pieces
from transformers import AutoTokenizer

from ftclip.chat_templates import (
    AXOLOTL_TEMPLATES,
    BUILTIN_TEMPLATES,
    CHAT_TEMPLATE_CHOICES,
    FALLBACK_PREFIX,
    builtin_template,
    resolve_chat_template,
)
from ftclip.data.chat import IGNORE_INDEX, Conversation, tokenize_conversations

PACKAGE = Path(__file__).resolve().parent.parent / "ftclip" / "chat_templates"
SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2 = "Be brief.", "Capital of Peru?", "Lima.", "And Chile?", "Santiago."

# Axolotl's Mistral v1/v2v3/v3-tekken templates take only alternating user/assistant turns: a system turn is refused.
REFUSE_SYSTEM = {"mistral_v1", "mistral_v2v3", "mistral_v3_tekken"}
# Pixtral's template writes the system message into the LAST user turn only; a training conversation ends with
# the assistant, so the system message is left out (Axolotl and the model's own template do the same).
DROP_SYSTEM = {"pixtral"}


@lru_cache(maxsize=1)
def _quickstart_tokenizer():
    return AutoTokenizer.from_pretrained(QUICKSTART_MODEL)


def template_tokenizer(name: str, bos: str | None = None, eos: str | None = None, extra: tuple[str, ...] = ()):
    """The quickstart tokenizer with the model's bos, eos and turn markers as special tokens (so each encodes as one
    token, as in the model's own tokenizer) and the built-in template `name`."""
    tokenizer = copy.deepcopy(_quickstart_tokenizer())  # a copy: added tokens must not leak between tests
    special = {"additional_special_tokens": list(extra)}
    special |= ({"bos_token": bos} if bos else {}) | ({"eos_token": eos} if eos else {})
    tokenizer.add_special_tokens(special)
    tokenizer.chat_template = resolve_chat_template(name, None)
    return tokenizer


def chat(*, system: bool = True) -> Conversation:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    return Conversation(messages + [
        {"role": "user", "content": USER_1}, {"role": "assistant", "content": ANSWER_1},
        {"role": "user", "content": USER_2}, {"role": "assistant", "content": ANSWER_2},
    ])




# ---------------------------------------------------------------- names, files, sources


def test_names_files_and_sources_agree():
    files = {path.stem for path in PACKAGE.glob("*.jinja")}
    assert files == set(BUILTIN_TEMPLATES)
    assert BUILTIN_TEMPLATES[:5] == ("chatml", "llama3", "qwen3", "mistral", "gemma")  # ftclip's own, unchanged
    assert CHAT_TEMPLATE_CHOICES[:7] == ("tokenizer_default", "jinja", "chatml", "llama3", "qwen3", "mistral", "gemma")
    assert {FALLBACK_PREFIX + name for name in BUILTIN_TEMPLATES} <= set(CHAT_TEMPLATE_CHOICES)
    sources = (PACKAGE / "SOURCES.md").read_text()
    for name in AXOLOTL_TEMPLATES:
        assert f"| `{name}.jinja` |" in sources, name
    assert "llava" not in BUILTIN_TEMPLATES  # skipped: renders only list-of-parts (image) content, see SOURCES.md


# ---------------------------------------------------------------- every Axolotl name renders


@pytest.mark.parametrize("name", AXOLOTL_TEMPLATES)
def test_every_axolotl_name_resolves_and_renders_a_conversation(name):
    tokenizer = template_tokenizer(name)
    assert tokenizer.chat_template == builtin_template(name) == (PACKAGE / f"{name}.jinja").read_text()
    conversation = chat(system=name not in REFUSE_SYSTEM)
    if name in REFUSE_SYSTEM:
        with pytest.raises(TemplateError, match="must alternate"):
            tokenizer.apply_chat_template(chat().messages, tokenize=False)
    render = tokenizer.apply_chat_template(conversation.messages, tokenize=False)
    contents = [message["content"] for message in conversation.messages]
    if name in DROP_SYSTEM:
        assert SYSTEM not in render
        contents.remove(SYSTEM)
    positions = [render.find(content) for content in contents]
    assert -1 not in positions and positions == sorted(positions), render  # every turn, in order


# ---------------------------------------------------------------- masking trains exactly the assistant turns

COHERE_TURNS = ("<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")
# name: (bos, eos, the model's turn markers, the trained pieces of chat())
MASK_CASES = {
    "qwen_25": (None, "<|im_end|>", ("<|im_start|>",), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    # phi_3 has no generation prompt: the user turn writes <|assistant|> itself
    "phi_3": ("<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
              ["Lima.<|end|>", "Santiago.<|end|>"]),
    "phi_35": ("<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
               ["Lima.<|end|>", "Santiago.<|end|>"]),
    "gemma3": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), ["Lima.<end_of_turn>", "Santiago.<end_of_turn>"]),
    "cohere": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", COHERE_TURNS,
               ["Lima.<|END_OF_TURN_TOKEN|>", "Santiago.<|END_OF_TURN_TOKEN|>"]),
    # Command A wraps the answer in <|START_RESPONSE|>...<|END_RESPONSE|>, then <|END_OF_TURN_TOKEN|> (its eos, where
    # generation stops: trained too)
    "command_a": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", (*COHERE_TURNS, "<|START_RESPONSE|>", "<|END_RESPONSE|>"),
                  ["Lima.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "Santiago.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]),
    "llama4": ("<|begin_of_text|>", "<|eot|>", ("<|header_start|>", "<|header_end|>"), ["Lima.<|eot|>", "Santiago.<|eot|>"]),
    "deepseek_v3": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ("<｜User｜>", "<｜Assistant｜>"),
                    ["Lima.<｜end▁of▁sentence｜>", "Santiago.<｜end▁of▁sentence｜>"]),
    "mistral_v3_tekken": ("<s>", "</s>", ("[INST]", "[/INST]"), ["Lima.</s>", "Santiago.</s>"]),  # no system turn
    "falcon_h1": (None, "<|im_end|>", ("<|im_start|>",), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    "exaone": (None, "[|endofturn|]", ("[|system|]", "[|user|]", "[|assistant|]"),
               ["Lima.[|endofturn|]", "Santiago.[|endofturn|]"]),
}


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_masking_trains_exactly_the_assistant_turns(name):
    bos, eos, extra, expected = MASK_CASES[name]
    tokenizer = template_tokenizer(name, bos, eos, extra)
    conversation = chat(system=name not in REFUSE_SYSTEM)
    [(input_ids, labels)] = tokenize_conversations([conversation], tokenizer, roles_to_train=["assistant"],
                                                   train_on_eos="turn", train_on_inputs=False, sequence_len=4096)
    assert trained_pieces(tokenizer, input_ids, labels) == expected
    render = tokenizer.apply_chat_template(conversation.messages, tokenize=False)
    assert input_ids == tokenizer(render, add_special_tokens=False)["input_ids"]  # the full render's ids
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(input_ids, labels))
    for marker in (*extra, eos):  # each marker is one token, so the masks fall on whole markers
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


# ---------------------------------------------------------------- tokenizer_default_fallback_<name>


def test_fallback_keeps_the_tokenizers_template_or_gives_the_named_one():
    assert resolve_chat_template("tokenizer_default_fallback_qwen_25", None, "{{ own }}") is None  # keep the own
    assert resolve_chat_template("tokenizer_default_fallback_qwen_25", None, None) == builtin_template("qwen_25")
    assert resolve_chat_template("tokenizer_default_fallback_chatml", None, "") == builtin_template("chatml")
    assert resolve_chat_template("qwen_25", None, "{{ own }}") == builtin_template("qwen_25")  # a plain name replaces


def recipe_with(**keys):
    from ftclip.recipe import parse_recipe

    document = {"base_model": "org/model", "datasets": [{"path": "chat.jsonl", "type": "chat_template"}], **keys}
    return parse_recipe(json.dumps(document), "recipe.yaml")


def test_fallback_through_load_tokenizer(tmp_path):
    from ftclip.modeling import load_tokenizer

    with_template = load_tokenizer(recipe_with(base_model=str(QUICKSTART_MODEL),
                                               chat_template="tokenizer_default_fallback_chatml"))
    assert with_template.chat_template == (QUICKSTART_MODEL / "chat_template.jinja").read_text()

    bare = tmp_path / "bare"  # the same tokenizer without a chat template
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QUICKSTART_MODEL / name, bare / name)
    assert not AutoTokenizer.from_pretrained(bare).chat_template
    fallen_back = load_tokenizer(recipe_with(base_model=str(bare), chat_template="tokenizer_default_fallback_chatml"))
    assert fallen_back.chat_template == builtin_template("chatml")


# ---------------------------------------------------------------- recipes and Axolotl configs take the names


@pytest.mark.parametrize("name", ["qwen_25", "phi_3", "gemma3", "cohere", "command_a", "llama3_2_vision",
                                  "tokenizer_default_fallback_chatml", "tokenizer_default_fallback_gemma3"])
def test_recipe_takes_axolotl_names(name):
    assert recipe_with(chat_template=name).chat_template == name


@pytest.mark.parametrize("name", ["llava", "tokenizer_default_fallback_llava", "tokenizer_default_fallback_jinja",
                                  "tokenizer_default_fallback_"])
def test_unknown_and_skipped_names_are_refused(name):
    from ftclip.errors import RecipeError

    with pytest.raises(RecipeError, match=f"unknown chat template {name!r}"):
        recipe_with(chat_template=name)


def test_axolotl_import_passes_the_names_through(tmp_path):
    from ftclip.axolotl import import_config
    from ftclip.recipe import parse_recipe

    config = tmp_path / "axolotl.yml"
    config.write_text("base_model: org/model\nchat_template: qwen_25\ndatasets:\n  - path: chat.jsonl\n"
                      "    type: chat_template\n")
    result = import_config(config)
    assert result.ok, (result.refused, result.problems)
    assert parse_recipe(result.text).chat_template == "qwen_25"

    config.write_text("base_model: org/model\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\n"
                      "    chat_template: tokenizer_default_fallback_chatml\n")  # per dataset, as Axolotl allows
    result = import_config(config)
    assert result.ok, (result.refused, result.problems)
    assert parse_recipe(result.text).chat_template == "tokenizer_default_fallback_chatml"
