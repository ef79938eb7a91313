"""Two machines on one host: two torchrun processes (`--nnodes 2 --nproc-per-node 1`), started at the same time,
meeting through a c10d rendezvous on 127.0.0.1, one worker each, gloo on the CPU. With a shared folder the run
equals one process on the same global batch to float32 rounding (tests/tolerances.py) and one node builds the
cache; with a cache folder per node each builds its own and the run is the same; an output_dir per node, or other
data on one node, stops both before the first step; a worker killed with SIGKILL ends the other with a message,
and a restart of both resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_distributed import LOSS_RTOL, NORM_RTOL, SGD_STEP, UPDATE_RTOL, per_step
from tolerances import assert_same_first_lora_sgd_step

from ftclip.recipe import load_recipe
from ftclip.train import train

pytestmark = pytest.mark.slow
RUN_LIMIT_S = 120  # one two-node run of the tiny model takes ~10 s here; a hang fails the test instead of the suite
# Every run here: 3 plain SGD steps (the first one is compared with one process, as in test_distributed.py), a
# checkpoint after each (the killed run resumes from one), and a collective timeout: a lost peer that does not
# close its connections (a network failure, not tested here) still ends the survivor's wait within it.
RUN = {**SGD_STEP, "max_steps": 3, "save_steps": 1, "save_total_limit": 0, "distributed": {"strategy": "ddp", "timeout": 60}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_nodes(*commands: list[str], via_nproc: bool = False) -> list[subprocess.Popen]:
    """One torchrun per command, each a node of one c10d rendezvous (c10d numbers the nodes in the order they
    join, so which command becomes node 0 is not fixed: the tests look at ranks and at what each node wrote).
    via_nproc: each command is `ftclip train ... --nproc 1`, and torchrun takes the rendezvous from PET_* variables."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    nodes = []
    for node, command in enumerate(commands):
        if via_nproc:
            launch = [sys.executable, *command, "--nproc", "1"]
            variables = {"PET_NNODES": "2", "PET_NODE_RANK": str(node), "PET_RDZV_BACKEND": "c10d",
                         "PET_RDZV_ENDPOINT": f"127.0.0.1:{port}"}
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                      "--node-rank", str(node), *rendezvous, *command]
            variables = {}
        nodes.append(subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**env, **variables}))
    return nodes


def finish(nodes: list[subprocess.Popen], limit: float = RUN_LIMIT_S) -> list[subprocess.CompletedProcess]:
    deadline = time.monotonic() + limit
    done = []
    try:
        for node in nodes:
            out, err = node.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    return done


def two_nodes(recipe: Path, *per_node: list[str], via_nproc: bool = False) -> list[subprocess.CompletedProcess]:
    """`ftclip train recipe` on two nodes, each with its own extra arguments (--set ...)."""
    commands = [["-m", "ftclip", "train", str(recipe), *extra] for extra in (per_node or ([], []))]
    return finish(start_nodes(*commands, via_nproc=via_nproc))


def assert_ok(done: list[subprocess.CompletedProcess]) -> None:
    for node in done:
        assert node.returncode == 0, node.stderr[-3000:]


