"""Nodes, GPUs, which GPU sits on which node, and the link figures the cost model uses."""
from __future__ import annotations

import dataclasses
import functools
import os
import socket
from dataclasses import dataclass, field

import torch

from grace_ds.errors import GraceInputError


@dataclass(frozen=True)
class LinkModel:
    """Alpha-beta figures for the cost model; defaults follow the paper's testbed (NVLink + 25 Gbit/s)."""

    intra_node_bandwidth_GBps: float = 150.0  # per GPU and direction (NVLink)
    inter_node_bandwidth_Gbps: float = 25.0  # per node NIC and direction, shared by its GPUs
    intra_node_latency_us: float = 8.0  # per all-to-all stage inside a node
    inter_node_latency_us: float = 30.0  # per all-to-all stage across nodes
    expert_tflops: float = 250.0  # achieved bf16 expert GEMM rate per GPU
    # Fixed cost of one MoE layer whatever its traffic (kernel launches, host syncs, every collective's
    # start-up): what a few tokens take (every expert one pair from every GPU); measured by
    # scripts/bench_gpu.py, 0 when unknown.
    layer_overhead_us: float = 0.0
    hop_overhead_us: float = 0.0  # what the hierarchical mode's second hop adds to that fixed cost
    gather_overhead_us: float = 0.0  # the gather exchange's fixed cost in place of layer_overhead_us, 0: the same
    # Of the fixed cost, the host time after the layer's last wait for the device (launches that overlap
    # the device's work once there is work; measured with the fixed cost, 0 when unknown). The gather
    # exchange has none to overlap: on a GPU it is one CUDA graph, launched at that time's end.
    layer_host_tail_us: float = 0.0  # flat
    hierarchical_host_tail_us: float = 0.0
    # Same-node stages that run alone (hierarchical hop 2, the gather's in-node stages), when the runtime
    # gives them a process group of the node (node_groups); 0: intra_node_bandwidth_GBps, as over the
    # job's group.
    fanout_bandwidth_GBps: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            may_be_zero = f.name.endswith(("_overhead_us", "_host_tail_us")) or f.name == "fanout_bandwidth_GBps"
            if not (isinstance(value, (int, float)) and value == value and (value > 0 or (may_be_zero and value == 0))):
                raise GraceInputError(f"link model: {f.name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Topology:
    """GPUs numbered node by node: GPU g of node n is global rank sum(gpus_per_node[:n]) + g."""

    gpus_per_node: tuple[int, ...]
    links: LinkModel = field(default_factory=LinkModel)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus_per_node", tuple(int(g) for g in self.gpus_per_node))
        if not self.gpus_per_node or any(g < 1 for g in self.gpus_per_node):
            raise GraceInputError(f"topology: every node needs at least one GPU, got {list(self.gpus_per_node)}")

    @classmethod
    def uniform(cls, num_nodes: int, gpus_per_node: int, links: LinkModel | None = None) -> "Topology":
        if num_nodes < 1 or gpus_per_node < 1:
            raise GraceInputError(f"topology: nodes and GPUs per node must be >= 1, got {num_nodes} x {gpus_per_node}")
        return cls((gpus_per_node,) * num_nodes, links or LinkModel())

    @property
    def num_nodes(self) -> int:
        return len(self.gpus_per_node)

    @property
    def num_gpus(self) -> int:
        return sum(self.gpus_per_node)

    @functools.cached_property  # frozen dataclass: computed once, kept in __dict__
    def node_of_gpu(self) -> torch.Tensor:
        """[P] int64: node index of each global GPU."""
        return torch.repeat_interleave(torch.arange(self.num_nodes), torch.tensor(self.gpus_per_node))

    @functools.cached_property
    def first_gpu_of_node(self) -> torch.Tensor:
        """[N] int64: global index of each node's first GPU."""
        counts = torch.tensor(self.gpus_per_node)
        return torch.cumsum(counts, 0) - counts

    @functools.cached_property
    def local_index_of_gpu(self) -> torch.Tensor:
        """[P] int64: a GPU's index inside its node (its peer on another node has the same index)."""
        return torch.arange(self.num_gpus) - self.first_gpu_of_node[self.node_of_gpu]

    def peer_of(self, gpu: int | torch.Tensor, node: int | torch.Tensor) -> int | torch.Tensor:
        """The GPU of `node` with `gpu`'s local index (modulo that node's size when nodes differ): where the
        hierarchical exchanges send what `gpu` has for `node`. Ints, or int64 tensors that broadcast."""
        sizes = torch.tensor(self.gpus_per_node)
        peer = self.first_gpu_of_node[node] + self.local_index_of_gpu[gpu] % sizes[node]
        return int(peer) if isinstance(gpu, int) and isinstance(node, int) else peer

    @functools.cached_property
    def peer_table(self) -> torch.Tensor:
        """[P, N] int64: peer_of(gpu, node) for every GPU and node (the planners' cost model looks it up for
        every candidate placement they score)."""
        return self.peer_of(torch.arange(self.num_gpus).view(-1, 1), torch.arange(self.num_nodes).view(1, -1))

    def gpus_of_node(self, node: int) -> list[int]:
        start = int(self.first_gpu_of_node[node])
        return list(range(start, start + self.gpus_per_node[node]))

    def describe(self) -> str:
        """'2 nodes x 4 GPUs', '1 node x 1 GPU', '2 nodes with [4, 2] GPUs'."""
        nodes = f"{self.num_nodes} node{'' if self.num_nodes == 1 else 's'}"
        if len(set(self.gpus_per_node)) == 1:
            gpus = self.gpus_per_node[0]
            return f"{nodes} x {gpus} GPU{'' if gpus == 1 else 's'}"
        return f"{nodes} with {list(self.gpus_per_node)} GPUs"

    def to_dict(self) -> dict:
        return {"gpus_per_node": list(self.gpus_per_node), "links": dataclasses.asdict(self.links)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "topology") -> "Topology":
        if not isinstance(data, dict) or "gpus_per_node" not in data:
            raise GraceInputError(f"{source}: needs a 'gpus_per_node' list")
        gpus = data["gpus_per_node"]
        if not isinstance(gpus, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in gpus):
            raise GraceInputError(f"{source}: 'gpus_per_node' must be a list of integers, got {gpus!r}")
        links = data.get("links", {})
        known = {f.name for f in dataclasses.fields(LinkModel)}
        if not isinstance(links, dict) or set(links) - known:
            raise GraceInputError(f"{source}: 'links' may only hold {sorted(known)}, got {links!r}")
        return cls(tuple(gpus), LinkModel(**links))

    @classmethod
    def from_launcher_env(cls, world_size: int, links: LinkModel | None = None) -> "Topology | None":
        """Topology from the deepspeed launcher's CROSS_SIZE / LOCAL_SIZE (ranks contiguous per node)."""
        cross_size, local_size = os.environ.get("CROSS_SIZE"), os.environ.get("LOCAL_SIZE")
        if cross_size is None or local_size is None:
            return None
        nodes, per_node = int(cross_size), int(local_size)
        if nodes * per_node != world_size:
            raise GraceInputError(
                f"launcher environment: CROSS_SIZE={nodes} x LOCAL_SIZE={per_node} != world size {world_size}")
        return cls.uniform(nodes, per_node, links)

    @classmethod
    def from_hostnames(cls, hostnames: list[str], links: LinkModel | None = None) -> "Topology":
        """Topology from every rank's host name (rank order); ranks of one host must be contiguous."""
        counts: list[int] = []
        seen: list[str] = []
        for name in hostnames:
            if seen and seen[-1] == name:
                counts[-1] += 1
            elif name in seen:
                raise GraceInputError(f"ranks of host {name!r} are not contiguous: {hostnames}")
            else:
                seen.append(name)
                counts.append(1)
        return cls(tuple(counts), links or LinkModel())

    @classmethod
    def discover(cls, group=None, links: LinkModel | None = None) -> "Topology":
        """The running job's topology: launcher variables, else an all-gather of host names."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        found = cls.from_launcher_env(world, links)
        if found is not None:
            return found
        # Fixed-size byte tensors, not all_gather_object: nothing is pickled between ranks.
        name = os.environ.get("GRACE_HOSTNAME", socket.gethostname()).encode()[:255]
        from grace_ds.faults import all_gather_tensor, collective_device

        mine = torch.zeros(256, dtype=torch.uint8, device=collective_device(group))
        mine[: len(name)] = torch.tensor(list(name), dtype=torch.uint8)

        everyone = all_gather_tensor(mine, "topology discovery (host names)", group)
        names = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in everyone]
        return cls.from_hostnames(names, links)
