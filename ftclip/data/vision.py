"""Image chats for vision-language runs (recipe key processor_type): records → token ids, labels and image
references, tokenized once and cached like text; images → the processor's tensors, per batch, in DataLoader
worker processes (ftclip/data/vision_batches.py).

Records use Axolotl's multimodal chat layout: `messages` whose `content` is a string (one text part) or a list of
parts `{"type": "text", "text": ...}` and `{"type": "image", "path" | "url" | "base64" | "image": ...}`; an
`images` (or `image`) column fills the image parts that name no image, in order, and what is left of it goes to
the first user turn (Axolotl puts the column's image there). Paths are relative to the data file. Hub datasets
with Image features (llava-instruct-mix-vsft's layout) work the same way: their images are embedded bytes.

Where the image placeholders are expanded: at tokenization. The template writes one placeholder per image
(Qwen2-VL's <|image_pad|>, Gemma 3's <start_of_image>, LLaVA's <image>); the processor replaces it with a text
that depends on the image's size (Qwen2-VL: one token per 28×28 patch group; Gemma 3: a fixed block). ftclip does
that replacement on the rendered conversation, with the processor's own replacement text for an image of the
same size, and tokenizes the result once, with character offsets for chat masking: the ids are exactly those
`processor(text=..., images=...)` gives (checked in the tests), the lengths are the real ones (sequence_len and
batching see them), and `preprocess --show` shows the expanded placeholders. So every image is opened once at
tokenization (decoded in full: a truncated or garbage file is found here, named with its record, skipped and
counted; the same >10 % stop rule as chat masking). The cache key covers the processor's settings, image_size
and image_resize_algorithm. An image whose file changes size after tokenization is caught when its batch is
built (its placeholder count no longer matches).

Only assistant text is trained: the chat spans come from ftclip/data/chat.py on the expanded render, and every
character of an image's replacement text is then masked, in whichever turn it stands."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftclip.data.chat import (
    Conversation,
    Skip,
    _role_names,  # the chat records' role mapping, shared
    record_turns,
    template_marks,
    trained_flags,
)
from ftclip.data.records import IGNORE_INDEX
from ftclip.errors import DataError
from ftclip.recipe import DatasetSpec, Recipe

IMAGE_KEYS = ("path", "url", "base64", "image")
IMAGE_COLUMNS = ("images", "image")
RESAMPLE = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}
# Model inputs a processor derives from the token ids rather than from the images; ftclip computes them from its
# own ids per batch (vision_batches.py).
TEXT_DERIVED_INPUTS = ("mm_token_type_ids", "token_type_ids", "cross_attention_mask")
# Every processor output a batch may carry to the model besides the ids and the attention mask (the loss passes
# these on); a processor that gives another one is refused by name (vision_batches.ImageLoader).
IMAGE_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask",
                      "image_sizes", *TEXT_DERIVED_INPUTS)


def is_vision(recipe: Recipe) -> bool:
    return recipe.processor_type is not None


# ---------------------------------------------------------------- images: references and loading


@dataclass(frozen=True)
class ImageSettings:
    """What ftclip does to an image before the processor: image_size and image_resize_algorithm."""

    size: int | tuple[int, int] | None = None
    resample: str = "bilinear"

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> ImageSettings:
        size = tuple(recipe.image_size) if isinstance(recipe.image_size, list) else recipe.image_size
        return cls(size, recipe.image_resize_algorithm or "bilinear")


class ImageProblem(Exception):
    """An image that cannot be read: the message names it."""


def _name(reference: dict) -> str:
    if reference.get("path"):
        return reference["path"]
    return f"embedded image ({len(reference.get('bytes') or b''):,} bytes)"


def describe_image(reference: dict) -> str:
    return _name(reference)


def _decoded_base64(text: str) -> bytes | None:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def image_reference(value: Any, key: str, base: Path) -> dict | str:
    """{"path": ..., "bytes": ...} for one image given as a part's `key` (path, url, base64, image) or a column
    value; or a description of what is wrong with it. Local paths are made absolute against `base`."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # a datasets Image feature, undecoded
        if value.get("bytes"):
            return {"path": None, "bytes": bytes(value["bytes"])}
        value, key = value.get("path"), "path"
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image (a decoded Image feature)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"path": None, "bytes": buffer.getvalue()}
    if isinstance(value, (bytes, bytearray)):
        return {"path": None, "bytes": bytes(value)}
    if not isinstance(value, str) or not value:
        return f"an image's {key!r} must be a non-empty string"
    if key in ("url", "image", "path") and value.startswith(("http://", "https://")):
        return {"path": value, "bytes": None}
    if value.startswith("file://"):
        value = value.removeprefix("file://")
    if key == "base64" or (key == "image" and value.startswith("data:")):
        data = _decoded_base64(value)
        return {"path": None, "bytes": data} if data else f"an image's {key!r} is not valid base64"
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if key == "image" and not path.exists():  # transformers' meaning: a path, a URL or base64
        data = _decoded_base64(value)
        if data:
            return {"path": None, "bytes": data}
    return {"path": str(path), "bytes": None}


