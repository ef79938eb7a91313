"""Two gloo processes on the CPU (torchrun) against one process on the same global batch: the same pre-clip
norm and the same weights after the step, for DDP and FSDP2; only rank 0 writes."""

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

from ftclip.recipe import load_recipe
from ftclip.train import train

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# One step of 2 micro-batches: exercises no_sync accumulation, a clipped update and the weights after it.
STEPS = dict(max_steps=1, gradient_accumulation_steps=2, lora_dropout=0.0, learning_rate=1e-2, logging_steps=1,
             gradient_clipping={"mode": "norm", "max_norm": 0.5})


def torchrun(*args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *args],
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
    path = write_recipe(folder, tiny_model_dir, data, micro_batch_size=4, **STEPS)
    result = train(load_recipe(path), Console(quiet=True))
    return result.output_dir, folder, data


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_on_the_same_global_batch(single_process, tiny_model_dir, strategy):
    from conftest import write_recipe

    reference, folder, data = single_process
    cache = folder / f"cache-{strategy}"  # a cold cache: rank 0 tokenizes, rank 1 waits and reads the same files
    path = write_recipe(folder, tiny_model_dir, data, name=f"{strategy}.yaml", micro_batch_size=2,
                        output_dir=str(folder / strategy), distributed={"strategy": strategy},
                        dataset_cache_dir=str(cache), **STEPS)
    done = torchrun("-m", "ftclip", "train", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    builds = [json.loads(line) for line in (cache / "builds.log").read_text().splitlines()]
    assert [build["rank"] for build in builds] == [0]
    out = folder / strategy
    assert per_step(out, "grad_norm") == pytest.approx(per_step(reference, "grad_norm"), rel=1e-5)
    assert per_step(out, "loss") == pytest.approx(per_step(reference, "loss"), rel=1e-5)
    assert per_step(out, "clip_coef")[0] < 1  # the clip really acted
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    # Rank 0 alone writes: one metrics line per step, one summary, one event file.
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert done.stdout.count("ftclip run summary") == 1
    assert len(list((out / "tensorboard").glob("events.*"))) == 1


FLAT_UNDER_DDP = textwrap.dedent("""
    import os, sys, torch
    from ftclip.clip import GradientClipper
    from ftclip.distributed import Distributed
    from ftclip.recipe import GradientClipping
    dist = Distributed.from_environment("ddp")
    torch.manual_seed(0)
    model = dist.wrap(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)))
    clipper = GradientClipper(GradientClipping(max_norm=0.1), list(model.parameters()))
    for micro in range(2):  # accumulation: the reduction happens on the second backward only
        with dist.gradient_sync(model, sync=micro == 1):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 * dist.rank + micro))
            model(x).pow(2).mean().backward()
    intact = clipper.flat_grads.intact()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    outcome = clipper.clip()
    with open(f"{sys.argv[1]}/rank-{dist.rank}.txt", "w") as result:  # one file per rank: no interleaved output
        result.write(f"{dist.rank} {intact} {float(outcome.pre_clip_norm)!r} {float(expected)!r}")
    dist.close()
    os._exit(0)  # past torch's gloo teardown, which can abort at interpreter exit (see cli._leave_worker)
""")


def test_flat_gradient_buffer_survives_ddp_and_no_sync(tmp_path):
    script = tmp_path / "flat_ddp.py"
    script.write_text(FLAT_UNDER_DDP)
    done = torchrun(str(script), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    results = [(tmp_path / f"rank-{rank}.txt").read_text().split() for rank in (0, 1)]
    assert sorted(r[0] for r in results) == ["0", "1"]
    for _, intact, norm, expected in results:
        assert intact == "True"  # DDP copied the averaged gradients into ftclip's views, not beside them
        assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert results[0][2] == results[1][2]  # the same global norm on both ranks


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
