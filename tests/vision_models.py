"""Tiny vision-language models built from a config with their real processor classes, saved to a folder so that
tests load them through the same from_pretrained / AutoProcessor path users hit. Nothing is downloaded: the
tokenizer is the quickstart's byte-level BPE plus the special tokens each architecture needs, the image
processors are the PIL ones (no torchvision here) with small sizes, and the towers have one or two layers.

`build(architecture, folder)` writes config.json, the weights, the tokenizer and the processor files."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART_TOKENIZER = REPO / "recipes" / "quickstart" / "tiny-llama" / "tokenizer.json"
TEMPLATES = REPO / "ftclip" / "chat_templates"

# The architectures the tests cover, each with the chat template its family uses.
ARCHITECTURES = ("qwen2_vl", "llava", "gemma3", "mllama", "smolvlm", "mistral3")
TEMPLATE = {"qwen2_vl": "qwen2_vl", "llava": "llava", "gemma3": "gemma3", "mllama": "llama3_2_vision",
            "smolvlm": None, "mistral3": "mistral_v7_tekken"}

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)


def _tokenizer(special: list[str], eos: str, bos: str = "<s>", extra: dict | None = None, pad: str = "<pad>"):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(QUICKSTART_TOKENIZER), bos_token=bos, eos_token=eos,
                                        pad_token=pad, unk_token="<unk>", extra_special_tokens=extra or {})
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special if t not in tokenizer.get_vocab()]})
    return tokenizer


def _template(architecture: str) -> str | None:
    name = TEMPLATE[architecture]
    return (TEMPLATES / f"{name}.jinja").read_text() if name else None


def _save_processor(processor, folder: Path) -> None:
    from ftclip.vlm import save_processor

    save_processor(processor, folder)


def _images_only(processor_class):
    from ftclip.vlm import images_only_processor_class

    return images_only_processor_class(processor_class)


def _qwen2_vl(folder: Path):
    import torch  # noqa: F401
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                            "<|video_pad|>"], eos="<|im_end|>")
    # 8-pixel patches merged 2×2: an image of h×w pixels (rounded to 16) gives h·w/256 placeholder tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                               temporal_patch_size=2)
    processor = _images_only(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=_template("qwen2_vl"))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(TEXT, vocab_size=len(tokenizer), rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                           "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _llava(folder: Path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tokenizer(["<image>"], eos="</s>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_template("llava"))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(**TEXT, vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config), processor


def _gemma3(folder: Path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = _tokenizer(["<start_of_turn>", "<end_of_turn>", *extra.values()], eos="<end_of_turn>", bos="<s>",
                           extra=extra)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=_template("gemma3"))
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=dict(TEXT, vocab_size=len(tokenizer), head_dim=16, sliding_window=64),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return Gemma3ForConditionalGeneration(config), processor


BUILDERS = {"qwen2_vl": _qwen2_vl, "llava": _llava, "gemma3": _gemma3}


def build(architecture: str, folder: Path, seed: int = 0) -> Path:
    """A tiny `architecture` model with its processor, saved in `folder`."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, processor = BUILDERS[architecture](folder)
    model.save_pretrained(folder)
    _save_processor(processor, folder)
    (folder / "ftclip_test_model.json").write_text(json.dumps({"architecture": architecture}))
    return folder
