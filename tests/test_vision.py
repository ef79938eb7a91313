"""Vision-language runs on tiny models built from a config with their real processor classes (tests/vision_models.py):
what is trained (only assistant text; image placeholders, prompts and system turns are -100), that the ids are the
processor's own, that the loss falls, a resumed run is exact, two DDP ranks equal one process, and broken images
are named, skipped and counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file
from vision_models import build

from ftclip.data import prepare
from ftclip.data.records import IGNORE_INDEX
from ftclip.errors import DataError, RecipeError
from ftclip.modeling import load_tokenizer
from ftclip.recipe import load_recipe, parse_recipe
from ftclip.train import train

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 200, 40)}
SIZES = [(48, 32), (32, 32), (40, 56)]


@pytest.fixture(scope="session")
def vision_models(tmp_path_factory):
    cache = {}

    def model(architecture: str) -> Path:
        if architecture not in cache:
            cache[architecture] = build(architecture, tmp_path_factory.mktemp(architecture))
        return cache[architecture]

    return model


def picture(path: Path, color: str, shape: str, size: tuple[int, int]) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (255, 255, 255))
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def image_chats(folder: Path, count: int = 12, system: bool = True) -> Path:
    """count records in Axolotl's layout, images under folder/photos (paths relative to the data file); every
    third record has a system turn (unless not `system`), every fourth gives its image through the `images` column."""
    records = []
    for index in range(count):
        color, shape = list(COLORS)[index % 4], ("circle", "square")[index // 4 % 2]
        picture(folder / "photos" / f"{index}.png", color, shape, SIZES[index % 3])
        user = [{"type": "image", "path": f"photos/{index}.png"}, {"type": "text", "text": "What is in the picture?"}]
        record = {"messages": [{"role": "user", "content": user},
                               {"role": "assistant", "content": [{"type": "text", "text": f"A {color} {shape}."}]}]}
        if index % 4 == 3:
            user[0] = {"type": "image"}
            record["images"] = [f"photos/{index}.png"]
        if index % 3 == 0 and system:
            record["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
        records.append(record)
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def vision_recipe(folder: Path, model: Path, data: Path, name: str = "recipe.yaml", **overrides) -> Path:
    recipe = {
        "base_model": str(model), "processor_type": "AutoProcessor", "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "datasets": [{"path": str(data), "type": "chat"}], "sequence_len": 256,
        "micro_batch_size": 4, "max_steps": 6, "learning_rate": 1e-2, "lr_scheduler": "constant",
        "output_dir": str(folder / "out"), "logging_steps": 1, "dataset_cache_dir": str(folder / "cache"),
        "dataset_processes": 1,
    }
    recipe.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe))
    return path


ARCHITECTURES = ["qwen2_vl", "llava", "gemma3", "mllama", "idefics3"]
# Llama 3.2 Vision's template refuses a system turn in a conversation with images.
SYSTEM_TURNS = {"mllama": False}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_only_assistant_text_is_trained_and_the_ids_are_the_processors(architecture, vision_models, tmp_path):
    from PIL import Image

    data = image_chats(tmp_path, system=SYSTEM_TURNS.get(architecture, True))
    recipe = load_recipe(vision_recipe(tmp_path, vision_models(architecture), data))
    tokenizer = load_tokenizer(recipe)
    processor = tokenizer.ftclip_processor
    prepared = prepare(recipe, tokenizer)
    examples = prepared.examples
    assert len(examples) == 12
    records = [json.loads(line) for line in data.read_text().splitlines()]
    image_ids = set(processor.image_token_ids)
    for index, record in enumerate(records):
        ids, labels = examples.input_ids(index).tolist(), examples.labels(index).tolist()
        trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
        text = tokenizer.decode(trained).strip()  # a byte-level token may carry the space before the answer
        answer = record["messages"][-1]["content"][0]["text"]
        assert text.startswith(answer), (architecture, text)
        # After the answer only the turn's end marker (nothing when the template writes none, as LLaVA's).
        assert len(text) - len(answer) <= len(tokenizer.eos_token) + 2
        assert not image_ids & set(trained)
        assert "picture" not in text and "briefly" not in text
        # The ids are exactly what the processor makes of the same conversation and image.
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], list) else
                     [{"type": "text", "text": m["content"]}]} for m in record["messages"]]
        for message in messages:
            message["content"] = [{"type": "image"} if part["type"] == "image" else part for part in message["content"]]
        render = tokenizer.apply_chat_template(messages, tokenize=False)
        image = Image.open(tmp_path / "photos" / f"{index}.png").convert("RGB")
        expected = processor(text=[render], images=[image], add_special_tokens=False)["input_ids"][0]
        assert ids == list(expected)
        assert examples.images(index) == [{"path": str(tmp_path / "photos" / f"{index}.png"), "bytes": None}]
    # A batch carries the processor's tensors, and the model takes them.
    batch = prepared.train.rows([0, 1, 2])
    from ftclip.data.batches import collate

    inputs = collate(batch, tokenizer.pad_token_id)
    assert "pixel_values" in inputs
    from ftclip.modeling import load_model

    model = load_model(recipe, torch.device("cpu"), tokenizer)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).loss)


def test_image_size_resizes_before_the_processor_and_is_part_of_the_cache_key(vision_models, tmp_path):
    data = image_chats(tmp_path, count=4)
    model = vision_models("qwen2_vl")
    plain = load_recipe(vision_recipe(tmp_path, model, data))
    sized = load_recipe(vision_recipe(tmp_path, model, data, "sized.yaml", image_size=64, image_resize_algorithm="bicubic"))
    first, second = prepare(plain, load_tokenizer(plain)), prepare(sized, load_tokenizer(sized))
    assert first.cache != second.cache
    pad = load_tokenizer(plain).ftclip_processor.image_token_ids[0]
    # 48×32 pixels are 2×3 merged patches (6 placeholders); padded to 64×64 they are 4×4 (16).
    assert first.examples.input_ids(0).tolist().count(pad) == 6
    assert second.examples.input_ids(0).tolist().count(pad) == 16


def test_broken_and_missing_images_are_named_skipped_and_counted(vision_models, tmp_path):
    data = image_chats(tmp_path, count=24)
    good = (tmp_path / "photos" / "5.png").read_bytes()
    (tmp_path / "photos" / "5.png").write_bytes(good[: len(good) // 2])  # a real truncated PNG
    (tmp_path / "photos" / "7.png").write_bytes(b"this is not an image at all")
    recipe = load_recipe(vision_recipe(tmp_path, vision_models("qwen2_vl"), data))
    prepared = prepare(recipe, load_tokenizer(recipe))
    assert len(prepared.examples) == 22
    note = " ".join(prepared.notes)
    assert "skipped 2 of 24 image chat records" in note
    assert "record 6: image " + str(tmp_path / "photos" / "5.png") in note
    assert "record 8: image " + str(tmp_path / "photos" / "7.png") in note
    for index in (9, 10, 11):  # 5 of 24 is more than 10 %: the run stops, naming the first ones
        (tmp_path / "photos" / f"{index}.png").unlink()
    recipe = load_recipe(vision_recipe(tmp_path, vision_models("qwen2_vl"), data, dataset_cache_dir=str(tmp_path / "c2")))
    with pytest.raises(DataError, match=r"5 of 24 image chat records were skipped .*no such file"):
        prepare(recipe, load_tokenizer(recipe))


def test_recipe_refuses_packing_and_vision_keys_without_a_processor():
    base = "base_model: m\ndatasets: [{path: d.jsonl, type: chat}]\n"
    with pytest.raises(RecipeError) as caught:
        parse_recipe(base + "processor_type: AutoProcessor\nsample_packing: true\n")
    assert "sample_packing" in str(caught.value) and "not packed" in str(caught.value)
    with pytest.raises(RecipeError) as caught:
        parse_recipe(base + "image_size: 224\nfreeze_mm_modules: true\n")
    assert "image_size" in str(caught.value) and "set processor_type" in str(caught.value)
    with pytest.raises(RecipeError, match="width, height"):
        parse_recipe(base + "processor_type: AutoProcessor\nimage_size: [1, 2, 3]\n")
    recipe = parse_recipe(base + "processor_type: Qwen2VLProcessor\nimage_size: [448, 224]\nskip_prepare_dataset: true\n"
                          "remove_unused_columns: false\n")
    assert recipe.image_size == [448, 224]


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [value for line in lines for value in json.loads(line)["per_step"]["loss"]]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_loss_falls(architecture, vision_models, tmp_path):
    data = image_chats(tmp_path, count=10, system=SYSTEM_TURNS.get(architecture, True))
    result = train(load_recipe(vision_recipe(tmp_path, vision_models(architecture), data, max_steps=6, val_set_size=2)),
                   Console(quiet=True))
    steps = losses(result.output_dir)
    assert sum(steps[-2:]) / 2 < steps[0] - 0.1, steps
    assert result.eval_loss is not None and result.eval_loss == result.eval_loss  # held-out images load in-process
    assert (result.output_dir / "adapter" / "processor_config.json").is_file()


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(vision_models, tmp_path):
    data = image_chats(tmp_path)
    model = vision_models("gemma3")
    run = dict(max_steps=4, save_steps=2, micro_batch_size=2, lora_dropout=0.1)
    reference = train(load_recipe(vision_recipe(tmp_path, model, data, "a.yaml", output_dir=str(tmp_path / "a"), **run)),
                      Console(quiet=True))
    path = vision_recipe(tmp_path, model, data, "b.yaml", output_dir=str(tmp_path / "b"), **run)
    train(load_recipe(path), Console(quiet=True))
    out = tmp_path / "b"
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "checkpoints" / "latest").write_text("step-2")
    resumed = train(load_recipe(path), Console(quiet=True))
    assert resumed.resumed_from == out / "checkpoints" / "step-2"
    assert losses(out) == losses(reference.output_dir)
    ours, theirs = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(
        reference.output_dir / "adapter" / "adapter_model.safetensors")
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.slow
def test_two_ddp_ranks_equal_one_process(vision_models, tmp_path):
    from test_distributed import per_step, torchrun

    data = image_chats(tmp_path, count=8)
    model = vision_models("qwen2_vl")
    steps = dict(max_steps=1, gradient_accumulation_steps=2, gradient_clipping={"mode": "norm", "max_norm": 0.5})
    single = train(load_recipe(vision_recipe(tmp_path, model, data, "one.yaml", micro_batch_size=4,
                                             output_dir=str(tmp_path / "one"), **steps)), Console(quiet=True))
    path = vision_recipe(tmp_path, model, data, "two.yaml", micro_batch_size=2, output_dir=str(tmp_path / "two"),
                         distributed={"strategy": "ddp"}, dataset_cache_dir=str(tmp_path / "cache-ddp"), **steps)
    done = torchrun("-m", "ftclip", "train", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    # Each rank processes its own rows' images; gloo sums the gradients in another order than one process
    # accumulates them, so the norms agree to float32 rounding over a few thousand terms, not bit for bit.
    assert per_step(tmp_path / "two", "grad_norm") == pytest.approx(per_step(single.output_dir, "grad_norm"), rel=1e-5)
    assert per_step(tmp_path / "two", "loss") == pytest.approx(per_step(single.output_dir, "loss"), rel=1e-5)


@pytest.mark.slow
def test_chat_answers_about_an_image_and_merge_saves_what_the_auto_classes_load(vision_models, tmp_path):
    from transformers import AutoModelForImageTextToText

    from ftclip.inference import Conversation, chat_image, find_chat_source, load_for_chat, prompt_style
    from ftclip.merge import merge_adapter
    from ftclip.vlm import load_processor_from

    data = image_chats(tmp_path, count=4)
    result = train(load_recipe(vision_recipe(tmp_path, vision_models("qwen2_vl"), data, max_steps=2)), Console(quiet=True))
    source = find_chat_source(result.output_dir)
    model, tokenizer = load_for_chat(source)
    processor = tokenizer.ftclip_processor
    image = chat_image(tmp_path / "photos" / "0.png", source.recipe, processor)
    inputs = Conversation(tokenizer, prompt_style(source.recipe, tokenizer), processor=processor,
                          image=image).prompt_inputs("What is in the picture?")
    assert "pixel_values" in inputs and inputs["input_ids"][0].tolist().count(processor.image_token_ids[0]) == 6
    merged = merge_adapter(result.output_dir)
    loaded = AutoModelForImageTextToText.from_pretrained(merged).eval()
    again = load_processor_from(merged)  # AutoProcessor (images-only here, where torchvision is missing)
    assert type(again).__name__ == type(processor).__name__
    with torch.no_grad():
        # The merged weights are base + B·A folded in: the same logits as base + adapter, to float32 rounding.
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-4, atol=1e-5)
    from typer.testing import CliRunner

    from ftclip.cli import app

    done = CliRunner().invoke(app, ["chat", str(result.output_dir), "--image", str(tmp_path / "photos" / "0.png"),
                                    "--prompt", "What is in the picture?", "--max-new-tokens", "4"])
    assert done.exit_code == 0, done.output
    assert done.output.strip()
    refused = CliRunner().invoke(app, ["chat", str(result.output_dir), "--image", str(tmp_path / "nothing.png"),
                                       "--prompt", "hi"])
    assert refused.exit_code == 2 and "nothing.png: no such file" in refused.output


def test_a_processor_that_needs_torchvision_is_refused_saying_so(tmp_path, vision_models):
    """PixtralProcessor (Pixtral, Mistral 3) needs torchvision in transformers 5: without it, train and validate say
    so instead of failing deep inside transformers."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here")
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
    from vision_models import _tokenizer

    from ftclip.cli import app
    from ftclip.errors import ModelError

    folder = tmp_path / "pixtral"
    _tokenizer(["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"], eos="</s>").save_pretrained(folder)
    PixtralImageProcessorPil(size={"longest_edge": 64}).save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
    shutil.copy(vision_models("llava") / "config.json", folder / "config.json")
    data = image_chats(tmp_path, count=2)
    path = vision_recipe(tmp_path, folder, data)
    with pytest.raises(ModelError, match="needs torchvision, which is not installed"):
        load_tokenizer(load_recipe(path))
    from typer.testing import CliRunner

    checked = CliRunner().invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0 and "torchvision is not installed" in checked.output


