"""Vision-language models (recipe key processor_type): the processor and the model, loaded through transformers'
AutoProcessor and AutoModelForImageTextToText, and which of the model's modules LoRA adapts or freeze_mm_modules
freezes. modeling.py calls in here; the training loop never does.

Processors without torchvision: in transformers 5 a processor such as Qwen2VLProcessor also builds a video
processor, which needs torchvision, and the processor refuses to be built without it (even with
video_processor=None). ftclip trains on images only, so when torchvision is what is missing the processor is
built without its video part (`images_only_processor_class`): the same class, the same image processor (its
PIL backend, which transformers picks by itself without torchvision), tokenizer and settings; it saves under its
own class name, so AutoProcessor loads the saved folder as usual (with the video part where torchvision is
installed). A processor whose image half needs torchvision too is refused with a message saying so."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ftclip.errors import ModelError
from ftclip.recipe import Recipe

if TYPE_CHECKING:
    import torch

# The towers and projectors freeze_mm_modules freezes, and LoRA leaves alone by default: every child of the
# model's core except the language model (the names transformers 5 gives them vary by architecture).
LANGUAGE_MODEL_NAMES = ("language_model", "text_model")


# ---------------------------------------------------------------- processors


@functools.cache
def images_only_processor_class(processor_class: type) -> type:
    """`processor_class` without its video processor: the attributes transformers builds and checks are read off
    __init__'s signature, so a subclass whose __init__ takes no video_processor builds and saves without it."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __reduce__(self):  # datasets' worker processes get the processor pickled
        return _rebuild_images_only, (processor_class, self.__dict__)

    return type(processor_class.__name__, (processor_class,),
                {"__init__": __init__, "__reduce__": __reduce__, "__module__": processor_class.__module__,
                 "__doc__": f"{processor_class.__name__} for images only (no video processor: no torchvision)."})


def _rebuild_images_only(processor_class: type, state: dict):
    cls = images_only_processor_class(processor_class)
    processor = cls.__new__(cls)
    processor.__dict__.update(state)
    return processor


def needs_torchvision(error: BaseException) -> bool:
    return "torchvision" in str(error).lower()


def _processor_class(processor_type: str, source, trust_remote_code: bool = False):
    import transformers

    if processor_type != "AutoProcessor":
        found = getattr(transformers, processor_type, None)
        if found is None or not isinstance(found, type):
            raise ModelError(f"processor_type: transformers has no processor class {processor_type!r}")
        return found
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    # AutoProcessor's own lookup, without building anything: the saved processor_class, else the model type's.
    name = _saved_processor_class(source)
    if name is None:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        name = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    found = processor_class_from_name(name) if name else None
    if found is None:
        raise ModelError(f"processor_type: AutoProcessor finds no processor class for {source}; name the class "
                         "(e.g. processor_type: Qwen2VLProcessor)")
    return found


def _saved_processor_class(source) -> str | None:
    import json

    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = Path(source) / name
        if path.is_file():
            value = json.loads(path.read_text()).get("processor_class")
            if value:
                return value
    return None


def load_processor(recipe: Recipe, source, revision: dict | None = None):
    """The recipe's processor (AutoProcessor or the named class), from the model folder or hub id `source`."""
    return load_processor_from(source, recipe.processor_type or "AutoProcessor", recipe.trust_remote_code, revision)


def load_processor_from(source, processor_type: str = "AutoProcessor", trust_remote_code: bool = False,
                        revision: dict | None = None):
    """A processor from `source`; without torchvision, the images-only form of its class (see the module's
    docstring), with `ftclip_note` saying so."""
    import transformers

    options = {"trust_remote_code": trust_remote_code, **(revision or {})}
    try:
        if processor_type != "AutoProcessor":
            return _with_template(_processor_class(processor_type, source).from_pretrained(source, **options))
        return _with_template(transformers.AutoProcessor.from_pretrained(source, **options))
    except (ImportError, RuntimeError, ValueError, OSError) as error:
        # Without torchvision the video processor fails to build, with an ImportError naming torchvision, or,
        # for a folder whose image settings live only in processor_config.json, as a missing video config.
        missing = not transformers.utils.is_torchvision_available() and "video" in str(error).lower()
        if not (needs_torchvision(error) or missing):
            raise ModelError(f"cannot load the processor ({processor_type}) from {source}: {error}") from None
        first = error
    try:
        processor_class = _processor_class(processor_type, source, trust_remote_code)
        processor = images_only_processor_class(processor_class).from_pretrained(source, **options)
    except (ImportError, RuntimeError, ValueError, OSError, TypeError) as error:
        reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
        raise ModelError(f"the processor of {source} needs torchvision, which is not installed or does not import "
                         f"({reason}); install the torchvision build that matches your torch "
                         f"(pip install torchvision), or name a processor class whose image processor has a PIL "
                         f"backend. Building it without the video part failed too: {error}") from None
    processor.ftclip_note = ("torchvision is not installed (or does not import): the processor is built without its "
                             "video part (ftclip trains on images) and its image processor runs on PIL")
    return _with_template(processor)


