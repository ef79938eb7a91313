"""Optimizer and learning-rate schedule, built from the recipe for the trainable parameters.

Imports torch only inside the builders: `validate` asks `optimizer_device_problem` and must stay light."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ftclip.errors import ModelError
from ftclip.recipe import Recipe, schedule_steps

if TYPE_CHECKING:
    import torch

# transformers' scheduler names; "constant" still honours warmup_steps.
_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def build_optimizer(recipe: Recipe, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    import torch

    lr, decay = recipe.learning_rate, recipe.weight_decay
    adam = {"betas": (recipe.adam_beta1, recipe.adam_beta2), "eps": recipe.adam_epsilon}
    if recipe.optimizer == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay, **adam)
    if recipe.optimizer == "adamw_torch_fused":
        # Fused: one kernel per step, and it applies ftclip's clip scale and non-finite skip itself.
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=decay, fused=True, **adam)
    if recipe.optimizer == "sgd":
        # torch has no DTensor rule for the fused SGD kernel (2.13: "Operator aten._fused_sgd_.default does not have
        # a sharding strategy registered"), so FSDP2's sharded parameters take the foreach kernel.
        return torch.optim.SGD(parameters, lr=lr, weight_decay=decay, fused=not _sharded(parameters))
    if recipe.optimizer == "adamw_torch_4bit":  # what Hugging Face's adamw_torch_4bit builds
        try:
            from torchao.optim import AdamW4bit
        except ImportError as error:
            raise ModelError(f"optimizer: adamw_torch_4bit needs torchao (pip install 'ftclip[torchao]'): {error}") from None
        return AdamW4bit(parameters, lr=lr, weight_decay=decay, **adam)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ModelError(f"optimizer: {recipe.optimizer} needs bitsandbytes ({error})") from None
    optimizers = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                  "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return optimizers[recipe.optimizer](parameters, lr=lr, weight_decay=decay, **adam)


def _sharded(parameters: list[torch.nn.Parameter]) -> bool:
    """True for FSDP2's parameters (DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without torch.distributed
        return False
    return any(isinstance(p, DTensor) for p in parameters)


PAGED_NEEDS_CUDA = (
    "{name} pages optimizer state between GPU and CPU memory through CUDA unified memory, so it needs a CUDA "
    "device ({why}); use adamw_8bit (the same 8-bit AdamW, unpaged) or run on a GPU"
)


def optimizer_device_problem(recipe: Recipe, cuda_available: bool, why_no_cuda: str = "this machine has none") -> str | None:
    """Why the recipe's optimizer cannot run on the device it will get, or None. bitsandbytes itself only
    warns and silently drops the paging on the CPU; a recipe asking for paging should hear that it is moot."""
    if not recipe.optimizer.startswith("paged_"):
        return None
    if recipe.device == "cpu":
        return PAGED_NEEDS_CUDA.format(name=recipe.optimizer, why="the recipe sets device: cpu")
    if not cuda_available:
        return PAGED_NEEDS_CUDA.format(name=recipe.optimizer, why=why_no_cuda)
    return None


def why_no_cuda_without_torch() -> str | None:
    """None when `torch.cuda.is_available()` would most likely say True, else the reason it would not, found
    without importing torch (seconds of `validate`'s time, on every commit). Exact for the common cases: a
    CPU-only torch build (read from torch/version.py), GPUs hidden by CUDA_VISIBLE_DEVICES, and a machine
    without an NVIDIA (or ROCm) driver. It cannot see a broken driver; `train` asks torch itself and refuses then."""
    torch = sys.modules.get("torch")
    if torch is not None:  # already paid for: ask it
        return None if torch.cuda.is_available() else "this machine has none"
    build = _torch_build_accelerators()
    if build is not None and not (build["cuda"] or build["hip"]):
        return f"the installed torch {build['__version__']} is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if _gpu_driver_present(nvidia=build is None or bool(build["cuda"]), rocm=build is None or bool(build["hip"])):
        return None
    return "this machine has none"


def _torch_build_accelerators() -> dict[str, str | None] | None:
    """torch/version.py's `__version__`, `cuda` and `hip` (the last two None in a CPU build), read as text;
    None when it can't be read."""
    spec = importlib.util.find_spec("torch")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        tree = ast.parse((Path(spec.submodule_search_locations[0]) / "version.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and target.id in ("__version__", "cuda", "hip"):
                    found[target.id] = node.value.value
    return found if set(found) == {"__version__", "cuda", "hip"} else None


def _gpu_driver_present(nvidia: bool, rocm: bool) -> bool:
    """A GPU the torch build can use: an NVIDIA driver with at least one GPU (Linux /proc and /dev, WSL's
    /dev/dxg, else nvidia-smi on PATH, as on Windows), or for a ROCm build the ROCm device /dev/kfd."""
    if rocm and Path("/dev/kfd").exists():
        return True
    if not nvidia:
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    if any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists():
        return True
    return shutil.which("nvidia-smi") is not None


def build_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer, total_steps: int):
    from transformers import get_scheduler

    name, options = _SCHEDULES[recipe.lr_scheduler], None
    if recipe.lr_scheduler == "cosine" and recipe.min_lr_ratio:
        name, options = "cosine_with_min_lr", {"min_lr_rate": recipe.min_lr_ratio}
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=schedule_steps(recipe, total_steps).warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=options,
    )