def test_preprocess_show_json_labels_no_image_or_prompt_token(vision_models, tmp_path):
    import subprocess
    import sys

    from typer.testing import CliRunner

    from ftclip.cli import app

    data = image_chats(tmp_path, count=4)
    path = vision_recipe(tmp_path, vision_models("qwen2_vl"), data)
    shown = subprocess.run([sys.executable, "-m", "ftclip", "preprocess", str(path), "--show", "1", "--json"],
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    [line] = shown.stdout.splitlines()  # nothing but the example on stdout
    example = json.loads(line)
    tokenizer = load_tokenizer(load_recipe(path))
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(trained) == "A red circle.<|im_end|>"
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert example["input_ids"].count(pad) == 6 and pad not in trained
    plain = CliRunner().invoke(app, ["preprocess", str(path), "--show", "1"])
    assert "<|image_pad|>×6" in plain.output  # placeholder runs shown with their count


def test_a_dataset_with_image_features_in_llava_instruct_mix_layout(vision_models, tmp_path):
    """HuggingFaceH4/llava-instruct-mix-vsft's layout: messages with bare image parts ({"type": "image", "text": null})
    and an `images` column of Image features; saved with save_to_disk and read as a dataset folder."""
    import datasets
    from PIL import Image

    records = {"messages": [], "images": []}
    for index, color in enumerate(COLORS):
        records["messages"].append([
            {"role": "user", "content": [{"index": 0, "text": None, "type": "image"},
                                         {"index": None, "text": "Which colour is it?", "type": "text"}]},
            {"role": "assistant", "content": [{"index": None, "text": f"It is {color}.", "type": "text"}]}])
        records["images"].append([Image.new("RGB", SIZES[index % 3], COLORS[color])])
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": [{"index": datasets.Value("int64"),
                                                                     "text": datasets.Value("string"),
                                                                     "type": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(records, features=features).save_to_disk(str(tmp_path / "mix"))
    recipe = load_recipe(vision_recipe(tmp_path, vision_models("qwen2_vl"), tmp_path / "mix"))
    tokenizer = load_tokenizer(recipe)
    prepared = prepare(recipe, tokenizer)
    assert len(prepared.examples) == 4
    assert prepared.examples.images(0)[0]["bytes"]  # embedded, not a path
    trained = [t for t, label in zip(prepared.examples.input_ids(1).tolist(), prepared.examples.labels(1).tolist())
               if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "It is green.<|im_end|>"
    [row] = prepared.train.rows([1])
    # 32×32 pixels (index 1 is the second size): 4×4 patches of 8 pixels, 4 placeholders once merged 2×2.
    assert row.image_inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert prepared.examples.input_ids(1).tolist().count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4


def test_image_references_resolve_paths_against_the_data_file_and_decode_base64(tmp_path):
    import base64

    from ftclip.data.vision import image_reference

    png = picture(tmp_path / "a.png", "red", "circle", (32, 32)).read_bytes()
    encoded = base64.b64encode(png).decode()
    assert image_reference("a.png", "path", tmp_path) == {"path": str(tmp_path / "a.png"), "bytes": None}
    assert image_reference(f"file://{tmp_path}/a.png", "url", tmp_path)["path"] == str(tmp_path / "a.png")
    assert image_reference("https://example.com/a.png", "url", tmp_path) == {"path": "https://example.com/a.png",
                                                                          "bytes": None}
    assert image_reference(encoded, "base64", tmp_path)["bytes"] == png
    assert image_reference("data:image/png;base64," + encoded, "image", tmp_path)["bytes"] == png
    assert image_reference(encoded, "image", tmp_path)["bytes"] == png  # not a file here: base64, as transformers reads it
    assert image_reference({"bytes": png, "path": None}, "images", tmp_path)["bytes"] == png
    assert "not valid base64" in image_reference("%%%", "base64", tmp_path)
