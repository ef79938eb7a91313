"""`ftclip chat`: try what a run trained. Loads the base model with the run's LoRA adapter (or a merged or
fully fine-tuned model), formats each turn as the run was trained (the tokenizer's chat template for chat
data, the alpaca prompt for alpaca data, plain text for completion data), streams the reply through
transformers' TextStreamer and keeps the conversation for the next turn."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftclip.checkpoint import RECIPE_FILE
from ftclip.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ChatSource:
    """What to load: a model folder, or a base model plus an adapter folder; and the recipe it trained with."""

    folder: Path  # the adapter or the model folder
    base_model: str | None  # set when `folder` is an adapter
    recipe: dict[str, Any]  # the saved recipe ({} when the folder has none)
    base_given: bool = False  # the base model was named by hand (--base-model), not read from the adapter


def find_chat_source(path: Path, base_model: str | None = None) -> ChatSource:
    """RUN_DIR (its adapter/, model/ or merged/) or a folder that is itself an adapter or a model."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such folder; give a run's output_dir or a model/adapter folder")
    for folder in (path / "adapter", path / "model", path / "merged", path):
        if (folder / ADAPTER_CONFIG).is_file():
            base = base_model or json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            if not base:
                raise ModelError(f"{folder / ADAPTER_CONFIG} does not name its base model; pass --base-model")
            if Path(base).is_absolute() and not (Path(base) / "config.json").is_file():
                raise ModelError(f"the adapter's base model {base} is gone (no config.json); pass --base-model")
            return ChatSource(folder, base, _saved_recipe(folder, path), base_given=base_model is not None)
        if (folder / "config.json").is_file():
            return ChatSource(folder, None, _saved_recipe(folder, path))
    raise ModelError(f"{path}: no adapter ({ADAPTER_CONFIG}) or model (config.json) here or in adapter/, model/ "
                     "or merged/")


def refuse_reward_model(source: ChatSource) -> None:
    """A reward model (reward_model: true, a sequence-classification head) scores text; it has nothing to say."""
    config_file = source.folder / "config.json"
    architectures = json.loads(config_file.read_text()).get("architectures") or [] if config_file.is_file() else []
    adapter = source.folder / ADAPTER_CONFIG
    task = json.loads(adapter.read_text()).get("task_type") if adapter.is_file() else None
    if source.recipe.get("reward_model") or task == "SEQ_CLS" or (
            architectures and all(name.endswith("ForSequenceClassification") for name in architectures)):
        raise ModelError(f"{source.folder} is a reward model (a sequence-classification head that gives each text one "
                         "score): it does not generate, so there is nothing to chat with. Score texts with "
                         "transformers' AutoModelForSequenceClassification (see docs/preference.md)")


def _saved_recipe(folder: Path, run_dir: Path) -> dict[str, Any]:
    from ftclip.merge import saved_recipe

    for candidate in (folder, run_dir / "adapter", run_dir / "model"):
        if (candidate / RECIPE_FILE).is_file():
            return saved_recipe(candidate)
    return {}


def prompt_format_of(recipe: dict[str, Any]) -> dict | None:
    """The run's prompt format (a dataset type given as a mapping), if it used one."""
    return next((dataset["type"] for dataset in recipe.get("datasets") or [] if isinstance(dataset.get("type"), dict)),
                None)


def prompt_style(recipe: dict[str, Any], tokenizer) -> str:
    """chat, prompt_format, alpaca or completion: how the run's data was formatted (chat wins in a mix, if the tokenizer has
    a template); a folder without a recipe is chatted with through its template when it has one."""
    kinds = {"prompt_format" if isinstance(dataset.get("type"), dict) else dataset.get("type")
             for dataset in recipe.get("datasets") or []}
    from ftclip.data.mistral_chat import is_mistral_common

    # mistral-common's tokenizer has no template text: its chat encoding is its own.
    has_template = bool(getattr(tokenizer, "chat_template", None)) or is_mistral_common(tokenizer)
    if kinds & {"chat", "chat_template"} and has_template:
        return "chat"
    if recipe.get("rl") and has_template:  # preference data: its messages were rendered by the template
        return "chat"
    if "prompt_format" in kinds:
        return "prompt_format"
    if "alpaca" in kinds:
        return "alpaca"
    if kinds:
        return "completion"
    return "chat" if has_template else "completion"


