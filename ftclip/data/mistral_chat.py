"""Chat records → token ids and labels with Mistral's own tokenizer (tokenizer_use_mistral_common: transformers'
MistralCommonBackend over mistral-common's MistralTokenizer).

mistral-common has no text template to render and locate turns in: it encodes a conversation message by message
into token ids (`encode_chat_completion`), and those ids are what the model sees. So the whole conversation is
encoded once by mistral-common, and each assistant message is encoded again on its own by the same instruct
tokenizer (`encode_assistant_message`, with the same position flag encode_instruct passes); the whole encoding
is the concatenation of its messages' encodings, so each assistant message's ids are found there in order, and
those positions are trained: the reply and its end-of-turn `</s>` (as train_on_eos says), never the
[INST]…[/INST] turns, the system prompt or the tool results.

mistral-common is imported here only (an optional extra, `pip install 'ftclip[mistral]'`)."""

from __future__ import annotations

from ftclip.data.chat import Conversation, Skip
from ftclip.data.records import IGNORE_INDEX
from ftclip.errors import DataError


def is_mistral_common(tokenizer) -> bool:
    """True for transformers' MistralCommonBackend (by name: importing it needs mistral-common)."""
    return type(tokenizer).__name__ == "MistralCommonBackend"


def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Plain texts (alpaca, completion) as mistral-common encodes them: <s> first with add_special_tokens, never
    an </s> at the end (the backend's add_special_tokens adds both; ftclip appends </s> where it trains one)."""
    raw = tokenizer.tokenizer.instruct_tokenizer.tokenizer
    return [raw.encode(text, bos=add_special_tokens, eos=False) for text in texts]


def _assistant_spans(tokenizer, conversation: Conversation) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's ids and the [start, end) of each assistant message's ids (its </s> included)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage
    from mistral_common.protocol.instruct.normalize import get_normalizer
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    mistral = tokenizer.tokenizer
    instruct = mistral.instruct_tokenizer
    request = ChatCompletionRequest.from_openai(messages=conversation.messages, tools=conversation.tools)
    ids = list(mistral.encode_chat_completion(request).tokens)  # validates, as the backend's mode says
    raw = instruct.tokenizer
    normalized = get_normalizer(raw.version, getattr(raw, "model_settings_builder", None)
                                ).from_chat_completion_request(request)
    _, last_user = instruct.find_first_last_user(normalized)
    spans, cursor = [], 0
    for index, message in enumerate(normalized.messages):
        if not isinstance(message, AssistantMessage):
            continue
        own = instruct.encode_assistant_message(message, index < last_user)
        start = _find(ids, own, cursor)
        if start is None:
            raise ValueError(f"assistant message {index} is not encoded in the conversation as it is on its own")
        spans.append((start, start + len(own)))
        cursor = start + len(own)
    return ids, spans


def _find(ids: list[int], part: list[int], start: int) -> int | None:
    for position in range(start, len(ids) - len(part) + 1):
        if ids[position:position + len(part)] == part:
            return position
    return None


def tokenize_conversations(conversations: list[Conversation], tokenizer, *, roles_to_train: list[str],
                           train_on_eos: str, train_on_inputs: bool, sequence_len: int
                           ) -> list[tuple[list[int], list[int]] | Skip]:
    """(input_ids, labels) per conversation, or a Skip saying why mistral-common would not encode it."""
    from mistral_common.exceptions import MistralCommonException
    from pydantic import ValidationError

    if sorted(set(roles_to_train)) != ["assistant"] and not train_on_inputs:
        raise DataError(f"roles_to_train {roles_to_train}: with tokenizer_use_mistral_common ftclip trains the "
                        "assistant turns mistral-common encodes (roles_to_train: [assistant])")
    eos = tokenizer.eos_token_id
    results: list[tuple[list[int], list[int]] | Skip] = []
    for conversation in conversations:
        try:
            ids, spans = _assistant_spans(tokenizer, conversation)
        except (MistralCommonException, ValidationError, ValueError, AssertionError) as error:
            results.append(Skip(f"mistral-common does not encode this conversation: {error}"))
            continue
        if train_on_inputs:
            labels = list(ids)
        else:
            labels = [IGNORE_INDEX] * len(ids)
            for number, (start, end) in enumerate(spans):
                keep_eos = train_on_eos in ("turn", "all") or (train_on_eos == "last" and number == len(spans) - 1)
                if not keep_eos and ids[end - 1] == eos:
                    end -= 1
                labels[start:end] = ids[start:end]
        results.append((ids[:sequence_len], labels[:sequence_len]))
    return results
