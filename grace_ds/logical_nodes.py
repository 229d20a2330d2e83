"""Several logical nodes on one host: how a test or benchmark rank joins a job as if its node were real.

GRACE_HOSTNAME names the rank's node for the topology probe, LOCAL_SIZE / CROSS_SIZE tell it like a
launcher would; on CUDA, NCCL_HOSTID makes NCCL see separate hosts (traffic between logical nodes leaves
NVLink) and each node sees only its own GPUs, numbered from 0 as on a real node.
"""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on this host now, for a job's rendezvous. Taken below the ephemeral range: a port
    the kernel hands out (bind to 0) can go to an outgoing connection (NCCL's socket transport opens
    many) before the rendezvous listens on it."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768
    candidates = range(max(1024, first_ephemeral - 12000), first_ephemeral)
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range taken: let the kernel choose
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