def builds(cache: Path) -> list[dict]:
    return [json.loads(line) for line in (cache / "builds.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """The data, and one process on the global batch the two nodes split (micro_batch_size 4 = 2 nodes × 2)."""
    from conftest import ALPACA, write_jsonl, write_recipe

    folder = tmp_path_factory.mktemp("nodes")
    data = write_jsonl(folder / "alpaca.jsonl", ALPACA)
    path = write_recipe(folder, tiny_model_dir, data, micro_batch_size=4, output_dir=str(folder / "single"),
                        dataset_cache_dir=str(folder / "single-cache"), **{**RUN, "distributed": {}})
    reference = train(load_recipe(path), Console(quiet=True)).output_dir
    return folder, data, reference


@pytest.fixture(scope="module")
def shared_run(setup, tiny_model_dir):
    from conftest import write_recipe

    folder, data, reference = setup
    path = write_recipe(folder, tiny_model_dir, data, name="shared.yaml", micro_batch_size=2,
                        output_dir=str(folder / "shared"), dataset_cache_dir=str(folder / "shared-cache"), **RUN)
    done = two_nodes(path)
    return folder / "shared", folder / "shared-cache", done, path


def test_shared_folder_one_node_builds_and_the_run_equals_one_process(setup, shared_run):
    _, _, reference = setup
    out, cache, done, _ = shared_run
    assert_ok(done)
    # One build, by node 0: node 1 saw node 0's marker in the folder, waited, and reused node 0's entry.
    assert [build["node"] for build in builds(cache)] == [0]
    # The first step, from the same weights: later steps start from weights that already differ by rounding.
    assert per_step(out, "grad_norm")[0] == pytest.approx(per_step(reference, "grad_norm")[0], rel=NORM_RTOL, abs=0)
    assert per_step(out, "loss")[0] == pytest.approx(per_step(reference, "loss")[0], rel=LOSS_RTOL, abs=0)
    assert per_step(out, "clip_coef")[0] < 1 - 100 * NORM_RTOL  # the clip acted: the global norm is the two nodes'
    step_1 = Path("checkpoints", "step-1", "adapter", "adapter_model.safetensors")
    ours, theirs = load_file(out / step_1), load_file(reference / step_1)
    assert_same_first_lora_sgd_step(ours, theirs, UPDATE_RTOL)
    assert sum(node.stdout.count("ftclip run summary") for node in done) == 1  # rank 0 speaks for the run
    assert not list(out.glob(".ftclip-node-*")) and not list(cache.glob(".ftclip-node-*"))  # markers cleaned up


def test_a_cache_folder_per_node_each_builds_its_own_and_the_run_is_the_same(setup, shared_run):
    folder, _, _ = setup
    shared_out, _, _, path = shared_run
    out = folder / "per-node-cache"
    caches = [folder / "cache-a", folder / "cache-b"]
    # Launched as `ftclip train ... --nproc 1` with torchrun's rendezvous options in PET_* variables.
    done = two_nodes(path, *[["--set", f"output_dir={out}", "--set", f"dataset_cache_dir={cache}"] for cache in caches],
                     via_nproc=True)
    assert_ok(done)
    assert [len(builds(cache)) for cache in caches] == [1, 1]
    assert sorted(builds(cache)[0]["node"] for cache in caches) == [0, 1]  # each node built into its own folder
    assert builds(caches[0])[0]["key"] == builds(caches[1])[0]["key"]
    # The same tokens, the same layout, the same arithmetic as the shared run: the same numbers, bit for bit.
    for key in ("loss", "grad_norm", "clip_coef"):
        assert per_step(out, key) == per_step(shared_out, key)
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(shared_out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_an_output_dir_per_node_is_refused_before_the_first_step(setup, shared_run):
    folder, _, _ = setup
    _, _, _, path = shared_run
    outs = [folder / "out-a", folder / "out-b"]
    started = time.monotonic()
    done = two_nodes(path, *[["--set", f"output_dir={out}"] for out in outs])
    assert time.monotonic() - started < RUN_LIMIT_S
    for node in done:
        assert node.returncode != 0
        assert "exitcode  : 2" in node.stderr or "exitcode: 2" in node.stderr  # the workers' own exit: bad input
        assert "is not shared between the nodes: node 1 (" in node.stderr
        assert "cannot see the marker file node 0 (" in node.stderr
    assert not any((out / "metrics.jsonl").exists() for out in outs)  # no step was taken
    assert not any((out / "checkpoints").exists() for out in outs)


def test_other_data_on_one_node_is_refused_naming_the_nodes(setup, shared_run):
    from conftest import ALPACA, write_jsonl

    folder, _, _ = setup
    _, cache, _, path = shared_run
    other = write_jsonl(folder / "other.jsonl", ALPACA[::-1])  # the same records in another order: other tokens
    out = folder / "mismatch"
    done = two_nodes(path, ["--set", f"output_dir={out}"], ["--set", f"output_dir={out}", "--set", f"datasets.0.path={other}"])
    for node in done:
        assert node.returncode != 0
        assert "exitcode  : 2" in node.stderr or "exitcode: 2" in node.stderr
        assert "the nodes would train on different data (node 0 (" in node.stderr
        assert "node 1 (" in node.stderr
    assert not (out / "metrics.jsonl").exists()
    assert len(builds(cache)) == 1  # the shared cache was not rebuilt for the other file


KILLED_AT_STEP_3 = textwrap.dedent("""
    import os, sys, time
    import ftclip.clip as clip
    from ftclip.cli import app

    count = {"n": 0}
    real = clip.GradientClipper.optimizer_step
    def hooked(self, outcome):
        real(self, outcome)
        count["n"] += 1
        if count["n"] == 3 and os.environ["RANK"] == "1":  # step 3: step 2's checkpoint is complete (save_steps 1)
            with open(sys.argv[2] + ".tmp", "w") as handle:
                handle.write(str(os.getpid()))
            os.replace(sys.argv[2] + ".tmp", sys.argv[2])
            time.sleep(600)  # until the test's kill -9
    clip.GradientClipper.optimizer_step = hooked
    app(["train", sys.argv[1]], prog_name="ftclip")
""")


def test_a_node_killed_mid_run_ends_the_other_and_a_restart_resumes_exactly(setup, shared_run, tiny_model_dir, tmp_path):
    from conftest import write_recipe

    folder, data, _ = setup
    # The uninterrupted run is the shared-folder one (every rank's RNG state in a checkpoint: test_distributed.py).
    full_dir = shared_run[0]
    cut_dir = folder / "killed"
    cut = write_recipe(folder, tiny_model_dir, data, name="killed.yaml", micro_batch_size=2, output_dir=str(cut_dir),
                       dataset_cache_dir=str(folder / "shared-cache"), **RUN)
    script, pid_file = tmp_path / "killed_at_step_3.py", tmp_path / "rank1.pid"
    script.write_text(KILLED_AT_STEP_3)
    nodes = start_nodes(*[[str(script), str(cut), str(pid_file)]] * 2)
    deadline = time.monotonic() + RUN_LIMIT_S
    while not pid_file.exists() and time.monotonic() < deadline and all(node.poll() is None for node in nodes):
        time.sleep(0.1)
    assert pid_file.exists(), finish(nodes, 1)[0].stderr[-3000:]
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    killed = time.monotonic()
    done = finish(nodes, limit=60)
    assert time.monotonic() - killed < 60  # both torchruns ended, well before any timeout
    assert all(node.returncode != 0 for node in done)
    stderr = "".join(node.stderr for node in done)
    assert "Signal 9 (SIGKILL) received by PID" in stderr  # torchrun's report on the killed node
    assert "node 0 (" in stderr and "rank 0: lost contact with the other processes of this run" in stderr
    assert f"The last checkpoint is {cut_dir / 'checkpoints' / 'step-2'}" in stderr
    assert (cut_dir / "checkpoints" / "latest").read_text() == "step-2"

    resumed = two_nodes(cut)
    assert_ok(resumed)
    assert "resumed" in "".join(node.stdout for node in resumed)
    assert per_step(cut_dir, "loss") == per_step(full_dir, "loss")
    assert per_step(cut_dir, "grad_norm") == per_step(full_dir, "grad_norm")
    ours = load_file(cut_dir / "adapter" / "adapter_model.safetensors")
    theirs = load_file(full_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