def open_image(reference: dict, settings: ImageSettings):
    """The image as RGB, EXIF orientation applied, resized as image_size says; decoded in full now, so a damaged
    file fails here. Raises ImageProblem naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = _name(reference)
    try:
        if reference.get("bytes") is not None:
            image = Image.open(io.BytesIO(reference["bytes"]))
        elif reference["path"].startswith(("http://", "https://")):
            from transformers.image_utils import load_image

            image = load_image(reference["path"])
        else:
            image = Image.open(reference["path"])
        image.load()
        image = ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise ImageProblem(f"image {name}: no such file") from None
    except UnidentifiedImageError:
        raise ImageProblem(f"image {name}: not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageProblem(f"image {name}: cannot be decoded: {error}") from None
    except Exception as error:  # a URL that cannot be fetched (requests' errors), a codec's own error type
        raise ImageProblem(f"image {name}: cannot be loaded: {error}") from None
    return resized(image, settings)


def resized(image, settings: ImageSettings):
    """image_size as Axolotl applies it: an int pads to a square (aspect kept, black), a pair resizes exactly."""
    from PIL import Image, ImageOps

    if settings.size is None:
        return image
    method = getattr(Image.Resampling, RESAMPLE[settings.resample])
    if isinstance(settings.size, tuple):
        return image.resize(settings.size, method)
    return ImageOps.pad(image, (settings.size, settings.size), method=method, color=(0, 0, 0))


# ---------------------------------------------------------------- records → conversations with images


@dataclass
class ImageChat:
    """A record as the template renders it (content as lists of parts, images as bare {"type": "image"}), the
    same turns with each turn's last text (where chat masking finds the turn in the render), and the images in
    the order the template writes them."""

    messages: list[dict[str, Any]]
    located: Conversation
    images: list[dict] = field(default_factory=list)


def _column_images(record: dict, base: Path) -> list[dict] | str:
    for column in IMAGE_COLUMNS:
        value = record.get(column)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        found = []
        for item in values:
            reference = image_reference(item, column, base)
            if isinstance(reference, str):
                return f"{column}: {reference}"
            found.append(reference)
        return found
    return []


def _parts(content: Any, where: str) -> list[dict] | str:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        return f"{where}.content must be a string or a list of parts"
    parts = []
    for number, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("text", "image", "image_url"):
            return f"{where}.content[{number}] must be a part with type text or image"
        parts.append(part)
    return parts


def image_chat(record: dict, spec: DatasetSpec, base: Path) -> ImageChat | str:
    """The record's conversation and images, or what is wrong with the record."""
    found = record_turns(record, spec, "an image chat record")
    if isinstance(found, str):
        return found
    key, turns, mapping = found
    names = _role_names(spec)
    column = _column_images(record, base)
    if isinstance(column, str):
        return column
    pending = list(column)
    messages, located, images = [], [], []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict) or not isinstance(turn.get(mapping["role"]), str):
            return f"{where} needs a string {mapping['role']!r}"
        role = names.get(turn[mapping["role"]])
        if role is None:
            return f"{where}.{mapping['role']} is {turn[mapping['role']]!r}; allowed: {', '.join(names)}"
        if spec.drop_system_message and role == "system":
            continue
        parts = _parts(turn.get(mapping["content"]), where)
        if isinstance(parts, str):
            return parts
        rendered, last_text = [], ""
        for number, part in enumerate(parts):
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    return f"{where}.content[{number}] is a text part without a string 'text'"
                rendered.append({"type": "text", "text": text})
                last_text = text
                continue
            given = [name for name in IMAGE_KEYS if part.get(name) is not None]
            if part["type"] == "image_url" and isinstance(part.get("image_url"), dict):
                given, part = ["url"], {"url": part["image_url"].get("url")}
            if given:
                reference = image_reference(part[given[0]], given[0], base)
            elif pending:
                reference = pending.pop(0)
            else:
                return f"{where}.content[{number}] is an image part with no image (path, url, base64 or image) and " \
                       "the record's images column has none left for it"
            if isinstance(reference, str):
                return f"{where}.content[{number}]: {reference}"
            images.append((len(messages), reference))
            rendered.append({"type": "image"})
        messages.append({"role": role, "content": rendered})
        located.append({"role": role, "content": last_text})
    if pending:  # column images no part asked for: the first user turn, before its text (Axolotl appends them)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
        messages[first_user]["content"][:0] = [{"type": "image"} for _ in pending]
        images = [(first_user, ref) for ref in pending] + images
    if not any(message["role"] in spec.roles_to_train for message in located):
        return f"no {' or '.join(spec.roles_to_train)} turn: nothing to train on"
    # The template writes images turn by turn, in part order: sort by turn, keeping the order within one.
    ordered = [reference for _, reference in sorted(enumerate(images), key=lambda item: (item[1][0], item[0]))]
    return ImageChat(messages, Conversation(located), [reference for _, reference in ordered])


