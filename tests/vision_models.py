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
ARCHITECTURES = ("qwen2_vl", "llava", "gemma3", "mllama", "idefics3")
TEMPLATE = {"qwen2_vl": "qwen2_vl", "llava": "llava", "gemma3": "gemma3", "mllama": "llama3_2_vision"}

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)


def _tokenizer(special: list[str], eos: str, bos: str = "<s>", extra: dict | None = None, pad: str = "<pad>"):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(QUICKSTART_TOKENIZER), bos_token=bos, eos_token=eos,
                                        pad_token=pad, unk_token="<unk>", extra_special_tokens=extra or {})
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special if t not in tokenizer.get_vocab()]})
    return tokenizer


def _template(architecture: str) -> str | None:
    return (TEMPLATES / f"{TEMPLATE[architecture]}.jinja").read_text()


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


# SmolVLM's chat template as transformers 5.25 ships it (models/smolvlm/processing_smolvlm.py, DEFAULT_CHAT_TEMPLATE,
# Apache-2.0): the format SmolVLM (Idefics3) checkpoints use.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}"
    "{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] "
    "== 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _idefics3(folder: Path):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows = [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    tokenizer = _tokenizer(["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
                            *rows], eos="<end_of_utterance>")
    # 32-pixel tiles of 8-pixel patches, merged 2×2: 4 <image> tokens per tile; a larger image is split into a grid
    # of tiles plus a global view, each framed by <fake_token_around_image> and named <row_r_col_c>.
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=LlamaConfig(**TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(config), processor


def _mllama(folder: Path):
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tokenizer = _tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>",
                            "<|python_tag|>"], eos="<|eot_id|>", bos="<|begin_of_text|>")
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=_template("mllama"))
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, image_size=32, patch_size=8, max_num_tiles=2, vision_output_dim=64,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(TEXT, vocab_size=len(tokenizer), cross_attention_layers=[1], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    return MllamaForConditionalGeneration(config), processor


BUILDERS = {"qwen2_vl": _qwen2_vl, "llava": _llava, "gemma3": _gemma3, "idefics3": _idefics3, "mllama": _mllama}


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
