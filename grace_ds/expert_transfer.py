"""Moving expert weights between GPUs for a plan change, point to point, while serving goes on.

Each moved copy is fetched from a GPU that holds that expert under the served plan (same node as the
receiver when one does; among several, the one with the fewest sends so far). Its weights travel as one
flat buffer cut into chunks, as non-blocking sends and receives on their own process group (on CUDA
from a side stream), so they overlap the forwards that keep using the served plan; received weights wait
in fresh buffers until every rank switches at the same step boundary.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from grace_ds import faults
from grace_ds.plan import PlacementPlan
from grace_ds.planners.incremental import Move

DEFAULT_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Transfer:
    layer: int
    expert: int
    source_gpu: int
    target_gpu: int
    target_slot: int


def schedule_transfers(plan: PlacementPlan, moves: list[Move]) -> list[Transfer]:
    """One transfer per move into `plan` (the served plan), from a GPU that holds the expert now."""
    node_of_gpu = plan.topology.node_of_gpu.tolist()
    sends = [0] * plan.num_gpus
    out = []
    for move in moves:
        holders = (plan.slot_expert[move.layer] == move.new_expert).any(1).nonzero().flatten().tolist()
        if not holders:
            raise ValueError(f"layer {move.layer}: expert {move.new_expert} has no copy to fetch from")
        # A copy that only changes slots on its GPU is copied there (several moves of one re-plan can
        # overwrite it in one slot and want it in another).
        source = min(holders, key=lambda g: (g != move.gpu, node_of_gpu[g] != node_of_gpu[move.gpu], sends[g], g))
        sends[source] += source != move.gpu
        out.append(Transfer(move.layer, move.new_expert, source, move.gpu, move.slot))
    return out


class ExpertTransfer:
    """This rank's part of a list of transfers (the same list on every rank). `start` posts the sends and
    receives and returns at once; `wait` blocks until they are done and gives layer -> slot -> weights."""

    def __init__(self, transfers: list[Transfer], rank: int, plan: PlacementPlan, slot_modules: dict,
                 group=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.transfers, self.rank, self.plan, self.slot_modules = transfers, rank, plan, slot_modules
        self.group, self.chunk_bytes = group, chunk_bytes
        self._works: list = []
        self._received: list[tuple[Transfer, torch.Tensor]] = []
        self._keep: list[torch.Tensor] = []  # send buffers live until their sends complete
        self.bytes_sent = self.bytes_received = 0
        self._stream = None

    def _slot_of(self, transfer: Transfer) -> int:
        row = self.plan.slot_expert[transfer.layer, transfer.source_gpu]
        return int((row == transfer.expert).nonzero()[0])

    def _chunks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        per_chunk = max(1, self.chunk_bytes // flat.element_size())
        return list(flat.split(per_chunk))

    def _flat_weights(self, module, transfer: Transfer) -> torch.Tensor:
        """The source slot's gate_up and down, as one contiguous buffer."""
        gate_up, down = module.slot_weights(self._slot_of(transfer))
        return torch.cat([gate_up.detach().reshape(-1), down.detach().reshape(-1)])

    def _side_stream(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def start(self) -> "ExpertTransfer":
        ops = []
        for transfer in self.transfers:
            if self.rank not in (transfer.source_gpu, transfer.target_gpu):
                continue
            module = self.slot_modules[transfer.layer]
            device = module.gate_up_proj.device
            if device.type == "cuda" and self._stream is None:
                self._stream = torch.cuda.Stream(device)
                self._stream.wait_stream(torch.cuda.current_stream(device))
            with self._side_stream():
                if transfer.source_gpu == transfer.target_gpu:  # same GPU, another slot: a local copy
                    self._received.append((transfer, self._flat_weights(module, transfer)))
                elif transfer.source_gpu == self.rank:
                    flat = self._flat_weights(module, transfer)
                    self._keep.append(flat)
                    self.bytes_sent += flat.numel() * flat.element_size()
                    ops += [dist.P2POp(dist.isend, chunk, transfer.target_gpu, self.group) for chunk in self._chunks(flat)]
                else:
                    two_i, hidden = module.gate_up_proj.shape[1:]
                    flat = torch.empty(two_i * hidden + hidden * (two_i // 2), dtype=module.gate_up_proj.dtype,
                                       device=device)
                    self._received.append((transfer, flat))
                    self.bytes_received += flat.numel() * flat.element_size()
                    ops += [dist.P2POp(dist.irecv, chunk, transfer.source_gpu, self.group) for chunk in self._chunks(flat)]
        if ops:
            with self._side_stream():
                self._works = faults.guarded("online re-planning (posting expert weight transfers)", self.group,
                                             dist.batch_isend_irecv, ops)
        return self

    def wait(self) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        for work in self._works:
            faults.guarded("online re-planning (moving expert weights)", self.group, work.wait)
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        arrived: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for transfer, flat in self._received:
            module = self.slot_modules[transfer.layer]
            two_i, hidden = module.gate_up_proj.shape[1:]
            gate_up = flat[:two_i * hidden].view(two_i, hidden)
            down = flat[two_i * hidden:].view(hidden, two_i // 2)
            arrived.setdefault(transfer.layer, {})[transfer.target_slot] = (gate_up, down)
        self._works, self._keep = [], []
        return arrived