def record_problem(record: Any, spec: DatasetSpec, base: Path) -> str | None:
    """For validate: why an image chat record does not fit (images are not opened here)."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, not {type(record).__name__}"
    chat = image_chat(record, spec, base)
    return chat if isinstance(chat, str) else None


# ---------------------------------------------------------------- the processor's side of tokenization


class _PartsTokenizer:
    """The tokenizer, with string contents rendered as one text part: chat masking probes the template with
    string turns, and a template written for parts (LLaVA's) must see them as the data will be."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages, **options):
        as_parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
                    for m in messages]
        return self._tokenizer.apply_chat_template(as_parts, **options)


def images_kwargs(processor) -> dict:
    """The image options the processor's own __call__ would use (its defaults merged with the tokenizer's)."""
    merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs)
    return dict(merged["images_kwargs"])


def process_images(processor, images: list) -> tuple[dict, list[str]]:
    """The processor's image tensors for one example's images and each image's replacement text: the two halves
    of what `processor(text, images)` does, through the same methods (`_process_images`, which calls
    `replace_image_token`) so that every processor's own rules apply."""
    options = images_kwargs(processor)
    options["return_tensors"] = "pt"
    return processor._process_images([images], **options)


class Expander:
    """The replacement text of an image of a given size (after image_size), from the processor on a blank image
    of that size: it depends on the size only. Remembered per size."""

    def __init__(self, processor):
        self.processor = processor
        self.known: dict[tuple[int, int], str] = {}

    def replacement(self, size: tuple[int, int]) -> str:
        if size not in self.known:
            from PIL import Image

            _, replacements = process_images(self.processor, [Image.new("RGB", size)])
            self.known[size] = replacements[0]
        return self.known[size]


