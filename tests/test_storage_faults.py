"""Storage faults, each the real fault: checkpoint files cut short or with a flipped bit, an output folder on a
tmpfs that fills up, a checkpoint folder that turns read-only, and kill -9 of one rank under torchrun."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ALPACA, write_jsonl, write_recipe
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

import ftclip.checkpoint as checkpoint_module
import ftclip.train as train_module
from ftclip.checkpoint import low_space_warning, verify_checkpoint
from ftclip.cli import app
from ftclip.errors import ResumeError
from ftclip.recipe import load_recipe

# Dropout on, so an exact match after a fallback also covers the RNG state of the older checkpoint.
RUN = dict(max_steps=6, save_steps=2, save_total_limit=None, lora_dropout=0.1, micro_batch_size=2,
           gradient_accumulation_steps=2, logging_steps=1, lr_scheduler="cosine", warmup_steps=2)
CHECKPOINT_FILES = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/README.md",
                    "trainer_state.pt", "trainer_state.json", "ftclip_recipe.yaml"]
runner = CliRunner()


def run(path, console=None, **kwargs):
    return train_module.train(load_recipe(path), console or Console(quiet=True), **kwargs)


def losses(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [loss for line in lines for loss in json.loads(line)["per_step"]["loss"]]


def assert_same_final_weights(out, reference):
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(data)


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("storage")
    return folder, write_jsonl(folder / "alpaca.jsonl", ALPACA)


@pytest.fixture(scope="module")
def reference(workspace, tiny_model_dir):
    """An uninterrupted run of RUN, in this process: checkpoints at steps 2, 4, 6."""
    folder, data = workspace
    path = write_recipe(folder, tiny_model_dir, data, "reference.yaml", output_dir=str(folder / "reference"), **RUN)
    return run(path).output_dir


def copy_of_run(reference, workspace, tiny_model_dir, tmp_path, name="copy"):
    """The reference run's folder without its final adapter (as if killed after its last checkpoint), and a
    recipe that trains into it."""
    folder, data = workspace
    out = tmp_path / name
    shutil.copytree(reference, out)
    shutil.rmtree(out / "adapter")
    return out, write_recipe(tmp_path, tiny_model_dir, data, f"{name}.yaml", output_dir=str(out), **RUN)


def test_state_file_records_every_file_with_its_size_and_sha256(reference):
    step = reference / "checkpoints" / "step-6"
    state = json.loads((step / "trainer_state.json").read_text())
    on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(state["files"]) == sorted(set(on_disk) - {"trainer_state.json"})
    for relative, recorded in state["files"].items():
        assert recorded["size"] == (step / relative).stat().st_size
        assert recorded["sha256"] == checkpoint_module.sha256_of_file(step / relative)  # hashed while written
    check = verify_checkpoint(step)
    assert check.intact and check.hashed == len(state["files"]) and not check.legacy


def slow_unless(case):
    return pytest.param(*case, marks=() if case in FAST_CASES else pytest.mark.slow, id="-".join(case))


FAST_CASES = [("adapter/adapter_model.safetensors", "truncated"), ("trainer_state.pt", "bit-flipped")]


@pytest.mark.parametrize("relative, damage",
                         [slow_unless((f, d)) for f in CHECKPOINT_FILES for d in ("truncated", "bit-flipped")])
def test_damaged_latest_checkpoint_falls_back_and_matches_the_uninterrupted_run(reference, workspace, tiny_model_dir,
                                                                               tmp_path, relative, damage):
    out, path = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    (truncate if damage == "truncated" else flip_bit)(out / "checkpoints" / "step-6" / relative)
    printed = io.StringIO()
    result = run(path, Console(file=printed, width=300))
    assert result.resumed_from == out / "checkpoints" / "step-4"
    warning = printed.getvalue()
    assert f"checkpoint {out / 'checkpoints' / 'step-6'} is damaged" in warning
    named = "trainer_state.json" if relative == "trainer_state.json" else relative
    assert f"{named}: " in warning and "expected" in warning
    assert "resuming from" in warning and "step-4, the newest intact checkpoint" in warning
    assert losses(out) == losses(reference)
    assert_same_final_weights(out, reference)
    assert verify_checkpoint(out / "checkpoints" / "step-6").intact  # rewritten by the resumed run


def test_no_intact_checkpoint_exits_2_and_no_resume_starts_over(reference, workspace, tiny_model_dir, tmp_path):
    out, path = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    for step in (2, 4, 6):
        flip_bit(out / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors")
    refused = runner.invoke(app, ["train", str(path)])
    assert refused.exit_code == 2, refused.output
    assert "no intact checkpoint" in refused.output and "--no-resume" in refused.output
    assert refused.output.count("adapter/adapter_model.safetensors: expected SHA-256") == 3
    assert "Traceback" not in refused.output and not (out / "adapter").exists()
    fresh = runner.invoke(app, ["train", str(path), "--no-resume"])
    assert fresh.exit_code == 0, fresh.output
    assert losses(out) == losses(reference)
    assert_same_final_weights(out, reference)


def test_resume_path_to_a_damaged_checkpoint_exits_2_naming_the_file(reference, workspace, tiny_model_dir, tmp_path):
    out, path = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    step4 = out / "checkpoints" / "step-4"
    truncate(step4 / "trainer_state.pt")
    refused = runner.invoke(app, ["train", str(path), "--resume", str(step4)])
    assert refused.exit_code == 2
    size = (reference / "checkpoints" / "step-4" / "trainer_state.pt").stat().st_size
    assert f"--resume {step4}: the checkpoint is damaged: trainer_state.pt: expected {size:,} bytes, found {size // 2:,}" \
        in " ".join(refused.output.split())
    assert "Traceback" not in refused.output


def test_large_files_are_size_checked_by_default_and_hashed_with_verify_full(reference, workspace, tiny_model_dir,
                                                                             tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "FULL_HASH_LIMIT", 20_000)  # the safetensors and .pt files count as large
    out, path = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    step6 = out / "checkpoints" / "step-6"
    weights = step6 / "adapter" / "adapter_model.safetensors"
    flip_bit(weights, at=0.9)  # in the tensor data: only a hash sees it
    auto, full = verify_checkpoint(step6, "auto"), verify_checkpoint(step6, "full")
    assert auto.intact and auto.size_checked == 2
    assert [p.split(":")[0] for p in full.problems] == ["adapter/adapter_model.safetensors"]
    truncate(step6 / "trainer_state.pt")  # a size change is seen either way
    assert verify_checkpoint(step6, "auto").problems[0].startswith("trainer_state.pt: expected")
    result = run(path, verify="full")
    assert result.resumed_from == out / "checkpoints" / "step-4"
    assert_same_final_weights(out, reference)


def test_a_damaged_large_file_that_passes_the_size_check_still_fails_cleanly(reference, workspace, tiny_model_dir,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_module, "FULL_HASH_LIMIT", 20_000)
    out, path = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    state = out / "checkpoints" / "step-6" / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[-30:] = bytes(30)  # the zip's end-of-central-directory record: torch.load cannot open it
    state.write_bytes(data)
    with pytest.raises(ResumeError) as caught:
        run(path)
    assert "cannot load checkpoint" in str(caught.value) and "--verify full" in str(caught.value)


def test_checkpoints_command_lists_step_size_state_and_the_resume_point(reference, workspace, tiny_model_dir, tmp_path):
    out, _ = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    truncate(out / "checkpoints" / "step-6" / "adapter" / "adapter_config.json")
    shown = CliRunner().invoke(app, ["checkpoints", str(out)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    rows = {line.split("│")[1].strip(): line for line in shown.output.splitlines() if line.count("│") == 5}
    assert set(rows) == {"2", "4", "6"}
    assert "intact" in rows["2"] and "← resume" not in rows["2"]
    assert "intact" in rows["4"] and "← resume" in rows["4"]
    assert "damaged: adapter/adapter_config.json: expected" in rows["6"]
    listed = json.loads(CliRunner().invoke(app, ["checkpoints", str(out), "--json", "--verify", "full"]).output)
    assert listed["resume_from"] == str(out / "checkpoints" / "step-4")
    assert [(c["step"], c["intact"], c["resume"]) for c in listed["checkpoints"]] == [
        (2, True, False), (4, True, True), (6, False, False)]
    assert listed["checkpoints"][0]["bytes"] == sum(
        p.stat().st_size for p in (out / "checkpoints" / "step-2").rglob("*") if p.is_file())
    missing = CliRunner().invoke(app, ["checkpoints", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no checkpoints/ folder" in missing.output
    unknown = CliRunner().invoke(app, ["checkpoints", str(out), "--verify", "fast"])
    assert unknown.exit_code == 2 and "--verify fast: use one of auto, full" in unknown.output


def test_checkpoint_without_a_file_list_is_used_unverified_with_a_warning(reference, workspace, tiny_model_dir,
                                                                           tmp_path):
    out, path = copy_of_run(reference, workspace, tiny_model_dir, tmp_path)
    legacy = out / "checkpoints" / "step-6"  # as an ftclip from before checksums wrote it
    state = json.loads((legacy / "trainer_state.json").read_text())
    del state["files"], state["state_sha256"]
    (legacy / "trainer_state.json").write_text(json.dumps(state))
    check = verify_checkpoint(legacy)
    assert check.intact and check.legacy
    printed = io.StringIO()
    result = run(path, Console(file=printed, width=300))
    assert result.resumed_from == legacy
    assert f"{legacy} was written without checksums (an older ftclip): resuming from it unverified" in printed.getvalue()
    assert_same_final_weights(out, reference)


def test_low_space_warning_when_the_checkpoints_will_not_fit(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe(save_steps=10, save_total_limit=2, max_steps=100))
    free = shutil.disk_usage(tmp_path).free
    huge = [torch.empty(free // 4, device="meta")]  # as many fp32 values as the disk has bytes / 4
    warning = low_space_warning(recipe, tmp_path, huge, 100)
    assert warning and "save_total_limit 2, plus one while the next is written" in warning and "exit 3" in warning
    assert low_space_warning(recipe, tmp_path, [torch.empty(1000, device="meta")], 100) is None
    assert low_space_warning(recipe.model_copy(update={"save_steps": None}), tmp_path, huge, 100) is None


# ---------------------------------------------------------------- real processes, real mounts

def ftclip_process(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "300"})


def mount(*args) -> None:
    """Run mount(8), or skip the test with the machine's reason (not root, no mount namespace rights, ...)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs or a read-only bind needs root")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine refuses `mount {' '.join(args)}`: {done.stderr.strip()}")


