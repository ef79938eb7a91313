"""qat: quantization-aware training through torchao (Axolotl's `qat:` block).

The decoder's linear layers are swapped for torchao's fake-quantized ones when the model loads
(`QATConfig(base_config, step="prepare")`): their forward rounds the weights (and, with activation_dtype, the
activations) to the quantized type and back, so the weights learn to survive the rounding, while the
full-precision weights train. `fake_quant_after_n_steps` trains that many optimizer steps without the rounding
first (`FakeQuantSchedule`, called by the loop before each step; resume-safe: it depends on the step only).
lm_head stays out, as transformers' TorchAoConfig leaves it out by default, and so does a layer whose input
width is not a multiple of group_size (said at load); quantize_embedding adds the input embedding.

At the end the run saves `model/` as every full fine-tune does: the trained full-precision weights, which plain
transformers loads (fake quantization is a training-time module, not stored). Then `quantized/`: `model/`
reloaded and quantized with the same torchao config over the same layers (the post-training step the
fake quantization simulated), saved with transformers' TorchAoConfig, so `from_pretrained` (with torchao
installed) gives the quantized model. `ftclip chat RUN_DIR/quantized` talks to it; `ftclip merge` has nothing to
merge (no adapter).

The base configs are Axolotl's (axolotl/utils/quantization.py) for the same dtype pairs."""

from __future__ import annotations

from pathlib import Path

import torch

from ftclip.errors import ModelError
from ftclip.recipe import QATSettings

QUANTIZED_DIR = "quantized"


def base_config(settings: QATSettings):
    """torchao's post-training config for the weight/activation dtypes: what the fake quantization simulates
    and what the saved model is quantized with."""
    weight, activation, group = settings.weight_dtype, settings.activation_dtype, settings.group_size
    if weight == "int4" and activation is None:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group or 128)
    if weight == "int4" and activation == "int8":
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerGroup

        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group or 32))
    if weight == "float8_e4m3fn" and activation == "float8_e4m3fn":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return Float8DynamicActivationFloat8WeightConfig()
    if weight == "int4" and activation == "float8_e4m3fn":
        from torchao.quantization import Float8DynamicActivationInt4WeightConfig

        return Float8DynamicActivationInt4WeightConfig()
    if weight == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig()
    if weight == "mxfp4":
        from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig

        return MXDynamicActivationMXWeightConfig(activation_dtype=torch.float4_e2m1fn_x2,
                                                 weight_dtype=torch.float4_e2m1fn_x2, block_size=group or 32)
    raise ModelError(f"qat: weight_dtype {weight} with activation_dtype {activation}: torchao has no QAT scheme for "
                     "that pair (int4 with int8, float8 or none; float8 with float8; nvfp4; mxfp4)")


def _layer_filter(model: torch.nn.Module, settings: QATSettings, skipped: list[str]):
    """torchao's filter_fn for the linear layers QAT covers: not lm_head, and widths that split into groups."""
    output = model.get_output_embeddings()
    group = settings.group_size if settings.weight_dtype in ("int4", "int8") else None

    def covered(module: torch.nn.Module, name: str) -> bool:
        if not isinstance(module, torch.nn.Linear) or module is output:
            return False
        if group and module.in_features % group:
            skipped.append(name)
            return False
        return True

    return covered


def _embedding_config(settings: QATSettings):
    """quantize_embedding: the input embedding's weight-only scheme (torchao fake-quantizes no embedding
    activations), as Axolotl builds it: int4 weights only (validate refuses the rest)."""
    return base_config(QATSettings(weight_dtype=settings.weight_dtype, group_size=settings.group_size))


