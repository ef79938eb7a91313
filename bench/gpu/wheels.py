"""The Python packages a lent GPU machine lacks, carried to it as wheels (the machine reaches no network).

    python bench/gpu/wheels.py download .whl [--bnb-cuda-major 13|all]   # here: `make gpu-wheels`
    python bench/gpu/wheels.py install .whl /tmp/site                     # there: bench/gpu/run.sh does it

What the H200 image has and lacks is listed in the device tool's KINDS.md: it has torch 2.11 (CUDA 13),
transformers 5.x, peft, accelerate, triton, pyarrow, pandas, xxhash, fsspec, huggingface-hub, typer, rich,
pyyaml, safetensors, tokenizers; it lacks bitsandbytes, datasets (and datasets' dill and multiprocess),
liger-kernel, and pydantic (ftclip's recipe model; with pydantic-core, annotated-types, typing-inspection).
Those are downloaded as CPython 3.12 manylinux x86_64 wheels, one version each: the version the running
Python has installed (what the test suite here ran with), else the pin below. A few small ones travel as
fallbacks, installed only if the machine's own version does not do: peft (ftclip's LoRA setup passes
ensure_weight_tying, new in peft 0.18; the image's peft version is not recorded), fsspec (datasets pins it
from above) and typing-extensions (pydantic's floor).

Size: the working tree and the carried wheels travel together, at most 64 MiB. bitsandbytes' wheel is 43 MB,
almost all of it native libraries for CUDA 11.8-12.8, ROCm and XPU that a CUDA 13 torch never loads
(bitsandbytes picks libbitsandbytes_cuda<torch's CUDA version>.so, else another of the same major). The
download keeps the CPU library and those of one CUDA major (13, the H200's torch) and rewrites the wheel
without the rest (its RECORD too): about 4 MB. `--bnb-cuda-major all` keeps the wheel as published.
pyarrow (50 MB) is not carried: the machine has one, and the whole budget could not hold it.

install: a carried wheel is installed (pip --no-index --no-deps --target) when the machine lacks that package
or has a version that a carried package or ftclip itself (pyproject.toml) does not accept; otherwise the
machine's own build is kept. torch is never carried, so it is never reinstalled.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The pins used when the running Python does not have the package (liger-kernel is an optional extra).
PINS = {
    "bitsandbytes": "0.50.2", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19",
    "pydantic": "2.14.4", "pydantic-core": "2.50.5", "annotated-types": "0.8.0", "typing-inspection": "0.4.5",
    "liger-kernel": "0.8.5", "peft": "0.21.2", "fsspec": "2026.9.0", "typing-extensions": "4.16.0",
}
# What ftclip's code needs beyond the floors pyproject.toml states (checked on the machine with those).
NEEDS = ["peft>=0.18"]  # LoraConfig(ensure_weight_tying=...) in ftclip/modeling.py
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
LIMIT_MIB = 64  # the device tool's limit on the working tree plus carried paths
MiB = 2**20


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_and_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


# ---------------------------------------------------------------- download (here)


def chosen_versions() -> dict[str, str]:
    versions = {}
    for name, pin in PINS.items():
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = pin
    return versions


def slim_bitsandbytes(wheel: Path, cuda_major: str) -> None:
    """Rewrite the wheel without the native libraries a torch built for CUDA `cuda_major` never loads."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda_major}\d)\.so$")
    dropped = re.compile(r"libbitsandbytes_\w+\.so$")
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if dropped.search(item.filename) and not keep.search(item.filename):
                continue
            data = source.read(item.filename)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines
                               if not (dropped.search(line.split(",")[0]) and not keep.search(line.split(",")[0]))).encode()
            target.writestr(item, data)
    slim.replace(wheel)


