"""Mixture-of-experts models: which parameters are the fused experts, which modules route, and what LoRA
targets mean on such a model.

transformers 5 stores each MoE layer's experts as fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`: [experts, out, in], or [experts, in, out] for gpt-oss), not as nn.Linear modules. LoRA
reaches them through peft's `target_parameters` (a ParamWrapper per parameter); attention, shared experts and
dense MLP layers stay ordinary linear targets.

`all-linear` on an MoE model is resolved here, not by peft: peft's own resolution differs by architecture
(Qwen3-MoE and Mixtral get the experts *and* the router through its transformers-v4 name conversion, gpt-oss
gets neither), so ftclip names the targets itself: every linear layer but lm_head and the routers, plus every
fused expert parameter. The router stays frozen: it decides which experts a token reaches, and a low-rank
update of a [experts × hidden] matrix is not what LoRA on "all linear layers" means. Name it in
lora_target_modules / lora_target_parameters to train it anyway.

The router's auxiliary (load-balancing) loss is the model's own (`output_router_logits`,
`router_aux_loss_coef` on its config, set through overrides_of_model_config); ftclip.loss adds it."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Config fields that give an MoE model's expert count (transformers' names across architectures).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Linear modules of an MoE block that route tokens rather than transform them.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
_LAYER_INDEX = re.compile(r"\.\d+\.")


def is_moe_config(config) -> bool:
    """True when a transformers config (or a config.json dict) describes an MoE model."""
    get = config.get if isinstance(config, dict) else lambda name, default=None: getattr(config, name, default)
    text = get("text_config")  # multimodal wrappers keep the language model's settings here
    if text is not None and is_moe_config(text):
        return True
    return any(isinstance(get(key), int) and get(key) > 1 for key in EXPERT_COUNT_KEYS)


def expert_parameters(model) -> list[tuple[str, str]]:
    """(module name, parameter name) of every fused expert weight: a 3-D parameter of a module whose name
    says expert (Axolotl's rule too). 2-D expert biases (gpt-oss) are not weights LoRA adapts."""
    found = []
    for module_name, module in model.named_modules():
        if "expert" not in module_name.rsplit(".", 1)[-1].lower():
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 3:
                found.append((module_name, name))
    return found


def parameter_suffix(module_name: str, name: str) -> str:
    """The name a target_parameters entry uses: the path after the layer index ("mlp.experts.gate_up_proj"), the
    same for every layer (peft matches it as a suffix)."""
    full = f"{module_name}.{name}"
    parts = _LAYER_INDEX.split(full, maxsplit=1)
    return parts[1] if len(parts) == 2 else full


def _router_names(model) -> set[str]:
    """Full names of the linear routers: the MoE block's own gate/router, beside its `experts`."""
    routers = set()
    for module_name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" not in children:
            continue
        for child in ROUTER_NAMES:
            if child in children:
                routers.add(f"{module_name}.{child}" if module_name else child)
    return routers


def linear_module_names(model, exclude_routers: bool = True) -> list[str]:
    """Leaf names of the linear layers LoRA adapts under all-linear: every nn.Linear (bitsandbytes' 4/8-bit
    ones are nn.Linear too) except the output embedding and, on MoE models, the routers."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    routers = _router_names(model) if exclude_routers else set()
    leaves, router_leaves = set(), set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        (router_leaves if name in routers else leaves).add(name.rsplit(".", 1)[-1])
    clash = router_leaves & leaves
    if clash:  # a router shares its leaf name with a real linear layer: name the layers in full
        return sorted(name for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and module is not output and name not in routers)
    return sorted(leaves)


@dataclass
class LoraTargets:
    """peft's target_modules and target_parameters, and the linear layer names meant (for the check that peft
    adapted them all: unadapted_linear_layers)."""

    modules: list[str] | str
    parameters: list[str]
    meant_modules: list[str] | str


def lora_targets(model, target_modules: list[str] | str, target_parameters: list[str] | str | None) -> LoraTargets:
    """The LoRA targets for peft's LoraConfig. On an MoE model, all-linear becomes the linear layers (attention,
    shared experts, dense MLPs; not lm_head, not the routers) and every fused expert weight; on a dense model it
    stays peft's all-linear. Parameters the recipe names are kept, after ftclip's own."""
    given = [target_parameters] if isinstance(target_parameters, str) else list(target_parameters or [])
    experts = expert_parameters(model)
    if target_modules != "all-linear" or not experts:
        return LoraTargets(target_modules, given, target_modules)
    suffixes = list(dict.fromkeys(parameter_suffix(module, name) for module, name in experts))
    linear = linear_module_names(model)
    return LoraTargets(_names_peft_keeps(model, linear), list(dict.fromkeys(suffixes + given)), linear)


def _names_peft_keeps(model, names: list[str]) -> list[str]:
    """The names peft leaves in target_modules. On some architectures (see unadapted_linear_layers) peft moves
    gate_proj/up_proj/down_proj/gate to the experts' target_parameters, doubling the rank of the fused
    gate_up_proj; ftclip names the experts itself, so those names are left out (their layers cannot be reached
    by name there)."""
    try:
        from peft import LoraConfig
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # another peft: its own rules apply
        return names
    probe = LoraConfig(target_modules=list(names))
    convert_peft_config_for_transformers(probe, model=model, conversions=None)
    kept = set(probe.target_modules or ())
    return [name for name in names if name in kept]


def describe_targets(model) -> str:
    """One line for the log: what LoRA adapts on this model (after get_peft_model)."""
    from peft.tuners.lora import ParamWrapper

    wrappers = [module for module in model.modules() if isinstance(module, ParamWrapper)]
    names = sorted({module.parameter_name for module in wrappers})
    values = sum(parameter.numel() for module in wrappers
                 for parameter in [*module.lora_A.parameters(), *module.lora_B.parameters()])
    return (f"moe: LoRA on {len(wrappers)} fused expert weights ({', '.join(names)}; {values:,} trainable values "
            "through peft's target_parameters); the routers stay frozen")


def unadapted_linear_layers(model, target_modules: list[str] | str) -> list[str]:
    """Linear layers a list of target_modules names that got no LoRA (after get_peft_model). peft 0.21 reads
    gate_proj, up_proj, down_proj and gate in the target_modules of some MoE architectures (qwen3_moe, glm4_moe,
    deepseek_v3, qwen3_next, olmoe, ...) as those experts' transformers-4 module names and moves them to
    target_parameters, so shared experts and dense MLP layers of those names are left out."""
    import torch
    from peft.tuners.lora import LoraLayer

    if isinstance(target_modules, str):
        return []
    wanted = set(target_modules)
    base = model.get_base_model()
    missed = []
    for name, module in base.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and not isinstance(module, LoraLayer) and leaf in wanted:
            parent = base.get_submodule(name.rsplit(".", 1)[0]) if "." in name else base
            if not isinstance(parent, LoraLayer):  # a LoRA layer's own base_layer
                missed.append(name)
    return missed
