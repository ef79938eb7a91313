"""quantize_moe_experts: the fused MoE expert weights in 4-bit NF4 (bitsandbytes) while LoRA trains.

`load_in_4bit` quantizes nn.Linear layers only (transformers swaps them for bitsandbytes' Linear4bit); the
fused 3-D expert parameters of transformers 5's MoE blocks, most of an MoE model's weights, stay in 16 bits.
bitsandbytes quantizes any parameter through a torch parametrization (`replace_parameter_4bit`: the packed
bytes are stored, the weight is dequantized when the module reads it), which is what this module applies,
as Axolotl's quantize_moe_experts does:

- while `from_pretrained` places each weight (`quantizing_experts_on_load`): every expert weight is quantized
  as soon as it lands on its device, so the 16-bit experts never all exist at once (on a 24 GB card they would
  not fit); weights the loader did not pass through its hook are quantized right after loading;
- peft then wraps the experts with LoRA (`lora_ready`): peft nests its ParamWrappers in the parameters'
  definition order on a plain model but in sorted-name order on a parametrized one, and the adapter's saved
  names follow the nesting. So the quantized weights are hidden behind zero-stride placeholders of their
  dequantized shape while peft wraps, and the adapter has the names it has on an unquantized base: merge,
  chat and plain peft load it there;
- two peft 0.21 details of LoRA on a parametrized parameter are fixed per wrapper (`_fix_wrappers`): the LoRA
  parametrization is removed after each forward (peft removes only its `_LoraParameterProxy` when another
  parametrization sits under it, leaving the `_LoraFactorsProxy` behind), and the weight is dropped from
  torch's parametrization cache once the LoRA parametrization is on (registered while an outer wrapper's
  cache is on, it was cached without the LoRA update, and the expert's forward would read that).

Quantization runs wherever bitsandbytes runs (CUDA; its CPU backend too: the tests run there)."""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.utils.parametrize as parametrize

from ftclip.moe import expert_parameters


@dataclass
class ExpertQuantization:
    """What was quantized: each (module, parameter name), and the definition order of each module's parameters
    before quantization (peft's nesting, hence the adapter's names, depends on it)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    quantized: list[tuple[torch.nn.Module, str]] = field(default_factory=list)
    order: dict[int, list[str]] = field(default_factory=dict)  # id(module) → parameter names, definition order

    def quantize(self, module: torch.nn.Module, name: str) -> None:
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        if parametrize.is_parametrized(module, name):
            return
        self.order.setdefault(id(module), list(module._parameters))
        replace_parameter_4bit(module, name, compress_statistics=self.double_quant, quant_type=self.quant_type)
        self.quantized.append((module, name))

    def quantize_remaining(self, model: torch.nn.Module) -> None:
        """Expert weights the loading hook did not see (another loading path, initialized weights)."""
        for module_name, name in expert_parameters(model):
            self.quantize(model.get_submodule(module_name), name)

    def summary(self) -> tuple[int, int, int, int]:
        """(tensors, values, bytes stored now, bytes in the original dtype)."""
        values = stored = original = 0
        for module, name in self.quantized:
            state = _quant_state(module, name)
            count = state.shape.numel()
            values += count
            original += count * torch.empty((), dtype=state.dtype).element_size()
            stored += _stored_bytes(module, name)
        return len(self.quantized), values, stored, original


def _bnb_parametrization(module: torch.nn.Module, name: str):
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, Bnb4bitParametrization)), None)


def _quant_state(module: torch.nn.Module, name: str):
    return _bnb_parametrization(module, name).quant_state


def _stored_bytes(module: torch.nn.Module, name: str) -> int:
    """The packed 4-bit bytes and the quantization constants (absmax, and with double quantization the
    constants' own constants), as they sit in memory."""
    packed = module.parametrizations[name].original
    state = _quant_state(module, name)
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@contextmanager
def quantizing_experts_on_load(quantization: ExpertQuantization):
    """While transformers' from_pretrained runs: each fused expert weight is quantized right after the loader
    sets it on its module (transformers.core_model_loading.set_param_for_module, the one place every weight
    passes through in transformers 5). Restored afterwards, also on error."""
    import transformers.core_model_loading as loading

    original = getattr(loading, "set_param_for_module", None)
    if original is None:  # another transformers: quantize_remaining does it after loading (higher peak memory)
        yield
        return

    def set_and_quantize(model, target_name, param_value, *args, **kwargs):
        original(model, target_name, param_value, *args, **kwargs)
        module_name, _, name = target_name.rpartition(".")
        if getattr(param_value, "ndim", 0) == 3 and "expert" in module_name.rsplit(".", 1)[-1].lower():
            quantization.quantize(model.get_submodule(module_name), name)

    loading.set_param_for_module = set_and_quantize
    try:
        yield
    finally:
        loading.set_param_for_module = original


@contextmanager
def lora_ready(model: torch.nn.Module, quantization: ExpertQuantization | None):
    """Around peft's get_peft_model / PeftModel.from_pretrained: the quantized expert weights appear to peft as
    plain parameters of their dequantized shape and dtype, in definition order (zero-stride placeholders: no
    memory), so peft wraps them as it would on an unquantized base. Afterwards the 4-bit weights are back and
    each ParamWrapper over one is fixed (see the module docstring)."""
    if quantization is None or not quantization.quantized:
        yield
        return
    hidden = _hide_quantized(quantization)
    try:
        yield
    finally:
        _restore_quantized(hidden)
        _fix_wrappers(model)


def _hide_quantized(quantization: ExpertQuantization) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter, object]]:
    hidden = []
    for module, name in quantization.quantized:
        bnb = _bnb_parametrization(module, name)
        packed = module.parametrizations[name].original
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        state = bnb.quant_state
        placeholder = torch.empty((), dtype=state.dtype, device=packed.device).expand(tuple(state.shape))
        module._parameters[name] = torch.nn.Parameter(placeholder, requires_grad=False)
        hidden.append((module, name, packed, bnb))
    for module in {id(module): module for module, _ in quantization.quantized}.values():
        order = quantization.order.get(id(module), [])
        # Re-registration appended the names at the end: back to definition order, as peft reads it.
        ranked = sorted(module._parameters, key=lambda key: order.index(key) if key in order else len(order))
        module._parameters = {key: module._parameters[key] for key in ranked}
    return hidden