def tree_bytes() -> int:
    """The working tree that travels with a device call: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def download(folder: Path, bnb_cuda_major: str) -> None:
    folder.mkdir(exist_ok=True)
    versions = chosen_versions()
    wanted = {normalize(name) for name in versions}
    for old in folder.glob("*.whl"):  # one version of each: two would stop the whole install there
        if wheel_name_and_version(old)[0] in wanted:
            old.unlink()
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder),
                    *[f"{name}=={version}" for name, version in versions.items()]], check=True)
    if bnb_cuda_major != "all":
        for wheel in folder.glob("bitsandbytes-*.whl"):
            published = wheel.stat().st_size
            slim_bitsandbytes(wheel, bnb_cuda_major)
            print(f"bitsandbytes: kept the CPU and CUDA {bnb_cuda_major}.x libraries: "
                  f"{published / MiB:.1f} MiB -> {wheel.stat().st_size / MiB:.1f} MiB")
    wheels = sorted(folder.glob("*.whl"))
    print("\n| wheel | MiB |\n|---|---:|")
    for wheel in wheels:
        print(f"| {wheel.name} | {wheel.stat().st_size / MiB:.2f} |")
    carried = sum(wheel.stat().st_size for wheel in wheels)
    tree = tree_bytes()
    total = carried + tree
    print(f"| **wheels** | **{carried / MiB:.2f}** |\n| working tree (tracked + untracked, not ignored) | {tree / MiB:.2f} |")
    print(f"| **travels with `carry: [\".whl\"]`** | **{total / MiB:.2f}** of {LIMIT_MIB} |")
    if total > LIMIT_MIB * MiB:
        sys.exit(f"over the device tool's {LIMIT_MIB} MiB: drop a wheel from {folder} (liger-kernel first) before the call")


# ---------------------------------------------------------------- install (on the device machine)


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode(errors="replace").splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def ftclip_requirements() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def choose(carried: dict[str, tuple[str, list[str]]], installed: dict[str, str], required: list[str]
           ) -> tuple[list[str], list[str]]:
    """Which carried wheels to install, and why each choice was made.

    carried: name -> (version, its Requires-Dist); installed: the machine's name -> version; required:
    requirement strings that must hold (ftclip's). A carried package is installed when the machine lacks it, or
    when the machine's version breaks a requirement of ftclip or of a package being installed; that repeats
    until nothing changes (a package installed for one reason brings its own requirements)."""
    try:
        from packaging.markers import default_environment
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import InvalidRequirement, Requirement

    environment = {**default_environment(), "extra": ""}
    chosen: dict[str, str] = {}
    warnings: dict[str, str] = {}
    for name in carried:
        if name not in installed:
            chosen[name] = f"{name} {carried[name][0]}: the machine has none"
    changed = True
    while changed:
        changed = False
        for text in required + [req for name in chosen for req in carried[name][1]]:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = normalize(requirement.name)
            if name in chosen:
                continue
            if name not in installed:
                warnings[name] = f"warning: {text!r} is needed, and neither the machine nor the carried wheels have {name}"
            elif not requirement.specifier.contains(installed[name], prereleases=True):
                if name in carried:
                    chosen[name] = f"{name} {carried[name][0]}: the machine's {installed[name]} breaks {text!r}"
                    changed = True
                else:
                    warnings[name] = f"warning: the machine's {name} {installed[name]} breaks {text!r} (no wheel carried)"
    kept = [f"{name} {installed[name]} (the machine's; carried {version} not needed)"
            for name, (version, _) in carried.items() if name not in chosen]
    return sorted(chosen), [chosen[name] for name in sorted(chosen)] + kept + sorted(warnings.values())


def install(folder: Path, target: Path) -> None:
    wheels = {wheel_name_and_version(path)[0]: path for path in sorted(folder.glob("*.whl"))}
    carried = {name: (wheel_name_and_version(path)[1], wheel_requirements(path)) for name, path in wheels.items()}
    installed = {normalize(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
                 if dist.metadata["Name"]}
    names, reasons = choose(carried, installed, ftclip_requirements() + NEEDS)
    for reason in reasons:
        print(f"  wheels: {reason}")
    if not names:
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--root-user-action=ignore",
                    "--target", str(target),
                    *[str(wheels[name]) for name in names]], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="fetch the wheels (here, with a network)")
    get.add_argument("folder", type=Path)
    get.add_argument("--bnb-cuda-major", default="13", help="keep bitsandbytes' libraries for this CUDA major, or 'all'")
    put = commands.add_parser("install", help="install what the machine lacks into a target folder (there)")
    put.add_argument("folder", type=Path)
    put.add_argument("target", type=Path)
    args = parser.parse_args()
    if args.command == "download":
        download(args.folder, args.bnb_cuda_major)
    else:
        install(args.folder, args.target)


if __name__ == "__main__":
    main()
