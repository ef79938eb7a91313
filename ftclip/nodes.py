"""Several machines under one torchrun rendezvous: which folders the nodes share, asked of the filesystem.

Two of ftclip's folders are read on every node. output_dir must be one folder that every node sees: rank 0
alone writes the checkpoints, and every rank reads one back to resume. The tokenized-data cache may be shared or
on each node's own disk; where it is shared, one node builds and the others reuse its entry. Nothing in the
environment says which folders are shared (the same path may be an NFS mount on one node and a local disk on the
next), so ftclip asks: the local rank 0 of a node writes a marker file named by a token fresh for this run, and
the local rank 0 of every node opens the others' markers by name (an open, not a directory listing: a lookup by
name is what network filesystems keep consistent between clients). Every rank gathers every node's answer, so
all ranks decide the same thing.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from ftclip.distributed import Distributed
from ftclip.errors import DataError, OutputError

MARKER = ".ftclip-node-{token}-{node}"


@dataclass(frozen=True)
class NodeView:
    """What one node's local rank 0 found in a folder."""

    node: int
    name: str  # "node 1 (gpu-b07)"
    seen: frozenset[int]  # the nodes whose markers it could open
    problem: str | None = None  # why it could not write its own marker


def folder_views(dist: Distributed, folder: Path, writers: set[int] | None = None) -> list[NodeView]:
    """Each node's view of `folder`, one entry per node, on every rank (a collective: every rank calls it).
    writers: the nodes that leave a marker (None: every node)."""
    token = dist.from_rank0(secrets.token_hex(8))
    marker = folder / MARKER.format(token=token, node=dist.node_rank)
    writes = dist.local_rank == 0 and (writers is None or dist.node_rank in writers)
    problem = None
    if writes:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{token} {dist.node}\n", encoding="utf-8")
        except OSError as error:
            problem = f"cannot write to {folder}: {error.strerror or error}"
    announced = dist.gather((dist.node_rank, writes))  # also the barrier: every marker is written
    nodes = sorted({node for node, _ in announced})
    expected = sorted({node for node, wrote in announced if wrote})
    seen = frozenset()
    if dist.local_rank == 0:
        seen = frozenset(node for node in expected if _holds(folder / MARKER.format(token=token, node=node), token))
    views = dist.gather((dist.node_rank, dist.node, seen, problem) if dist.local_rank == 0 else None)
    if writes and problem is None:  # every node has looked (the gather above waited for all of them)
        with contextlib.suppress(OSError):  # a marker left behind is harmless: its token is this run's alone
            marker.unlink()
    found = {view[0]: NodeView(*view) for view in views if view is not None}
    return [found[node] for node in nodes]


def _holds(marker: Path, token: str) -> bool:
    try:
        return marker.read_text(encoding="utf-8").startswith(token)
    except OSError:
        return False


def names(views: list[NodeView]) -> str:
    return ", ".join(view.name for view in views)


def check_shared_output_dir(dist: Distributed, output_dir: Path) -> None:
    """Every node must see the output_dir rank 0 prepared: stop before training where one does not."""
    if not dist.enabled:
        return
    views = folder_views(dist, output_dir, writers={0})
    first = views[0]
    if first.problem:
        raise OutputError(f"output_dir {output_dir}: {first.name} {first.problem}")
    blind = [view for view in views if 0 not in view.seen]
    if blind:
        raise OutputError(
            f"output_dir {output_dir} is not shared between the nodes: {names(blind)} cannot see the marker file "
            f"{first.name} wrote there. Rank 0 writes the checkpoints and every rank reads one back to resume, so "
            "every node needs the same output_dir: a shared filesystem (NFS, Lustre, a cloud file store) mounted "
            "at the same path on every node."
        )


def cache_builders(dist: Distributed, root: Path) -> dict[int, int]:
    """For each node, the node that builds the tokenized-data cache it reads: itself, or the first node whose
    marker it sees in the cache folder (that node's disk is this node's disk). So on a shared filesystem one
    node builds, and nodes with a folder of their own build theirs at the same time."""
    views = folder_views(dist, root)
    broken = [view for view in views if view.problem]
    if broken:
        raise DataError("dataset_cache_dir: " + "; ".join(f"{view.name} {view.problem}" for view in broken))
    return {view.node: min(view.seen | {view.node}) for view in views}
