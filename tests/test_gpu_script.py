"""The GPU run's script (bench/gpu/run.sh, docs/gpu.md) on the CPU: every step runs end to end with tiny shapes
and lands in both reports, a step that runs out of time is recorded and the next one still runs, and the
carried wheels are chosen and slimmed as the device tool's 64 MiB allows. No GPU is needed: this is what keeps
the script from rotting between the times a GPU machine is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench" / "gpu"))

import wheels  # noqa: E402  (bench/gpu/wheels.py)

STEPS = ["versions", "a", "b", "c", "d"]


def run_script(out: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "--cpu-smoke", *arguments],
                          capture_output=True, text=True, env=env, timeout=1500)


@pytest.mark.slow
def test_cpu_smoke_run_reports_every_step(tmp_path):
    done = run_script(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    # What comes back from the device tool: a few files, none deeper than one folder.
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["gpu-log.txt", "gpu-results.json", "gpu-results.md"]

    report = json.loads((tmp_path / "gpu-results.json").read_text())
    assert report["mode"] == "cpu-smoke"
    steps = {step["step"]: step for step in report["steps"]}
    assert list(steps) == STEPS
    for key in STEPS:
        assert steps[key]["status"] == "ok", steps[key]
        assert steps[key]["result"], f"step {key} wrote no results"
    assert steps["a"]["result"]["smoke"]["passed"] >= 1
    clip = steps["b"]["result"]["sets"]["tiny32"]["methods"]
    assert clip["ftclip flat"]["launches"] > 0 and clip["torch foreach"]["ms"] > 0
    assert {"ftclip", "hf"} <= set(steps["c"]["result"]["results"]["packed"])
    qlora = steps["d"]["result"]["results"]
    assert qlora["ftclip"]["micro_batch"] == 2 and qlora["hf"]["micro_batch"] == 2  # the search's largest candidate
    assert qlora["ftclip"]["timed_steps"] >= 1 and 0 < qlora["ftclip"]["clip_share"] < 1

    markdown = (tmp_path / "gpu-results.md").read_text()
    for key in STEPS:
        assert f"\n| {key} | " in markdown  # a row in the summary table
        assert f"\n## {key}. " in markdown  # and a section
    assert "| ftclip flat+folded " in markdown  # b's table
    assert "| packed | ftclip | " in markdown and "| packed | HF Trainer + peft | " in markdown  # c's
    assert "| ftclip | 2 | " in markdown and "| HF Trainer + peft + bitsandbytes | 2 | " in markdown  # d's
    assert "| clip ≤ 1 % of the step time (QLoRA 8B) | " in markdown  # the targets the CPU can measure
    assert "## Targets (issue 25)" in done.stdout  # the summary ends the output the device tool returns


@pytest.mark.slow
def test_a_step_out_of_time_is_recorded_and_the_next_step_still_runs(tmp_path):
    # One second is far too little to import torch: the versions step is killed for real.
    done = run_script(tmp_path, "--only", "versions,b", "--timeout", "versions=1")
    assert done.returncode == 1
    steps = {step["step"]: step for step in json.loads((tmp_path / "gpu-results.json").read_text())["steps"]}
    assert steps["versions"]["status"] == "timeout" and steps["versions"]["timeout_s"] == 1
    assert steps["b"]["status"] == "ok" and steps["b"]["result"]["sets"]["tiny32"]
    markdown = (tmp_path / "gpu-results.md").read_text()
    assert "| versions | what is installed | timeout |" in markdown
    assert "| b | clip bench on CUDA | ok |" in markdown


def test_wheels_are_installed_only_where_the_machine_falls_short():
    carried = {
        "datasets": ("5.2.0", ["pyarrow>=24.0.0", "dill<0.4.2,>=0.3.0", "fsspec<=2026.9.0", "pytest; extra == 'tests'"]),
        "dill": ("0.4.1", []),
        "pyarrow": ("25.0.1", []),
        "pydantic": ("2.14.4", ["pydantic-core==2.50.5"]),
        "pydantic-core": ("2.50.5", []),
    }
    installed = {"pyarrow": "23.0.0", "dill": "0.3.9", "fsspec": "2026.10.0", "pydantic-core": "2.41.0"}
    names, reasons = wheels.choose(carried, installed, ["datasets>=4.0", "pydantic>=2.6"])
    # datasets and pydantic are missing; the machine's pyarrow and pydantic-core are too old for them; its
    # dill satisfies datasets and is kept.
    assert names == ["datasets", "pyarrow", "pydantic", "pydantic-core"]
    assert any(reason.startswith("dill 0.3.9 (the machine's") for reason in reasons)
    assert any("fsspec 2026.10.0 breaks 'fsspec<=2026.9.0' (no wheel carried)" in reason for reason in reasons)
    assert not any("pytest" in reason for reason in reasons)  # an extra's requirement does not count


def make_wheel(folder: Path, libraries: list[str]) -> Path:
    """A minimal real wheel named like bitsandbytes', holding empty native libraries."""
    path = folder / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    info = "bitsandbytes-0.50.2.dist-info"
    files = {"bitsandbytes/__init__.py": "", **{f"bitsandbytes/{name}": "" for name in libraries},
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(name, text)
    return path


def test_slimmed_bitsandbytes_keeps_one_cuda_major_and_still_installs(tmp_path):
    libraries = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda118.so", "libbitsandbytes_cuda128.so",
                 "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_rocm72.so",
                 "libbitsandbytes_xpu2026.so"]
    wheel = make_wheel(tmp_path, libraries)
    wheels.slim_bitsandbytes(wheel, "13")
    kept = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert sorted(name.split("/")[-1] for name in names if name.endswith(".so")) == kept
    assert sorted(line.split(",")[0].split("/")[-1] for line in record.splitlines() if ".so," in line) == kept
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    assert sorted(path.name for path in (target / "bitsandbytes").glob("*.so")) == kept
