"""FSDP2 low-memory loading under two gloo ranks: rank 0 alone reads the weights, rank 1 builds on the meta
device, and the sharded model holds exactly the weights (and buffers) of a plain single-process load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ftclip.modeling import load_model
from ftclip.recipe import load_recipe

pytestmark = pytest.mark.slow

LOAD_FROM_RANK0 = textwrap.dedent("""
    import os, sys, torch, transformers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from ftclip.distributed import Distributed
    from ftclip.modeling import load_model
    from ftclip.recipe import load_recipe

    reads = []
    real = transformers.AutoModelForCausalLM.from_pretrained
    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)
    transformers.AutoModelForCausalLM.from_pretrained = counted

    recipe_path, out = sys.argv[1], sys.argv[2]
    recipe = load_recipe(recipe_path)
    dist = Distributed.from_environment("fsdp")
    torch.manual_seed(0)  # the LoRA initialization rank 0 broadcasts
    device = torch.device("cpu")
    model = dist.wrap_from_rank0(lambda placement: load_model(recipe, device, placement=placement), device)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    torch.save({"reads": len(reads), "state": full, "buffers": buffers, "trainable": trainable},
               f"{out}/rank-{dist.rank}.pt")
    dist.close()
    os._exit(0)  # FSDP2 keeps the gloo group alive past close(): leave before finalization (cli._leave_worker)
""")


@pytest.mark.parametrize("adapter", ["lora", None], ids=["lora", "full"])
def test_meta_device_loading_on_two_ranks_gives_the_weights_of_a_plain_load(make_recipe, tmp_path, adapter):
    path = make_recipe(adapter=adapter, distributed={"strategy": "fsdp"}, device="cpu")
    script = tmp_path / "load_from_rank0.py"
    script.write_text(LOAD_FROM_RANK0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(path), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in (0, 1))
    assert (rank0["reads"], rank1["reads"]) == (1, 0)  # rank 1 never read the weights

    torch.manual_seed(0)
    plain = load_model(load_recipe(path), torch.device("cpu"))
    expected = plain.state_dict()
    assert rank0["state"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(rank0["state"][name], tensor), name
    assert any("lora_A" in name for name in expected) == (adapter == "lora")
    # Buffers outside the state dict (rotary inv_freq) are rank 0's on rank 1, not uninitialized memory.
    plain_buffers = dict(plain.named_buffers())
    for rank in (rank0, rank1):
        assert rank["buffers"].keys() == plain_buffers.keys()
        for name, buffer in plain_buffers.items():
            assert torch.equal(rank["buffers"][name], buffer), name
    assert rank0["trainable"] == rank1["trainable"] == sorted(n for n, p in plain.named_parameters() if p.requires_grad)
