"""Running past one process with torch.distributed, as launched by `torchrun` (never a launcher of our own).

One `Distributed` object answers the questions the loop asks: am I rank 0 (the only one that prints and
writes), which slice of the global micro-batch is mine, how to skip the gradient reduction on all but the
last micro-batch of a step, and how to wrap the model (DDP, or FSDP2 `fully_shard` per decoder layer).
With WORLD_SIZE unset or 1 every answer is the single-process one and nothing is initialized.

Data: every rank computes the same seeded epoch order; global micro-batch i is the next
micro_batch_size × world_size examples of it, and rank r takes the r-th contiguous slice. So a 2-rank run
sees exactly the batches a 1-rank run with twice the micro_batch_size sees (DistributedSampler's split,
without the sampler), and every rank knows the step's global token count without asking the others.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ftclip.errors import ModelError

if dist.is_available():
    # torch.distributed.nn's functions take `group=group.WORLD` as default arguments, evaluated when the module is
    # first imported, and DDP and FSDP2 import it. Imported after init_process_group, those defaults would hold the
    # default group, so destroy_process_group could not free it and its gloo worker threads would run into
    # interpreter exit (the abort in docs/distributed-teardown.md). Imported here, before any group exists, they
    # hold None.
    import torch.distributed.nn  # noqa: F401


@dataclass
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp
    control_group: object = None  # gloo group for host-side flags (stop requests), whatever the backend
    node_rank: int = 0  # torchrun's GROUP_RANK: which machine (node) of the rendezvous this process runs on
    host: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node(self) -> str:
        """This process's node, as messages name it: "node 1 (gpu-b07)"."""
        return f"node {self.node_rank} ({self.host or socket.gethostname()})"

    @classmethod
    def from_environment(cls, strategy: str, timeout: float | None = None) -> Distributed:
        """timeout: seconds a collective waits for the other processes before it fails (None: torch's default)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        if not dist.is_available():
            raise ModelError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        limit = timedelta(seconds=timeout) if timeout else None
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=limit)
        control = dist.new_group(backend="gloo", timeout=limit) if backend != "gloo" else None
        node_rank = int(os.environ.get("GROUP_RANK", "0"))  # torchrun's node rank, as its rendezvous assigned it
        return cls(world_size, dist.get_rank(), local_rank, strategy, control, node_rank, socket.gethostname())

    def device(self, chosen: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if chosen.type == "cuda" and self.enabled else chosen

    # ------------------------------------------------------------ data

    def local_slice(self, global_batch: list) -> list:
        """This rank's contiguous part of a global micro-batch (sizes differ by at most one)."""
        size, extra = divmod(len(global_batch), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return global_batch[start:start + size + (self.rank < extra)]

    # ------------------------------------------------------------ model

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
            if not layers:
                raise ModelError("strategy: fsdp shards per decoder layer, and this model has no *DecoderLayer modules")
            for layer in layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        # gradient_as_bucket_view stays off: DDP then copies the averaged bucket back into each existing
        # param.grad, which keeps ftclip's flat gradient buffer (param.grad are views into it) intact.
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=False)

    def wrap_from_rank0(self, build, device: torch.device) -> torch.nn.Module:
        """FSDP2 with about one copy of the model per node in host memory: rank 0 reads the weights into host
        memory (`build("host")`), every rank builds the architecture on the meta device (`build("meta")`, no
        weights read) and shards it, and rank 0 broadcasts each full tensor once; every rank keeps only its
        shard, on its device (torch.distributed.checkpoint's set_model_state_dict with broadcast_from_rank0).
        Buffers that are not in the state dict (rotary inv_freq) come from rank 0 too."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        host = build("host") if self.is_main else None
        full_state = host.state_dict() if host is not None else {}
        host_buffers = dict(host.named_buffers()) if host is not None else {}
        del host
        model = self.wrap(build("meta"))
        model.to_empty(device=device)  # storage for this rank's shards and the buffers; filled below
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full_state
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if self.is_main:
                    buffer.copy_(host_buffers[name])
                dist.broadcast(buffer, src=0)
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if self.strategy == "ddp" and self.enabled else model

    def gradient_sync(self, model: torch.nn.Module, sync: bool):
        """Context for one micro-batch's backward: reduce gradients only when `sync` (the step's last)."""
        if not self.enabled:
            return contextlib.nullcontext()
        if self.strategy == "fsdp":
            model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync else model.no_sync()

    # ------------------------------------------------------------ collectives

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def agree_max(self, value: int) -> int:
        """The largest of the ranks' values, on every rank: a signal may reach one rank and not the others,
        and all must stop at the same step (a host-side gloo all-reduce of one integer)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(tensor.item())

    def gather(self, value) -> list:
        """Every rank's `value` (a small picklable host object), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.control_group)
        return gathered

    def from_rank0(self, value):
        """Rank 0's `value` (a small picklable host object) on every rank: one decision every rank follows."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control_group)

    def close(self, wait_for_peers: bool = True) -> None:
        if self.enabled and dist.is_initialized():
            # The barrier: no rank destroys its groups while a peer still waits on a collective, and while this rank
            # waits (without the GIL) gloo's worker threads can release the collectives they finished; a worker that
            # does that during interpreter exit aborts the process (docs/distributed-teardown.md). Skipped on an
            # error path of one rank, whose peers may never arrive. destroy_process_group then joins those workers,
            # unless something still holds the group (FSDP2's DTensor cache does: cli._leave_worker).
            if wait_for_peers:
                dist.barrier(group=self.control_group)
            dist.destroy_process_group()


def gather_objects(value):
    """Every rank's `value`, in rank order, on every rank (small host objects such as RNG states)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
