"""Two gloo processes on the CPU (torchrun) against one process on the same global batch: the same pre-clip
norm and the same weights after the step, for DDP and FSDP2, to float32 rounding (tests/tolerances.py derives
how much); only rank 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from tolerances import UNIT_ROUNDOFF, assert_same_first_lora_sgd_step, reordering_rtol, tiny_loss_sums, tiny_step_sums

from ftclip.clip import ROW_SIZE
from ftclip.recipe import load_recipe
from ftclip.train import train

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# One step of 2 micro-batches: exercises no_sync accumulation, a clipped update and the weights after it.
STEPS = dict(max_steps=1, gradient_accumulation_steps=2, lora_dropout=0.0, learning_rate=1e-2, logging_steps=1,
             gradient_clipping={"mode": "norm", "max_norm": 0.5})
# The layouts are compared after a plain SGD step (why not Adam: tolerances.assert_same_first_lora_sgd_step).
SGD_STEP = {**STEPS, "optimizer": "sgd"}
GLOBAL_BATCH = 8  # examples per step: micro_batch_size 4 (or 2 × 2 ranks) × gradient_accumulation_steps 2
# How far two layouts of the same step may differ (tests/tolerances.py): they sum the same terms in other orders
# (other batch shapes, per-rank partial sums, the all-reduce). The loss passes through the forward pass's sums;
# a gradient through the backward pass's too; the pre-clip norm then through a row of the flat gradient buffer.
LOSS_RTOL = reordering_rtol(tiny_loss_sums(GLOBAL_BATCH))
NORM_RTOL = reordering_rtol(tiny_step_sums(GLOBAL_BATCH), ROW_SIZE)
# The weights move by lr·coef·g: the gradient's rounding and the coefficient's (the norm's), and SGD's own ops.
UPDATE_RTOL = reordering_rtol(tiny_step_sums(GLOBAL_BATCH)) + NORM_RTOL + 4 * UNIT_ROUNDOFF


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def per_step(output_dir, key):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [value for line in lines for value in json.loads(line)["per_step"][key]]


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    """One process, micro_batch_size 4 = two ranks × 2."""
    from conftest import ALPACA, write_jsonl, write_recipe

    folder = tmp_path_factory.mktemp("single")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA)
    path = write_recipe(folder, tiny_model_dir, data, micro_batch_size=4, **SGD_STEP)
    result = train(load_recipe(path), Console(quiet=True))
    return result.output_dir, folder, data


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_on_the_same_global_batch(single_process, tiny_model_dir, strategy):
    from conftest import write_recipe

    reference, folder, data = single_process
    cache = folder / f"cache-{strategy}"  # a cold cache: rank 0 tokenizes, rank 1 waits and reads the same files
    path = write_recipe(folder, tiny_model_dir, data, name=f"{strategy}.yaml", micro_batch_size=2,
                        output_dir=str(folder / strategy), distributed={"strategy": strategy},
                        dataset_cache_dir=str(cache), **SGD_STEP)
    done = torchrun("-m", "ftclip", "train", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    builds = [json.loads(line) for line in (cache / "builds.log").read_text().splitlines()]
    assert [build["rank"] for build in builds] == [0]
    out = folder / strategy
    assert per_step(out, "grad_norm") == pytest.approx(per_step(reference, "grad_norm"), rel=NORM_RTOL, abs=0)
    assert per_step(out, "loss") == pytest.approx(per_step(reference, "loss"), rel=LOSS_RTOL, abs=0)
    assert per_step(out, "clip_coef")[0] < 1 - 100 * NORM_RTOL  # the clip really acted, by far more than rounding
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert_same_first_lora_sgd_step(ours, theirs, UPDATE_RTOL)
    # The step is as long as the clip says: lr × the post-clip norm (lora_B's values are the whole update).
    update = torch.cat([ours[name].double().flatten() for name in ours if "lora_B" in name])
    post_clip_norm = per_step(out, "grad_norm")[0] * per_step(out, "clip_coef")[0]
    assert float(update.norm()) == pytest.approx(SGD_STEP["learning_rate"] * post_clip_norm, rel=UPDATE_RTOL, abs=0)
    # Rank 0 alone writes: one metrics line per step, one summary, one event file.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert done.stdout.count("ftclip run summary") == 1
    assert len(list((out / "tensorboard").glob("events.*"))) == 1


FLAT_UNDER_DDP = textwrap.dedent("""
    import copy, os, sys, torch
    from ftclip.clip import GradientClipper
    from ftclip.distributed import Distributed
    from ftclip.recipe import GradientClipping

    def step(dist):  # the model goes out of scope before close(), as in ftclip.train
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
        model = dist.wrap(copy.deepcopy(plain))
        clipper = GradientClipper(GradientClipping(max_norm=0.1), list(model.parameters()))
        for micro in range(2):  # accumulation: the reduction happens on the second backward only
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * dist.rank + micro))
            with dist.gradient_sync(model, sync=micro == 1):
                model(x).pow(2).mean().backward()
            plain(x).pow(2).mean().backward()  # the same arithmetic, never reduced: this rank's own gradient
        intact = clipper.flat_grads.intact()
        reduced = [p.grad.clone() for p in model.parameters()]
        outcome = clipper.clip()
        return {"intact": intact, "local": [p.grad for p in plain.parameters()], "reduced": reduced,
                "norm": outcome.pre_clip_norm, "clipped": [p.grad.clone() for p in model.parameters()]}

    dist = Distributed.from_environment("ddp")
    result = step(dist)
    dist.close()
    tasks = "/proc/self/task"  # Linux: one folder per thread, its name in comm
    if os.path.isdir(tasks):
        result["threads"] = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)]
    torch.save(result, f"{sys.argv[1]}/rank-{dist.rank}.pt")