@contextmanager
def mounted(target: Path, *args):
    mount(*args, str(target))
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture(scope="module")
def subprocess_reference(workspace, tiny_model_dir):
    """The uninterrupted run in a process of its own, for the tests whose runs are processes too."""
    folder, data = workspace
    path = write_recipe(folder, tiny_model_dir, data, "process-reference.yaml",
                        output_dir=str(folder / "process-reference"), **RUN)
    done = ftclip_process("-m", "ftclip", "train", str(path))
    assert done.returncode == 0, done.stderr
    return folder / "process-reference"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_output_folder_on_a_tmpfs_that_fills_up(subprocess_reference, workspace, tiny_model_dir, tmp_path):
    folder, data = workspace
    out = tmp_path / "small-disk"
    out.mkdir()
    checkpoint = folder_bytes(subprocess_reference / "checkpoints" / "step-2")
    logs = folder_bytes(subprocess_reference) - folder_bytes(subprocess_reference / "checkpoints") \
        - folder_bytes(subprocess_reference / "adapter")
    with mounted(out, "-t", "tmpfs", "-o", "size=1500k", "tmpfs"):
        # Leave room for the logs, one checkpoint and a half: the first save fits, the second cannot.
        room = logs + checkpoint * 5 // 4 + 8 * 4096  # tmpfs counts 4 KiB pages: each small file takes one
        (out / "ballast").write_bytes(bytes(shutil.disk_usage(out).free - room))
        path = write_recipe(tmp_path, tiny_model_dir, data, "small-disk.yaml", output_dir=str(out), **RUN)
        full = ftclip_process("-m", "ftclip", "train", str(path))
        assert full.returncode == 3, full.stderr
        assert "Traceback" not in full.stderr
        assert "warning:" in full.stdout and "a save will likely fail with the disk full" in " ".join(full.stdout.split())
        message = " ".join(full.stderr.split())
        assert f"cannot write checkpoint step-4 in {out / 'checkpoints'}: No space left on device (it needs about" in message
        assert f"The previous checkpoint {out / 'checkpoints' / 'step-2'} is intact" in message
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2"]  # no partial step-4
        assert verify_checkpoint(out / "checkpoints" / "step-2", "full").intact
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
        (out / "ballast").unlink()  # space freed: the same command resumes from step 2
        resumed = ftclip_process("-m", "ftclip", "train", str(path))
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed" in resumed.stdout and "step 2 of 6" in resumed.stdout
        assert losses(out) == losses(subprocess_reference)
        assert_same_final_weights(out, subprocess_reference)


