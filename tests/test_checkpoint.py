"""Nothing lost: checkpoints, exact resume, kill -9, signals, non-finite steps, a full disk."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ALPACA, write_jsonl, write_recipe
from rich.console import Console
from safetensors.torch import load_file

import ftclip.checkpoint as checkpoint_module
import ftclip.clip as clip_module
import ftclip.train as train_module
from ftclip.errors import ResumeError, RunStopped, StorageError
from ftclip.recipe import load_recipe

# Dropout on, so the exact-resume check also covers the RNG state.
RUN = dict(max_steps=10, save_steps=2, save_total_limit=0, lora_dropout=0.1, micro_batch_size=2,
           gradient_accumulation_steps=2, logging_steps=1, lr_scheduler="cosine", warmup_steps=2)


def run(path, **kwargs):
    return train_module.train(load_recipe(path), Console(quiet=True), **kwargs)


def adapter_weights(output_dir):
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def losses(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [loss for line in lines for loss in json.loads(line)["per_step"]["loss"]]


@pytest.fixture
def reference(make_recipe, tmp_path):
    """An uninterrupted run of RUN, in this process."""
    path = make_recipe("reference.yaml", output_dir=str(tmp_path / "reference"), **RUN)
    result = run(path)
    return result


def test_checkpoints_hold_everything_and_latest_points_at_the_newest(reference):
    root = reference.output_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest"] + [f"step-{n}" for n in (10, 2, 4, 6, 8)]
    assert (root / "latest").read_text() == "step-10"
    step4 = root / "step-4"
    assert {"adapter", "trainer_state.pt", "trainer_state.json", "ftclip_recipe.yaml"} <= {p.name for p in step4.iterdir()}
    state = json.loads((step4 / "trainer_state.json").read_text())
    # 8 examples, 2 per micro-batch, 2 per step: step 4 ends the second epoch (0-based epoch 1, 4 of 4 batches)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 4)
    tensors = torch.load(step4 / "trainer_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "clipper", "rng"} <= set(tensors)
    assert {"python", "numpy", "torch"} <= set(tensors["rng"])


def test_save_total_limit_keeps_the_newest(make_recipe, tmp_path):
    result = run(make_recipe(**{**RUN, "save_total_limit": 2}))
    assert sorted(p.name for p in (result.output_dir / "checkpoints").iterdir()) == ["latest", "step-10", "step-8"]


def test_resume_reproduces_the_uninterrupted_run_exactly(reference, make_recipe, tmp_path):
    path = make_recipe("resumed.yaml", output_dir=str(tmp_path / "resumed"), **RUN)
    run(path)
    out = tmp_path / "resumed"
    # Roll the run back to its step-4 checkpoint, as if it had died there.
    for step in (6, 8, 10):
        import shutil

        shutil.rmtree(out / "checkpoints" / f"step-{step}")
    (out / "checkpoints" / "latest").write_text("step-4")
    result = run(path)
    assert result.resumed_from == out / "checkpoints" / "step-4"
    assert losses(out) == losses(reference.output_dir)
    assert_same_weights(adapter_weights(out), adapter_weights(reference.output_dir))


def test_changed_recipe_refuses_to_resume_and_lists_the_differences(reference, make_recipe, tmp_path):
    path = make_recipe("changed.yaml", output_dir=str(reference.output_dir), **{**RUN, "learning_rate": 1e-2, "logging_steps": 5})
    with pytest.raises(ResumeError) as caught:
        run(path)
    message = str(caught.value)
    assert "learning_rate: 0.003 in the checkpoint, 0.01 now" in message
    assert "logging_steps" not in message  # logging does not change the run
    assert "--no-resume" in message
    fresh = run(path, resume=False)
    assert fresh.resumed_from is None and fresh.steps == 10


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(make_recipe, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def filling_disk(obj, target, *args, **kwargs):
        # not the tokenization cache's save; the checkpoint writes through a hashing file object
        calls["n"] += str(getattr(target, "name", target)).endswith("trainer_state.pt")
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", filling_disk)
    path = make_recipe(**RUN)
    with pytest.raises(StorageError) as caught:
        run(path)
    assert "No space left on device" in str(caught.value) and "step-2 is intact" in str(caught.value)
    root = load_recipe(path).output_dir + "/checkpoints"
    import pathlib

    entries = sorted(p.name for p in pathlib.Path(root).iterdir())
    assert entries == ["latest", "step-2"], entries  # no partial step-4, no staging folder
    assert pathlib.Path(root, "latest").read_text() == "step-2"


def nan_at(steps, monkeypatch):
    """Make the gradients of the given optimizer steps nan, after a real backward."""
    real, count = train_module.forward_backward, {"n": 0}

    def poisoned(model, *args, **kwargs):
        loss = real(model, *args, **kwargs)
        count["n"] += 1
        if count["n"] in steps:
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(train_module, "forward_backward", poisoned)


@pytest.mark.parametrize("optimizer", ["adamw_torch_fused", "adamw_torch"])
def test_nan_step_leaves_weights_identical_and_the_run_finishes(make_recipe, monkeypatch, optimizer):
    nan_at({3}, monkeypatch)
    snapshots = []
    real_step = clip_module.GradientClipper.optimizer_step

    def recording(self, outcome):
        before = [p.detach().clone() for p in self.parameters]
        real_step(self, outcome)
        snapshots.append((before, [p.detach().clone() for p in self.parameters]))

    monkeypatch.setattr(clip_module.GradientClipper, "optimizer_step", recording)
    result = run(make_recipe(max_steps=5, optimizer=optimizer))
    assert result.steps == 5 and result.skipped_steps == 1
    before, after = snapshots[2]
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    before, after = snapshots[3]
    assert not all(torch.equal(b, a) for b, a in zip(before, after))  # training went on


def test_too_many_nonfinite_steps_abort_with_a_checkpoint(make_recipe, monkeypatch):
    nan_at(set(range(3, 100)), monkeypatch)
    path = make_recipe(max_steps=20, max_skipped_steps=3)
    with pytest.raises(RunStopped) as caught:
        run(path)
    stopped = caught.value
    assert stopped.exit_code == 1 and "3 optimizer steps in a row" in str(stopped)
    assert stopped.checkpoint.name == "step-5"
    state = json.loads((stopped.checkpoint / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 3


# ---------------------------------------------------------------- real processes, real signals

KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    import ftclip.clip as clip
    import ftclip.checkpoint as checkpoint
    from ftclip.cli import app
    where, when, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
    count = {"n": 0}
    if where == "step":  # after the optimizer step of step `when`
        real = clip.GradientClipper.optimizer_step
        def hooked(self, outcome):
            real(self, outcome)
            count["n"] += 1
            if count["n"] == when:
                os.kill(os.getpid(), sig)
        clip.GradientClipper.optimizer_step = hooked
    else:  # in the middle of writing checkpoint number `when`: adapter written, trainer state not yet
        real = torch.save
        def hooked(obj, target, *args, **kwargs):
            count["n"] += str(getattr(target, "name", target)).endswith("trainer_state.pt")
            if count["n"] == when:
                os.kill(os.getpid(), sig)
            return real(obj, target, *args, **kwargs)
        checkpoint.torch.save = hooked
    app(["train", sys.argv[4]])
""")