def processor_fingerprint(processor, settings: ImageSettings) -> str:
    """What decides the expanded placeholders, for the cache key: the processor's class and settings (image
    processor included), image_size and image_resize_algorithm."""
    try:
        described = processor.to_json_string()
    except (TypeError, ValueError, AttributeError):
        described = json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)
    return json.dumps({"class": type(processor).__name__, "processor": described, "image_size": settings.size,
                       "resample": settings.resample}, sort_keys=True, default=str)


# ---------------------------------------------------------------- records → ids, labels and images (Dataset.map)


@dataclass(frozen=True)
class VisionTokenizeSettings:
    spec: DatasetSpec
    sequence_len: int
    train_on_inputs: bool
    base: Path  # where the data file's relative image paths start
    images: ImageSettings


def _rows(batch: dict[str, list]) -> list[dict[str, Any]]:
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*(batch[name] for name in names))]


def _replacement_spans(render: str, token: str, replacements: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The render with the n-th placeholder replaced by the n-th replacement text, and where each landed."""
    pieces, spans, last = [], [], 0
    position = 0
    for match, replacement in zip(re.finditer(re.escape(token), render), replacements):
        pieces.append(render[last:match.start()])
        position += match.start() - last
        spans.append((position, position + len(replacement)))
        pieces.append(replacement)
        position += len(replacement)
        last = match.end()
    pieces.append(render[last:])
    return "".join(pieces), spans


def tokenize_batch(batch: dict[str, list], indices: list[int], tokenizer, settings: VisionTokenizeSettings
                   ) -> dict[str, list]:
    """Dataset.map's function for image chats: input_ids, labels, trained, problem, skipped (as for text chats;
    see ftclip/data/tokenize.py) and images (the references the batch loader opens)."""
    processor = tokenizer.ftclip_processor
    expander = _expander(processor)
    out: dict[str, list] = {"input_ids": [], "labels": [], "trained": [], "problem": [], "skipped": [], "images": []}

    def emit(ids=(), labels=(), trained=0, problem=None, skipped=None, images=()):
        out["input_ids"].append(list(ids))
        out["labels"].append(list(labels))
        out["trained"].append(trained)
        out["problem"].append(problem)
        out["skipped"].append(skipped)
        out["images"].append(list(images))

    marks = template_marks(_PartsTokenizer(tokenizer))
    for record, index in zip(_rows(batch), indices):
        chat = image_chat(record, settings.spec, settings.base)
        if isinstance(chat, str):
            emit(problem=chat)
            continue
        result = _tokenize_chat(chat, tokenizer, processor, expander, marks, settings, index)
        if isinstance(result, Skip):
            emit(skipped=result.reason)
        else:
            emit(*result, images=chat.images)
    return out


_EXPANDERS: dict[int, Expander] = {}


def _expander(processor) -> Expander:
    return _EXPANDERS.setdefault(id(processor), Expander(processor))


def _tokenize_chat(chat: ImageChat, tokenizer, processor, expander: Expander, marks, settings: VisionTokenizeSettings,
                   index: int):
    where = f"record {index + 1}"
    sizes = []
    for reference in chat.images:
        try:
            sizes.append(open_image(reference, settings.images).size)
        except ImageProblem as problem:
            return Skip(f"{where}: {problem}")
    try:
        render = tokenizer.apply_chat_template(chat.messages, tokenize=False)
    except Exception as error:  # a template's raise_exception (roles must alternate, ...)
        return Skip(f"{where}: the chat template refused it: {error}")
    token = processor.image_token
    written = render.count(token)
    if written != len(chat.images):
        return Skip(f"{where}: the chat template wrote {written} image placeholder(s) ({token}) for "
                    f"{len(chat.images)} image(s)")
    expanded, spans = _replacement_spans(render, token, [expander.replacement(size) for size in sizes])
    encoded = tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if settings.train_on_inputs:
        flags = bytearray(b"\x01" * len(expanded))
    else:
        flags = trained_flags(expanded, chat.located, marks, settings.spec.roles_to_train, settings.spec.train_on_eos)
        if isinstance(flags, Skip):
            return Skip(f"{where}: {flags.reason}")
    for start, end in spans:  # image placeholders are never trained, whichever turn they stand in
        flags[start:end] = bytes(end - start)
    labels = [token_id if any(flags[start:end]) else IGNORE_INDEX for token_id, (start, end) in zip(ids, offsets)]
    if len(ids) > settings.sequence_len:
        kept = ids[:settings.sequence_len]
        image_ids = set(processor.image_token_ids)
        if sum(1 for t in kept if t in image_ids) != sum(1 for t in ids if t in image_ids):
            return Skip(f"{where}: {len(ids)} tokens with its image placeholders, more than sequence_len "
                        f"({settings.sequence_len}) before its last image ends; raise sequence_len")
        ids, labels = kept, labels[:settings.sequence_len]
    trained = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
    return ids, labels, trained


def check_skipped_images(skipped: int, total: int, first_reasons: list[str], source: str) -> str | None:
    """Records skipped for a broken or missing image (or one the template could not mask): stop when more than
    the chat-masking share (>10 %), otherwise a note naming the first of them."""
    from ftclip.data.chat import SKIP_LIMIT

    if not skipped:
        return None
    reasons = "; ".join(first_reasons[:3])
    if skipped > SKIP_LIMIT * total:
        raise DataError(f"{source}: {skipped} of {total} image chat records were skipped (more than {SKIP_LIMIT:.0%}): "
                        f"check the images and the chat template. First reasons: {reasons}")
    return f"{source}: skipped {skipped} of {total} image chat records: {reasons}"


def check_processor(tokenizer) -> None:
    """What the data stage needs of a processor, said before tokenizing."""
    processor = getattr(tokenizer, "ftclip_processor", None)
    if processor is None:
        raise DataError("vision-language data needs the processor (processor_type); none was loaded")
    if getattr(processor, "image_token", None) is None or not hasattr(processor, "_process_images"):
        raise DataError(f"{type(processor).__name__} has no image placeholder token (image_token) or image "
                        "processing in this transformers version; ftclip cannot build image chats with it")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer and processor have no chat template; image chats need one (set chat_template:, "
                        "e.g. qwen2_vl, llava, gemma3, llama3_2_vision, pixtral, mistral_v7_tekken)")


def tokenize_settings(source, setting, recipe: Recipe) -> VisionTokenizeSettings:
    """The map function's settings for one source: image paths start at the data file's folder (a folder
    source's own folder; the recipe's for a hub dataset)."""
    location = Path(source.location)
    base = location.parent if source.kind == "file" else location if source.kind == "folder" else (
        recipe.folder or Path.cwd())
    return VisionTokenizeSettings(setting.spec, setting.sequence_len, setting.train_on_inputs, base,
                                  ImageSettings.from_recipe(recipe))


def undecoded_images(dataset):
    """Image features read as {"bytes", "path"} (no decoding in the tokenize pass; ftclip opens them itself)."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        inner = getattr(feature, "feature", None)
        if isinstance(inner, datasets.Image) and inner.decode:
            dataset = dataset.cast_column(name, type(feature)(datasets.Image(decode=False)))
    return dataset


def recipe_notes(recipe: Recipe, tokenizer=None) -> list[str]:
    """What a vision-language run says about keys it accepts and ignores, and about its processor."""
    notes = [f"{key}: accepted for Axolotl compatibility and ignored ({why})"
             for key, why in (("skip_prepare_dataset", "ftclip tokenizes the text once, cached, and processes images "
                                                       "per batch either way"),
                              ("remove_unused_columns", "batches carry only what the model takes"))
             if getattr(recipe, key) is not None]
    processor_note = getattr(getattr(tokenizer, "ftclip_processor", None), "ftclip_note", None)
    return notes + ([processor_note] if processor_note else [])