@pytest.mark.slow
def test_a_disk_too_full_for_the_metrics_exits_3_without_a_traceback(workspace, tiny_model_dir, tmp_path):
    _, data = workspace
    out = tmp_path / "full-disk"
    out.mkdir()
    with mounted(out, "-t", "tmpfs", "-o", "size=100k", "tmpfs"):
        (out / "ballast").write_bytes(bytes(shutil.disk_usage(out).free - 4096))  # one page left
        path = write_recipe(tmp_path, tiny_model_dir, data, "full-disk.yaml", output_dir=str(out),
                            **{**RUN, "max_steps": 3, "save_steps": None})
        full = ftclip_process("-m", "ftclip", "train", str(path))
    assert full.returncode == 3, full.stderr
    assert "Traceback" not in full.stderr and "No space left on device" in full.stderr


# Makes the checkpoints folder a read-only bind mount of itself after the optimizer step of step `when`.
READ_ONLY_AFTER = textwrap.dedent("""
    import subprocess, sys
    import ftclip.clip as clip
    from ftclip.cli import app
    when, folder = int(sys.argv[1]), sys.argv[2]
    count = {"n": 0}
    real = clip.GradientClipper.optimizer_step
    def hooked(self, outcome):
        real(self, outcome)
        count["n"] += 1
        if count["n"] == when:
            subprocess.run(["mount", "--bind", folder, folder], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
    clip.GradientClipper.optimizer_step = hooked
    app(["train", sys.argv[3]])
""")


