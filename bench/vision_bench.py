"""Vision input pipeline against the training step, on the same run: is the image loader the bottleneck?

    python bench/vision_bench.py [--images 256] [--size 448] [--workers 1 2 4] [--steps 20] [--micro-batch-size 4]

Draws N pictures of --size×--size pixels (PNG, under bench/.cache/vision), writes image chats for them, and uses
recipes/vision/tiny-qwen2-vl with its processor resized to take that size (max_pixels), so the pipeline does the
work a real run does per image: decode, resize, normalize, patchify. Then, in this process:
- loader: ftclip's batch stream (ImageRows.micro_batches: DataLoader workers open and process each row's images)
  drained with no model, for each --workers count: images/s;
- step: `ftclip train` on the same data and recipe for --steps optimizer steps (its loader running with the
  largest --workers count): optimizer steps/s from metrics.jsonl (the first step excluded: warm-up), times the
  images per step, gives the images/s the model consumes.
The loader keeps up when its images/s is above the step's. The tiny model makes the step far faster than a real
one, so the step figure here is an upper bound on what the loader must sustain.
Run it on a quiet machine; numbers under load measure the other jobs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = HERE / ".cache" / "vision"


def make_data(count: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder = CACHE / f"{count}-{size}"
    data = folder / "chats.jsonl"
    if data.is_file():
        return data
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        hue = (index * 37 % 255, index * 91 % 255, index * 53 % 255)
        ImageDraw.Draw(image).ellipse((size // 8, size // 8, size - size // 8, size - size // 4), fill=hue)
        image.save(folder / f"{index}.png")
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"{index}.png"},
                                         {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": "A coloured circle."}]}))
    data.write_text("\n".join(lines) + "\n")
    return data


def model_for(size: int, scratch: Path) -> Path:
    """The shipped tiny Qwen2-VL, with max_pixels raised so a --size picture is processed at full size."""
    folder = scratch / "model"
    shutil.copytree(REPO / "recipes" / "vision" / "tiny-qwen2-vl", folder)
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text())
    pixels = (size // 16 * 16) ** 2
    config["image_processor"].update(max_pixels=pixels, size={"shortest_edge": 256, "longest_edge": pixels})
    config_path.write_text(json.dumps(config, indent=2))
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        preprocessor.write_text(json.dumps(config["image_processor"], indent=2))
    return folder


def recipe_for(model: Path, data: Path, scratch: Path, args, workers: int) -> Path:
    import yaml

    recipe = {"base_model": str(model), "processor_type": "AutoProcessor", "adapter": "lora", "lora_r": 8,
              "lora_alpha": 16, "lora_dropout": 0.0, "datasets": [{"path": str(data), "type": "chat"}],
              "sequence_len": 4096, "micro_batch_size": args.micro_batch_size, "max_steps": args.steps,
              "learning_rate": 1e-3, "output_dir": str(scratch / f"out-{workers}"), "logging_steps": 1,
              "dataset_cache_dir": str(scratch / "cache"), "dataset_processes": workers}
    path = scratch / f"recipe-{workers}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def loader_rate(recipe_path: Path) -> float:
    from ftclip.data import prepare
    from ftclip.data.batches import micro_batches
    from ftclip.modeling import load_tokenizer
    from ftclip.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    data = prepare(recipe, load_tokenizer(recipe))
    started = time.perf_counter()
    images = 0
    for batch in micro_batches(data.train, recipe.micro_batch_size, recipe.seed, epoch=0):
        images += sum(row.image_inputs["image_grid_thw"].shape[0] for row in batch)
    return images / (time.perf_counter() - started)


def timed_train(recipe_path: Path, steps: int, micro_batch_size: int) -> float:
    """Images/s the training step consumes: wall time of steps 2..N of `ftclip train` (step 1 warms up)."""
    import ftclip.train as loop

    stamps = []
    original = loop.forward_backward

    def stamped(*args, **kwargs):
        stamps.append(time.perf_counter())
        return original(*args, **kwargs)

    loop.forward_backward = stamped
    try:
        from rich.console import Console

        from ftclip.recipe import load_recipe

        loop.train(load_recipe(recipe_path), Console(quiet=True))
    finally:
        loop.forward_backward = original
    per_step = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    return micro_batch_size / per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args()
    data = make_data(args.images, args.size)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = model_for(args.size, scratch)
        print(f"{args.images} pictures of {args.size}×{args.size}, micro-batches of {args.micro_batch_size}")
        print("| measured | workers | images/s |\n| --- | --- | --- |")
        for workers in args.workers:
            rate = loader_rate(recipe_for(model, data, scratch, args, workers))
            print(f"| loader alone | {workers} | {rate:,.1f} |")
        workers = max(args.workers)
        rate = timed_train(recipe_for(model, data, scratch, args, workers), args.steps, args.micro_batch_size)
        print(f"| training step (tiny model, loader with {workers} workers) | {workers} | {rate:,.1f} |")


if __name__ == "__main__":
    main()