@dataclass
class Conversation:
    """The turns so far, rendered to token ids the way the run's data was: chat and completion prompts carry the
    earlier turns, alpaca prompts stand alone."""

    tokenizer: Any
    style: str
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)
    prompt_format: dict | None = None  # style prompt_format: the run's dataset type mapping
    processor: Any = None  # a vision-language run's processor
    image: Any = None  # the image the conversation is about (--image), in its first user turn

    def prompt_inputs(self, message: str) -> dict[str, Any]:
        """The model's inputs for the next reply: the token ids, and the image's tensors when there is one."""
        import torch

        if self.processor is None:
            return {"input_ids": torch.tensor([self.prompt_ids(message)])}
        def turn(role: str, text: str) -> dict:
            return {"role": role, "content": [{"type": "text", "text": text}]}

        messages = [m for user, reply in self.turns for m in (turn("user", user), turn("assistant", reply))]
        messages.append(turn("user", message))
        if self.image is not None:
            messages[0]["content"].insert(0, {"type": "image"})
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = {"images": [self.image]} if self.image is not None else {}
        inputs = self.processor(text=[text], **images, return_tensors="pt", add_special_tokens=False)
        return {name: value for name, value in inputs.items() if name != "attention_mask"}

    def prompt_ids(self, message: str) -> list[int]:
        from ftclip.data.mistral_chat import is_mistral_common

        tokenizer = self.tokenizer
        if self.style == "chat":
            messages = [m for user, reply in self.turns for m in ({"role": "user", "content": user},
                                                                  {"role": "assistant", "content": reply})]
            messages.append({"role": "user", "content": message})
            if is_mistral_common(tokenizer):  # ids straight from mistral-common's encoder (it renders no text)
                return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.style == "alpaca":
            from ftclip.data.records import ALPACA_NO_INPUT

            # Each turn alone: the alpaca format has no earlier turns, and a model trained on single exchanges
            # given earlier ones before the prompt repeats its previous answer (seen with the quickstart).
            return tokenizer(ALPACA_NO_INPUT.format(instruction=message), add_special_tokens=True)["input_ids"]
        if self.style == "prompt_format":
            from ftclip.recipe import PromptFormat

            prompt_format = PromptFormat.model_validate(self.prompt_format or {})
            # Each turn alone, as alpaca's: the message is the instruction, with no input.
            text = prompt_format.prompt({prompt_format.field_instruction: message})
            return tokenizer(text, add_special_tokens=True)["input_ids"]
        text = "".join(f"{user}{reply}" for user, reply in self.turns) + message  # completion: one running text
        return tokenizer(text, add_special_tokens=True)["input_ids"]


def load_for_chat(source: ChatSource, trust_remote_code: bool = False):
    """(model, tokenizer) on CUDA in the precision the run trained in, else on the CPU in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftclip.merge import base_model_options, merge_precision

    on_gpu = torch.cuda.is_available()
    dtype = getattr(torch, merge_precision(source.folder)[0]) if on_gpu else torch.float32
    model_source = source.base_model or source.folder
    tokenizer_source = source.folder if (source.folder / "tokenizer_config.json").is_file() else model_source
    auto_class = AutoModelForCausalLM
    try:
        if source.recipe.get("processor_type"):  # a vision-language run: the processor rides on its tokenizer
            from ftclip.vlm import load_processor_from, vision_auto_class

            processor = load_processor_from(tokenizer_source, source.recipe["processor_type"], trust_remote_code)
            tokenizer, auto_class = processor.tokenizer, vision_auto_class()
            tokenizer.ftclip_processor = processor
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
        # An adapter's base is loaded as training loaded it (revision, overrides_of_model_config); a merged or full
        # model folder saved its config with the overrides already set.
        options = base_model_options(source.base_model, source.folder, source.recipe, source.base_given,
                                     trust_remote_code) if source.base_model else {}
        model = auto_class.from_pretrained(model_source, dtype=dtype, trust_remote_code=trust_remote_code, **options)
        if source.base_model:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, source.folder)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {model_source}" + (f" with the adapter {source.folder}" if source.base_model else "")
                         + f": {error}") from None
    model.to("cuda" if on_gpu else "cpu").eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def _stop_ids(model, tokenizer) -> list[int]:
    """End of reply: the model's generation eos ids (e.g. Llama 3's <|eot_id|>) and the tokenizer's eos."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids + [tokenizer.eos_token_id] if i is not None})


def reply(model, tokenizer, conversation: Conversation, message: str, max_new_tokens: int, temperature: float,
          write: Callable[[str], None]) -> str:
    """Generate the answer to `message`, streaming its text to `write`; the conversation keeps the turn."""
    import torch
    from transformers import TextStreamer

    class _Echo(TextStreamer):  # TextStreamer prints; this hands each finished piece of text to `write`
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text)

    inputs = {name: value.to(model.device) for name, value in conversation.prompt_inputs(message).items()}
    ids = inputs["input_ids"]
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            eos_token_id=_stop_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
            streamer=_Echo(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling,
        )
    answer = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
    conversation.turns.append((message, answer))
    return answer


def chat_image(path: Path, recipe: dict[str, Any], processor):
    """--image: the picture, prepared as the run prepared its training images (image_size)."""
    if processor is None:
        raise ModelError(f"--image {path}: this run trained a text model (its recipe has no processor_type)")
    from ftclip.data.vision import ImageProblem, ImageSettings, open_image

    size = recipe.get("image_size")
    settings = ImageSettings(tuple(size) if isinstance(size, list) else size, recipe.get("image_resize_algorithm") or "bilinear")
    try:
        return open_image({"path": str(Path(path).resolve()), "bytes": None}, settings)
    except ImageProblem as problem:
        raise ModelError(f"--image: {problem}") from None