def _restore_quantized(hidden) -> None:
    for module, name, packed, bnb in hidden:
        module._parameters[name] = packed  # same slot: the definition order stays
        parametrize.register_parametrization(module, name, bnb, unsafe=True)


def _fix_wrappers(model: torch.nn.Module) -> None:
    from peft.tuners.lora import ParamWrapper

    for module in model.modules():
        if isinstance(module, ParamWrapper) and _bnb_parametrization(module.get_base_layer(), module.parameter_name):
            module._activate_lora = _activation_without_stale_cache(module, module._activate_lora)
            module._remove_parametrizations = types.MethodType(_remove_lora_parametrization, module)


def _activation_without_stale_cache(wrapper, activate):
    """peft's activation of the LoRA parametrization, then the weight dropped from torch's parametrization
    cache: an inner wrapper registers its LoRA while the outer one's cache is on, and torch's registration
    reads (and caches) the weight through the 4-bit parametrization alone; the expert's forward would get
    that cached weight, without the LoRA update."""
    key = (id(wrapper.get_base_layer()), wrapper.parameter_name)

    @contextmanager
    def activate_fresh(adapters):
        with activate(adapters):
            parametrize._cache.pop(key, None)
            yield

    return activate_fresh


def _remove_lora_parametrization(wrapper) -> None:
    """Remove this wrapper's LoRA parametrization (the last one peft added), leaving the 4-bit one under it."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    chain = wrapper.get_base_layer().parametrizations[wrapper.parameter_name]
    for index in reversed(range(len(chain))):
        if not isinstance(chain[index], Bnb4bitParametrization):
            del chain[index]
            return


def count_4bit_values(model: torch.nn.Module) -> tuple[int, int]:
    """(values stored in 4 bits, all parameter values): bitsandbytes' Linear4bit weights and the 4-bit expert
    weights, against every parameter of the model (4-bit ones counted at their dequantized size)."""
    four_bit = total = 0
    seen = set()
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if type(parameter).__name__ == "Params4bit":
                count = parameter.quant_state.shape.numel() if parameter.quant_state is not None else parameter.numel() * 2
                four_bit += count
                total += count
            else:
                total += parameter.numel()
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                parametrization = _bnb_parametrization(module, name)
                if parametrization is not None:
                    count = parametrization.quant_state.shape.numel()
                    four_bit += count
                    total += count - module.parametrizations[name].original.numel()  # the packed bytes counted above
    return four_bit, total