@pytest.mark.slow
def test_checkpoint_folder_turning_read_only_stops_with_exit_3(subprocess_reference, workspace, tiny_model_dir,
                                                                tmp_path):
    folder, data = workspace
    out = tmp_path / "read-only"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    # Probe first: skip with the machine's reason if it refuses a read-only bind mount.
    with mounted(checkpoints, "--bind", str(checkpoints)):
        mount("-o", "remount,bind,ro", str(checkpoints))
        with pytest.raises(OSError):
            (checkpoints / "probe").write_text("x")  # as root, a read-only mount stops writes; chmod would not
    path = write_recipe(tmp_path, tiny_model_dir, data, "read-only.yaml", output_dir=str(out), **RUN)
    try:
        stopped = ftclip_process("-c", READ_ONLY_AFTER, "3", str(checkpoints), str(path))
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False)
    assert stopped.returncode == 3, stopped.stderr
    assert "Traceback" not in stopped.stderr
    message = " ".join(stopped.stderr.split())
    assert f"cannot write checkpoint step-4 in {checkpoints}: Read-only file system" in message
    assert "Make the folder writable" in message and f"{checkpoints / 'step-2'} is intact" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
    assert verify_checkpoint(checkpoints / "step-2", "full").intact
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4  # metrics kept, through the failed save's step
    resumed = ftclip_process("-m", "ftclip", "train", str(path))  # writable again: resume from step 2
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(subprocess_reference)
    assert_same_final_weights(out, subprocess_reference)


# ---------------------------------------------------------------- torchrun: kill -9 of one rank during a save

# 2 ranks × micro_batch_size 1 see RUN's global batches.
TWO_RANKS = {**RUN, "micro_batch_size": 1}

