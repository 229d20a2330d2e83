"""A process group per node, for the exchanges that stay inside one: hierarchical hop 2's fan-out and the
gather exchange's in-node stages.

Over the job's group those all-to-alls include every rank, those on other nodes with nothing to send: each
waits on the slowest link even when nothing crosses it (on 4x H200 as 2 logical nodes x 2, a same-node
all-to-all over the world group reached 21.9 GB/s with 100 us start-up, far below NVLink). A group of the
node's ranks alone keeps them off the node link.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from grace_ds import faults
from grace_ds.topology import Topology


@dataclass(frozen=True)
class NodeGroup:
    """This rank's node as a process group: ranks `first` .. `first + size - 1` of the exchange's numbering
    (the topology's GPU indices), this rank `local` among them."""

    group: object
    first: int
    size: int
    local: int

    def to_local(self, gpu):
        """The topology's GPU index (an int or a tensor of them, all on this node) -> index in the group."""
        return gpu - self.first


_MADE: dict[tuple, NodeGroup] = {}


def make_node_group(topology: Topology, rank: int, group=None) -> NodeGroup:
    """This rank's NodeGroup; `rank` is its index in `group` (None: the job's), whose ranks are the
    topology's GPUs in order; faults stop it within `group`'s fault timeout. Every rank of `group` calls
    it (each creates its own node's group with the node's other ranks, once per group and topology)."""
    key = (group, topology.gpus_per_node, rank)
    if key in _MADE:  # every runtime of a job on the same group and nodes shares one
        return _MADE[key]
    members = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    if len(members) != topology.num_gpus:
        raise ValueError(f"the exchange group has {len(members)} ranks, the topology {topology.num_gpus} GPUs")
    node = int(topology.node_of_gpu[rank])
    first, size = int(topology.first_gpu_of_node[node]), topology.gpus_per_node[node]
    created = faults.fault_group(faults.timeout_of(group), members[first:first + size], members_only=True)
    _MADE[key] = NodeGroup(created, first, size, rank - first)
    return _MADE[key]
