"""Several logical nodes on one host: how a test or benchmark rank joins a job as if its node were real.

GRACE_HOSTNAME names the rank's node for the topology probe, LOCAL_SIZE / CROSS_SIZE tell it like a
launcher would; on CUDA, NCCL_HOSTID makes NCCL see separate hosts (traffic between logical nodes leaves
NVLink) and each node sees only its own GPUs, numbered from 0 as on a real node.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now, for a job's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_logical_node(rank: int, world: int, nodes: int, port: int, device_type: str = "cpu") -> tuple[torch.device, str]:
    """Init the default process group for `rank` of `world` ranks split into `nodes` equal logical nodes
    (gloo on CPU with one intra-op thread; NCCL on CUDA, one GPU a rank). Returns (device, backend)."""
    if world % nodes:
        raise ValueError(f"{world} ranks do not split into {nodes} equal nodes")
    per_node = world // nodes
    hostname = f"node{rank // per_node}"
    os.environ.update(GRACE_HOSTNAME=hostname, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % per_node),
                      LOCAL_SIZE=str(per_node), CROSS_SIZE=str(nodes), OMP_NUM_THREADS="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device_type == "cuda":
        os.environ["NCCL_HOSTID"] = hostname
        first = (rank // per_node) * per_node
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(per_node))
        torch.cuda.set_device(rank % per_node)
        device, backend = torch.device("cuda", rank % per_node), "nccl"
    else:
        torch.set_num_threads(1)
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device, backend