def _with_template(processor):
    """The processor's chat template on its tokenizer too, where the tokenizer has none (ftclip renders with it)."""
    if getattr(processor, "chat_template", None) and not getattr(processor.tokenizer, "chat_template", None):
        processor.tokenizer.chat_template = processor.chat_template
    return processor


def save_processor(processor, folder: Path) -> None:
    """The processor's files in `folder`. An images-only processor also writes its image settings as
    preprocessor_config.json, the file transformers builds a video processor from when a folder has no video
    settings of its own: AutoProcessor then loads the folder where torchvision is installed, too."""
    processor.save_pretrained(folder)
    if "video_processor" in type(processor).__bases__[0].get_attributes() and not hasattr(processor, "video_processor"):
        processor.image_processor.save_pretrained(folder)


def vision_notices(recipe: Recipe) -> list[tuple[str, str]]:
    """For validate, without importing transformers: the keys accepted and ignored, and a missing torchvision."""
    import importlib.util

    notices = [(key, "accepted for Axolotl compatibility and ignored by ftclip") for key in
               ("skip_prepare_dataset", "remove_unused_columns") if getattr(recipe, key) is not None]
    if importlib.util.find_spec("torchvision") is None:
        notices.append(("processor_type", "torchvision is not installed: the processor is built without its video part "
                                          "(images train as usual); a processor whose image side needs torchvision "
                                          "(PixtralProcessor, for Pixtral and Mistral 3, in transformers 5) cannot load "
                                          "— install the torchvision build that matches your torch"))
    return notices


def attach_processor(tokenizer, processor) -> None:
    """The processor rides on its tokenizer (`tokenizer.ftclip_processor`), which the data stage and the saving
    of the adapter receive; both render with the same chat template (the recipe's, else the model's)."""
    processor.chat_template = tokenizer.chat_template
    tokenizer.ftclip_processor = processor


# ---------------------------------------------------------------- models


def vision_auto_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def language_model(model) -> tuple[str, torch.nn.Module]:
    """(its full name, the module) of the model's language model: what get_decoder() returns for an
    image-text-to-text model in transformers 5 (model.language_model, model.text_model, ...)."""
    core = model.get_decoder()
    for name, module in model.named_modules():
        if module is core and name:
            return name, module
    raise ModelError(f"{type(model).__name__}: cannot find its language model (get_decoder() returns the model "
                     "itself); set lora_target_modules")


def language_model_targets(model, note=None) -> str:
    """A peft target regex for every linear layer of the language model (the vision tower, the projector and
    lm_head stay frozen), as Axolotl's vision examples write theirs by hand."""
    import torch

    name, module = language_model(model)
    leaves = sorted({child.rsplit(".", 1)[-1] for child, layer in module.named_modules()
                     if isinstance(layer, torch.nn.Linear)})
    if note:
        note(f"LoRA adapts the language model's linear layers ({', '.join(leaves)} under {name}); the vision tower and "
             "projector stay frozen (set lora_target_modules to choose others)")
    return rf"{re.escape(name)}\..*\.({'|'.join(map(re.escape, leaves))})"


def freeze_mm_modules(model, note=None) -> None:
    """freeze_mm_modules: every parameter outside the language model and lm_head stops training (the vision and
    audio towers, the multimodal projector)."""
    _, module = language_model(model)
    keep = {id(parameter) for parameter in module.parameters()}
    head = model.get_output_embeddings()
    keep |= {id(parameter) for parameter in head.parameters()} if head is not None else set()
    frozen = 0
    for parameter in model.parameters():
        if id(parameter) not in keep and parameter.requires_grad:
            parameter.requires_grad = False
            frozen += parameter.numel()
    if note:
        note(f"freeze_mm_modules: {frozen:,} parameters of the vision tower and projector frozen")
