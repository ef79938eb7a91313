"""Rebuild recipes/vision.yaml's tiny vision-language model, its pictures and its data (deterministic; run from
the repo root):

    python recipes/vision/build.py

The model is a Qwen2-VL (one vision block, a 2-layer language model, ~0.2 M parameters) with the quickstart's
byte-level tokenizer plus Qwen2-VL's special tokens, and Qwen2-VL's own processor classes (the PIL image
processor). Initialized randomly, it is then "pretrained" by ftclip itself (a full fine-tune) on pictures named
in bare words ("Describe the picture." → "red circle"), so it is a base model that tells colours and shapes
apart but not the answer format. recipes/vision.yaml's LoRA then teaches the format ("What is in the picture?"
→ "A red circle.") on 24 other pictures of the same kinds. The pictures are drawn with PIL: a coloured circle,
square or triangle on white, in several sizes and places.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent.parent
COLORS = {"red": (215, 30, 35), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((32, 32), (48, 32), (32, 48))


def draw(path: Path, color: str, shape: str, rng: random.Random) -> None:
    from PIL import Image, ImageDraw

    width, height = rng.choice(SIZES)
    side = rng.randint(min(width, height) // 2, min(width, height) - 4)
    left, top = rng.randint(0, width - side), rng.randint(0, height - side)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    box = (left, top, left + side, top + side)
    if shape == "circle":
        pen.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        pen.rectangle(box, fill=COLORS[color])
    else:
        pen.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def pictures(folder: Path, copies: int, seed: int) -> list[tuple[str, str, str]]:
    """(file name, colour, shape) for `copies` pictures of each kind, drawn into folder."""
    rng = random.Random(seed)
    made = []
    for color in COLORS:
        for shape in SHAPES:
            for copy in range(copies):
                name = f"{color}-{shape}-{copy}.png"
                draw(folder / name, color, shape, rng)
                made.append((name, color, shape))
    return made


def chat(image: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def build_model(folder: Path) -> None:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ftclip.vlm import images_only_processor_class, save_processor

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(REPO / "recipes/quickstart/tiny-llama/tokenizer.json"),
                                        bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    # 8-pixel patches merged 2×2: a 32×48 picture is 2×3 = 6 placeholder tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=64 * 64, patch_size=8, merge_size=2,
                                               temporal_patch_size=2)
    processor_class = Qwen2VLProcessor
    try:
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=(REPO / "ftclip/chat_templates/qwen2_vl.jinja").read_text())
    except (ImportError, ValueError, AttributeError):  # no torchvision: the processor without its video part
        processor = images_only_processor_class(processor_class)(
            image_processor=image_processor, tokenizer=tokenizer,
            chat_template=(REPO / "ftclip/chat_templates/qwen2_vl.jinja").read_text())
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    save_processor(processor, folder)


def pretrain(random_base: Path, corpus: Path, workdir: Path) -> Path:
    """Full fine-tune of the random model on pictures named in bare words, with ftclip's own loop."""
    from rich.console import Console

    from ftclip.recipe import Recipe
    from ftclip.train import train

    recipe = Recipe(
        base_model=str(random_base), processor_type="AutoProcessor", datasets=[{"path": str(corpus), "type": "chat"}],
        sequence_len=96, micro_batch_size=8, num_epochs=40, learning_rate=3e-3, lr_scheduler="cosine",
        warmup_steps=20, output_dir=str(workdir), logging_steps=50, seed=0, dataset_cache_dir=str(workdir / "cache"),
    )
    return train(recipe, Console(quiet=True)).artifact


def main() -> None:
    folder = HERE / "tiny-qwen2-vl"
    shutil.rmtree(HERE / "pictures", ignore_errors=True)
    shown = pictures(HERE / "pictures", copies=2, seed=0)  # the fine-tuning set: 24 pictures
    with open(HERE / "data.jsonl", "w") as handle:
        for name, color, shape in shown:
            handle.write(json.dumps(chat(f"pictures/{name}", "What is in the picture?", f"A {color} {shape}.")) + "\n")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        seen = pictures(scratch / "pretraining", copies=8, seed=1)  # other pictures of the same kinds
        corpus = scratch / "pretraining.jsonl"
        corpus.write_text("".join(json.dumps(chat(f"pretraining/{name}", "Describe the picture.", f"{color} {shape}"))
                                  + "\n" for name, color, shape in seen))
        build_model(scratch / "random")
        pretrained = pretrain(scratch / "random", corpus, scratch / "pretrain")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pretrained, folder, ignore=shutil.ignore_patterns("ftclip_recipe.yaml", "README.md"))
    size = sum(path.stat().st_size for path in HERE.rglob("*") if path.is_file())
    print(f"{len(shown)} fine-tuning pictures, {len(seen)} pretraining pictures; {size / 1e6:.2f} MB in {HERE}")


if __name__ == "__main__":
    main()
