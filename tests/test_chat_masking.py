"""Chat masking on real chat templates (tests/fixtures/chat_templates, see SOURCES.md there): the trained tokens
are exactly the assistant turns and their end-of-turn markers, and the ids are the full render's tokenization."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from conftest import QUICKSTART_MODEL
from transformers import AutoTokenizer

from ftclip.data.chat import (
    IGNORE_INDEX,
    Conversation,
    Skip,
    check_skipped,
    conversation_from_record,
    template_marks,
    tokenize_conversations,
)
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
LLAMA31 = "meta-llama-Llama-3.3-70B-Instruct.jinja"  # the same template as Llama 3.1's (see SOURCES.md)
QWEN3 = "Qwen-Qwen3-0.6B.jinja"
QWQ = "Qwen-QwQ-32B.jinja"
HERMES = "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"
MISTRAL = "mistralai-Mistral-Nemo-Instruct-2407.jinja"
GEMMA = "google-gemma-2-2b-it.jinja"
PHI = "microsoft-Phi-3.5-mini-instruct.jinja"

# Each model's bos, eos and the special tokens its template writes, added to the quickstart tokenizer so it
# encodes them as single tokens like the real tokenizer does.
SPECIAL_TOKENS = {
    LLAMA31: ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]),
    QWEN3: (None, "<|im_end|>", ["<|im_start|>"]),
    QWQ: (None, "<|im_end|>", ["<|im_start|>"]),
    HERMES: ("<|begin_of_text|>", "<|im_end|>", ["<|im_start|>"]),
    MISTRAL: ("<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                              "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    GEMMA: ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    PHI: ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}


@lru_cache(maxsize=None)
def template_tokenizer(name: str):
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    bos, eos, extra = SPECIAL_TOKENS[name]
    special = {"additional_special_tokens": extra} | ({"eos_token": eos} if eos else {}) | ({"bos_token": bos} if bos else {})
    tokenizer.add_special_tokens(special)
    tokenizer.chat_template = (TEMPLATES / name).read_text()
    return tokenizer


def masked(conversation: Conversation, tokenizer, **options):
    settings = {"roles_to_train": ["assistant"], "train_on_eos": "turn", "train_on_inputs": False, "sequence_len": 4096}
    return tokenize_conversations([conversation], tokenizer, **(settings | options))[0]


def trained_pieces(tokenizer, input_ids, labels) -> list[str]:
    """The trained tokens, decoded run by run."""
    pieces, run = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return pieces + ([tokenizer.decode(run)] if run else [])


SYSTEM, USER_1, USER_2 = "Be brief.", "Capital of Peru?", "And Chile?"
THINK_1 = "<think>\nPeru is on the Pacific.\n</think>\n\nLima."
THINK_2 = "<think>\nNext door.\n</think>\n\nSantiago."


def chat(*, system: bool = True, first: str = "Lima.", second: str = "Santiago.") -> Conversation:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    return Conversation(messages + [
        {"role": "user", "content": USER_1}, {"role": "assistant", "content": first},
        {"role": "user", "content": USER_2}, {"role": "assistant", "content": second},
    ])


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}}, "required": ["city"]},
}}]
CALL = {"id": "call00042", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lima"}}}
TOOL_RESULT = "temperature 22, clear sky"


def tool_chat(*, arguments_as_json: bool = False) -> Conversation:
    """arguments_as_json: the call's arguments as a JSON string (OpenAI style; DeepSeek's and functionary's templates
    take only that), not an object."""
    call = CALL
    if arguments_as_json:
        call = CALL | {"function": CALL["function"] | {"arguments": json.dumps(CALL["function"]["arguments"])}}
    return Conversation([
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": TOOL_RESULT, "tool_call_id": "call00042", "name": "get_weather"},
        {"role": "assistant", "content": "It is 22 C and sunny in Lima."},
    ], TOOLS)


CASES = [
    # Llama 3.1 keeps what the assistant wrote (a think block too); each turn ends with <|eot_id|>.
    (LLAMA31, chat(first=THINK_1, second=THINK_2), [THINK_1 + "<|eot_id|>", THINK_2 + "<|eot_id|>"]),
    (LLAMA31, tool_chat(), ['{"name": "get_weather", "parameters": {"city": "Lima"}}<|eot_id|>',
                            "It is 22 C and sunny in Lima.<|eot_id|>"]),
    # Qwen3 drops the think block of turns before the last user query (today's prefix method stops here).
    (QWEN3, chat(first=THINK_1, second=THINK_2), ["Lima.<|im_end|>", THINK_2 + "<|im_end|>"]),
    (QWEN3, tool_chat(), ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
                          "<think>\n\n</think>\n\nIt is 22 C and sunny in Lima.<|im_end|>"]),
    # QwQ (Qwen2.5-32B) strips think blocks from all but the last turn.
    (QWQ, chat(first=THINK_1, second=THINK_2), ["Lima.<|im_end|>", THINK_2 + "<|im_end|>"]),
    (QWQ, tool_chat(), ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
                        "It is 22 C and sunny in Lima.<|im_end|>"]),
    # Hermes 3 (ChatML) with its tool-use template.
    (HERMES, tool_chat(), ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
                           "It is 22 C and sunny in Lima.<|im_end|>"]),
    # Mistral has no assistant header: the answer follows [/INST] and ends with </s>.
    (MISTRAL, chat(), ["Lima.</s>", "Santiago.</s>"]),
    (MISTRAL, tool_chat(), ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lima"}, "id": "call00042"}]</s>',
                            "It is 22 C and sunny in Lima.</s>"]),
    (GEMMA, chat(system=False, first=" Lima. \n"), ["Lima.<end_of_turn>", "Santiago.<end_of_turn>"]),  # gemma trims
    # Phi-3.5 ends the conversation with eos after the last <|end|>: not a turn's marker, not trained.
    (PHI, chat(first=THINK_1), [THINK_1 + "<|end|>", "Santiago.<|end|>"]),
]


@pytest.mark.parametrize(("template", "conversation", "expected"), CASES,
                         ids=[f"{name.split('.jinja')[0]}-{'tools' if c.tools else 'chat'}" for name, c, _ in CASES])
def test_trained_tokens_are_the_assistant_turns_on_real_templates(template, conversation, expected):
    tokenizer = template_tokenizer(template)
    input_ids, labels = masked(conversation, tokenizer)
    assert trained_pieces(tokenizer, input_ids, labels) == expected
    render = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=False)
    assert input_ids == tokenizer(render, add_special_tokens=False)["input_ids"]
    trained = "".join(expected)
    for message in conversation.messages:
        if message["role"] != "assistant":
            assert message["content"] not in trained
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(input_ids, labels))


# ---------------------------------------------------------------- more real templates (SOURCES.md: the second table)

LLAMA3_TOKENS = ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"])
DEEPSEEK_TOKENS = [
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
]
MISTRAL_TOKENS = [
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[ARGS]",
    "[CALL_ID]",
    "[TOOL_CONTENT]",
]
COHERE_TOKENS = ["<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>"]
# Each model's bos, eos and the special tokens its template writes (as SPECIAL_TOKENS above).
MORE_SPECIAL_TOKENS = {
    "ByteDance-Seed-OSS.jinja": (
        "<seed:bos>",
        "<seed:eos>",
        [
            "<seed:think>",
            "</seed:think>",
            "<seed:cot_budget_reflect>",
            "</seed:cot_budget_reflect>",
            "<seed:tool_call>",
            "</seed:tool_call>",
            "<seed:pad>",
        ],
    ),
    "CohereForAI-c4ai-command-r-plus-tool_use.jinja": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", COHERE_TOKENS),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja": (
        "<BOS_TOKEN>",
        "<|END_OF_TURN_TOKEN|>",
        COHERE_TOKENS
        + [
            "<|START_ACTION|>",
            "<|END_ACTION|>",
            "<|START_RESPONSE|>",
            "<|END_RESPONSE|>",
            "<|START_THINKING|>",
            "<|END_THINKING|>",
            "<|START_TOOL_RESULT|>",
            "<|END_TOOL_RESULT|>",
        ],
    ),
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": ("<s>", "</s>", MISTRAL_TOKENS),
    "unsloth-mistral-Devstral-Small-2507.jinja": ("<s>", "</s>", MISTRAL_TOKENS),
    "NVIDIA-Nemotron-Nano-v2.jinja": (None, "<SPECIAL_12>", ["<SPECIAL_10>", "<SPECIAL_11>"]),
    "Qwen-Qwen2.5-7B-Instruct.jinja": (None, "<|im_end|>", ["<|im_start|>"]),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_TOKENS),
    "deepseek-ai-DeepSeek-V3.1.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_TOKENS),
    "llama-cpp-deepseek-r1.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_TOKENS),
    "fireworks-ai-llama-3-firefunction-v2.jinja": LLAMA3_TOKENS,
    "meta-llama-Llama-3.2-3B-Instruct.jinja": LLAMA3_TOKENS,
    "meetkai-functionary-medium-v3.1.jinja": LLAMA3_TOKENS,
    "meetkai-functionary-medium-v3.2.jinja": LLAMA3_TOKENS,
    "ibm-granite-granite-3.3-2B-Instruct.jinja": (
        None,
        "<|end_of_text|>",
        ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>", "<|start_of_cite|>", "<|end_of_cite|>"],
    ),
    "llama-cpp-rwkv-world.jinja": (None, None, []),
    "moonshotai-Kimi-K2.jinja": (
        None,
        "<|im_end|>",
        [
            "<|im_system|>",
            "<|im_user|>",
            "<|im_assistant|>",
            "<|im_middle|>",
            "<|tool_calls_section_begin|>",
            "<|tool_calls_section_end|>",
            "<|tool_call_begin|>",
            "<|tool_call_argument_begin|>",
            "<|tool_call_end|>",
        ],
    ),
    "openai-gpt-oss-120b.jinja": (
        None,
        "<|return|>",
        ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|constrain|>"],
    ),
    "GLM-4.6.jinja": ("[gMASK]", "<|user|>", ["<sop>", "<|system|>", "<|assistant|>", "<|observation|>"]),
    "HuggingFaceTB-SmolLM3-3B.jinja": (None, "<|im_end|>", ["<|im_start|>"]),
    "Qwen3-Coder.jinja": (None, "<|im_end|>", ["<|im_start|>"]),
    "Apertus-8B-Instruct.jinja": (
        "<s>",
        "<|assistant_end|>",
        [
            "<|system_start|>",
            "<|system_end|>",
            "<|developer_start|>",
            "<|developer_end|>",
            "<|user_start|>",
            "<|user_end|>",
            "<|assistant_start|>",
            "<|inner_prefix|>",
            "<|inner_suffix|>",
            "<|tools_prefix|>",
            "<|tools_suffix|>",
        ],
    ),
    "google-gemma-4-31B-it.jinja": (
        "<bos>",
        "<turn|>",
        [
            "<|turn>",
            "<|channel>",
            "<channel|>",
            "<|tool_call>",
            "<tool_call|>",
            "<|tool_response>",
            "<tool_response|>",
            "<|tool>",
            "<tool|>",
            '<|"|>',
            "<|think|>",
        ],
    ),
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja": ("<s>", "</s>", MISTRAL_TOKENS + ["[THINK]", "[/THINK]"]),
    "Bielik-11B-v3.0-Instruct.jinja": ("<s>", "<|im_end|>", ["<|im_start|>", "<|function_list|>", "<|function_output|>"]),
    "LFM2.5-Instruct.jinja": ("<|startoftext|>", "<|im_end|>", ["<|im_start|>"]),
}
SPECIAL_TOKENS.update(MORE_SPECIAL_TOKENS)

# What each template renders after the assistant header, as rendered (reviewed by hand): DeepSeek R1/V3.1 and LFM2.5
# drop think blocks (all, or before the last user turn); gpt-oss ends earlier turns with <|end|>, the last with
# <|return|>, a tool call with <|call|>; Command R7B trains its eos after <|END_RESPONSE|>; Command R+ writes no marker
# after a tool call (the call is trained up to the next turn, never the results); Gemma 4 keeps the call, the result and
# the answer in one model turn (the result is not trained); GLM ends a turn with the next role's token, so the last
# turn has none in the render, and Apertus leaves the last turn open; RWKV ends turns with a blank line.
MORE_CASES = [
    ("ByteDance-Seed-OSS.jinja", chat(), ["Lima.<seed:eos>", "Santiago.<seed:eos>"]),
    (
        "ByteDance-Seed-OSS.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<seed:eos>", "<think>\nNext door.\n</think>\n\nSantiago.<seed:eos>"],
    ),
    (
        "ByteDance-Seed-OSS.jinja",
        tool_chat(),
        [
            "<seed:tool_call>\n<function=get_weather>\n<parameter=city>Lima</parameter>\n</function>\n"
            "</seed:tool_call><seed:eos>",
            "It is 22 C and sunny in Lima.<seed:eos>",
        ],
    ),
    (
        "CohereForAI-c4ai-command-r-plus-tool_use.jinja",
        tool_chat(),
        [
            '\nAction:\n```json\n[\n    {\n        "tool_name": "get_weather",\n        "parameters": {\n'
            '            "city": "Lima"\n        }\n    }\n]```\n',
            "It is 22 C and sunny in Lima.<|END_OF_TURN_TOKEN|>",
        ],
    ),
    (
        "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
        chat(),
        ["Lima.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", "Santiago.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"],
    ),
    (
        "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
        chat(first=THINK_1, second=THINK_2),
        [
            "<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
            "<think>\nNext door.\n</think>\n\nSantiago.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
        ],
    ),
    (
        "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
        tool_chat(),
        [
            '<|START_THINKING|><|END_THINKING|><|START_ACTION|>[\n'
            '    {"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Lima"}}\n]<|END_ACTION|>',
            "It is 22 C and sunny in Lima.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
        ],
    ),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", chat(), ["Lima.</s>", "Santiago.</s>"]),
    (
        "Mistral-Small-3.2-24B-Instruct-2506.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.</s>", "<think>\nNext door.\n</think>\n\nSantiago.</s>"],
    ),
    (
        "Mistral-Small-3.2-24B-Instruct-2506.jinja",
        tool_chat(),
        ['[TOOL_CALLS]get_weather[CALL_ID]call00042[ARGS]{"city": "Lima"}</s>', "It is 22 C and sunny in Lima.</s>"],
    ),
    ("unsloth-mistral-Devstral-Small-2507.jinja", chat(), ["Lima.</s>", "Santiago.</s>"]),
    (
        "unsloth-mistral-Devstral-Small-2507.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.</s>", "<think>\nNext door.\n</think>\n\nSantiago.</s>"],
    ),
    (
        "unsloth-mistral-Devstral-Small-2507.jinja",
        tool_chat(),
        ['[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}</s>', "It is 22 C and sunny in Lima.</s>"],
    ),
    ("NVIDIA-Nemotron-Nano-v2.jinja", chat(), ["Lima.\n<SPECIAL_12>", "Santiago.\n<SPECIAL_12>"]),
    (
        "NVIDIA-Nemotron-Nano-v2.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["Lima.\n<SPECIAL_12>", "<think>\nNext door.\n</think>\n\nSantiago.\n<SPECIAL_12>"],
    ),
    (
        "NVIDIA-Nemotron-Nano-v2.jinja",
        tool_chat(),
        [
            '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Lima"}}]</TOOLCALL>\n<SPECIAL_12>',
            "It is 22 C and sunny in Lima.\n<SPECIAL_12>",
        ],
    ),
    ("Qwen-Qwen2.5-7B-Instruct.jinja", chat(), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    (
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|im_end|>", "<think>\nNext door.\n</think>\n\nSantiago.<|im_end|>"],
    ),
    (
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        tool_chat(),
        [
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
            "It is 22 C and sunny in Lima.<|im_end|>",
        ],
    ),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", chat(), ["Lima.<｜end▁of▁sentence｜>", "Santiago.<｜end▁of▁sentence｜>"]),
    (
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["\n\nLima.<｜end▁of▁sentence｜>", "\n\nSantiago.<｜end▁of▁sentence｜>"],
    ),
    ("deepseek-ai-DeepSeek-V3.1.jinja", chat(), ["Lima.<｜end▁of▁sentence｜>", "Santiago.<｜end▁of▁sentence｜>"]),
    (
        "deepseek-ai-DeepSeek-V3.1.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["\n\nLima.<｜end▁of▁sentence｜>", "\n\nSantiago.<｜end▁of▁sentence｜>"],
    ),
    (
        "deepseek-ai-DeepSeek-V3.1.jinja",
        tool_chat(arguments_as_json=True),
        [
            '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Lima"}<｜tool▁call▁end｜><｜too'
            'l▁calls▁end｜><｜end▁of▁sentence｜>',
            "It is 22 C and sunny in Lima.<｜end▁of▁sentence｜>",
        ],
    ),
    ("llama-cpp-deepseek-r1.jinja", chat(), ["Lima.<｜end▁of▁sentence｜>", "Santiago.<｜end▁of▁sentence｜>"]),
    (
        "llama-cpp-deepseek-r1.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["\n\nLima.<｜end▁of▁sentence｜>", "\n\nSantiago.<｜end▁of▁sentence｜>"],
    ),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", chat(), ["Lima.<|eot_id|>", "Santiago.<|eot_id|>"]),
    (
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|eot_id|>", "<think>\nNext door.\n</think>\n\nSantiago.<|eot_id|>"],
    ),
    (
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        tool_chat(),
        ['{"name": "get_weather", "parameters": {"city": "Lima"}}<|eot_id|>', "It is 22 C and sunny in Lima.<|eot_id|>"],
    ),
    ("meetkai-functionary-medium-v3.1.jinja", chat(), ["Lima.<|eot_id|>", "Santiago.<|eot_id|>"]),
    (
        "meetkai-functionary-medium-v3.1.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|eot_id|>", "<think>\nNext door.\n</think>\n\nSantiago.<|eot_id|>"],
    ),
    (
        "meetkai-functionary-medium-v3.1.jinja",
        tool_chat(arguments_as_json=True),
        ['<function=get_weather>{"city": "Lima"}</function><|eom_id|>', "It is 22 C and sunny in Lima.<|eot_id|>"],
    ),
    ("meetkai-functionary-medium-v3.2.jinja", chat(), ["all\nLima.<|eot_id|>", "all\nSantiago.<|eot_id|>"]),
    (
        "meetkai-functionary-medium-v3.2.jinja",
        chat(first=THINK_1, second=THINK_2),
        [
            "all\n<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|eot_id|>",
            "all\n<think>\nNext door.\n</think>\n\nSantiago.<|eot_id|>",
        ],
    ),
    (
        "meetkai-functionary-medium-v3.2.jinja",
        tool_chat(arguments_as_json=True),
        ['get_weather\n{"city": "Lima"}<|eot_id|>', "all\nIt is 22 C and sunny in Lima.<|eot_id|>"],
    ),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", chat(), ["Lima.<|end_of_text|>", "Santiago.<|end_of_text|>"]),
    (
        "ibm-granite-granite-3.3-2B-Instruct.jinja",
        chat(first=THINK_1, second=THINK_2),
        [
            "<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|end_of_text|>",
            "<think>\nNext door.\n</think>\n\nSantiago.<|end_of_text|>",
        ],
    ),
    ("llama-cpp-rwkv-world.jinja", chat(), [" Lima.\n\n", " Santiago.\n\n"]),
    ("llama-cpp-rwkv-world.jinja", chat(first=THINK_1, second=THINK_2), [" Lima.\n\n", " Santiago.\n\n"]),
    ("moonshotai-Kimi-K2.jinja", chat(), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    (
        "moonshotai-Kimi-K2.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|im_end|>", "<think>\nNext door.\n</think>\n\nSantiago.<|im_end|>"],
    ),
    (
        "moonshotai-Kimi-K2.jinja",
        tool_chat(),
        [
            '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"'
            'city": "Lima"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>',
            "It is 22 C and sunny in Lima.<|im_end|>",
        ],
    ),
    (
        "openai-gpt-oss-120b.jinja",
        chat(),
        ["<|channel|>final<|message|>Lima.<|end|>", "<|channel|>final<|message|>Santiago.<|return|>"],
    ),
    (
        "openai-gpt-oss-120b.jinja",
        chat(first=THINK_1, second=THINK_2),
        [
            "<|channel|>final<|message|><think>\nPeru is on the Pacific.\n</think>\n\nLima.<|end|>",
            "<|channel|>final<|message|><think>\nNext door.\n</think>\n\nSantiago.<|return|>",
        ],
    ),
    (
        "openai-gpt-oss-120b.jinja",
        tool_chat(),
        [
            ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Lima"}<|call|>',
            "<|channel|>final<|message|>It is 22 C and sunny in Lima.<|return|>",
        ],
    ),
    ("GLM-4.6.jinja", chat(), ["\n<think></think>\nLima.<|user|>", "\n<think></think>\nSantiago."]),
    (
        "GLM-4.6.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["\n<think></think>\nLima.<|user|>", "\n<think>Next door.</think>\nSantiago."],
    ),
    (
        "GLM-4.6.jinja",
        tool_chat(),
        [
            "\n<think></think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Lima</arg_value>\n"
            "</tool_call><|observation|>",
            "\n<think></think>\nIt is 22 C and sunny in Lima.",
        ],
    ),
    ("HuggingFaceTB-SmolLM3-3B.jinja", chat(), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    (
        "HuggingFaceTB-SmolLM3-3B.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|im_end|>", "<think>\nNext door.\n</think>\n\nSantiago.<|im_end|>"],
    ),
    ("Qwen3-Coder.jinja", chat(), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    (
        "Qwen3-Coder.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|im_end|>", "<think>\nNext door.\n</think>\n\nSantiago.<|im_end|>"],
    ),
    (
        "Qwen3-Coder.jinja",
        tool_chat(),
        [
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n</function>\n</tool_call><|im_end|>",
            "It is 22 C and sunny in Lima.<|im_end|>",
        ],
    ),
    ("Apertus-8B-Instruct.jinja", chat(), ["Lima.<|assistant_end|>", "Santiago."]),
    (
        "Apertus-8B-Instruct.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<|assistant_end|>", "<think>\nNext door.\n</think>\n\nSantiago."],
    ),
    (
        "Apertus-8B-Instruct.jinja",
        tool_chat(),
        ['<|tools_prefix|>[{"get_weather": {"city": "Lima"}}]<|tools_suffix|>', "It is 22 C and sunny in Lima."],
    ),
    ("google-gemma-4-31B-it.jinja", chat(), ["Lima.<turn|>", "Santiago.<turn|>"]),
    (
        "google-gemma-4-31B-it.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.<turn|>", "<think>\nNext door.\n</think>\n\nSantiago.<turn|>"],
    ),
    (
        "google-gemma-4-31B-it.jinja",
        tool_chat(),
        ['<|tool_call>call:get_weather{city:<|"|>Lima<|"|>}<tool_call|>', "It is 22 C and sunny in Lima.<turn|>"],
    ),
    ("mistralai-Ministral-3-14B-Reasoning-2512.jinja", chat(), ["Lima.</s>", "Santiago.</s>"]),
    (
        "mistralai-Ministral-3-14B-Reasoning-2512.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\n\nLima.</s>", "<think>\nNext door.\n</think>\n\nSantiago.</s>"],
    ),
    (
        "mistralai-Ministral-3-14B-Reasoning-2512.jinja",
        tool_chat(),
        ['[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}</s>', "It is 22 C and sunny in Lima.</s>"],
    ),
    ("Bielik-11B-v3.0-Instruct.jinja", chat(), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    (
        "Bielik-11B-v3.0-Instruct.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["<think>\nPeru is on the Pacific.\n</think>\nLima.<|im_end|>", "<think>\nNext door.\n</think>\nSantiago.<|im_end|>"],
    ),
    (
        "Bielik-11B-v3.0-Instruct.jinja",
        tool_chat(),
        [
            '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call><|im_end|>',
            "It is 22 C and sunny in Lima.<|im_end|>",
        ],
    ),
    ("LFM2.5-Instruct.jinja", chat(), ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    (
        "LFM2.5-Instruct.jinja",
        chat(first=THINK_1, second=THINK_2),
        ["Lima.<|im_end|>", "<think>\nNext door.\n</think>\n\nSantiago.<|im_end|>"],
    ),
]

def assert_trains_exactly(template: str, conversation: Conversation, expected: list[str]) -> None:
    tokenizer = template_tokenizer(template)
    result = masked(conversation, tokenizer)
    assert not isinstance(result, Skip), result
    input_ids, labels = result
    assert trained_pieces(tokenizer, input_ids, labels) == expected
    render = tokenizer.apply_chat_template(conversation.messages, tools=conversation.tools, tokenize=False)
    assert input_ids == tokenizer(render, add_special_tokens=False)["input_ids"]
    trained = "".join(expected)
    for message in conversation.messages:
        if message["role"] != "assistant":
            assert message["content"] not in trained  # no system prompt, user turn or tool result


@pytest.mark.parametrize(("template", "conversation", "expected"), MORE_CASES,
                         ids=[f"{name.split('.jinja')[0]}-{index}" for index, (name, _, _) in enumerate(MORE_CASES)])
def test_trained_tokens_are_the_assistant_turns_on_more_real_templates(template, conversation, expected):
    assert_trains_exactly(template, conversation, expected)


@pytest.mark.parametrize(("template", "conversation", "message"), [
    # A tool-use-only template (Command R+'s tool_use) cannot render a record without tools: say so, per record.
    ("CohereForAI-c4ai-command-r-plus-tool_use.jinja", chat(), "renders only conversations with tools (a tool-use template)"),
    # Templates that drop an assistant turn's tool_calls: training that turn would teach an empty answer.
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", tool_chat(), "assistant turn 2: the chat template does not write (all of) its"),
    ("HuggingFaceTB-SmolLM3-3B.jinja", tool_chat(), "assistant turn 2: the chat template does not write (all of) its"),
    ("LFM2.5-Instruct.jinja", tool_chat(), "assistant turn 2: the chat template does not write (all of) its"),
    ("llama-cpp-rwkv-world.jinja", tool_chat(), "assistant turn 2: the chat template does not write (all of) its"),
    # DeepSeek R1's template writes tool calls only for content None, which transformers drops before rendering.
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", tool_chat(arguments_as_json=True), "does not write (all of) its"),
    # Tool-call arguments in the form the template does not take: the template's error and what to change.
    ("deepseek-ai-DeepSeek-V3.1.jinja", tool_chat(), "may want them as a JSON string, OpenAI style"),
    ("Qwen3-Coder.jinja", tool_chat(arguments_as_json=True), "may want them as an object"),
])
def test_conversations_a_template_cannot_render_honestly_are_skipped_with_the_reason(template, conversation, message):
    result = masked(conversation, template_tokenizer(template))
    assert isinstance(result, Skip) and message in result.reason


def test_template_that_needs_its_own_variables_is_refused_clearly():
    with pytest.raises(DataError, match="cannot render a plain user/assistant exchange: 'functions' is undefined"):
        masked(chat(), template_tokenizer("fireworks-ai-llama-3-firefunction-v2.jinja"))


def test_gpt_oss_turn_markers_and_train_on_eos_all():
    tokenizer = template_tokenizer("openai-gpt-oss-120b.jinja")
    marks = template_marks(tokenizer)
    assert marks.turn_ends == ("<|return|>", "<|end|>") and marks.call_ends == ("<|call|>",)
    pieces = trained_pieces(tokenizer, *masked(chat(), tokenizer, train_on_eos="all"))
    # every <|end|>: the system, developer and two user turns', the first answer's; and the last <|return|>
    assert pieces.count("<|end|>") == 4 and pieces[3] == "<|channel|>final<|message|>Lima.<|end|>"
    assert pieces[-1] == "<|channel|>final<|message|>Santiago.<|return|>"
    assert trained_pieces(tokenizer, *masked(chat(), tokenizer, train_on_eos="none"))[0] == "<|channel|>final<|message|>Lima."


def test_command_r_tool_results_are_not_trained_after_a_call_without_marker():
    tokenizer = template_tokenizer("CohereForAI-c4ai-command-r-plus-tool_use.jinja")
    call, answer = trained_pieces(tokenizer, *masked(tool_chat(), tokenizer))
    assert call.startswith("\nAction:") and '"tool_name": "get_weather"' in call and call.endswith("```\n")
    assert TOOL_RESULT not in call and "<|SYSTEM_TOKEN|>" not in call
    # with tool results trained on purpose, they are their own piece
    pieces = trained_pieces(tokenizer, *masked(tool_chat(), tokenizer, roles_to_train=["assistant", "tool"]))
    assert any(TOOL_RESULT in piece for piece in pieces) and pieces[0] == call


def two_calls_chat(*, content: str = "") -> Conversation:
    calls = [CALL, CALL | {"id": "call00043", "function": {"name": "get_weather", "arguments": {"city": "Quito"}}}]
    return Conversation([
        {"role": "user", "content": "Weather in Lima and Quito?"},
        {"role": "assistant", "content": content, "tool_calls": calls if not content else calls[:1]},
        {"role": "tool", "content": TOOL_RESULT, "tool_call_id": "call00042", "name": "get_weather"},
        *([] if content else [{"role": "tool", "content": "cold", "tool_call_id": "call00043", "name": "get_weather"}]),
        {"role": "assistant", "content": "Lima is warmer."},
    ], TOOLS)


def test_parallel_tool_calls_are_all_trained_or_the_turn_is_skipped():
    gemma = template_tokenizer("google-gemma-4-31B-it.jinja")  # each call closes with <tool_call|>: up to the last
    assert trained_pieces(gemma, *masked(two_calls_chat(), gemma)) == [
        '<|tool_call>call:get_weather{city:<|"|>Lima<|"|>}<tool_call|><|tool_call>call:get_weather{city:<|"|>Quito<|"|>}<tool_call|>',
        "Lima is warmer.<turn|>"]
    gpt_oss = masked(two_calls_chat(), template_tokenizer("openai-gpt-oss-120b.jinja"))  # writes the first call only
    assert isinstance(gpt_oss, Skip) and "does not write (all of) its tool_calls" in gpt_oss.reason


def test_gemma4_content_after_the_tool_results_is_trained_without_them():
    tokenizer = template_tokenizer("google-gemma-4-31B-it.jinja")
    # Gemma 4 writes call, results, then the calling turn's own content, in one model turn
    assert trained_pieces(tokenizer, *masked(two_calls_chat(content="Let me check."), tokenizer)) == [
        '<|tool_call>call:get_weather{city:<|"|>Lima<|"|>}<tool_call|>', "Let me check.<turn|>", "Lima is warmer.<turn|>"]


def test_qwen3_reasoning_content_field_is_rendered_and_trained():
    tokenizer = template_tokenizer(QWEN3)
    conversation = Conversation([{"role": "user", "content": USER_1},
                                 {"role": "assistant", "content": "Lima.", "reasoning_content": "It is on the coast."}])
    input_ids, labels = masked(conversation, tokenizer)
    assert trained_pieces(tokenizer, input_ids, labels) == ["<think>\nIt is on the coast.\n</think>\n\nLima.<|im_end|>"]


def test_template_that_refuses_the_conversation_is_a_skip():
    result = masked(chat(system=True), template_tokenizer(GEMMA))
    assert isinstance(result, Skip) and "System role not supported" in result.reason


def test_content_the_template_does_not_render_is_a_skip():
    tokenizer = template_tokenizer(QWEN3)
    shouting = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    shouting.chat_template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content | upper }}</s>\n{% endfor %}"
    assert masked(chat(), tokenizer) != masked(chat(), shouting)
    result = masked(chat(), shouting)
    assert isinstance(result, Skip) and "assistant turn 2" in result.reason


@pytest.mark.parametrize(("train_on_eos", "expected"), [
    ("turn", ["Lima.<|im_end|>", "Santiago.<|im_end|>"]),
    ("last", ["Lima.", "Santiago.<|im_end|>"]),
    ("none", ["Lima.", "Santiago."]),
    # all: every turn's marker, the system's and users' too
    ("all", ["<|im_end|>", "<|im_end|>", "Lima.<|im_end|>", "<|im_end|>", "Santiago.<|im_end|>"]),
])
def test_train_on_eos(train_on_eos, expected):
    tokenizer = template_tokenizer(QWQ)
    assert trained_pieces(tokenizer, *masked(chat(), tokenizer, train_on_eos=train_on_eos)) == expected


def test_roles_to_train_can_include_tool_results():
    tokenizer = template_tokenizer(QWEN3)
    pieces = trained_pieces(tokenizer, *masked(tool_chat(), tokenizer, roles_to_train=["assistant", "tool"]))
    assert pieces[1] == TOOL_RESULT  # Qwen3 wraps tool results in a user turn: no marker right after the result
    assert TOOL_RESULT not in "".join(trained_pieces(tokenizer, *masked(tool_chat(), tokenizer)))


def test_train_on_inputs_trains_every_token_and_truncation_cuts_both():
    tokenizer = template_tokenizer(LLAMA31)
    input_ids, labels = masked(chat(), tokenizer, train_on_inputs=True)
    assert labels == input_ids
    short_ids, short_labels = masked(chat(), tokenizer, sequence_len=20)
    assert short_ids == input_ids[:20] and len(short_labels) == 20


def test_template_marks_found_by_probing():
    marks = template_marks(template_tokenizer(PHI))  # generation prompt vs eos at the end: must not cut <|assistant|>
    assert marks.headers[0] == "<|assistant|>\n" and marks.end_of_turn == "<|end|>"
    assert template_marks(template_tokenizer(MISTRAL)).headers == ("[/INST]",)
    assert template_marks(template_tokenizer(QWQ)).headers == ("<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n")


def test_many_conversations_in_one_call_keep_their_order():
    tokenizer = template_tokenizer(QWEN3)
    conversations = [chat(), chat(system=True, second="Valparaiso? No: Santiago."), tool_chat()]
    batched = tokenize_conversations(conversations, tokenizer, roles_to_train=["assistant"], train_on_eos="turn",
                                     train_on_inputs=False, sequence_len=4096)
    assert batched == [masked(conversation, tokenizer) for conversation in conversations]


# ---------------------------------------------------------------- records


def spec(**options) -> DatasetSpec:
    return DatasetSpec(path="data.jsonl", type="chat_template", **options)


def test_sharegpt_and_openai_records_give_the_same_conversation():
    openai = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    assert conversation_from_record(openai, spec()) == conversation_from_record(sharegpt, spec())


def test_axolotl_field_messages_mappings_and_roles():
    record = {"dialog": [{"speaker": "instructions", "text": "Be brief."}, {"speaker": "customer", "text": "Hi"},
                         {"speaker": "agent", "text": "Hello.", "thought": "greet back"}]}
    options = {"field_messages": "dialog", "roles": {"system": ["instructions"], "user": ["customer"], "assistant": ["agent"]},
               "message_property_mappings": {"role": "speaker", "content": "text", "reasoning_content": "thought"}}
    conversation = conversation_from_record(record, spec(**options))
    assert conversation.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"}]


def test_drop_system_message_leaves_the_records_system_turns_out():
    # Axolotl's drop_system_message, with its roles mapping: the system turn is recognized after the mapping.
    record = {"conversations": [{"from": "instructions", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello."}]}
    roles = {"system": ["instructions"], "user": ["human"], "assistant": ["gpt"]}
    kept = conversation_from_record(record, spec(roles=roles))
    dropped = conversation_from_record(record, spec(roles=roles, drop_system_message=True))
    assert kept.messages[0] == {"role": "system", "content": "Be brief."}
    assert dropped.messages == kept.messages[1:]
    tokenizer = template_tokenizer("Qwen-Qwen3-0.6B.jinja")
    ids, labels = masked(dropped, tokenizer)
    assert "Be brief." not in tokenizer.decode(ids) and "Be brief." in tokenizer.decode(masked(kept, tokenizer)[0])
    assert trained_pieces(tokenizer, ids, labels) == trained_pieces(tokenizer, *masked(kept, tokenizer))


def test_tools_and_tool_calls_pass_through():
    record = {"tools": json.dumps(TOOLS), "messages": [
        {"role": "user", "content": "Weather in Lima?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": TOOL_RESULT, "tool_call_id": "call00042"},
        {"role": "assistant", "content": "Sunny."}]}
    conversation = conversation_from_record(record, spec())
    assert conversation.tools == TOOLS
    assert conversation.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert conversation.messages[2]["tool_call_id"] == "call00042"


@pytest.mark.parametrize(("record", "options", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, {}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, {}, "allowed: system, user, assistant"),
    ({"messages": [{"role": "user"}]}, {}, "messages[0] needs string 'role' and 'content'"),
    ({"conversations": [{"from": "gpt"}]}, {}, "conversations[0] needs string 'from' and 'value'"),
    ({"turns": []}, {}, "needs 'messages'"),
    ({"messages": []}, {}, "messages must be a non-empty list"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, {"field_messages": "dialog"}, "no 'dialog'"),
    ({"messages": [{"role": "assistant", "content": "x"}], "tools": "{oops"}, {}, "'tools' is a string but not JSON"),
    ({"messages": [{"role": "user", "content": "x"}]}, {"roles_to_train": ["assistant", "tool"]}, "no assistant or tool turn"),
])
def test_record_faults_are_described(record, options, message):
    problem = conversation_from_record(record, spec(**options))
    assert isinstance(problem, str) and message in problem


def test_too_many_skips_stop_with_the_first_reasons():
    assert check_skipped(0, 50, []) is None
    assert "skipped 1 of 50" in check_skipped(1, 50, ["assistant turn 2: ..."], "data.jsonl")
    with pytest.raises(DataError, match="data.jsonl: 6 of 50 .*wrong template.*System role not supported"):
        check_skipped(6, 50, ["the chat template refused it: System role not supported"], "data.jsonl")


# ---------------------------------------------------------------- built-in templates, recipe keys, tokenizer and model


BUILTIN_CASES = {
    "chatml": ({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}, "<|im_end|>"),
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]}, "<|eot_id|>"),
    "qwen3": ({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]}, "<|im_end|>"),
    "mistral": ({"additional_special_tokens": ["[INST]", "[/INST]"]}, "</s>"),
    "gemma": ({"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
              "<end_of_turn>"),
}


@pytest.mark.parametrize("name", list(BUILTIN_CASES))
def test_builtin_templates_render_and_mask(name):
    from ftclip.chat_templates import BUILTIN_TEMPLATES, builtin_template

    assert name in BUILTIN_TEMPLATES
    special, marker = BUILTIN_CASES[name]
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART_MODEL)
    tokenizer.add_special_tokens(special)
    tokenizer.chat_template = builtin_template(name)
    input_ids, labels = masked(chat(), tokenizer)  # with a system turn: every built-in accepts one
    last = "<think>\n\n</think>\n\nSantiago." if name == "qwen3" else "Santiago."
    # mistral writes "[/INST] Lima.": the space and the first word are one token here, and that token is trained
    space = " " if name == "mistral" else ""
    assert trained_pieces(tokenizer, input_ids, labels) == [space + "Lima." + marker, space + last + marker]
    assert SYSTEM in tokenizer.decode(input_ids)


def recipe_with(**keys):
    from ftclip.recipe import parse_recipe

    document = {"base_model": "org/model", "datasets": [{"path": "chat.jsonl", "type": "chat_template"}], **keys}
    return parse_recipe(json.dumps(document), "recipe.yaml")


@pytest.mark.parametrize(("keys", "message"), [
    ({"chat_template": "chatm"}, "recipe.yaml:1: chat_template: unknown chat template 'chatm'; allowed: tokenizer_default, "
                                 "jinja, chatml, llama3, qwen3, mistral, gemma"),
    ({"chat_template": "jinja"}, "chat_template: jinja needs the template text in chat_template_jinja"),
    ({"chat_template": "chatml", "chat_template_jinja": "{{ x }}"}, "chat_template_jinja: given, but chat_template is chatml"),
])
def test_chat_template_keys_are_checked(keys, message):
    from ftclip.errors import RecipeError

    with pytest.raises(RecipeError) as error:
        recipe_with(**keys)
    assert message in str(error.value)


@pytest.mark.slow
def test_added_tokens_resize_the_model_train_with_lora_and_are_saved(tiny_model_dir, tmp_path):
    import torch

    from ftclip.chat_templates import builtin_template
    from ftclip.checkpoint import save_artifact
    from ftclip.modeling import load_model, load_tokenizer

    recipe = recipe_with(base_model=str(tiny_model_dir), adapter="lora", chat_template="chatml",
                         tokens=["<|im_start|>"], special_tokens={"eos_token": "<|im_end|>"})
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.chat_template == builtin_template("chatml")
    assert len(tokenizer) == 1026 and tokenizer.ftclip_added_tokens == ["<|im_end|>", "<|im_start|>"]
    assert len(tokenizer("<|im_start|>user")["input_ids"]) == len(tokenizer("user")["input_ids"]) + 1
    notes = []
    model = load_model(recipe, torch.device("cpu"), tokenizer, notes.append)
    assert model.get_input_embeddings().num_embeddings == 1026
    assert notes and "lora_modules_to_save is set to ['embed_tokens', 'lm_head']" in notes[0]
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert any("lm_head.modules_to_save" in name for name in trainable)

    saved = save_artifact(model, tokenizer, recipe, tmp_path / "adapter")
    reloaded = AutoTokenizer.from_pretrained(saved)
    assert reloaded.chat_template == builtin_template("chatml") and reloaded.eos_token == "<|im_end|>"
    assert reloaded.convert_tokens_to_ids("<|im_start|>") == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert set(json.loads((saved / "adapter_config.json").read_text())["modules_to_save"]) >= {"embed_tokens", "lm_head"}


def test_added_tokens_with_frozen_embeddings_are_refused(tiny_model_dir):
    import torch

    from ftclip.errors import ModelError
    from ftclip.modeling import load_model, load_tokenizer

    recipe = recipe_with(base_model=str(tiny_model_dir), adapter="lora", tokens=["<tool>"], lora_modules_to_save=["lm_head"])
    tokenizer = load_tokenizer(recipe)
    with pytest.raises(ModelError, match=r"leaves \['embed_tokens'\] frozen"):
        load_model(recipe, torch.device("cpu"), tokenizer)


def test_no_added_tokens_no_resize_and_no_modules_to_save(tiny_model_dir):
    import torch

    from ftclip.modeling import load_model, load_tokenizer

    recipe = recipe_with(base_model=str(tiny_model_dir), adapter="lora", special_tokens={"pad_token": "<pad>"})
    tokenizer = load_tokenizer(recipe)
    assert tokenizer.ftclip_added_tokens == [] and tokenizer.chat_template  # the tokenizer's own template kept
    model = load_model(recipe, torch.device("cpu"), tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 1024
    assert model.peft_config["default"].modules_to_save is None


# ---------------------------------------------------------------- preprocess --show


def test_show_examples_json_lines_and_colours():
    from rich.console import Console

    from ftclip.show import show_examples

    tokenizer = template_tokenizer(QWQ)
    input_ids, labels = masked(chat(), tokenizer)
    console = Console(record=True, width=60, color_system="truecolor", force_terminal=True)
    show_examples(console, tokenizer, [(input_ids, labels)] * 2, as_json=True)
    lines = console.export_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"input_ids": input_ids, "labels": labels}] * 2

    console = Console(record=True, width=60, color_system="truecolor", force_terminal=True)
    show_examples(console, tokenizer, [(input_ids, labels)])
    text = console.export_text(clear=False)
    assert f"example 1: {len(input_ids)} tokens, {sum(label != IGNORE_INDEX for label in labels)} trained" in text
    assert "Capital of Peru?<|im_end|>↵" in text
    styled = console.export_html(inline_styles=True)
    assert "Santiago" in styled and "font-weight: bold" in styled

    console = Console(record=True, width=60, color_system=None)  # piped: the trained runs are bracketed
    show_examples(console, tokenizer, [(input_ids, labels)])
    assert "<|im_start|>assistant↵\n⟦Lima.<|im_end|>⟧↵" in console.export_text()


@pytest.mark.slow
def test_training_with_added_tokens_learns_their_embeddings_and_saves_them(make_recipe, tmp_path, tiny_model_dir):
    """A real run: chatml template, its markers added as tokens; the new rows train and the adapter reloads
    on the base resized to the saved tokenizer."""
    import torch
    from peft import PeftModel
    from rich.console import Console
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ftclip.recipe import load_recipe
    from ftclip.train import train

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {n}."},
                                                     {"role": "assistant", "content": ", ".join(map(str, range(1, n + 1)))}]})
                            + "\n" for n in range(2, 10)))
    path = make_recipe(datasets=[{"path": str(data), "type": "chat_template"}], chat_template="chatml",
                       tokens=["<|im_start|>", "<|im_end|>"], special_tokens={"eos_token": "<|im_end|>"},
                       max_steps=4, micro_batch_size=8, learning_rate=1e-2)
    console = Console(record=True, width=200)
    result = train(load_recipe(path), console)
    assert "lora_modules_to_save is set to ['embed_tokens', 'lm_head']" in console.export_text()
    tokenizer = AutoTokenizer.from_pretrained(result.artifact)
    new_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert new_id >= 1024 and "<|im_start|>" in tokenizer.chat_template  # a new id, past the old vocabulary

    weights = load_file(result.artifact / "adapter_model.safetensors")
    embedding = next(value for name, value in weights.items() if "embed_tokens" in name)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mean_row = base.get_input_embeddings().weight.mean(dim=0)
    assert embedding.shape[0] == 1026
    assert not torch.allclose(embedding[new_id], mean_row, atol=1e-4)  # trained away from its mean start
    base.resize_token_embeddings(len(tokenizer))
    tuned = PeftModel.from_pretrained(base, result.artifact)
    assert torch.equal(tuned.get_input_embeddings().weight[new_id], embedding[new_id])