def _apply(model: torch.nn.Module, settings: QATSettings, step: str | None, skipped: list[str]) -> None:
    """quantize_ over the covered layers: QAT's prepare step (step="prepare"), or the real quantization (None)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    def wrap(config):
        return QATConfig(config, step=step) if step else config

    linear = _fp4_fake_quantization(settings) if step == "prepare" else None
    quantize_(model, linear or wrap(base_config(settings)), filter_fn=_layer_filter(model, settings, skipped))
    if settings.quantize_embedding:
        embedding = model.get_input_embeddings()
        quantize_(model, wrap(_embedding_config(settings)), filter_fn=lambda module, name: module is embedding)


def _fp4_fake_quantization(settings: QATSettings):
    """nvfp4/mxfp4: torchao derives no fake quantization from their inference configs; its prototype fake
    quantizers are named directly (as Axolotl does). Both run on recent NVIDIA GPUs only."""
    from torchao.quantization.qat import QATConfig

    if settings.weight_dtype == "nvfp4":
        from torchao.prototype.qat import NVFP4FakeQuantizeConfig

        activation = NVFP4FakeQuantizeConfig() if settings.activation_dtype == "nvfp4" else None
        return QATConfig(activation_config=activation, weight_config=NVFP4FakeQuantizeConfig(), step="prepare")
    if settings.weight_dtype == "mxfp4":
        from torchao.prototype.qat import MXFakeQuantizeConfig

        fake = MXFakeQuantizeConfig(dtype=torch.float4_e2m1fn_x2, block_size=settings.group_size or 32)
        activation = fake if settings.activation_dtype == "mxfp4" else None
        return QATConfig(activation_config=activation, weight_config=fake, step="prepare")
    return None


def prepare(model: torch.nn.Module, settings: QATSettings, note=None) -> None:
    """Swap the covered layers for torchao's fake-quantized ones (in place)."""
    skipped: list[str] = []
    try:
        _apply(model, settings, "prepare", skipped)
    except (ValueError, NotImplementedError, RuntimeError, AssertionError) as error:
        raise ModelError(f"qat: torchao cannot fake-quantize this model: {error}") from None
    count = sum(1 for module in model.modules() if type(module).__name__.startswith("FakeQuantized"))
    if note:
        activation = f", activations {settings.activation_dtype}" if settings.activation_dtype else ""
        start = (f"; from optimizer step {settings.fake_quant_after_n_steps + 1}" if settings.fake_quant_after_n_steps
                 else "")
        note(f"qat: {count} layers fake-quantized to weights {settings.weight_dtype}{activation} (torchao){start}")
        if skipped:
            note(f"warning: qat: {len(skipped)} linear layers stay in full precision: their input width is not a "
                 f"multiple of group_size {settings.group_size} (e.g. {skipped[0]})")


class FakeQuantSchedule:
    """fake_quant_after_n_steps: the rounding is off for the first N optimizer steps, on from step N+1."""

    def __init__(self, model: torch.nn.Module, settings: QATSettings):
        self.model, self.after = model, settings.fake_quant_after_n_steps or 0
        self.enabled: bool | None = None

    def before_step(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs its forwards."""
        enabled = step > self.after
        if enabled == self.enabled:
            return
        for module in self.model.modules():
            for name in ("weight_fake_quantizer", "activation_fake_quantizer"):
                quantizer = getattr(module, name, None)
                if quantizer is not None and hasattr(quantizer, "enabled"):
                    quantizer.enabled = enabled
        self.enabled = enabled


def save_quantized(model_dir: Path, settings: QATSettings, destination: Path) -> Path:
    """`model_dir` (the run's full-precision model) quantized with the scheme the training simulated, over the
    same layers, saved to `destination` with transformers' TorchAoConfig (from_pretrained restores it)."""
    from transformers import AutoModelForCausalLM, TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    from ftclip.checkpoint import atomic_directory

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    _apply(model, settings, None, [])
    config = base_config(settings)
    ao_config = TorchAoConfig(quant_type=config, include_input_output_embeddings=settings.quantize_embedding)
    model.config.quantization_config = ao_config
    model.hf_quantizer = TorchAoHfQuantizer(ao_config)  # save_pretrained then writes torchao's tensors
    with atomic_directory(destination) as staging:
        model.save_pretrained(staging)
        for path in model_dir.iterdir():  # tokenizer files and the recipe, as model/ has them
            weights = ".safetensors" in path.name or path.suffix == ".bin"
            if path.is_file() and not weights and path.name not in ("config.json", "generation_config.json"):
                (staging / path.name).write_bytes(path.read_bytes())
    return destination