def ftclip_process(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def subprocess_reference(tiny_model_dir, tmp_path_factory):
    """One uninterrupted run in a process of its own, shared by the tests that kill and signal theirs."""
    folder = tmp_path_factory.mktemp("subprocess-reference")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA)
    path = write_recipe(folder, tiny_model_dir, data, output_dir=str(folder / "reference"), **RUN)
    done = ftclip_process("-m", "ftclip", "train", str(path))
    assert done.returncode == 0, done.stderr
    return folder / "reference"


@pytest.mark.slow
@pytest.mark.parametrize("where, when", [("step", 7), ("save", 3)], ids=["during-training", "during-checkpoint-write"])
def test_kill_9_then_resume_matches_the_uninterrupted_run(subprocess_reference, make_recipe, tmp_path, where, when):
    out = tmp_path / "killed"
    path = make_recipe("killed.yaml", output_dir=str(out), **RUN)
    killed = ftclip_process("-c", KILLER, where, str(when), "SIGKILL", str(path))
    assert killed.returncode == -9
    assert not (out / "adapter").exists()
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == ("step-6" if where == "step" else "step-4")
    if where == "save":  # the third checkpoint died half-written, in its staging folder
        assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".step-6.tmp-")]
    resumed = ftclip_process("-m", "ftclip", "train", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # the partial one was cleaned
    assert losses(out) == losses(subprocess_reference)
    assert_same_weights(adapter_weights(out), adapter_weights(subprocess_reference))


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_finishes_the_step_saves_and_exits(subprocess_reference, make_recipe, tmp_path, signal_name, code):
    out = tmp_path / "stopped"
    path = make_recipe("stopped.yaml", output_dir=str(out), **RUN)
    stopped = ftclip_process("-c", KILLER, "step", "5", signal_name, str(path))
    assert stopped.returncode == code, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert f"stopped by {signal_name} after step 5" in stopped.stderr and "to resume" in stopped.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-5"
    resumed = ftclip_process("-m", "ftclip", "train", str(path))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(out) == losses(subprocess_reference)
    assert_same_weights(adapter_weights(out), adapter_weights(subprocess_reference))
