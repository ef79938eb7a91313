"""What the GPU run ran on: the Python packages it imported (and from where: the machine or the carried
wheels), torch's CUDA build and the card. `python bench/gpu/versions.py [--json FILE]`."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# (distribution, module): imported, so a package that is there but broken shows its error.
PACKAGES = [("torch", "torch"), ("transformers", "transformers"), ("peft", "peft"), ("accelerate", "accelerate"),
            ("bitsandbytes", "bitsandbytes"), ("datasets", "datasets"), ("pyarrow", "pyarrow"),
            ("liger-kernel", "liger_kernel"), ("triton", "triton"), ("flash-attn", "flash_attn"),
            ("pydantic", "pydantic"), ("tokenizers", "tokenizers"), ("safetensors", "safetensors"),
            ("numpy", "numpy"), ("pytest", "pytest")]


def package(distribution: str, module: str) -> dict:
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # any import failure is what the report must show
        missing = isinstance(error, ModuleNotFoundError) and error.name == module
        return {"version": None, "error": "not installed" if missing else f"{type(error).__name__}: {error}"[:300]}
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = getattr(imported, "__version__", "?")
    location = str(Path(getattr(imported, "__file__", "") or "").parent)
    carried = os.environ.get("FTCLIP_GPU_SITE")
    return {"version": version, "from": "carried wheel" if carried and location.startswith(carried) else location}


def torch_facts() -> dict:
    import torch

    facts = {"torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        facts.update(card=properties.name, capability=f"{properties.major}.{properties.minor}",
                     memory_gib=round(properties.total_memory / 2**30, 1), multiprocessors=properties.multi_processor_count,
                     cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            facts["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            facts["driver"] = None
    return facts


def commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def collect() -> dict:
    facts = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
             "cpus": os.cpu_count(), "commit": commit()}
    facts["packages"] = {name: package(name, module) for name, module in PACKAGES}
    try:
        facts.update(torch_facts())
    except Exception as error:
        facts["torch_error"] = f"{type(error).__name__}: {error}"
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    facts = collect()
    for name, info in facts["packages"].items():
        print(f"{name:14} {info['version'] or '-':14} {info.get('from') or info.get('error')}")
    print({key: value for key, value in facts.items() if key != "packages"})
    if args.json:
        args.json.write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