""")


def test_flat_gradient_buffer_survives_ddp_and_no_sync(tmp_path):
    script = tmp_path / "flat_ddp.py"
    script.write_text(FLAT_UNDER_DDP)
    done = torchrun(str(script), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in (0, 1)]
    # DDP halves each rank's gradient (exact in binary) and adds the two halves: one float32 addition per value,
    # the same in any order. So the reduced gradient is exactly (g0 + g1) / 2, in ftclip's views, on both ranks.
    average = [(g0 + g1) / 2 for g0, g1 in zip(ranks[0]["local"], ranks[1]["local"])]
    exact_norm = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in average]))
    coefficient = min(1.0, 0.1 / (float(exact_norm) + 1e-6))
    assert coefficient < 0.5  # the clip acts
    for rank in ranks:
        assert rank["intact"]  # DDP copied the averaged gradients into ftclip's views, not beside them
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(rank["reduced"], average))
        # The norm: one float32 sum of squares over a row of the flat buffer, then float64 (tests/tolerances.py).
        norm_rtol = reordering_rtol(ROW_SIZE)
        assert float(rank["norm"]) == pytest.approx(float(exact_norm), rel=norm_rtol, abs=0)
        for clipped, gradient in zip(rank["clipped"], average):  # scaled by the coefficient, one rounding more
            torch.testing.assert_close(clipped, gradient * coefficient, rtol=norm_rtol + 4 * UNIT_ROUNDOFF, atol=0)
    assert torch.equal(ranks[0]["norm"], ranks[1]["norm"])  # the same global norm on both ranks, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["clipped"], ranks[1]["clipped"]))
    # Distributed.close() freed the DDP group: no gloo thread runs into interpreter exit, where one that releases a
    # finished collective aborts the process (docs/distributed-teardown.md). So this script exits normally.
    for rank in ranks:
        assert not [name for name in rank.get("threads", []) if "gloo" in name], rank["threads"]


def test_quickstart_finishes_on_two_ranks_via_nproc(tmp_path):
    out = tmp_path / "quick"
    done = subprocess.run(
        [sys.executable, "-m", "ftclip", "train", str(REPO / "recipes" / "quickstart.yaml"), "--nproc", "2",
         "--max-steps", "3", "--set", "warmup_steps=0", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "× 2 ranks (ddp)" in done.stdout and done.stdout.count("done:") == 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpoint_resumes_on_the_same_world_size(single_process, tiny_model_dir, strategy):
    from conftest import write_recipe

    _, folder, data = single_process
    common = dict(micro_batch_size=2, distributed={"strategy": strategy}, save_steps=1, save_total_limit=0,
                  **{**STEPS, "max_steps": 3, "lora_dropout": 0.1})
    full_dir, cut_dir = folder / f"{strategy}-full", folder / f"{strategy}-cut"
    full = write_recipe(folder, tiny_model_dir, data, name=f"{strategy}-full.yaml", output_dir=str(full_dir), **common)
    done = torchrun("-m", "ftclip", "train", str(full))
    assert done.returncode == 0, done.stderr[-3000:]
    cut = write_recipe(folder, tiny_model_dir, data, name=f"{strategy}-cut.yaml", output_dir=str(cut_dir), **common)
    shutil.copytree(full_dir, cut_dir)  # the same run, to be cut back and resumed
    (cut_dir / "adapter" / "adapter_model.safetensors").unlink()
    checkpoints = cut_dir / "checkpoints"
    if strategy == "fsdp":  # sharded weights and optimizer state, one file per rank
        assert len(list((checkpoints / "step-1" / "sharded").glob("*.distcp"))) == 2
    for step in (2, 3):  # roll back to step 1, as if killed there
        shutil.rmtree(checkpoints / f"step-{step}")
    (checkpoints / "latest").write_text("step-1")
    resumed = torchrun("-m", "ftclip", "train", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout
    assert per_step(cut_dir, "loss") == per_step(full_dir, "loss")
    ours = load_file(cut_dir / "adapter" / "adapter_model.safetensors")
    theirs = load_file(full_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    one_rank = subprocess.run([sys.executable, "-m", "ftclip", "train", str(cut)], capture_output=True, text=True,
                              timeout=300)
    assert one_rank.returncode == 2 and "written by a run of 2 process(es)" in one_rank.stderr


SIGNAL_ONE_RANK = textwrap.dedent("""
    import os, signal, sys
    import ftclip.clip as clip
    from ftclip.cli import app
    count = {"n": 0}
    real = clip.GradientClipper.optimizer_step
    def hooked(self, outcome):
        real(self, outcome)
        count["n"] += 1
        if count["n"] == 2 and os.environ["RANK"] == "1":  # only rank 1 hears it, as with a stray kill
            os.kill(os.getpid(), signal.SIGINT)
    clip.GradientClipper.optimizer_step = hooked
    app(["train", sys.argv[1]], prog_name="ftclip")
""")


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step(single_process, tiny_model_dir, tmp_path):
    from conftest import write_recipe

    _, folder, data = single_process
    path = write_recipe(folder, tiny_model_dir, data, name="signal.yaml", micro_batch_size=2,
                        output_dir=str(folder / "signal"), **{**STEPS, "max_steps": 5})
    script = tmp_path / "signal_one_rank.py"
    script.write_text(SIGNAL_ONE_RANK)
    done = torchrun(str(script), str(path))
    assert done.returncode != 0  # torchrun reports the workers' exit 130 as a failure of its own
    assert "exitcode: 130" in done.stderr or "exitcode  : 130" in done.stderr
    assert done.stderr.count("stopped by SIGINT after step 2") == 1  # rank 0 speaks, naming rank 1's signal
    checkpoints = folder / "signal" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-2"
    assert json.loads((checkpoints / "step-2" / "trainer_state.json").read_text())["world_size"] == 2
