"""This rank's expert slots, stored fused like transformers 5.x experts, computed as a grouped GEMM."""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from grace_ds.errors import GraceInputError

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


class SlotExperts(nn.Module):
    """gate_up_proj [U, 2I, H], down_proj [U, H, I] for the U occupied of this rank's S slots;
    slot_expert [S] the logical expert in each slot (-1: empty, holds no weights).
    forward(rows [M, H], slot [M]) -> act(rows W_gate) * (rows W_up) W_down per row; rows with slot -1
    (pairs another rank computes, in the gather exchange) are skipped: their output rows are unspecified.
    weighted_sum(rows, pair_row, pair_slot, pair_weight): the same per (token, expert) pair, weighted and
    summed per row, without forward's copies (what the exchanges call)."""

    def __init__(self, slot_expert: torch.Tensor, hidden_size: int, intermediate_size: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self._allocate(slot_expert.long().cpu(), hidden_size, intermediate_size, dtype, torch.device(device))
        self._set_slots(slot_expert.long().cpu(), torch.device(device))
        self.act_fn = act_fn

    def _allocate(self, slot_expert: torch.Tensor, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                  device: torch.device) -> None:
        num_slots = int((slot_expert >= 0).sum())
        self.gate_up_proj = nn.Parameter(torch.zeros(num_slots, 2 * intermediate_size, hidden_size, dtype=dtype,
                                                     device=device))
        self.down_proj = nn.Parameter(torch.zeros(num_slots, hidden_size, intermediate_size, dtype=dtype, device=device))

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
        self._set_slots(slot_expert, new_gu.device)
        self.gate_up_proj = nn.Parameter(new_gu, requires_grad=self.gate_up_proj.requires_grad)
        self.down_proj = nn.Parameter(new_dn, requires_grad=self.down_proj.requires_grad)

    @property
    def capturable(self) -> bool:
        """Whether a forward can go into a CUDA graph: torch's grouped GEMM keeps group sizes on the device
        only for bf16 on Hopper/Blackwell; elsewhere it reads them on the host."""
        weight = self.gate_up_proj
        return (_HAS_GROUPED_MM and weight.is_cuda and weight.dtype == torch.bfloat16
                and torch.cuda.get_device_capability(weight.device)[0] in (9, 10))

    def _set_slots(self, slot_expert: torch.Tensor, device: torch.device) -> None:
        used = slot_expert >= 0
        row_of_slot = torch.full_like(slot_expert, -1, dtype=torch.long)
        row_of_slot[used] = torch.arange(int(used.sum()))
        self._row_of_slot_host = row_of_slot.cpu()
        self.register_buffer("row_of_slot", row_of_slot.to(device), persistent=False)
        self.register_buffer("slot_expert", slot_expert.clone().long().to(device), persistent=False)

    def num_occupied(self) -> int:
        return int((self._row_of_slot_host >= 0).sum())

    def slot_order(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order that groups rows by slot, skipped rows (slot -1) last; rows per occupied slot [U])."""
        num_slots = self.num_occupied()
        group = torch.where(slot >= 0, self.row_of_slot[slot.clamp(min=0)], num_slots)
        # scatter_add, not bincount: bincount reads its input's max on the host (a device sync).
        counts = torch.zeros(num_slots + 1, dtype=torch.long, device=slot.device)
        counts = counts.scatter_add_(0, group, torch.ones_like(group))[:num_slots]
        return torch.argsort(group, stable=True), counts

    def grouped(self, x: torch.Tensor, counts: torch.Tensor, params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x [M, H] grouped by slot (counts[u] rows for occupied slot u, then skipped rows) -> [M, H]; the
        skipped rows' outputs are unspecified. `params` ([gate_up, down], as slot_tensors()) stand in for
        the parameters (training ties replicas through them: grace_ds.replica_sync)."""
        gate_up_proj, down_proj = params if params is not None else (self.gate_up_proj, self.down_proj)
        if _HAS_GROUPED_MM and x.shape[0] > 0 and x.dtype in (torch.float32, torch.bfloat16):
            offs = torch.cumsum(counts, 0).to(torch.int32)  # rows past offs[-1] (skipped) are left out
            gate, up = F.grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            return F.grouped_mm(self.act_fn(gate) * up, down_proj.transpose(1, 2), offs=offs)
        out = x.new_empty(x.shape)  # a loop over slots where grouped GEMM is missing
        for s, (start, end) in enumerate(zip((torch.cumsum(counts, 0) - counts).tolist(), torch.cumsum(counts, 0).tolist())):
            if end > start:
                gate, up = F.linear(x[start:end], gate_up_proj[s]).chunk(2, dim=-1)
                out[start:end] = F.linear(self.act_fn(gate) * up, down_proj[s])
        return out

    # ---- what replica training needs (grace_ds.replica_sync) ------------------------------------
    def slot_tensors(self) -> list[torch.Tensor]:
        """The parameters every slot's computation reads: [gate_up_proj, down_proj]."""
        return [self.gate_up_proj, self.down_proj]

    def copy_views(self, tensors: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
        """Views of `tensors` (shaped as slot_tensors(): the parameters, or their gradients) that belong
        to the copy in local slot `slot`."""
        row = int(self._row_of_slot_host[slot])
        return [tensor[row] for tensor in tensors]

    def bind(self, params: list[torch.Tensor]) -> "BoundSlotExperts":
        """The same expert computation reading `params` in place of the parameters."""
        return BoundSlotExperts(self, params)

    def forward(self, rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        order, counts = self.slot_order(slot)
        out = self.grouped(rows[order], counts)
        result = torch.empty_like(out)
        result[order] = out
        return result

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False,
                     params: list[torch.Tensor] | None = None) -> torch.Tensor:
        """rows [R, H]; per (token, expert) pair its row, local slot (-1: another rank computes it, skipped)
        and routing weight. Returns sum over pairs of weight * expert(row) per row, [R, H] in rows' dtype.
        Permute and unpermute are fused into index maps: the rows are gathered once, straight into slot
        order (no pair-ordered copy first, no copy back as in forward). pairs_by_row (the pairs come sorted
        by row, as every exchange delivers them): the outputs return by one sparse-times-dense product (a
        CSR matrix of the weights, a row per row and a column per slot-ordered output) from
        SPARSE_SUM_MIN_PAIRS pairs on, where the sparse kernels take the dtype and nothing needs a gradient;
        otherwise by one gather into pair order and a sum over each row's contiguous pairs; both without
        atomics. Pairs in any order: one weighted scatter-add in float32 (atomic adds: slower on a GPU).
        `params`: as in grouped."""
        order, counts = self.slot_order(pair_slot)
        gathered = rows[pair_row[order]]
        out = self.grouped(gathered, counts) if params is None else self.grouped(gathered, counts, params=params)
        num_rows = rows.shape[0]
        routed = pair_slot >= 0
        if pairs_by_row:
            position = torch.empty_like(order)
            position[order] = torch.arange(order.numel(), device=order.device)
            per_row = torch.zeros(num_rows, dtype=torch.long, device=rows.device)
            per_row = per_row.scatter_add_(0, pair_row, torch.ones_like(pair_row))
            if _sparse_sum_applies(out, pair_weight):
                return _row_sums_by_sparse_product(out, position, per_row, pair_weight, routed)
            # Skipped pairs' outputs are unspecified (maybe not finite): zeroed, not weighted by 0.
            per_pair = torch.where(routed.unsqueeze(-1), out[position] * pair_weight.unsqueeze(-1).to(out.dtype), 0)
            return torch.segment_reduce(per_pair, "sum", lengths=per_row, unsafe=True)  # unsafe: no host check
        # Skipped pairs land on a spare row.
        into = torch.where(routed, pair_row, num_rows)[order]
        weighted = out * pair_weight[order].float().unsqueeze(-1)  # float32, in one pass
        summed = torch.zeros((num_rows + 1, rows.shape[1]), dtype=torch.float32, device=rows.device)
        return summed.index_add_(0, into, weighted)[:num_rows].to(rows.dtype)


class _SlotWeights(nn.Module):
    """One slot's expert: gate_up_proj [2I, H], down_proj [H, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(2 * intermediate_size, hidden_size, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.zeros(hidden_size, intermediate_size, dtype=dtype, device=device))


class EmptySlot(nn.Module):
    """An unused slot: no weights, one zero-size buffer, so that DeepSpeed's expert checkpointing writes
    (and later finds) a file for every slot id."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unused", torch.zeros(0))


class PerSlotExperts(SlotExperts):
    """SlotExperts whose copies are separate parameters, one module per slot (`deepspeed_experts.<slot>`),
    as DeepSpeed's MoE training expects them (a checkpoint file per slot, ZeRO and clipping per expert
    parameter). The grouped GEMM reads them stacked: a copy of the slots' weights per call, the price of
    training through DeepSpeed's own expert machinery. Serving keeps SlotExperts' one fused tensor."""

    def _allocate(self, slot_expert: torch.Tensor, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                  device: torch.device) -> None:
        self.deepspeed_experts = nn.ModuleDict(
            {str(s): _SlotWeights(hidden_size, intermediate_size, dtype, device) if int(e) >= 0 else EmptySlot()
             for s, e in enumerate(slot_expert.tolist())})

    def _occupied_modules(self) -> list[_SlotWeights]:
        return [self.deepspeed_experts[str(s)] for s in (self._row_of_slot_host >= 0).nonzero().flatten().tolist()]

    @property
    def gate_up_proj(self) -> torch.Tensor:  # [U, 2I, H], stacked (a copy)
        return torch.stack([m.gate_up_proj for m in self._occupied_modules()])

    @property
    def down_proj(self) -> torch.Tensor:  # [U, H, I], stacked (a copy)
        return torch.stack([m.down_proj for m in self._occupied_modules()])

    def load_fused(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> None:
        held = self.slot_expert[self.slot_expert >= 0].tolist()
        with torch.no_grad():
            for module, expert in zip(self._occupied_modules(), held):
                module.gate_up_proj.copy_(gate_up_proj[expert])
                module.down_proj.copy_(down_proj[expert])

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        if int(self._row_of_slot_host[slot]) < 0:
            raise ValueError(f"slot {slot} is empty")
        module = self.deepspeed_experts[str(slot)]
        return module.gate_up_proj, module.down_proj

    def refill(self, *unused) -> None:
        raise GraceInputError("experts held for DeepSpeed training (one module per slot) do not re-plan online")

    @property
    def capturable(self) -> bool:
        return False

    def slot_tensors(self) -> list[torch.Tensor]:
        return [p for module in self._occupied_modules() for p in (module.gate_up_proj, module.down_proj)]

    def copy_views(self, tensors: list[torch.Tensor], slot: int) -> list[torch.Tensor]:
        row = int(self._row_of_slot_host[slot])
        return list(tensors[2 * row:2 * row + 2])

    def bind(self, params: list[torch.Tensor]) -> "BoundSlotExperts":
        return BoundSlotExperts(self, [torch.stack(params[0::2]), torch.stack(params[1::2])])

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False,
                     params: list[torch.Tensor] | None = None) -> torch.Tensor:
        if params is None:
            params = [self.gate_up_proj, self.down_proj]
        return super().weighted_sum(rows, pair_row, pair_slot, pair_weight, pairs_by_row, params)


class BoundSlotExperts:
    """A SlotExperts computation reading given tensors in place of its parameters (SlotExperts.bind)."""

    capturable = False  # built per training call, never captured

    def __init__(self, experts: SlotExperts, params: list[torch.Tensor]) -> None:
        self.experts, self.params = experts, params

    def weighted_sum(self, rows: torch.Tensor, pair_row: torch.Tensor, pair_slot: torch.Tensor,
                     pair_weight: torch.Tensor, pairs_by_row: bool = False) -> torch.Tensor:
        return self.experts.weighted_sum(rows, pair_row, pair_slot, pair_weight, pairs_by_row, self.params)

    def slot_tensors(self) -> list[torch.Tensor]:
        return list(self.params)


def _min_pairs_from_env(default: int) -> int:
    text = os.environ.get("GRACE_SPARSE_SUM_MIN_PAIRS", str(default))
    if not text.isdigit():
        raise GraceInputError(f"GRACE_SPARSE_SUM_MIN_PAIRS must be a whole number of pairs, got {text!r}")
    return int(text)


# Fewer pairs than this sum faster by the gather into pair order: the sparse product's set-up (descriptors,
# workspace) costs more than it saves. Measured by `scripts/bench_expert_compute.py`'s sweep on one H200
# (OLMoE prefill pairs, bf16): the gather wins up to 4096 pairs, they are even at 8192, the sparse product
# wins from 16384 (docs/expert-compute-h200.json). Other GPUs cross elsewhere: GRACE_SPARSE_SUM_MIN_PAIRS
# sets it (the sweep says where).
SPARSE_SUM_MIN_PAIRS = _min_pairs_from_env(8192)


def _sparse_sum_applies(out: torch.Tensor, pair_weight: torch.Tensor) -> bool:
    """Whether the per-row sums should be one sparse product: enough pairs (SPARSE_SUM_MIN_PAIRS), torch's
    CSR x dense product computes in the outputs' dtype (CUDA: float32, bfloat16, float16; CPU: float32,
    float64), no gradient is wanted (the pair-order path keeps autograd) and no CUDA graph is being
    captured (the decode graphs keep the path they were measured with)."""
    if out.shape[0] < SPARSE_SUM_MIN_PAIRS:
        return False
    if torch.is_grad_enabled() and (out.requires_grad or pair_weight.requires_grad):
        return False
    if out.is_cuda:
        return out.dtype in (torch.float32, torch.bfloat16, torch.float16) and not torch.cuda.is_current_stream_capturing()
    return out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64)


def _row_sums_by_sparse_product(out: torch.Tensor, position: torch.Tensor, pairs_per_row: torch.Tensor,
                                pair_weight: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """[R, H]: for each row, sum over its pairs (contiguous, pairs sorted by row) of weight * out[position]
    as one CSR [R, Q] x out [Q, H] product: no pair-ordered copy of the outputs, the weights applied in the
    product's accumulation. A skipped pair weighs 0 and reads output row 0, which is computed whenever a
    pair is routed and zeroed here when none is (its outputs, like every skipped one's, are unspecified)."""
    num_rows = pairs_per_row.shape[0]
    if out.shape[0] == 0:
        return out.new_zeros((num_rows, out.shape[1]))
    out[:1] = torch.where(routed.any(), out[:1], 0)
    crow = torch.cat([pairs_per_row.new_zeros(1), torch.cumsum(pairs_per_row, 0)])
    column = torch.where(routed, position, 0)
    weight = torch.where(routed, pair_weight, 0).to(out.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        matrix = torch.sparse_csr_tensor(crow, column, weight, size=(num_rows, out.shape[0]), check_invariants=False)
    return matrix @ out
