"""The GPU run's steps, each in its own process, timed, within one budget; results as markdown and JSON.

Called by bench/gpu/run.sh (which installs the carried wheels first); see docs/gpu.md.

    python bench/gpu/run.py --out DIR [--cpu-smoke] [--budget 460] [--only a,d]

Steps, in this order (the issue's a-d, after a look at what is installed):
  versions  packages and where each was imported from, torch's CUDA, the card
  a         pytest: the gpu-marked tests, and the clip, loss, padding-free, training/QLoRA and optimizer tests
  b         bench/clip_bench.py on the 8B-LoRA and full-125M gradient sets (CUDA events, kernels, host syncs)
  c         bench/step_bench.py in bf16: 128k vocabulary, sequence 2048, padded and packed
  d         bench/gpu/qlora_8b.py: QLoRA of a Llama-3.1-8B-shaped model, micro-batch as large as fits 24 GB

Budget: each step has a share of the budget; a step's timeout is what is left of the budget less the shares of
the steps after it, so time a step leaves unused goes to the next, and a step that hangs takes only its own and
the unused time (it is killed, its process group with it). A failure or timeout is recorded with the end of
the step's output, and the next step runs. After every step DIR/gpu-results.md and DIR/gpu-results.json are
rewritten (a run cut short keeps what it measured); DIR/gpu-log.txt holds each step's output (its last 64 KB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
LOG_KEEP = 64 * 1024  # bytes of each step's output kept in gpu-log.txt
TAIL = 3000  # characters of a failed step's output kept in the results


@dataclass
class Step:
    key: str
    title: str
    share: float  # seconds of the budget, GPU run
    smoke_share: float  # seconds of the budget, CPU smoke run

    def command(self, smoke: bool, result_file: Path, timeout: float) -> list[str]:
        json_out = ["--json", str(result_file)]
        if self.key == "versions":
            return [PYTHON, "bench/gpu/versions.py", *json_out]
        if self.key == "a":
            return [PYTHON, "bench/gpu/pytest_step.py", *json_out, *(["--smoke"] if smoke else [])]
        if self.key == "b":
            sizes = ["--device", "cpu", "--sets", "tiny32", "--reps", "3"] if smoke else [
                "--device", "cuda", "--sets", "lora8b,full125m", "--reps", "51"]
            return [PYTHON, "bench/clip_bench.py", *sizes, "--profile", *json_out]
        if self.key == "c":
            sizes = ["--device", "cpu", "--sequence-len", "512", "--micro-batch", "2", "--steps", "3", "--vocab", "2048",
                     "--records", "40", "--modes", "packed"] if smoke else [
                "--device", "cuda", "--sequence-len", "2048", "--micro-batch", "4", "--steps", "20"]
            return [PYTHON, "bench/step_bench.py", *sizes, *json_out]
        if self.key == "d":
            sizes = ["--device", "cpu", "--shape", "tiny", "--sequence-len", "512", "--steps", "4", "--candidates", "1,2",
                     "--records", "40"] if smoke else ["--device", "cuda", "--shape", "8b", "--steps", "20"]
            # The step's own budget, less a margin for writing its results after both sides.
            return [PYTHON, "bench/gpu/qlora_8b.py", *sizes, "--budget-s", f"{max(timeout - 10, 30):.0f}", *json_out]
        raise ValueError(self.key)


# Shares of the budget in seconds: (GPU run, CPU smoke run). The smoke run needs 60-110 s of CPU time (every
# step imports torch, transformers and peft, and peft imports bitsandbytes, which imports torch's compiler); its
# budget is wide because the machines that run the test suite are often shared: there it only stops a hang.
STEPS = [
    Step("versions", "what is installed", 30, 60),
    Step("a", "tests with CUDA visible", 80, 90),
    Step("b", "clip bench on CUDA", 60, 60),
    Step("c", "step bench on CUDA, bf16, 128k vocabulary, sequence 2048", 110, 180),
    Step("d", "QLoRA of a Llama-3.1-8B-shaped model, NF4, LoRA r16, packed 2048", 180, 210),
]


# ---------------------------------------------------------------- running a step


def run_step(step: Step, smoke: bool, timeout: float, work: Path, log) -> dict:
    result_file = work / f"{step.key}.json"
    command = step.command(smoke, result_file, timeout)
    print(f"\n=== {step.key}: {step.title} (timeout {timeout:.0f} s)\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    # A session of its own, so a timeout kills the step's whole process tree (pytest's and the benches' workers).
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    output = bytearray()

    def pump():  # echo the step's output live (the device tool returns the end of it) and keep it
        for line in iter(process.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            output.extend(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        exit_code = process.wait(timeout=timeout)
        status = "ok" if exit_code == 0 else "failed"
    except subprocess.TimeoutExpired:
        exit_code, status = None, "timeout"
    try:  # the step's process group: everything it left running (all of it, on a timeout) holds the GPU
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    exit_code = process.wait() if exit_code is None else exit_code
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    text = output.decode(errors="replace")
    log.write(f"\n===== {step.key}: {step.title}: {status} in {seconds:.1f} s\n$ {' '.join(command)}\n")
    log.write(text if len(text) <= LOG_KEEP else f"[... {len(text) - LOG_KEEP} characters left out ...]\n" + text[-LOG_KEEP:])
    log.flush()
    record = {"step": step.key, "title": step.title, "status": status, "seconds": round(seconds, 1),
              "timeout_s": round(timeout), "exit_code": exit_code, "command": " ".join(command[1:])}
    if status != "ok":
        record["output_tail"] = text[-TAIL:]
    if result_file.exists():
        try:
            record["result"] = json.loads(result_file.read_text())
        except json.JSONDecodeError as error:
            record["result_error"] = str(error)
    return record


# ---------------------------------------------------------------- the report


def headline(record: dict) -> str:
    result = record.get("result")
    if not result:
        return ""
    key = record["step"]
    if key == "versions":
        packages = result.get("packages", {})
        card = result.get("card") or "no CUDA device"
        return (f"{card}; torch {packages.get('torch', {}).get('version')} (CUDA {result.get('torch_cuda')}), "
                f"transformers {packages.get('transformers', {}).get('version')}, "
                f"bitsandbytes {packages.get('bitsandbytes', {}).get('version')}")
    if key == "a":
        return "; ".join(f"{name}: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
                         for name, r in result.items())
    if key == "b":
        parts = []
        for name, data in result.get("sets", {}).items():
            methods = data["methods"]
            folded = methods["ftclip flat+folded"]
            parts.append(f"{name}: ftclip flat+folded {folded['x_torch'] or 0:.2f}× torch, {folded['x_floor']:.2f}× floor")
        return "; ".join(parts)
    if key == "c":
        parts = []
        for mode, pair in result.get("results", {}).items():
            ours, theirs = pair.get("ftclip", {}), pair.get("hf", {})
            if "tokens_per_s" in ours and "tokens_per_s" in theirs:
                parts.append(f"{mode}: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× tokens/s")
        return "; ".join(parts)
    if key == "d":
        ours, theirs = result["results"].get("ftclip", {}), result["results"].get("hf", {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            return (f"micro-batch {ours['micro_batch']}: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× tokens/s, "
                    f"clip {ours['clip_share']:.3%} of the step")
    return ""


def targets(records: dict) -> list[str]:
    """The issue's targets against this run's numbers (measured side by side in the same run)."""
    rows = ["| target | measured | met |", "|---|---|---|"]

    def add(target: str, measured: str, met: bool | None):
        rows.append(f"| {target} | {measured} | {'yes' if met else 'no' if met is not None else 'n/a'} |")

    d = (records.get("d") or {}).get("result", {}).get("results", {})
    ours, theirs = d.get("ftclip", {}), d.get("hf", {})
    if "peak_cuda_mb" in ours and "peak_cuda_mb" in theirs:
        ratio = ours["peak_cuda_mb"] / theirs["peak_cuda_mb"]
        add("QLoRA 8B: peak memory ≤ 0.6× HF", f"{ratio:.2f}× ({ours['peak_cuda_mb'] / 1024:.1f} vs "
            f"{theirs['peak_cuda_mb'] / 1024:.1f} GiB allocated, micro-batch {ours['micro_batch']})", ratio <= 0.6)
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        add("QLoRA 8B: tokens/s ≥ 1.5× HF", f"{speed:.2f}× ({ours['tokens_per_s']:,.0f} vs {theirs['tokens_per_s']:,.0f})",
            speed >= 1.5)
    if "peak_cuda_reserved_mb" in ours:
        cap = (records.get("d") or {}).get("result", {}).get("cap_gib", 23)
        reserved = ours["peak_cuda_reserved_mb"] / 1024
        add("QLoRA 8B: fits 24 GB at sequence 2048, packed", f"{reserved:.1f} GiB reserved under a {cap:g} GiB cap, "
            f"micro-batch {ours['micro_batch']}", reserved <= cap)
    sets = (records.get("b") or {}).get("result", {}).get("sets", {})
    lora = sets.get("lora8b", {}).get("methods")
    if lora:
        folded, call = lora["ftclip flat+folded"], lora["ftclip clip() call, folded"]
        add("clip ≥ 3× faster than clip_grad_norm_ (foreach), 8B-LoRA set",
            f"{folded['x_torch'] or 0:.2f}× (clip + its share of the fused step); the clip() call alone {call['x_torch']:.2f}×",
            (folded["x_torch"] or 0) >= 3)
        add("clip ≤ 1.3× one HBM read of the gradients", f"{folded['x_floor']:.2f}×; the clip() call alone "
            f"{call['x_floor']:.2f}×", folded["x_floor"] <= 1.3)
        syncs = [lora[name].get("host_sync") for name in ("ftclip flat", "ftclip flat+folded", "ftclip clip() call, folded")]
        add("no host sync in the clip step", ", ".join(f"{name}: {'SYNC' if s else 'none' if s is False else 'n/a'}"
                                                      for name, s in zip(("flat", "clip + fused step", "clip() call"), syncs)),
            None if None in syncs else not any(syncs))
    if "clip_share" in ours:
        add("clip ≤ 1 % of the step time (QLoRA 8B)", f"{ours['clip_share']:.3%} ({ours['clip_ms_per_step']:.3f} of "
            f"{ours['step_ms']:.0f} ms)", ours["clip_share"] <= 0.01)
    return rows


def step_section(record: dict) -> list[str]:
    key, result = record["step"], record.get("result")
    lines = [f"\n## {key}. {record['title']}\n", f"`{record['command']}`: **{record['status']}** in "
             f"{record['seconds']} s (timeout {record['timeout_s']} s)\n"]
    try:
        if result and key == "versions":
            lines += ["| package | version | from |", "|---|---|---|"]
            lines += [f"| {name} | {info.get('version') or '—'} | {info.get('from') or info.get('error')} |"
                      for name, info in result["packages"].items()]
            facts = {k: v for k, v in result.items() if k != "packages"}
            lines.append("\n" + ", ".join(f"{k}: {v}" for k, v in facts.items()))
        elif result and key == "a":
            lines += ["| tests | selection | passed | failed | skipped |", "|---|---|---:|---:|---:|"]
            lines += [f"| {name} | `{r['selection']}` | {r['passed']} | {r['failed']} | {r['skipped']} |"
                      for name, r in result.items()]
            failures = [f for r in result.values() for f in r["failures"]]
            skips = [s for r in result.values() for s in r["skips"]]
            lines += ["\nFailures:"] + [f"- {f}" for f in failures] if failures else []
            lines += ["\nSkipped:"] + [f"- {s}" for s in skips[:30]] if skips else []
        elif result and key == "b":
            sys.path.insert(0, str(REPO / "bench"))
            from clip_bench import format_set

            lines.append(f"torch {result['torch']}, {result['device']}" + (f" ({result['card']})" if result["card"] else ""))
            lines.append("× torch: torch foreach time / method time; × floor: method time / one read pass\n```")
            for name, data in result["sets"].items():
                lines += format_set(name, data)
            lines.append("```")
        elif result and key == "c":
            sys.path.insert(0, str(REPO / "bench"))
            from step_bench import table

            lines.append(f"vocabulary {result['vocab']:,}, sequence {result['sequence_len']}, micro-batch "
                         f"{result['micro_batch']}, {result['steps']} steps, {result['device']}\n")
            lines.append(table(result["results"]))
        elif result and key == "d":
            sys.path.insert(0, str(REPO / "bench" / "gpu"))
            from qlora_8b import table

            lines.append(f"shape {result['shape']} ({result['config']['num_hidden_layers']} layers, hidden "
                         f"{result['config']['hidden_size']}, vocabulary {result['config']['vocab_size']:,}), sequence "
                         f"{result['sequence_len']}, {result['device']}\n")
            lines.append(table(result["results"], result["cap_gib"]))
            probe = result["results"].get("ftclip", {}).get("probe")
            if probe:
                lines.append("\nMicro-batch search (peak reserved per try): "
                             + ", ".join(f"{size}: {outcome}" for size, outcome in probe.items()))
    except Exception as error:  # a report that cannot be rendered still shows its data
        lines.append(f"(could not render: {type(error).__name__}: {error})\n```\n{json.dumps(result, indent=1)[:4000]}\n```")
    if record["status"] != "ok" and record.get("output_tail"):
        lines.append(f"\nEnd of the output:\n```\n{record['output_tail']}\n```")
    return lines


def write_report(out: Path, records: dict, meta: dict) -> str:
    """Rewrite gpu-results.md and .json; returns the summary (the step table and the targets)."""
    lines = [f"# ftclip GPU run ({meta['mode']}), {meta['started']}\n",
             f"`bash bench/gpu/run.sh{' --cpu-smoke' if meta['mode'] == 'cpu-smoke' else ''}`; budget "
             f"{meta['budget_s']:.0f} s, {meta['elapsed_s']:.0f} s so far\n",
             "| step | what | status | seconds | result |", "|---|---|---|---:|---|"]
    for record in records.values():
        lines.append(f"| {record['step']} | {record['title']} | {record['status']} | {record['seconds']} | "
                     f"{headline(record) if record.get('result') else ''} |")
    lines += ["\n## Targets (issue 25)\n"] + targets(records)
    summary = "\n".join(lines) + "\n"
    for record in records.values():
        if record["status"] != "skipped":
            lines += step_section(record)
    (out / "gpu-results.md").write_text("\n".join(lines) + "\n")
    (out / "gpu-results.json").write_text(json.dumps({**meta, "steps": list(records.values())}, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu-results")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same steps on the CPU with tiny shapes")
    parser.add_argument("--budget", type=float, help="seconds for all steps (default: 460 on a GPU, 1200 for the smoke)")
    parser.add_argument("--only", help="comma-separated steps to run (versions,a,b,c,d); e.g. a second try of one")
    parser.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                        help="cap one step's timeout below what the budget gives it (repeatable)")
    args = parser.parse_args()
    caps = {key: float(seconds) for key, seconds in (item.split("=", 1) for item in args.timeout)}
    smoke = args.cpu_smoke
    budget = args.budget or (1200 if smoke else 460)
    wanted = set(args.only.split(",")) if args.only else {step.key for step in STEPS}
    steps = [step for step in STEPS if step.key in wanted]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ftclip-gpu-steps-"))  # the steps' JSON; what comes back is in --out
    started = time.perf_counter()
    meta = {"mode": "cpu-smoke" if smoke else "gpu", "started": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "budget_s": budget, "elapsed_s": 0.0}
    records: dict[str, dict] = {}
    with (args.out / "gpu-log.txt").open("w") as log:
        for index, step in enumerate(steps):
            later = sum(s.smoke_share if smoke else s.share for s in steps[index + 1:])
            timeout = min(budget - (time.perf_counter() - started) - later, caps.get(step.key, budget))
            if timeout < min(10, caps.get(step.key, 10)):
                records[step.key] = {"step": step.key, "title": step.title, "status": "skipped", "seconds": 0,
                                     "timeout_s": 0, "command": "", "output_tail": f"{timeout:.0f} s of the budget left"}
            else:
                records[step.key] = run_step(step, smoke, timeout, work, log)
            meta["elapsed_s"] = time.perf_counter() - started
            summary = write_report(args.out, records, meta)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{summary}\nfull report: {args.out / 'gpu-results.md'}")  # last in the output the device tool returns
    sys.exit(0 if all(record["status"] == "ok" for record in records.values()) else 1)


if __name__ == "__main__":
    main()