# SIGKILL one rank in the middle of checkpoint number `when`: under DDP rank 0 after writing the adapter and
# before trainer_state.pt, rank 1 while rank 0 writes; under FSDP rank 1 as it starts writing its shards.
KILL_ONE_RANK = textwrap.dedent("""
    import os, signal, sys
    import torch
    import torch.distributed.checkpoint as dcp
    import ftclip.checkpoint as checkpoint
    import ftclip.train as train
    from ftclip.cli import app
    rank, when = int(sys.argv[1]), int(sys.argv[2])
    mine = int(os.environ["RANK"]) == rank
    count = {"n": 0}
    def kill_at(real, counts):
        def hooked(*args, **kwargs):
            count["n"] += counts(*args)
            if mine and count["n"] == when:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return hooked
    if sys.argv[3] == "fsdp":
        dcp.save = kill_at(dcp.save, lambda *args: 1)
    elif rank == 0:
        checkpoint.torch.save = kill_at(torch.save, lambda obj, target, *rest: str(getattr(target, "name", target))
                                        .endswith("trainer_state.pt"))
    else:
        train.gather_objects = kill_at(train.gather_objects, lambda *args: 1)
    app(["train", sys.argv[4]], prog_name="ftclip")
""")


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def two_rank_references(workspace, tiny_model_dir):
    """Uninterrupted 2-rank runs, one per strategy, made on first use."""
    folder, data = workspace
    made = {}

    def reference(strategy):
        if strategy not in made:
            out = folder / f"two-ranks-{strategy}"
            path = write_recipe(folder, tiny_model_dir, data, f"two-ranks-{strategy}.yaml", output_dir=str(out),
                                distributed={"strategy": strategy}, **TWO_RANKS)
            done = torchrun("-m", "ftclip", "train", str(path))
            assert done.returncode == 0, done.stderr[-3000:]
            made[strategy] = out
        return made[strategy]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("strategy, rank", [("ddp", 0), ("ddp", 1), ("fsdp", 1)],
                         ids=["ddp-rank-0-writing", "ddp-rank-1-waiting", "fsdp-rank-1-writing-shards"])
def test_kill_9_of_one_rank_during_a_save_then_resume_matches(two_rank_references, workspace, tiny_model_dir, tmp_path,
                                                              strategy, rank):
    reference = two_rank_references(strategy)
    _, data = workspace
    out = tmp_path / "killed"
    path = write_recipe(tmp_path, tiny_model_dir, data, "killed.yaml", output_dir=str(out),
                        distributed={"strategy": strategy}, **TWO_RANKS)
    script = tmp_path / "kill_one_rank.py"
    script.write_text(KILL_ONE_RANK)
    killed = torchrun(str(script), str(rank), "2", strategy, str(path))  # during the second save: step 4
    assert killed.returncode != 0
    assert "Signals.SIGKILL" in killed.stderr or "exitcode: -9" in killed.stderr or "exitcode  : -9" in killed.stderr
    assert not (out / "adapter").exists()
    checkpoints = out / "checkpoints"
    if rank == 0 or strategy == "fsdp":  # the writer died: step-4 never became a checkpoint
        assert (checkpoints / "latest").read_text() == "step-2"
        assert not (checkpoints / "step-4").exists()
    resumed = torchrun("-m", "ftclip", "train", str(path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # partial folders removed
    assert losses(out) == losses(reference)
    assert_same_final_weights(out, reference)


@pytest.mark.slow
def test_a_failed_save_under_ddp_stops_every_rank_with_exit_3(workspace, tiny_model_dir, tmp_path):
    """Rank 0 alone writes a DDP checkpoint; when it cannot, rank 1 must not wait for it forever nor go on."""
    _, data = workspace
    out = tmp_path / "read-only-ddp"
    checkpoints = out / "checkpoints"
    checkpoints.mkdir(parents=True)
    with mounted(checkpoints, "--bind", str(checkpoints)):  # skip with the reason if the machine refuses
        mount("-o", "remount,bind,ro", str(checkpoints))
    path = write_recipe(tmp_path, tiny_model_dir, data, "read-only-ddp.yaml", output_dir=str(out), **TWO_RANKS)
    script = tmp_path / "read_only_after.py"
    script.write_text(READ_ONLY_AFTER.replace('if count["n"] == when:', 'if count["n"] == when and os.environ["RANK"] == "0":')
                      .replace("import subprocess, sys", "import os, subprocess, sys"))
    try:
        stopped = torchrun(str(script), "3", str(checkpoints), str(path), timeout=240)
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)], check=False)
    assert "exitcode: 3" in stopped.stderr or "exitcode  : 3" in stopped.stderr, stopped.stderr[-3000:]
    assert "ftclip/" not in stopped.stderr  # no worker traceback (torchrun prints one of its own for the exit 3)
    assert " ".join(stopped.stderr.split()).count(f"cannot write checkpoint step-4 in {checkpoints}: Read-only") == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2"]
