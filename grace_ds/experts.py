"""This rank's expert slots, stored fused like transformers 5.x experts, computed as a grouped GEMM."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class SlotExperts(nn.Module):
    """gate_up_proj [U, 2I, H], down_proj [U, H, I] for the U occupied of this rank's S slots;
    slot_expert [S] the logical expert in each slot (-1: empty, holds no weights).
    forward(rows [M, H], slot [M]) -> act(rows W_gate) * (rows W_up) W_down per row; rows with slot -1
    (pairs another rank computes, in the gather exchange) are skipped: their output rows are unspecified."""

    accepts_unrouted = True

    def __init__(self, slot_expert: torch.Tensor, hidden_size: int, intermediate_size: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        num_slots = int((slot_expert >= 0).sum())
        self.gate_up_proj = nn.Parameter(torch.zeros(num_slots, 2 * intermediate_size, hidden_size, dtype=dtype,
                                                     device=device))
        self.down_proj = nn.Parameter(torch.zeros(num_slots, hidden_size, intermediate_size, dtype=dtype, device=device))
        self._set_slots(slot_expert.long().cpu())
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, slot_expert: torch.Tensor,
                   act_fn: Callable[[torch.Tensor], torch.Tensor]) -> "SlotExperts":
        """Copy the slots' experts out of all experts' fused tensors [E, 2I, H] and [E, H, I]."""
        num_experts, two_i, hidden = gate_up_proj.shape
        module = cls(slot_expert, hidden, two_i // 2, act_fn, gate_up_proj.dtype, gate_up_proj.device)
        module.load_fused(gate_up_proj, down_proj)
        return module

    def load_fused(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        """Fill the occupied slots from every logical expert's fused weights [E, 2I, H], [E, H, I]."""
        held = self.slot_expert[self.slot_expert >= 0].to(gate_up_proj.device)
        with torch.no_grad():
            self.gate_up_proj.copy_(gate_up_proj[held])
            self.down_proj.copy_(down_proj[held])

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of the expert in slot `slot` (views, no copy)."""
        row = int(self._row_of_slot_host[slot])
        if row < 0:
            raise ValueError(f"slot {slot} is empty")
        return self.gate_up_proj[row], self.down_proj[row]

    def refill(self, slot_expert: torch.Tensor, arrived: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Hold slot_expert [S] from now on: a slot whose expert is unchanged keeps its weights, the others
        take (gate_up, down) from `arrived` (slot -> weights). New parameter tensors replace the old ones."""
        slot_expert = slot_expert.long().cpu()
        old = self.slot_expert.cpu()
        changed = [s for s in range(slot_expert.numel()) if int(slot_expert[s]) >= 0 and int(slot_expert[s]) != int(old[s])]
        missing = [s for s in changed if s not in arrived]
        if missing:
            raise ValueError(f"slots {missing} change expert but no weights arrived for them")
        used = (slot_expert >= 0).nonzero().flatten().tolist()
        gate_up, down = [], []
        with torch.no_grad():
            for s in used:
                source = arrived[s] if s in changed else self.slot_weights(s)
                gate_up.append(source[0].to(self.gate_up_proj.device, self.gate_up_proj.dtype))
                down.append(source[1].to(self.down_proj.device, self.down_proj.dtype))
            shape_gu, shape_dn = self.gate_up_proj.shape[1:], self.down_proj.shape[1:]
            new_gu = torch.stack(gate_up) if used else self.gate_up_proj.new_zeros((0, *shape_gu))
            new_dn = torch.stack(down) if used else self.down_proj.new_zeros((0, *shape_dn))
        self._set_slots(slot_expert)
        self.gate_up_proj = nn.Parameter(new_gu, requires_grad=self.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(new_dn, requires_grad=self.down_proj.requires_grad)

    @property
    def capturable(self) -> bool:
        """Whether a forward can go into a CUDA graph: torch's grouped GEMM keeps group sizes on the device
        only for bf16 on Hopper/Blackwell; elsewhere it reads them on the host."""
        weight = self.gate_up_proj
        return (_HAS_GROUPED_MM and weight.is_cuda and weight.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(weight.device)[0] in (9, 10))

    def _set_slots(self, slot_expert: torch.Tensor) -> None:
        used = slot_expert >= 0
        row_of_slot = torch.full_like(slot_expert, -1, dtype=torch.long)
        row_of_slot[used] = torch.arange(int(used.sum()))
        device = self.gate_up_proj.device
        self._row_of_slot_host = row_of_slot.cpu()
        self.register_buffer("row_of_slot", row_of_slot.to(device), persistent=False)
        self.register_buffer("slot_expert", slot_expert.clone().long().to(device), persistent=False)

    def forward(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        num_slots = self.gate_up_proj.shape[0]
        routed = slot >= 0
        slot = torch.where(routed, self.row_of_slot[slot.clamp(min=0)], num_slots)  # skipped rows sort last
        order = torch.argsort(slot, stable=True)
        x = rows[order]
        # scatter_add, not bincount: bincount reads its input's max on the host (a device sync).
        counts = torch.zeros(num_slots + 1, dtype=torch.long, device=slot.device)
        counts = counts.scatter_add_(0, slot, torch.ones_like(slot))[:num_slots]
        if _HAS_GROUPED_MM and x.shape[0] > 0 and x.dtype in (torch.float32, torch.bfloat16):
            offs = torch.cumsum(counts, 0).to(torch.int32)  # rows past offs[-1] (skipped) are left out
            gate, up = F.grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            out = F.grouped_mm(self.act_fn(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        else:  # a loop over slots where grouped GEMM is missing
            out = x.new_empty(x.shape)
            for s, (start, end) in enumerate(zip((torch.cumsum(counts, 0) - counts).tolist(), torch.cumsum(counts, 0).tolist())):
                if end > start:
                    gate, up = F.linear(x[start:end], self.gate_up_proj[s]).chunk(2, dim=-1)
                    out[start:end] = F.linear(self.act_fn(gate) * up, self.down_proj[s])
        result = torch.empty_like(out)
        result[order] = out
        return result
